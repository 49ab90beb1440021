"""The `kvmodel` command: argument parsing and outcome -> exit code, nothing else."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvmodel import __version__, api
from kvmodel.bugs.catalogue import CATALOGUE
from kvmodel.bugs.check import check_all
from kvmodel.check.campaign import Explored, expand, vendors_for
from kvmodel.check.differential import Verdict, differential, export, show
from kvmodel.check.engine import Engine, EngineKind
from kvmodel.check.explore import Bounds, ExploreResult
from kvmodel.check.schedule import describe
from kvmodel.errors import KvmodelError
from kvmodel.export.qemu import find_qemu, qemu_version
from kvmodel.guest.asm import find_binutils
from kvmodel.kvm.vcpu import Vendor
from kvmodel.report.explore import explore_dict, print_bugs, print_findings, print_side_by_side, summary_table
from kvmodel.report.json import SCHEMA_VERSION, document
from kvmodel.report.text import print_comparison, print_result
from kvmodel.report.timeline import timeline_svg
from kvmodel.scenario.load import load
from kvmodel.scenario.schema import MAX_STEPS


class Exit(IntEnum):
    """Exit codes (STYLE.md lesson 8)."""

    OK = 0  # every expectation holds
    FAILED = 1  # an expectation does not hold
    BAD_INPUT = 2  # malformed scenario, missing tool, or outside what the model covers
    INCOMPLETE = 3  # explore: the time limit ended the search before the bounds were covered
    MODEL_BUG = 4  # an internal error: probably a kvmodel bug
    INTERRUPTED = 130  # SIGINT (Ctrl-C): what was found so far is written (128 + 2)
    TERMINATED = 143  # SIGTERM: the same (128 + 15)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmodel",
        description="An executable model of how KVM virtualizes x86 events, checked against "
                    "a bare-metal x86 model (Intel SDM / AMD APM).",
        epilog="Exit codes: 0 all expectations hold, 1 an expectation fails, 2 bad input "
               "(scenario error, missing GNU as, instruction outside the model), 3 explore: "
               "the time limit ended the search early, 4 internal error, 130/143 explore "
               "interrupted by SIGINT/SIGTERM.",
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


def _bound(text: str) -> int:
    """--max-async/--max-host/--max-vmm: a negative bound would allow no schedule at all."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} allows no schedule: it must be 0 or more")
    return value


def _workers(text: str) -> int:
    value = _bound(text)
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1 worker")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} allows no schedule: it must be more than 0 s")
    return value


