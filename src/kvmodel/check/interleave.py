"""Exploring the interleavings of several CPUs ([cpus]) on bare metal.

A schedule is a tuple of switches (arch/machine.py Switch): after the k-th
choice point, CPU c runs next. Choice points are only where a CPU interacts
(an IPI, a touch of a cache line another CPU writes): depth-first, every
schedule with up to `max_switches` switches is run, each child switching at a
choice point after its parent's last switch, to a CPU other than the one the
parent ran there. The shared lines come from the runs: when a run finds a
line shared that no choice point stood for, the search starts again with it
(until none is new), so no interleaving of interacting steps is missed.

Each run must meet the scenario's expectations (every interleaving on real
hardware is a legal behaviour the guest has to cope with), and stop where the
default schedule stops. With `reduce=False` every step is a choice point:
the naive search, which the explorer also runs (for a few seconds at most)
to report what the reduction saves and to check it finds the same outcomes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from kvmodel.arch.machine import Interleaving, Switch
from kvmodel.scenario.runner import RunResult, run_machine
from kvmodel.scenario.schema import Scenario

DEFAULT_MAX_SWITCHES = 2


@dataclass(slots=True)
class InterleavingResult:
    explored: int = 0
    rounds: int = 0  # searches: one more each time runs found new shared lines
    outcomes: set[str] | None = None
    failures: list[tuple[Interleaving, str]] | None = None  # (schedule, why) of runs that fail
    limit: tuple[Interleaving, str] | None = None
    complete: bool = True


def describe(schedule: Interleaving) -> str:
    if not schedule:
        return "the default interleaving"
    return ", ".join(f"cpu{s.cpu} after choice point {s.at}" for s in schedule)


def explore_interleavings(scenario: Scenario, max_switches: int | None = None,
                          deadline: float | None = None, reduce: bool = True) -> InterleavingResult:
    """`reduce`: False puts a choice point at every step (bench/ measures the difference)."""
    bound = DEFAULT_MAX_SWITCHES if max_switches is None else max_switches
    result = InterleavingResult(outcomes=set(), failures=[])
    shared: frozenset[int] = frozenset()
    while True:
        result.rounds += 1
        result.explored, result.outcomes, result.failures = 0, set(), []
        found = _search(scenario, bound, shared, result, deadline, reduce)
        if found <= shared or result.limit is not None or not result.complete:
            break
        shared = shared | found
    return result


def _search(scenario: Scenario, bound: int, shared: frozenset[int], result: InterleavingResult,
            deadline: float | None, reduce: bool) -> frozenset[int]:
    found: set[int] = set()
    default_stop = None
    stack: list[Interleaving] = [()]
    while stack:
        if deadline is not None and time.monotonic() >= deadline:
            result.complete = False
            break
        schedule = stack.pop()
        run = run_machine(scenario, schedule=schedule, shared=shared, reduce=reduce)
        result.explored += 1
        if run.limit is not None:
            result.limit = (schedule, run.limit)
            break
        found |= run.smp.shared
        if not schedule:
            default_stop = run.final.stop
        result.outcomes.add(_digest(run))
        why = _failure(run, default_stop)
        if why is not None:
            result.failures.append((schedule, why))
        if len(schedule) < bound:
            stack += reversed(list(_children(schedule, run)))
    return frozenset(found)


def _children(schedule: Interleaving, run: RunResult):
    last = schedule[-1].at if schedule else 0
    for at in range(last + 1, len(run.smp.points) + 1):
        point = run.smp.points[at - 1]
        for cpu in point.runnable:
            if cpu != point.ran:
                yield schedule + (Switch(at, cpu),)


def _failure(run: RunResult, default_stop: str | None) -> str | None:
    if run.mismatches:
        return run.mismatches[0].message
    if run.final.stop == "budget" and default_stop != "budget":
        return f"the default interleaving stops ({default_stop}); this one runs out of steps"
    return None


def _digest(run: RunResult) -> str:
    """What the guest saw on each CPU (arrivals aside), every CPU's final state, and memory:
    the order in which the CPUs' observations were merged is not an outcome."""
    per_cpu = tuple(tuple(o for o, c in zip(run.trace, run.cpu_of, strict=True)
                          if c == n and o.kind != "arrival")
                    for n in range(run.scenario.cpus.count))
    return hashlib.blake2b(repr((per_cpu, run.smp.finals)).encode() + bytes(run.memory),
                           digest_size=12).hexdigest()
