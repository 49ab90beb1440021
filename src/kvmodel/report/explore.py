"""What exploration found: the summary table, findings, replays side by side with bare metal."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvmodel.bugs.catalogue import CATALOGUE
from kvmodel.check.explore import ExploreResult, Finding
from kvmodel.check.oracle import Comparison, guest_view
from kvmodel.check.schedule import describe
from kvmodel.report.text import line_for, print_comparison


def summary_table(results: list[ExploreResult]) -> Table:
    table = Table(title="exploration", show_lines=False)
    for column in ("scenario", "vendor", "schedules", "distinct outcomes", "findings", "known",
                   "time"):
        table.add_column(column, justify="left" if column in ("scenario", "vendor") else "right")
    for r in results:
        findings = str(len(r.findings))
        if r.findings or r.unseen_known:
            findings = f"[bold red]{findings}[/]"
        schedules = f"{r.schedules}" + ("" if r.complete else " [yellow](interrupted)[/]"
                                        if r.interrupted else " [yellow](time limit)[/]")
        if r.limit is not None:
            schedules += f" [bold red]({r.model_limits} limited)[/]" if r.schedules else (
                " [bold red](model limit)[/]")
        if r.not_applicable:
            schedules = "[dim]n/a[/]"
        table.add_row(escape(_short(r.scenario.path)), r.vendor.value, schedules, str(r.distinct), findings,
                      str(len(r.known)), f"{r.elapsed:.2f} s")
    return table


def _short(path: str) -> str:
    """scenarios/virt/x.toml -> virt/x: the table stays readable at 80 columns."""
    p = Path(path)
    return f"{p.parent.name}/{p.stem}"


def print_findings(console: Console, result: ExploreResult,
                   shrunk: list[tuple[Finding, str | None]],
                   known: list[tuple[Finding, str | None]] = ()) -> None:
    for label, found in (("[bold red]FINDING[/]", shrunk), ("[yellow]KNOWN[/]", known)):
        for finding, replay in found:
            console.print(f"{label} {escape(result.scenario.path)} "
                          f"{escape(f'[{result.vendor.value}]')} {finding.kind}: {escape(finding.message)}")
            console.print(f"  schedule: {escape(describe(finding.schedule))}")
            if replay is not None:
                console.print(f"  replay:   kvmodel replay {escape(replay)}")
    for known in result.unseen_known:
        console.print(f"[bold red]FAIL[/] {escape(result.scenario.path)}:{known.line}: the known "
                      f"finding involving {', '.join(known.involves)} did not show up")
    if result.interleavings is not None:
        explored, naive, complete = result.interleavings
        console.print(f"[dim]{escape(result.scenario.path)} {escape(f'[{result.vendor.value}]')}: bare metal "
                      f"{explored} interleavings (choice points where CPUs interact), "
                      f"{'over ' if not complete else ''}{naive} with a choice point at every "
                      f"step; under KVM {result.schedules}[/]", highlight=False)
    if result.deeper is not None:
        d = result.deeper
        where = f"{escape(result.scenario.path)} {escape(f'[{result.vendor.value}]')}"
        over = "over " if not d.complete else ""
        console.print(f"[dim]{where}: bare metal one switch deeper, {over}{d.explored} "
                      f"interleavings, shows {d.matched} of the KVM outcomes the bound did not "
                      f"(dropped as bound artefacts)[/]", highlight=False)
    if result.limit is not None:
        console.print(f"[bold red]MODEL LIMIT[/] {escape(result.scenario.path)} "
                      f"{escape(f'[{result.vendor.value}]')}: {escape(limit_text(result))}")


def limit_text(result: ExploreResult) -> str:
    """What the model could not explore, and why: the limit's message, where it was met."""
    if result.schedules == 0:
        return f"not explored: {result.limit}"
    return (f"{result.model_limits} of {result.schedules} schedules not explored: {result.limit} "
            f"(first in: {describe(result.limit_schedule)})")


def explore_dict(result: ExploreResult, shrunk: list[tuple[Finding, str | None]]) -> dict:
    return {
        "scenario": result.scenario.path,
        "vendor": result.vendor.value,
        "schedules": result.schedules,
        "distinct_outcomes": result.distinct,
        "complete": result.complete,
        "interrupted": result.interrupted,
        "model_limits": result.model_limits,
        "model_limit": result.limit,
        "model_limit_schedule": None if result.limit_schedule is None else [
            p.to_dict() for p in result.limit_schedule],
        "not_applicable": result.not_applicable,
        **({"interleavings": {"explored": result.interleavings[0], "naive": result.interleavings[1],
                              "naive_complete": result.interleavings[2],
                              **({"deeper": {"explored": result.deeper.explored,
                                             "matched": result.deeper.matched,
                                             "complete": result.deeper.complete}}
                                 if result.deeper is not None else {})},
            } if result.interleavings is not None else {}),
        "elapsed_s": round(result.elapsed, 3),
        "findings": [{"kind": f.kind, "message": f.message,
                      "schedule": [p.to_dict() for p in f.schedule], "replay": replay}
                     for f, replay in shrunk],
        "new_findings": len(result.findings),
        "known_findings": len(result.known),
        "unseen_known": [k.line for k in result.unseen_known],
    }


def print_side_by_side(console: Console, comparison: Comparison) -> None:
    """Bare metal and the KVM run, guest-observable entries paired, the first divergence marked."""
    print_comparison(console, comparison)
    if comparison.virt is None:
        return
    bare = [comparison.bare.trace[n] for n, _ in guest_view(comparison.bare.trace)]
    virt = [comparison.virt.trace[n] for n, _ in guest_view(comparison.virt.trace)]
    d = comparison.divergence
    mark = d.index if d is not None and d.index >= 0 else None
    table = Table(title="guest-observable, side by side", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("bare metal")
    table.add_column(f"under KVM ({comparison.virt.vendor.value})")
    program, mode = comparison.bare.program, comparison.bare.scenario.mode
    for n in range(max(len(bare), len(virt))):
        cells = []
        for side in (bare, virt):
            if n < len(side):
                retired, where, what = line_for(side[n], program, mode)
                cells.append(f"{retired:>4} {escape(where)} {what}")
            else:
                cells.append("[dim]-[/]")
        style = "bold red" if n == mark else None
        table.add_row(str(n + 1) + (" <<" if n == mark else ""), *cells, style=style)
    console.print(table)


def print_bugs(console: Console) -> None:
    """The catalogue, one block per bug: too much text for table columns."""
    console.print(f"[bold]{len(CATALOGUE)} catalogued bugs[/] (switch one on with --bug NAME)")
    for bug in CATALOGUE:
        console.print(f"\n[bold]{bug.name}[/] [dim]({', '.join(bug.vendors)}; "
                      f"{escape(bug.scenario)})[/]", highlight=False)
        console.print(f"  {escape(bug.summary)}", highlight=False)
        console.print(f"  [dim]source:[/] {escape(bug.reference)}", highlight=False)
