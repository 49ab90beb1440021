"""The `kvmodel` command: argument parsing and outcome -> exit code, nothing else."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from enum import IntEnum
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvmodel import __version__, _faults
from kvmodel.bugs.catalogue import lookup
from kvmodel.bugs.check import check_all
from kvmodel.check.campaign import Explored, expand, explore_all, vendors_for
from kvmodel.check.differential import Verdict, differential, export, show
from kvmodel.check.explore import Bounds, ExploreResult
from kvmodel.check.oracle import compare
from kvmodel.check.replay import read
from kvmodel.check.schedule import describe
from kvmodel.errors import KvmodelError
from kvmodel.export.qemu import find_qemu, qemu_version
from kvmodel.guest.asm import find_binutils
from kvmodel.kvm.vcpu import Vendor
from kvmodel.report.explore import explore_dict, print_bugs, print_findings, print_side_by_side, summary_table
from kvmodel.report.json import JSON_SCHEMA, document
from kvmodel.report.text import print_comparison, print_result
from kvmodel.report.timeline import timeline_svg
from kvmodel.scenario.load import load
from kvmodel.scenario.runner import run
from kvmodel.scenario.schema import MAX_STEPS


class Exit(IntEnum):
    """Exit codes (STYLE.md lesson 8)."""

    OK = 0  # every expectation holds
    FAILED = 1  # an expectation does not hold
    BAD_INPUT = 2  # malformed scenario, missing tool, or outside what the model covers
    MODEL_BUG = 4  # an internal error: probably a kvmodel bug
    INTERRUPTED = 130  # Ctrl-C: what was found so far is written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmodel",
        description="An executable model of how KVM virtualizes x86 events, checked against "
                    "a bare-metal x86 model (Intel SDM / AMD APM).",
        epilog="Exit codes: 0 all expectations hold, 1 an expectation fails, 2 bad input "
               "(scenario error, missing GNU as, instruction outside the model), "
               "4 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"kvmodel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_p = sub.add_parser(
        "run", help="run scenarios on the bare-metal model and check their expectations",
        description="Run each scenario file (TOML) on the bare-metal x86 model, print its "
                    "trace (deliveries, IRETs, halts, arrivals of NMIs and interrupts) and "
                    "the verdict against the file's [expect] tables.",
    )
    run_p.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario .toml files")
    run_p.add_argument("--json", action="store_true",
                       help="print one JSON document instead of the text trace")
    run_p.add_argument("--instructions", action="store_true",
                       help="also list every retired instruction in the trace")
    run_p.add_argument("--max-steps", type=_steps, metavar="N",
                       help=f"override the scenario's step budget (instructions tried), "
                            f"1..{MAX_STEPS:,}")
    run_p.add_argument("--vendor", choices=[v.value for v in Vendor],
                       help="bare: the bare-metal model; svm/vmx: run under the KVM model on "
                            "AMD SVM / Intel VMX and compare what the guest sees with bare metal "
                            "(default: the scenario's [cpu] vendor, else bare)")
    run_p.add_argument("--bug", action="append", default=[], metavar="NAME",
                       help="switch on a catalogued bug (kvmodel bugs list); repeatable")
    run_p.add_argument("--svg", metavar="FILE",
                       help="also write a timeline picture (SVG) of the run: bare metal beside "
                            "KVM and its exits, the first divergence marked (one scenario only)")
    _explore_parsers(sub)
    _bridge_parsers(sub)
    return parser


def _bridge_parsers(sub) -> None:
    ex = sub.add_parser(
        "export", help="write a scenario as a bootable image for QEMU (multiboot, -kernel)",
        description="Write the scenario's guest, a boot stub that reproduces the model's CPU at "
                    "reset and logging stubs on every IDT vector into DIR: kernel.elf, boot.s and "
                    "run.sh (the QEMU command line; the log goes to debugcon.bin).")
    ex.add_argument("scenario", metavar="SCENARIO")
    ex.add_argument("--out", required=True, metavar="DIR")
    diff = sub.add_parser(
        "differential", help="run scenarios in QEMU and compare with the bare-metal model",
        description="Export each scenario, boot it in QEMU and compare what the guest saw "
                    "(deliveries, port 0xE9 output, how it stopped, final registers, memory) with "
                    "the bare-metal model. Exit 0: every realizable scenario agrees or differs "
                    "only where its [[expect.qemu]] says; 1: a disagreement or QEMU failed; "
                    "2: bad input.")
    diff.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario files or directories")
    diff.add_argument("--qemu", action="store_true", required=True,
                      help="the second opinion is QEMU (the only one so far)")
    diff.add_argument("--accel", choices=["tcg", "kvm"], default="tcg",
                      help="tcg: QEMU's own CPU; kvm: real KVM on this host's VMX/SVM (/dev/kvm)")
    diff.add_argument("--timeout", type=float, default=10.0, metavar="S",
                      help="seconds a scenario may run in QEMU before it is stopped (default 10)")
    diff.add_argument("--out", metavar="DIR",
                      help="keep each scenario's image and QEMU log under DIR (default: temporary)")


def _steps(text: str) -> int:
    """--max-steps: the same range as a scenario's max_steps."""
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= steps <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"{steps} is not in 1..{MAX_STEPS:,}")
    return steps