def _explore_parsers(sub) -> None:
    ex = sub.add_parser(
        "explore", help="try every placement of the choice points and report findings",
        description="For each scenario (or directory of them) and vendor, run every schedule of "
                    "asynchronous happenings within the bounds under KVM and on bare metal, and "
                    "report what the guest saw that bare metal would not have shown it. Findings "
                    "are shrunk and written as replay files. Exit 0: no finding within the "
                    "bounds; 1: findings; 2: bad input, or a model limit stopped (part of) a scenario's "
                    "exploration; 3: the time limit ended the search early; 130/143: interrupted "
                    "by SIGINT/SIGTERM (the summary so far is printed, replay files kept).")
    ex.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario files or directories")
    ex.add_argument("--vendor", choices=["svm", "vmx", "both"], default="both")
    ex.add_argument("--max-async", type=_bound, metavar="N",
                    help="at most N external NMIs/interrupts per schedule (default: 2)")
    ex.add_argument("--max-host", type=_bound, metavar="N",
                    help="at most N host happenings per schedule: host interrupts, host faults, "
                         "save/restores (default: 2)")
    ex.add_argument("--max-vmm", type=_bound, metavar="N",
                    help="at most N VMM uAPI calls per schedule, each after any VM exit: those the "
                         "scenario's [explore] vmm lists, or all of them (default: 2 if it lists "
                         "some, else none)")
    ex.add_argument("--max-switches", type=int, metavar="N",
                    help="[cpus] scenarios: switches between CPUs per interleaving, at the points "
                         "where they interact (default 2)")
    ex.add_argument("--workers", type=_workers, default=1, metavar="N",
                    help="processes to spread the scenarios over (with --engine ray and no "
                         "--address: the CPUs of the local Ray instance)")
    ex.add_argument("--engine", choices=[k.value for k in EngineKind], default="processes",
                    help="where the explorations run: worker processes on this machine (default), "
                         "or Ray tasks (needs pip install 'kvmodel[ray]'); the results are the same")
    ex.add_argument("--address", metavar="ADDR",
                    help="--engine ray: an existing Ray cluster (as ray.init() takes it, e.g. "
                         "auto or ray://host:10001; its nodes need kvmodel and the scenario files "
                         "at the same paths) instead of a local instance started for the command")
    ex.add_argument("--from-reset", action="store_true",
                    help="run every schedule under KVM from reset instead of resuming it from a "
                         "copy of a shorter schedule's run (the same results, slower: for checking "
                         "the resumption)")
    ex.add_argument("--time-limit", type=_seconds, metavar="S",
                    help="stop the whole search after S seconds, reporting what was covered "
                         "(exit 3 if that was not everything)")
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
                                    "not, 2 if the file is not a valid replay, the scenario "
                                    "changed since, or the model cannot run it to the end.")
    rp.add_argument("replay", metavar="FILE")
    rp.add_argument("--json", action="store_true",
                    help="one JSON document (the replayed comparison) instead of text")
    rp.add_argument("--svg", metavar="FILE",
                    help="also write a timeline picture (SVG) of both runs, the divergence marked")
    bugs = sub.add_parser("bugs", help="the catalogue of known KVM bugs the model can switch on")
    bugs_sub = bugs.add_subparsers(dest="bugs_command", required=True, metavar="ACTION")
    bugs_sub.add_parser("list", help="list the catalogued bugs and their references")
    check = bugs_sub.add_parser("check", help="explore each bug's scenario with the bug on")
    check.add_argument("--out", default="kvmodel-findings", metavar="DIR")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = _console()
    try:
        return _run(args, console)
    except KvmodelError as e:
        _error(str(e))
        return Exit.BAD_INPUT
    except Exception:  # noqa: BLE001 - report, save, and say it is ours
        with tempfile.NamedTemporaryFile("w", prefix="kvmodel-crash-", suffix=".txt",
                                         delete=False) as f:
            traceback.print_exc(file=f)
        print(f"internal error: this is probably a kvmodel bug; traceback saved to {f.name}",
              file=sys.stderr)
        return Exit.MODEL_BUG


PIPED_WIDTH = 400  # columns for tables when stdout is not a terminal: nothing cut to fit 80


def _console(**kwargs) -> Console:
    """Stdout. On a terminal, its width; piped, wide enough that no table cell is cut short
    ("0.01…"), unless COLUMNS says otherwise."""
    console = Console(highlight=False, soft_wrap=True, **kwargs)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


