"""Exploring many scenarios: expand paths, explore each on each vendor, shrink, write replays."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kvmodel.check.explore import Bounds, ExploreResult, Finding, explore
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
    result: ExploreResult
    shrunk: list[tuple[Finding, str | None]] = field(default_factory=list)
    known: list[tuple[Finding, str | None]] = field(default_factory=list)  # with --known


def explore_all(paths: list[Path], vendors: tuple[Vendor, ...], bounds: Bounds, *, workers: int = 1,
                time_limit: float | None = None, bugs: frozenset[str] = frozenset(),
                out_dir: Path | None = None, known: bool = False,
                done: Callable[[Explored], None] | None = None) -> list[Explored]:
    """Explore each scenario on each vendor; new findings are shrunk and written as replays.

    With several workers, whole (scenario, vendor) explorations go to worker processes
    and come back in the order they were given, so the result does not depend on
    `workers`.
    """
    jobs = [(str(path), vendor) for path in paths for vendor in vendors]
    explored = []
    if workers <= 1:
        for path, vendor in jobs:
            item = explore_one(path, vendor, bounds, time_limit, bugs, out_dir, known)
            explored.append(item)
            if done is not None:
                done(item)
        return explored
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(explore_one, path, vendor, bounds, time_limit, bugs, out_dir, known)
                   for path, vendor in jobs]
        try:
            for future in futures:
                item = future.result()
                explored.append(item)
                if done is not None:
                    done(item)
        except KeyboardInterrupt:
            for future in futures:
                future.cancel()
            raise
    return explored


def explore_one(path: str, vendor: Vendor, bounds: Bounds, time_limit: float | None,
                bugs: frozenset[str], out_dir: Path | None, known: bool = False) -> Explored:
    """`known`: also shrink and write the declared findings, e.g. to report them upstream."""
    scenario = load(path)
    result = explore(scenario, vendor, bounds, time_limit=time_limit, bugs=bugs)
    item = Explored(result)
    item.shrunk = _shrink_each_kind(scenario, vendor, result.findings, bugs, out_dir)
    if known:
        item.known = _shrink_each_kind(scenario, vendor, result.known, bugs, out_dir)
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