def _explore_parsers(sub) -> None:
    ex = sub.add_parser(
        "explore", help="try every placement of the choice points and report findings",
        description="For each scenario (or directory of them) and vendor, run every schedule of "
                    "asynchronous happenings within the bounds under KVM and on bare metal, and "
                    "report what the guest saw that bare metal would not have shown it. Findings "
                    "are shrunk and written as replay files. Exit 0: no finding within the "
                    "bounds; 1: findings; 2: bad input, or a model limit stopped (part of) a scenario's "
                    "exploration; 130: interrupted (findings kept).")
    ex.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario files or directories")
    ex.add_argument("--vendor", choices=["svm", "vmx", "both"], default="both")
    ex.add_argument("--max-async", type=int, metavar="N",
                    help="at most N external NMIs/interrupts per schedule (default: 2)")
    ex.add_argument("--max-host", type=int, metavar="N",
                    help="at most N host happenings per schedule: host interrupts, host faults, "
                         "save/restores (default: 2)")
    ex.add_argument("--max-vmm", type=int, metavar="N",
                    help="at most N VMM uAPI calls per schedule, each after any VM exit: those the "
                         "scenario's [explore] vmm lists, or all of them (default: 2 if it lists "
                         "some, else none)")
    ex.add_argument("--max-switches", type=int, metavar="N",
                    help="[cpus] scenarios: switches between CPUs per interleaving, at the points "
                         "where they interact (default 2)")
    ex.add_argument("--workers", type=int, default=1, metavar="N",
                    help="processes to spread each scenario's schedules over")
    ex.add_argument("--time-limit", type=float, metavar="S",
                    help="stop each scenario's search after S seconds, reporting what was covered")
    ex.add_argument("--bug", action="append", default=[], metavar="NAME",
                    help="switch on a catalogued bug (kvmodel bugs list); repeatable")
    ex.add_argument("--out", default="kvmodel-findings", metavar="DIR",
                    help="where replay files go (default: ./kvmodel-findings)")
    ex.add_argument("--known", action="store_true",
                    help="also shrink and write replay files for the findings scenarios declare "
                         "([[explore.known]]), e.g. to report them upstream")
    ex.add_argument("--json", action="store_true", help="one JSON document instead of text")
    rp = sub.add_parser("replay", help="re-run a replay file, side by side with bare metal",
                        description="Re-run the exact schedule of a replay file written by "
                                    "`kvmodel explore`. Exit 1 if the finding shows again, 0 if "
                                    "not, 2 if the scenario changed since.")
    rp.add_argument("replay", metavar="FILE")
    rp.add_argument("--svg", metavar="FILE",
                    help="also write a timeline picture (SVG) of both runs, the divergence marked")
    bugs = sub.add_parser("bugs", help="the catalogue of known KVM bugs the model can switch on")
    bugs_sub = bugs.add_subparsers(dest="bugs_command", required=True, metavar="ACTION")
    bugs_sub.add_parser("list", help="list the catalogued bugs and their references")
    check = bugs_sub.add_parser("check", help="explore each bug's scenario with the bug on")
    check.add_argument("--out", default="kvmodel-findings", metavar="DIR")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    try:
        return _run(args, console)
    except KvmodelError as e:
        console.print(f"[bold red]error[/]: {escape(str(e))}")
        return Exit.BAD_INPUT
    except Exception:  # noqa: BLE001 - report, save, and say it is ours
        with tempfile.NamedTemporaryFile("w", prefix="kvmodel-crash-", suffix=".txt",
                                         delete=False) as f:
            traceback.print_exc(file=f)
        print(f"internal error: this is probably a kvmodel bug; traceback saved to {f.name}",
              file=sys.stderr)
        return Exit.MODEL_BUG


def _run(args: argparse.Namespace, console: Console) -> int:
    find_binutils()  # say how to install GNU as before reading anything
    if args.command == "explore":
        return _explore(args, console)
    if args.command == "replay":
        return _replay(args, console)
    if args.command == "bugs":
        return _bugs(args, console)
    if args.command == "export":
        return _export(args, console)
    if args.command == "differential":
        return _differential(args, console)
    if args.svg is not None and len(args.scenarios) > 1:
        raise KvmodelError(f"--svg draws one scenario; {len(args.scenarios)} were given")
    for name in args.bug:
        lookup(name)
    with _faults.switched_on(frozenset(args.bug)):
        return _run_scenarios(args, console)


