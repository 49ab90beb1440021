"""`kvmodel bugs check`: explore each catalogued bug's scenario with the bug switched on."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmodel.bugs.catalogue import CATALOGUE, Bug
from kvmodel.check.explore import Bounds, explore
from kvmodel.check.replay import read, shrink, write
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load


@dataclass(frozen=True, slots=True)
class BugCheck:
    bug: Bug
    vendor: Vendor
    found: bool
    happenings: int  # in the shrunk counterexample
    retired: int  # guest instructions before the first divergence (or the end)
    seconds: float
    replay: str | None
    reproduced: bool  # the replay file shows the finding again


def check_bug(bug: Bug, vendor: Vendor, out_dir: Path, from_reset: bool = False) -> BugCheck:
    """`from_reset`: explore and shrink running every schedule from reset (explore()'s)."""
    start = time.monotonic()
    bugs = frozenset({bug.name})
    scenario = load(bug.scenario)
    result = explore(scenario, vendor, Bounds(), bugs=bugs, stop_at_first=True,
                     from_reset=from_reset)
    if not result.findings:
        return BugCheck(bug, vendor, False, 0, 0, time.monotonic() - start, None, False)
    if scenario.cpus is not None:
        # Several CPUs: the finding is an interleaving, which has no replay file yet (the
        # search is deterministic: running it again is the reproduction).
        kind = result.findings[0].kind
        again = explore(scenario, vendor, Bounds(), bugs=bugs, stop_at_first=True)
        reproduced = any(f.kind == kind for f in again.findings)
        return BugCheck(bug, vendor, True, 0, 0, time.monotonic() - start, None, reproduced)
    small = shrink(scenario, vendor, result.findings[0], bugs, from_reset)
    path = write(out_dir, scenario, vendor, small, bugs)
    comparison = read(path).run()
    elapsed = time.monotonic() - start
    d = comparison.divergence
    retired = comparison.virt.final.retired if comparison.virt and comparison.virt.final else 0
    if comparison.virt and comparison.virt.host_bug is not None and comparison.virt.trace:
        retired = comparison.virt.trace[-1].retired  # where the host died (BUG_ON)
    if d is not None and d.virt is not None and not isinstance(d.virt, str):
        retired = d.virt.retired  # guest instructions before the first divergence
    reproduced = not comparison.passed
    return BugCheck(bug, vendor, True, len(small.schedule), retired, elapsed, str(path), reproduced)


def check_all(out_dir: Path, done: Callable[[BugCheck], None] | None = None) -> list[BugCheck]:
    """`done`: told of each check as it finishes (a progress bar)."""
    checks = []
    for bug in CATALOGUE:
        for v in bug.vendors:
            checks.append(check_bug(bug, Vendor(v), out_dir))
            if done is not None:
                done(checks[-1])
    return checks