def _error(message: str, label: str = "[bold red]error[/]") -> None:
    """Errors go to stderr, so stdout (a report, a JSON document) stays clean; the message is
    printed as text, never read as markup (it may quote a scenario or a replay file)."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"{label}: {escape(message)}")


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
    api.check_bugs(args.bug)
    return _run_scenarios(args, console)


def _run_scenarios(args: argparse.Namespace, console: Console) -> int:
    results, errors = [], []
    worst = Exit.OK
    for path in args.scenarios:
        try:
            outcome = api.run(api.load(path), args.vendor, bugs=args.bug, max_steps=args.max_steps,
                              instructions=args.instructions)
        except KvmodelError as e:
            errors.append({"path": path, "error": str(e)})
            if not args.json:
                _error(str(e))
            worst = max(worst, Exit.BAD_INPUT)
            continue
        result = outcome.comparison or outcome.result
        results.append(result)
        if not args.json:
            (print_result if outcome.comparison is None else print_comparison)(console, result)
        if outcome.model_limit is not None:
            worst = max(worst, Exit.BAD_INPUT)
        elif not outcome.passed:
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
    api.check_bugs(args.bug)
    engine = Engine(EngineKind(args.engine), args.workers, args.address)
    engine.check()  # Ray missing, --address without it: bad input before anything runs
    # A path that is not there is reported like an unreadable file: the others still run.
    missing = [p for p in args.scenarios if not Path(p).exists()]
    paths = expand([p for p in args.scenarios if p not in missing] or args.scenarios)
    bounds = Bounds(args.max_async, args.max_host, args.max_vmm, args.max_switches)
    done: list[Explored] = []
    bad_files: set[str] = set()

    def report(item: Explored) -> None:
        done.append(item)
        if item.error is not None:
            if item.path not in bad_files and not args.json:
                _error(item.error)
            bad_files.add(item.path)
            return
        if not args.json:
            print_findings(console, item.result, item.shrunk, item.known)
            if not console.is_terminal:
                r = item.result
                limited = "" if r.limit is None else (
                    f", {r.model_limits} at a model limit" if r.schedules else ", model limit")
                console.print(f"{escape(r.scenario.path)} ({r.vendor.value}): {r.schedules} schedules, "
                              f"{r.distinct} distinct outcomes, {len(r.findings)} findings{limited}")

    vendors = vendors_for(args.vendor)
    for path in missing:
        for vendor in vendors:
            report(Explored(path, vendor, None, error=f"{path}: no such scenario file or directory"))
    bar = _ExploreProgress(console, len(paths) * len(vendors), quiet=args.json)

    def advance(item: Explored) -> None:
        report(item)
        bar.finished(item)

    with _signals_as_interrupts() as caught:
        try:
            with bar.live:
                api.explore_all(paths, vendors, bounds, engine=engine, time_limit=args.time_limit,
                            bugs=frozenset(args.bug), out_dir=Path(args.out), known=args.known,
                            done=advance, progress=bar.running, from_reset=args.from_reset)
        except KeyboardInterrupt:
            caught.setdefault("signal", signal.SIGINT)
    interrupted = caught.get("signal")
    if interrupted is not None:
        _error(f"{interrupted.name} after {len(done)} of {len(paths) * len(vendors)} explorations; "
               "the summary so far follows, replay files written are kept", label="[yellow]interrupted[/]")
    return _explore_summary(args, console, done, (len(paths) + len(missing)) * len(vendors),
                            interrupted)


class _ExploreProgress:
    """A progress bar on a terminal (explorations done, schedules and their rate, findings so
    far), nothing when piped or with --json. With one worker the running exploration's
    schedules count as they are judged; with more, each exploration when it is done."""

    def __init__(self, console: Console, total: int, quiet: bool):
        self.live = Progress(TextColumn("exploring"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                             TextColumn("{task.description}"), console=console,
                             disable=quiet or not console.is_terminal)
        self.task = self.live.add_task("", total=total, counts="")
        self.start = time.monotonic()
        self.schedules = self.findings = 0  # of the finished explorations

    def _show(self, schedules: int, findings: int, **kwargs) -> None:
        rate = schedules / max(time.monotonic() - self.start, 1e-3)
        self.live.update(self.task, counts=f"{schedules:,} schedules ({rate:,.0f}/s), "
                                            f"{findings} findings", **kwargs)

    def running(self, result: ExploreResult) -> None:
        self._show(self.schedules + result.schedules, self.findings + len(result.findings),
                   description=f"{result.scenario.path} ({result.vendor.value})")

    def finished(self, item: Explored) -> None:
        if item.result is not None:
            self.schedules += item.result.schedules
            self.findings += len(item.result.findings)
        self._show(self.schedules, self.findings, advance=1,
                   description=f"{item.path} ({item.vendor.value})")


@contextmanager
def _signals_as_interrupts():
    """SIGTERM ends the search as Ctrl-C does (a KeyboardInterrupt: workers ended, summary
    printed); which signal it was is kept for the exit code."""
    caught: dict[str, signal.Signals] = {}

    def on_signal(signum, frame):
        caught.setdefault("signal", signal.Signals(signum))
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _explore_summary(args: argparse.Namespace, console: Console, done: list[Explored], planned: int,
                     interrupted: signal.Signals | None) -> int:
    results = [item.result for item in done if item.result is not None]
    errors = [{"path": item.path, "vendor": item.vendor.value, "error": item.error}
              for item in done if item.error is not None]
    if args.json:
        print(json.dumps({"schema_version": SCHEMA_VERSION, "interrupted": interrupted and interrupted.name,
                          "complete": interrupted is None and len(done) == planned
                          and all(r.complete for r in results),
                          "explored": [explore_dict(item.result, item.shrunk) for item in done
                                       if item.result is not None],
                          "errors": errors}, indent=1))
    else:
        console.print(summary_table(results))
        console.print(_explore_verdict(args, results, errors, planned, interrupted))
    if interrupted is not None:
        return Exit.TERMINATED if interrupted is signal.SIGTERM else Exit.INTERRUPTED
    return _explore_exit(results, errors)


def _explore_exit(results: list[ExploreResult], errors: list[dict]) -> Exit:
    """As for `run`: a model limit or a file that cannot be read is bad input (part of what was
    asked was not explored); then findings; then a search the time limit cut short."""
    if errors or any(r.limit is not None for r in results):
        return Exit.BAD_INPUT
    if not all(r.passed for r in results):
        return Exit.FAILED
    if not all(r.complete for r in results):
        return Exit.INCOMPLETE
    return Exit.OK


def _explore_verdict(args: argparse.Namespace, results: list[ExploreResult], errors: list[dict],
                     planned: int, interrupted: signal.Signals | None) -> str:
    """What was checked, exactly: never "correct", and "no counterexample" only for a search
    that covered all it was asked to."""
    findings = sum(len(r.findings) for r in results)
    found = "no finding" if findings == 0 else f"{findings} findings"
    caveats = []
    if interrupted is not None:
        caveats.append(f"interrupted by {interrupted.name} after {len(results) + len(errors)} of "
                       f"{planned} explorations (scenario and vendor)")
    if errors:
        files = len({e["path"] for e in errors})
        caveats.append(f"{files} scenario file{'s' if files > 1 else ''} could not be explored "
                       "(errors above)")
    limited = sum(r.limit is not None for r in results)
    if limited:
        caveats.append(f"{limited} of {len(results)} explorations (scenario and vendor) met a model "
                       f"limit (MODEL LIMIT above)")
    if interrupted is None and not all(r.complete for r in results):
        caveats.append("the time limit ended the search before the bounds were covered")
    if caveats:
        verdict = "; ".join(caveats) + f"; in what was explored, {found}"
    else:
        verdict = "no counterexample" if findings == 0 else f"{findings} findings"
    bounds = (f"up to {2 if args.max_async is None else args.max_async} asynchronous and "
              f"{2 if args.max_host is None else args.max_host} host happenings per schedule")
    return (f"{verdict} within the bounds ({bounds}): {sum(r.schedules for r in results):,} "
            f"schedules, {sum(r.distinct for r in results):,} distinct outcomes")


def _replay(args: argparse.Namespace, console: Console) -> int:
    replay = api.read_replay(args.replay)
    comparison = api.replay(replay).comparison
    bugs = f", bugs: {', '.join(sorted(replay.bugs))}" if replay.bugs else ""
    what = f"{replay.finding_kind} on {replay.vendor.value}, schedule: {describe(replay.schedule)}{bugs}"
    if args.json:
        doc = document([comparison], [])
        doc["replay"] = {"file": str(args.replay), "scenario": replay.scenario.path,
                         "vendor": replay.vendor.value, "bugs": sorted(replay.bugs),
                         "finding": replay.document["finding"],
                         "schedule": [p.to_dict() for p in replay.schedule]}
        print(json.dumps(doc, indent=1))
    else:
        console.print(f"replaying {escape(str(args.replay))}: {escape(what)}")
        print_side_by_side(console, comparison)
    if args.svg is not None:
        note = f"replay {args.replay}: schedule {describe(replay.schedule)}{bugs}"
        _write_svg(args.svg, timeline_svg(comparison, note=note), console, quiet=args.json)
    return _replay_exit(comparison)


def _replay_exit(comparison) -> Exit:
    """1 if the finding shows again, 0 if not; 2 if the model could not run it to the end, or
    the vendor cannot run the scenario at all (then nothing was replayed)."""
    if comparison.not_applicable is not None or _limit(comparison) is not None:
        return Exit.BAD_INPUT
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
    bar = Progress(TextColumn("checking bugs"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[found]} found"), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=console, disable=not console.is_terminal)
    task = bar.add_task("", total=sum(len(bug.vendors) for bug in CATALOGUE), found=0)
    found = 0

    def checked(c) -> None:
        nonlocal found
        found += c.found and c.reproduced
        bar.update(task, advance=1, found=found, description=f"{c.bug.name} ({c.vendor.value})")

    with bar:
        checks = check_all(Path(args.out), done=checked)
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