def _run_scenarios(args: argparse.Namespace, console: Console) -> int:
    results, errors = [], []
    worst = Exit.OK
    for path in args.scenarios:
        try:
            scenario = load(path)
            vendor = Vendor(args.vendor or scenario.vendor)
            if vendor is Vendor.BARE:
                result = run(scenario, vendor=vendor, record_instructions=args.instructions,
                             max_steps=args.max_steps)
            else:
                result = compare(scenario, vendor, record_instructions=args.instructions,
                                 max_steps=args.max_steps)
        except KvmodelError as e:
            errors.append({"path": path, "error": str(e)})
            if not args.json:
                console.print(f"[bold red]error[/]: {escape(str(e))}", highlight=False)
            worst = max(worst, Exit.BAD_INPUT)
            continue
        results.append(result)
        if not args.json:
            (print_result if vendor is Vendor.BARE else print_comparison)(console, result)
        if _limit(result) is not None:
            worst = max(worst, Exit.BAD_INPUT)
        elif not result.passed:
            worst = max(worst, Exit.FAILED)
    if args.svg is not None and results:
        _write_svg(args.svg, timeline_svg(results[0]), console, quiet=args.json)
    if args.json:
        print(json.dumps(document(results, errors), indent=1))
    elif len(args.scenarios) > 1:
        passed = sum(r.passed for r in results)
        console.print(f"[bold]{passed}/{len(args.scenarios)}[/] scenarios pass")
    return worst


def _write_svg(path: str, svg: str, console: Console, quiet: bool = False) -> None:
    try:
        Path(path).write_text(svg)
    except OSError as e:
        raise KvmodelError(f"cannot write the timeline to {path}: {e.strerror or e}") from None
    if not quiet:
        console.print(f"timeline written to {escape(path)}", highlight=False)


def _limit(result) -> str | None:
    """A model limit in either run stops the comparison: bad input, not a verdict."""
    if hasattr(result, "bare"):
        return result.bare.limit or (result.virt.limit if result.virt is not None else None)
    return result.limit


def _explore(args: argparse.Namespace, console: Console) -> int:
    for name in args.bug:
        lookup(name)
    paths = expand(args.scenarios)
    bounds = Bounds(args.max_async, args.max_host, args.max_vmm, args.max_switches)
    if args.workers < 1:
        raise KvmodelError("--workers must be at least 1")
    done: list[Explored] = []

    def report(item: Explored) -> None:
        done.append(item)
        if not args.json:
            print_findings(console, item.result, item.shrunk, item.known)
            if not console.is_terminal:
                r = item.result
                limited = "" if r.limit is None else (
                    f", {r.model_limits} at a model limit" if r.schedules else ", model limit")
                console.print(f"{r.scenario.path} ({r.vendor.value}): {r.schedules} schedules, "
                              f"{r.distinct} distinct outcomes, {len(r.findings)} findings{limited}")

    vendors = vendors_for(args.vendor)
    show_bar = console.is_terminal and not args.json
    bar = Progress(TextColumn("exploring"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                   disable=not show_bar)
    task = bar.add_task("", total=len(paths) * len(vendors))

    def advance(item: Explored) -> None:
        report(item)
        bar.update(task, advance=1, description=f"{item.result.scenario.path} ({item.result.vendor.value})")

    try:
        with bar:
            explore_all(paths, vendors, bounds, workers=args.workers, time_limit=args.time_limit,
                        bugs=frozenset(args.bug), out_dir=Path(args.out), known=args.known,
                        done=advance)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the findings above are written")
        _explore_summary(args, console, done)
        return Exit.INTERRUPTED
    return _explore_summary(args, console, done)


def _explore_summary(args: argparse.Namespace, console: Console, done: list[Explored]) -> int:
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, "explored": [
            explore_dict(item.result, item.shrunk) for item in done]}, indent=1))
    else:
        console.print(summary_table([item.result for item in done]))
        console.print(_explore_verdict(args, [item.result for item in done]))
    return max((_explore_exit(item.result) for item in done), default=Exit.OK)


def _explore_exit(result: ExploreResult) -> Exit:
    """As for `run`: a model limit is bad input (part of the scenario was not explored)."""
    if result.limit is not None:
        return Exit.BAD_INPUT
    return Exit.OK if result.passed else Exit.FAILED


