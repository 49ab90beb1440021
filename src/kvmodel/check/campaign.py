"""Exploring many scenarios: expand paths, explore each on each vendor, shrink, write replays."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvmodel.check.engine import Engine
from kvmodel.check.explore import Bounds, ExploreResult, Finding, Progress, check_bounds, explore
from kvmodel.check.replay import shrink, write
from kvmodel.errors import KvmodelError
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load
from kvmodel.scenario.schema import Scenario


def expand(paths: list[str]) -> list[Path]:
    """Scenario files, directories searched recursively for *.toml, in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.rglob("*.toml"))
        elif p.is_file():
            out.append(p)
        else:
            raise KvmodelError(f"{p}: no such scenario file or directory")
    if not out:
        raise KvmodelError(f"no scenario files in {', '.join(paths)}")
    return out


def vendors_for(choice: str) -> tuple[Vendor, ...]:
    return (Vendor.SVM, Vendor.VMX) if choice == "both" else (Vendor(choice),)


@dataclass(slots=True)
class Explored:
    path: str
    vendor: Vendor
    result: ExploreResult | None  # None: the scenario file could not be read (see `error`)
    shrunk: list[tuple[Finding, str | None]] = field(default_factory=list)
    known: list[tuple[Finding, str | None]] = field(default_factory=list)  # with --known
    error: str | None = None  # why the scenario could not be explored (bad input)


def explore_all(paths: list[Path], vendors: tuple[Vendor, ...], bounds: Bounds, *, workers: int = 1,
                engine: Engine | None = None, time_limit: float | None = None,
                bugs: frozenset[str] = frozenset(), out_dir: Path | None = None, known: bool = False,
                done: Callable[[Explored], None] | None = None,
                progress: Progress | None = None, from_reset: bool = False) -> list[Explored]:
    """Explore each scenario on each vendor; new findings are shrunk and written as replays.

    `time_limit` bounds the whole call: every exploration stops at the same deadline. A
    scenario file that cannot be read is an item with its error; the others still run.
    With several workers (or `engine` Ray), whole (scenario, vendor) explorations go to
    worker processes (or Ray tasks: check/engine.py) and come back in the order they were
    given, so the result does not depend on `workers` or the engine. On KeyboardInterrupt
    (SIGINT; the CLI raises it for SIGTERM too) the workers (or tasks) are ended, `done` has
    had every exploration finished so far (and, with one worker, the interrupted one,
    `result.interrupted` set), and the interrupt goes on up.
    `progress` (one worker only) sees the running exploration's result as it grows.
    `from_reset`: every run under KVM from reset (explore()'s), for comparison.
    """
    check_bounds(bounds, time_limit)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    jobs = [(str(path), vendor) for path in paths for vendor in vendors]
    explored = []

    def finished(item: Explored) -> None:
        explored.append(item)
        if done is not None:
            done(item)
        if item.result is not None and item.result.interrupted:
            raise KeyboardInterrupt

    engine = engine or Engine(workers=workers)
    if engine.in_process:
        for path, vendor in jobs:
            finished(explore_one(path, vendor, bounds, deadline, bugs, out_dir, known, progress,
                                 from_reset))
        return explored
    # The deadline travels as wall-clock time: time.monotonic() means nothing on another node.
    wall = None if deadline is None else time.time() + (deadline - time.monotonic())
    with engine.pool() as pool:
        futures = [pool.submit(_explore_elsewhere, path, vendor, bounds, wall, bugs, out_dir, known,
                               from_reset)
                   for path, vendor in jobs]
        for future in futures:
            finished(future.result())
    return explored


def _explore_elsewhere(path: str, vendor: Vendor, bounds: Bounds, wall_deadline: float | None,
                       bugs: frozenset[str], out_dir: Path | None, known: bool,
                       from_reset: bool) -> Explored:
    """explore_one() in a worker process or a Ray task, with the deadline as time.time()."""
    deadline = None if wall_deadline is None else time.monotonic() + (wall_deadline - time.time())
    return explore_one(path, vendor, bounds, deadline, bugs, out_dir, known, from_reset=from_reset)


def explore_one(path: str, vendor: Vendor, bounds: Bounds, deadline: float | None,
                bugs: frozenset[str], out_dir: Path | None, known: bool = False,
                progress: Progress | None = None, from_reset: bool = False) -> Explored:
    """`known`: also shrink and write the declared findings, e.g. to report them upstream."""
    try:
        scenario = load(path)
        result = explore(scenario, vendor, bounds, deadline=deadline, bugs=bugs, progress=progress,
                         from_reset=from_reset)
    except KvmodelError as e:
        return Explored(path, vendor, None, error=str(e))
    item = Explored(path, vendor, result)
    if result.interrupted:
        return item  # nothing shrunk: back to the caller at once
    try:
        item.shrunk = _shrink_each_kind(scenario, vendor, result.findings, bugs, out_dir)
        if known:
            item.known = _shrink_each_kind(scenario, vendor, result.known, bugs, out_dir)
    except KeyboardInterrupt:
        result.interrupted = True  # the findings are all there; only their replays are missing
    return item


def _shrink_each_kind(scenario: Scenario, vendor: Vendor, findings: list[Finding],
                      bugs: frozenset[str], out_dir: Path | None) -> list[tuple[Finding, str | None]]:
    """One cause per kind and scenario, usually: shrink the first of each kind."""
    out: list[tuple[Finding, str | None]] = []
    kinds_done: set[str] = set()
    for finding in findings:
        if finding.kind in kinds_done:
            continue
        kinds_done.add(finding.kind)
        if scenario.cpus is not None:  # several CPUs: an interleaving, no replay file yet
            out.append((finding, None))
            continue
        small = shrink(scenario, vendor, finding, bugs)
        out.append((small, str(write(out_dir, scenario, vendor, small, bugs)) if out_dir else None))
    return out
