"""Exploring the interleavings of several CPUs ([cpus]), on bare metal and under KVM.

A schedule is a tuple of switches (arch/machine.py Switch): after the k-th
choice point, CPU c runs next. Choice points are only where a CPU interacts
(an IPI, a touch of a cache line another CPU writes) or while another is on
its way to an IPI: depth-first, every
schedule with up to `max_switches` switches is run, each child switching at a
choice point after its parent's last switch, to a CPU other than the one the
parent ran there. The shared lines and the positions on a CPU's way to an IPI
come from the runs: when a run finds one that no choice point stood for, the
search starts again with it (until none is new), so no interleaving of
interacting steps is missed.

Each run must meet the scenario's expectations (every interleaving on real
hardware is a legal behaviour the guest has to cope with), and stop where the
default schedule stops. With `reduce=False` every step is a choice point:
the naive search, which the explorer also runs (for a few seconds at most)
to report what the reduction saves and to check it finds the same outcomes.

Under KVM (`vendor` svm or vmx) the vCPUs' steps include KVM's own (a step
ends at each fetch, the core's or KVM's emulation, and when a vCPU blocks), so
schedules do not map one to one onto bare metal's: the criterion is that what
the guest saw on each CPU, every CPU's final state and memory (`outcome()`)
is an outcome some explored bare-metal interleaving shows (`bare`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, fields, is_dataclass
from enum import IntEnum

from kvmodel.arch.machine import Interleaving, Position, Switch
from kvmodel.check.oracle import FINAL_FIELDS, Comparison, Divergence, first_divergence, guest_view
from kvmodel.check.pages import PageImage
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.runner import PreparedMachine, RunResult, run_machine
from kvmodel.scenario.schema import Scenario

DEFAULT_MAX_SWITCHES = 2
NAIVE_SECONDS = 5.0  # how long a search with a choice point at every step may take


@dataclass(slots=True)
class InterleavingResult:
    explored: int = 0
    rounds: int = 0  # searches: one more each time runs found new shared lines
    outcomes: set[str] = field(default_factory=set)
    failures: list[tuple[Interleaving, str, str]] = field(default_factory=list)  # (schedule, kind, why)
    # under KVM, the outcome of each "divergence" failure, by schedule (confirm_with_bare())
    unmatched: dict[Interleaving, str] = field(default_factory=dict)
    limit: tuple[Interleaving, str] | None = None
    complete: bool = True


def describe(schedule: Interleaving) -> str:
    if not schedule:
        return "the default interleaving"
    return ", ".join(f"cpu{s.cpu} after choice point {s.at}" for s in schedule)


def explore_interleavings(scenario: Scenario, max_switches: int | None = None,
                          deadline: float | None = None, reduce: bool = True,
                          vendor: Vendor = Vendor.BARE,
                          bare: set[str] | None = None,
                          stop_at_first: bool = False) -> InterleavingResult:
    """`reduce`: False puts a choice point at every step (bench/ measures the difference);
    `bare`: under KVM, the outcomes bare metal showed, which each KVM run must be one of;
    `stop_at_first`: end at the first failure (the result is then not complete)."""
    bound = DEFAULT_MAX_SWITCHES if max_switches is None else max_switches
    result = InterleavingResult()
    shared: frozenset[int] = frozenset()
    ahead: frozenset[Position] = frozenset()
    prepared = PreparedMachine(scenario)
    image = PageImage(prepared.memory)
    while True:
        result.rounds += 1
        result.explored, result.outcomes, result.failures = 0, set(), []
        result.unmatched = {}
        found, found_ahead = _search(scenario, bound, (shared, ahead), result, deadline, reduce,
                                     vendor, bare, (prepared, image), stop_at_first)
        if (found <= shared and found_ahead <= ahead) or result.limit is not None or (
                not result.complete):
            break
        shared, ahead = shared | found, ahead | found_ahead
    return result


def _search(scenario: Scenario, bound: int, learnt: tuple[frozenset[int], frozenset[Position]],
            result: InterleavingResult, deadline: float | None, reduce: bool, vendor: Vendor,
            bare: set[str] | None, reset: tuple[PreparedMachine, PageImage],
            stop_at_first: bool = False) -> tuple[frozenset[int], frozenset[Position]]:
    """`learnt`: the shared lines and the positions on a CPU's way to an IPI that earlier
    rounds found; returns those this round's runs found. `reset`: the scenario's CPUs and
    memory at reset."""
    shared, ahead = learnt
    prepared, image = reset
    found: set[int] = set()
    found_ahead: set[Position] = set()
    default_stop = None
    stack: list[Interleaving] = [()]
    while stack:
        if deadline is not None and time.monotonic() >= deadline:
            result.complete = False
            break
        schedule = stack.pop()
        run = run_machine(scenario, vendor=vendor, schedule=schedule, shared=shared, ahead=ahead,
                          reduce=reduce, prepared=prepared)
        result.explored += 1
        if run.limit is not None:
            result.limit = (schedule, run.limit)
            break
        found |= run.smp.shared
        found_ahead |= run.smp.ahead
        if run.final is None:  # KVM gave up
            result.failures.append((schedule, "hypervisor_error", run.hypervisor_error))
            if stop_at_first:
                result.complete = False
                break
            continue
        if not schedule:
            default_stop = run.final.stop
        key = outcome(run, image)
        result.outcomes.add(key)
        failure = _failure(run, default_stop, key, bare)
        if failure is not None:
            result.failures.append((schedule, *failure))
            if failure[0] == "divergence":
                result.unmatched[schedule] = key
            if stop_at_first:
                result.complete = False
                break
        if len(schedule) < bound:
            stack += reversed(list(_children(schedule, run)))
    return frozenset(found), frozenset(found_ahead)


@dataclass(frozen=True, slots=True)
class Deeper:
    """Bare metal searched one switch deeper for the KVM outcomes it had not shown."""

    explored: int  # bare-metal interleavings of the deeper search
    matched: int  # KVM divergences whose outcome it showed: dropped
    complete: bool  # False: DEEPER_SECONDS ended it, so some divergences may still be artefacts


DEEPER_SECONDS = 60.0


def confirm_with_bare(scenario: Scenario, bound: int, virt: InterleavingResult,
                      deadline: float | None) -> Deeper | None:
    """A vCPU's step is finer than a bare-metal CPU's (it ends at each fetch and when the
    vCPU blocks), so KVM reaches within `bound` switches orders that bare metal needs more
    for: each divergence is kept only if bare metal with one more switch does not show its
    outcome either (within DEEPER_SECONDS; any outcome a search shows is a real one)."""
    if not virt.unmatched:
        return None
    end = time.monotonic() + DEEPER_SECONDS
    deeper = explore_interleavings(scenario, bound + 1, end if deadline is None else min(end, deadline))
    shown = {schedule for schedule, key in virt.unmatched.items() if key in deeper.outcomes}
    virt.failures = [f for f in virt.failures if not (f[1] == "divergence" and f[0] in shown)]
    return Deeper(deeper.explored, len(shown), deeper.complete)


def _children(schedule: Interleaving, run: RunResult):
    last = schedule[-1].at if schedule else 0
    for at in range(last + 1, len(run.smp.points) + 1):
        point = run.smp.points[at - 1]
        for cpu in point.runnable:
            if cpu != point.default:
                yield schedule + (Switch(at, cpu),)


def _failure(run: RunResult, default_stop: str | None, key: str,
             bare: set[str] | None) -> tuple[str, str] | None:
    if run.warnings:
        return "warn", "KVM WARN_ON reached: " + "; ".join(run.warnings)
    if run.mismatches:
        return "interleaving", run.mismatches[0].message
    if run.final.stop == "budget" and default_stop != "budget":
        return "liveness", (f"the default interleaving stops ({default_stop}); this one runs "
                            "out of steps")
    if bare is not None and run.final.stop != "budget" and key not in bare:
        return "divergence", ("the guest saw what no explored bare-metal interleaving shows it "
                              "(per CPU: deliveries, IRETs, HLTs, output; final state; memory)")
    return None


def outcome(run: RunResult, image: PageImage) -> str:
    """What the guest saw on each CPU (its guest-observable trace, retired instructions aside),
    every CPU's final state and memory: the order in which the CPUs' records were merged, and
    the hypervisor's own records, are not part of it. `image`: the scenario's memory at reset
    (PreparedMachine.memory); memory goes in as the pages that differ from it, every call
    taking the same image so that keys compare across searches."""
    seen: list[list] = [[] for _ in range(run.scenario.cpus.count)]
    for entry, cpu in zip(run.trace, run.cpu_of, strict=True):
        if entry.kind != "retire":
            seen[cpu].append(entry)
    per_cpu = tuple(tuple(entry for _, entry in guest_view(tuple(records))) for records in seen)
    finals = tuple((tuple(getattr(f, name) for name in FINAL_FIELDS), f.registers)
                   for f in run.smp.finals)
    h = hashlib.blake2b(repr(_plain((per_cpu, finals))).encode(), digest_size=12)
    if len(run.memory) != image.size:
        h.update(run.memory)
        return h.hexdigest()
    for at, page in image.changed(run.memory).items():
        h.update(at.to_bytes(8, "little"))
        h.update(page)
    return h.hexdigest()


_ATOMS = frozenset({int, str, bool, bytes, type(None)})  # plain already
# A class's field names if it is a record (a dataclass), else None: looked up once a class.
_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _plain(value):
    """Enums as their numbers (Vec.NMI and 2 are one vector), records as tuples of fields."""
    cls = type(value)
    if cls in _ATOMS:
        return value
    if isinstance(value, tuple):
        return tuple(map(_plain, value))
    if isinstance(value, IntEnum):
        return int(value)
    if cls not in _FIELDS:
        _FIELDS[cls] = tuple(f.name for f in fields(value)) if is_dataclass(value) else None
    names = _FIELDS[cls]
    if names is None:
        return value
    return (cls.__name__, *(_plain(getattr(value, name)) for name in names))


def compare_cpus(scenario: Scenario, vendor: Vendor, *, record_instructions: bool = False,
                 max_steps: int | None = None) -> Comparison:
    """`kvmodel run` of a [cpus] scenario under KVM: the default interleaving under KVM shows
    what the default one on bare metal shows, or what some bare-metal interleaving of the
    reduced search shows (or of the naive one, within NAIVE_SECONDS): else the first
    difference from the default one is the divergence."""
    prepared = PreparedMachine(scenario)
    image = PageImage(prepared.memory)
    virt = run_machine(scenario, vendor=vendor, record_instructions=record_instructions,
                       max_steps=max_steps, prepared=prepared)
    bare = run_machine(scenario, record_instructions=record_instructions, max_steps=max_steps,
                       prepared=prepared)
    known = next((k for k in scenario.divergences if vendor.value in k.vendors), None)
    if bare.limit or virt.limit or bare.final is None or virt.final is None:
        return Comparison(bare, virt, None, known)
    divergence = None
    key = outcome(virt, image)
    if key != outcome(bare, image):
        # The reduced search runs to its end (the verdict must not depend on the machine's
        # speed); the naive one, which it stands for, only for what time is left.
        started = time.monotonic()
        shown = explore_interleavings(scenario).outcomes
        if key not in shown:
            shown |= explore_interleavings(scenario, deadline=started + NAIVE_SECONDS,
                                           reduce=False).outcomes
        if key not in shown:
            divergence = first_divergence(bare, virt) or Divergence(
                -1, "the outcome of every explored interleaving", "another outcome",
                len(virt.trace), -1)
    return Comparison(bare, virt, divergence, known)