def _explore_verdict(args: argparse.Namespace, results: list[ExploreResult]) -> str:
    """What was checked, exactly: never "correct", only no counterexample within the bounds."""
    findings = sum(len(r.findings) for r in results)
    verdict = "no counterexample" if findings == 0 else f"{findings} findings"
    limited = sum(r.limit is not None for r in results)
    if limited:
        verdict = (f"{limited} of {len(results)} explorations (scenario and vendor) met a model "
                   f"limit (MODEL LIMIT above); in what was explored, "
                   + ("no finding" if findings == 0 else f"{findings} findings"))
    bounds = (f"up to {2 if args.max_async is None else args.max_async} asynchronous and "
              f"{2 if args.max_host is None else args.max_host} host happenings per schedule")
    if not all(r.complete for r in results):
        bounds += "; cut short by the time limit"
    return (f"{verdict} within the bounds ({bounds}): {sum(r.schedules for r in results):,} "
            f"schedules, {sum(r.distinct for r in results):,} distinct outcomes")


def _replay(args: argparse.Namespace, console: Console) -> int:
    replay = read(args.replay)
    console.print(f"replaying {args.replay}: {replay.document['finding']['kind']} on "
                  f"{replay.vendor.value}, schedule: {describe(replay.schedule)}"
                  + (f", bugs: {', '.join(sorted(replay.bugs))}" if replay.bugs else ""))
    comparison = replay.run()
    print_side_by_side(console, comparison)
    if args.svg is not None:
        bugs = f", bugs: {', '.join(sorted(replay.bugs))}" if replay.bugs else ""
        _write_svg(args.svg, timeline_svg(comparison, note=f"replay {args.replay}: schedule "
                                          f"{describe(replay.schedule)}{bugs}"), console)
    return Exit.OK if comparison.passed else Exit.FAILED


def _export(args: argparse.Namespace, console: Console) -> int:
    exported = export(load(args.scenario), Path(args.out))
    if exported.image is not None:
        image = exported.image
        console.print(f"{escape(str(image.kernel))} written; run "
                      f"{escape(str(image.directory / 'run.sh'))}", highlight=False)
    else:
        console.print(f"no image: {escape(exported.not_exported or '')}", highlight=False)
    for path in exported.reproducers:
        if path.suffix == ".c":
            console.print(f"{escape(str(path))} written: a KVM selftest reproducing the "
                          f"scenario's finding (see README.md beside it; not compiled or run "
                          f"by kvmodel)", highlight=False)
    return Exit.OK


def _differential(args: argparse.Namespace, console: Console) -> int:
    find_qemu()
    paths = expand(args.scenarios)
    counts: dict[Verdict, int] = dict.fromkeys(Verdict, 0)
    declared = 0
    with tempfile.TemporaryDirectory(prefix="kvmodel-differential-") as tmp:
        root = Path(args.out or tmp)
        for n, path in enumerate(paths):
            result = differential(load(path), root / f"{n:03d}-{path.stem}", accel=args.accel,
                                  timeout=args.timeout)
            counts[result.verdict] += 1
            declared += result.verdict is Verdict.AGREE and bool(result.declared)
            for line in show(result):
                console.print(escape(line), highlight=False)
    realizable = len(paths) - counts[Verdict.NOT_REALIZABLE]
    console.print(f"{len(paths)} scenarios exported for QEMU ({args.accel}, {qemu_version()}): "
                  f"{realizable} realizable, {counts[Verdict.AGREE]} agree ({declared} of them "
                  f"past declared QEMU differences), {counts[Verdict.DECLARED]} compared up to a "
                  f"declared QEMU difference, {counts[Verdict.DISAGREE]} disagree, "
                  f"{counts[Verdict.QEMU_FAILED]} QEMU failed, "
                  f"{counts[Verdict.NOT_REALIZABLE]} not realizable")
    failed = counts[Verdict.DISAGREE] + counts[Verdict.QEMU_FAILED]
    return Exit.FAILED if failed else Exit.OK


def _bugs(args: argparse.Namespace, console: Console) -> int:
    if args.bugs_command == "list":
        print_bugs(console)
        return Exit.OK
    checks = check_all(Path(args.out))
    table = Table(title="kvmodel bugs check")
    table.add_column("bug", no_wrap=True, min_width=max(len(c.bug.name) for c in checks))
    for column in ("vendor", "found", "happenings", "retired", "time"):
        table.add_column(column, no_wrap=True)

    for c in checks:
        found = "[green]yes[/]" if c.found and c.reproduced else "[bold red]NO[/]"
        table.add_row(c.bug.name, c.vendor.value, found, str(c.happenings), str(c.retired),
                      f"{c.seconds:.2f} s")
    console.print(table)
    for c in checks:
        if c.replay:
            console.print(f"{c.bug.name} ({c.vendor.value}): kvmodel replay {c.replay}")
    return Exit.OK if all(c.found and c.reproduced for c in checks) else Exit.FAILED
