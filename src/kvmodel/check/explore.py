"""Exhaustive bounded exploration: every placement of the choice points, each run judged.

For every schedule (check/schedule.py) within the bounds, the scenario runs
under KVM and on bare metal with the same external events; a run is a
finding when the guest sees something bare metal would not show it, when
KVM gives up (failed entry, internal error), when KVM's stats disagree with
what it injected, when a KVM WARN_ON() is reached, or when the guest makes
no progress where bare metal stops (liveness: the step budget runs out under
KVM only), or when, with Notify VM exits on, the guest holds the CPU longer
than the notify window allows (starvation: the host could not get it back).

Search: every schedule is run from the start and none is pruned. Shared:

- the scenario's CPU at reset, built once; each run starts from a copy of it
  (an L1's VMX or SVM root attached afresh), written into the memory of a
  finished run when there is one (fresh memory costs a page fault per page);
- bare-metal runs, by all schedules with the same external events: kept with
  their guest-observable view and, instead of their memory, the pages that
  differ from the initial image;
- decoded instructions, by all runs (arch/decode.py).

Only a Runner's first run judges the scenario file's expectations; every run
is judged against bare metal. Runs that end in the same state (trace and
final state) count as one distinct outcome.

Schedules are made lazily, in the order the search runs them (fewest happenings
first, then by placement), and judged outcomes are folded into the result as
they come: a scenario with millions of schedules starts at once, its progress
and time limit work from the first schedule, and memory holds one VM exit
count per first-stage schedule (for the save/restores and VMM calls after
them), not the schedules.

Not done: prefix sharing (running the common prefix once and resuming each
schedule from a snapshot where its first happening lands) and memoizing
outcomes once the whole state repeats. A run can only be paused at the top
of KVM's loop, between exits, not at an arbitrary guest boundary (KVM_RUN,
the vendor run and VM entry would each need a resumable middle), and the
state is costly to copy or fingerprint: copy.deepcopy of a vCPU stack at the
end of a bench/explore20.toml run takes about 250 us, more than the whole KVM
run (about 110 us).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import os
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

from kvmodel import _faults
from kvmodel._util.records import replacer
from kvmodel.check.engine import Engine, Pool
from kvmodel.check.interleave import (
    DEFAULT_MAX_SWITCHES,
    NAIVE_SECONDS,
    Deeper,
    confirm_with_bare,
    explore_interleavings,
)
from kvmodel.check.interleave import describe as describe_interleaving
from kvmodel.check.oracle import first_divergence, guest_view, not_applicable
from kvmodel.check.pages import PageImage
from kvmodel.check.resume import Resumer
from kvmodel.check.schedule import Kind, Placement, Schedule, apply, place
from kvmodel.errors import KvmodelError
from kvmodel.guest.layout import IST_STACK_BASE, PAGE, STACK_TOP, gate_size
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load
from kvmodel.scenario.runner import Prepared, Resolver, RunResult, bare_counterpart, run
from kvmodel.scenario.schema import ExploreSpec, Happening, KnownFinding, Scenario
from kvmodel.scenario.vmm import CHOICE_NAMES, DEFAULT_CHOICE_NAMES


@dataclass(frozen=True, slots=True)
class Bounds:
    """How many happenings one schedule may hold (None: what the scenario offers, up to 2)."""

    max_async: int | None = None
    max_host: int | None = None
    max_vmm: int | None = None  # VMM calls; None: up to 2 of those the scenario offers, else 0
    max_switches: int | None = None  # [cpus]: switches between CPUs per interleaving (default 2)


FINDING_KINDS = ("divergence", "liveness", "hypervisor_error", "bug", "warn", "stats", "starvation",
                 "host")


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # one of FINDING_KINDS
    schedule: Schedule
    message: str


@dataclass(slots=True)
class ExploreResult:
    scenario: Scenario
    vendor: Vendor
    schedules: int = 0
    outcomes: set[str] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)  # new: nobody explained them
    known: list[Finding] = field(default_factory=list)  # matched by the scenario's [[explore.known]]
    unseen_known: list[KnownFinding] = field(default_factory=list)  # declared, not found
    model_limits: int = 0  # schedules the model could not run to the end
    limit: str | None = None  # the first model limit met, and where: "on bare metal: ..."
    limit_schedule: Schedule | None = None  # the first schedule that met it
    elapsed: float = 0.0
    complete: bool = True  # False: the time limit ended the search (or it was interrupted)
    interrupted: bool = False  # SIGINT/SIGTERM ended it: what is here was explored so far
    not_applicable: str | None = None
    # [cpus]: interleavings explored on bare metal, the naive search's count there, and whether
    # it ran to the end; `schedules` counts the interleavings under KVM
    interleavings: tuple[int, int, bool] | None = None
    deeper: Deeper | None = None  # [cpus]: bare metal searched one switch deeper (interleave.py)

    @property
    def distinct(self) -> int:
        return len(self.outcomes)

    @property
    def passed(self) -> bool:
        return not self.findings and not self.unseen_known

    def met_limit(self, schedule: Schedule, limit: str) -> None:
        self.model_limits += 1
        if self.limit is None:
            self.limit, self.limit_schedule = limit, schedule


# -- choice points ---------------------------------------------------------------------

def default_spec(scenario: Scenario) -> ExploreSpec:
    """Host time only: a host interrupt, a missing IDT or stack page, a save/restore anywhere.

    None of these may ever change what the guest sees.
    """
    idt_end = scenario.idt_base + 256 * gate_size(scenario.mode) - 1
    pages = [(scenario.idt_base, 0), (idt_end, 0), (STACK_TOP - PAGE, 0)]
    pages += [(IST_STACK_BASE + (k - 1) * PAGE, 0) for k, _, _ in scenario.ist]
    return ExploreSpec(0, (), 1, tuple(pages), 1, 0)


@dataclass(frozen=True, slots=True)
class Choices:
    spec: ExploreSpec
    max_async: int
    max_host: int
    boundaries: int  # positions 0..boundaries
    pages: tuple[int, ...]
    max_vmm: int = 0
    vmm: tuple[int, ...] = ()  # indexes into scenario/vmm.py CHOICE_NAMES


def choices_for(scenario: Scenario, resolve: Resolver, bounds: Bounds, boundaries: int) -> Choices:
    spec = scenario.explore or default_spec(scenario)
    offered_async = spec.nmis + len(spec.interrupts)
    offered_host = spec.host_interrupts + spec.host_nmis + len(spec.host_faults) + spec.save_restores
    max_async = min(offered_async, 2 if bounds.max_async is None else bounds.max_async)
    max_host = min(offered_host, 2 if bounds.max_host is None else bounds.max_host)
    pages = tuple(sorted({resolve.linear(p, line) // PAGE * PAGE for p, line in spec.host_faults}))
    # VMM calls are opt-in: the scenario's `vmm = [...]`, or every call that keeps to the
    # protocol when --max-vmm asks.
    offered_vmm = spec.vmm or (DEFAULT_CHOICE_NAMES if bounds.max_vmm else ())
    max_vmm = 0 if not offered_vmm else 2 if bounds.max_vmm is None else bounds.max_vmm
    vmm = tuple(CHOICE_NAMES.index(name) for name in offered_vmm)
    return Choices(spec, max_async, max_host, boundaries, pages, max_vmm, vmm)


def async_schedules(c: Choices) -> Iterator[Schedule]:
    """NMIs (interchangeable) and each interrupt vector at most once, at any boundary."""
    positions = range(c.boundaries + 1)
    for n_nmi in range(min(c.spec.nmis, c.max_async) + 1):
        for nmis in itertools.combinations_with_replacement(positions, n_nmi):
            room = c.max_async - n_nmi
            for k in range(min(room, len(c.spec.interrupts)) + 1):
                for vectors in itertools.combinations(c.spec.interrupts, k):
                    for ats in itertools.product(positions, repeat=k):
                        yield tuple(sorted([place(Kind.NMI, at) for at in nmis] + [
                            place(Kind.INTERRUPT, at, v) for v, at in zip(vectors, ats, strict=True)]))


def host_schedules(c: Choices) -> Iterator[Schedule]:
    """Host interrupts and NMIs at any boundary and missing pages, up to max_host
    (save/restores later)."""
    positions = range(c.boundaries + 1)
    for n_faults in range(min(len(c.pages), c.max_host) + 1):
        for pages in itertools.combinations(c.pages, n_faults):
            room = c.max_host - n_faults
            for n_irq in range(min(c.spec.host_interrupts, room) + 1):
                for n_nmi in range(min(c.spec.host_nmis, room - n_irq) + 1):
                    for irqs in itertools.combinations_with_replacement(positions, n_irq):
                        for nmis in itertools.combinations_with_replacement(positions, n_nmi):
                            yield tuple(sorted([place(Kind.HOST_FAULT, 0, p) for p in pages]
                                               + [place(Kind.HOST_INTERRUPT, at) for at in irqs]
                                               + [place(Kind.HOST_NMI, at) for at in nmis]))


def with_save_restores(c: Choices, schedule: Schedule, exits: int, size: int | None = None
                       ) -> Iterator[Schedule]:
    """Save/restores after any of the first `exits` VM exits, within the host bound
    (`size`: only that many), in order."""
    used = sum(1 for p in schedule if not p.kind.is_async)
    room = min(c.spec.save_restores, c.max_host - used)
    for n in range(1, room + 1) if size is None else [size] if 1 <= size <= room else []:
        for at in itertools.combinations(range(1, exits + 1), n):
            yield schedule + tuple(place(Kind.SAVE_RESTORE, e) for e in at)


def with_vmm_calls(c: Choices, schedule: Schedule, exits: int, size: int | None = None
                   ) -> Iterator[Schedule]:
    """VMM calls after any of the first `exits` VM exits, several at one exit too, in order."""
    slots = [(e, v) for e in range(1, exits + 1) for v in c.vmm]
    for n in range(1, c.max_vmm + 1) if size is None else [size] if 1 <= size <= c.max_vmm else []:
        for calls in itertools.combinations_with_replacement(slots, n):
            yield schedule + tuple(place(Kind.VMM, e, v) for e, v in calls)


# -- enumeration, lazily and in order ------------------------------------------------------
#
# The search runs schedules fewest happenings first, then in the order of their placements
# (_smallest_first): the first finding is already small, and the order of findings never
# depends on how the schedules were made. Both stages below generate exactly that order
# without building the set first, so a scenario with millions of schedules starts at once
# and its memory stays bounded (a few bytes per first-stage schedule, for the second).


@dataclass(frozen=True, slots=True)
class _Placements:
    """place(kind, at, value) for every `at` in `ats` and, at each, every value, in order; made
    on demand (a guest with millions of boundaries must not cost millions of records)."""

    kind: Kind
    ats: range
    values: tuple[int, ...] = (0,)

    def __len__(self) -> int:
        return len(self.ats) * len(self.values)

    def __getitem__(self, j: int) -> Placement:
        at, n = divmod(j, len(self.values))
        return place(self.kind, self.ats[at], self.values[n])


@dataclass(frozen=True, slots=True)
class _Region:
    """The placements of one kind, in order, and how many of them one schedule may hold."""

    items: _Placements
    cap: int  # of this kind
    host: bool  # counts against max_host, else max_async
    repeat: bool  # the same placement may occur again (NMIs, host interrupts at one boundary)


def _regions(c: Choices) -> list[_Region]:
    positions = range(c.boundaries + 1)
    vectors = tuple(sorted(set(c.spec.interrupts)))
    return [
        _Region(_Placements(Kind.NMI, positions), min(c.spec.nmis, c.max_async), False, True),
        _Region(_Placements(Kind.INTERRUPT, positions, vectors), len(c.spec.interrupts), False, True),
        _Region(_Placements(Kind.HOST_INTERRUPT, positions), c.spec.host_interrupts, True, True),
        _Region(_Placements(Kind.HOST_NMI, positions), c.spec.host_nmis, True, True),
        _Region(_Placements(Kind.HOST_FAULT, range(1), c.pages), len(c.pages), True, False),
    ]


def first_schedules(c: Choices, size: int | None = None) -> Iterator[Schedule]:
    """async_schedules() x host_schedules(), in _smallest_first order, made lazily
    (`size`: only schedules of that many happenings)."""
    regions = _regions(c)
    vector_caps = Counter(c.spec.interrupts)  # each vector once (twice if listed twice)
    longest = c.max_async + c.max_host
    for n in range(longest + 1) if size is None else [size]:
        yield from _sequences(regions, vector_caps, c, n)


def _sequences(regions: list[_Region], vector_caps: Counter, c: Choices, n: int
               ) -> Iterator[Schedule]:
    """Sorted tuples of n placements within the caps, in lexicographic order: each next
    placement is the same or a later one (a recursion over regions and their items)."""
    used = [0] * len(regions)
    vectors: Counter = Counter()

    def room(r: int, i: int, async_used: int, host_used: int) -> int:
        """How many more placements could still follow (an upper bound: prunes dead ends)."""
        free = {False: 0, True: 0}
        for k in range(r, len(regions)):
            region = regions[k]
            left = region.cap - used[k]
            if not region.repeat:
                left = min(left, len(region.items) - (i if k == r else 0))
            free[region.host] += max(0, left)
        return (min(free[False], c.max_async - async_used)
                + min(free[True], c.max_host - host_used))

    def grow(r: int, i: int, left: int, async_used: int, host_used: int) -> Iterator[Schedule]:
        if left == 0:
            yield ()
            return
        if room(r, i, async_used, host_used) < left:
            return
        for k in range(r, len(regions)):
            region = regions[k]
            if used[k] >= region.cap:
                continue
            if (host_used if region.host else async_used) >= (c.max_host if region.host else c.max_async):
                continue
            for j in range(i if k == r else 0, len(region.items)):
                p = region.items[j]
                if p.kind is Kind.INTERRUPT:
                    if vectors[p.value] >= vector_caps[p.value]:
                        continue
                    vectors[p.value] += 1
                used[k] += 1
                for rest in grow(k, j if region.repeat else j + 1, left - 1,
                                 async_used + (not region.host), host_used + region.host):
                    yield (p, *rest)
                used[k] -= 1
                if p.kind is Kind.INTERRUPT:
                    vectors[p.value] -= 1

    yield from grow(0, 0, n, 0, 0)


def second_stage_possible(c: Choices) -> bool:
    return (c.spec.save_restores > 0 and c.max_host > 0) or (c.max_vmm > 0 and bool(c.vmm))


def second_schedules(c: Choices, exits: Sequence[int], sizes: Sequence[int]) -> Iterator[Schedule]:
    """Each first-stage schedule with save/restores or VMM calls after its VM exits, in
    _smallest_first order. `exits[k]`: how many VM exits the k-th first-stage schedule took
    (-1: a model limit stopped it, nothing to add); `sizes[n]`: how many of those had n
    happenings (they come in that order). A second-stage schedule is its first-stage one
    (kinds NMI..HOST_FAULT) followed by what it adds (SAVE_RESTORE, VMM: later kinds), so
    for one first-stage length the order is the first-stage order, then the additions';
    heapq.merge interleaves the lengths."""
    most = max(min(c.spec.save_restores, c.max_host), c.max_vmm)
    offsets = list(itertools.accumulate(sizes, initial=0))
    for total in range(1, len(sizes) + most):
        streams = [_extended(c, n, total - n, exits, offsets[n])
                   for n in range(max(0, total - most), min(total - 1, len(sizes) - 1) + 1)]
        yield from heapq.merge(*streams)


def _extended(c: Choices, n: int, extra: int, exits: Sequence[int], offset: int
              ) -> Iterator[Schedule]:
    for k, base in enumerate(first_schedules(c, n)):
        if exits[offset + k] >= 0:
            yield from with_save_restores(c, base, exits[offset + k], extra)
            yield from with_vmm_calls(c, base, exits[offset + k], extra)


# -- one run -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Outcome:
    schedule: Schedule
    digest: str
    exits: int
    finding: Finding | None
    limit: str | None  # the model limit that stopped a run, and on which side


_without_memory = replacer(RunResult, "memory")


class Runner:
    """Runs schedules of one scenario on one vendor, sharing bare-metal runs."""

    def __init__(self, scenario: Scenario, vendor: Vendor, max_steps: int | None = None,
                 from_reset: bool = False):
        """`from_reset`: every run under KVM from reset, none resumed (check/resume.py)."""
        self.scenario = scenario
        self.vendor = vendor
        self.max_steps = max_steps
        self.from_reset = from_reset
        self.resumer: Resumer | None = None
        # Bare runs, kept with their guest view and, instead of their memory, its changed
        # pages (by id() of the kept result): keeping a whole memory per distinct bare run
        # costs a page fault per fresh page.
        self.bare_runs: dict[tuple[Schedule, tuple], RunResult] = {}
        self.bare_views: dict[int, list] = {}
        self.bare_pages: dict[int, dict[int, bytes]] = {}
        self.known = next((k for k in scenario.divergences if vendor.value in k.vendors), None)
        self.prepared: Prepared | None = None  # built at the first run: a bad scenario raises there
        self.image: PageImage | None = None

    def bare(self, schedule: Schedule, vmm_nmis: tuple[tuple[int, int], ...] = (),
             vmm_happenings: tuple[Happening, ...] = ()) -> RunResult:
        """`vmm_nmis`: where the VMM's calls in the KVM run made NMIs arrive (retired, delivered);
        `vmm_happenings`: the states its crafted KVM_SET_VCPU_EVENTS put the CPU in and the
        vectors its 8259 raised on INTR."""
        external = tuple(sorted(tuple(p for p in schedule if p.kind.is_async)
                                + tuple(place(Kind.NMI, at, 1 + delivered)
                                        for at, delivered in vmm_nmis)))
        key = (external, vmm_happenings) if vmm_happenings else external
        if key not in self.bare_runs:
            self.bare_runs[key] = self._keep(self.run(external, Vendor.BARE, vmm_happenings))
        return self.bare_runs[key]

    def _keep(self, result: RunResult) -> RunResult:
        if len(result.memory) != self.image.size:
            return result
        kept = _without_memory(result, b"")
        self.bare_views[id(kept)] = guest_view(result.trace)
        self.bare_pages[id(kept)] = self.image.changed(result.memory)
        self.prepared.recycle(result.memory)
        return kept

    def outcome(self, schedule: Schedule) -> Outcome:
        if self.prepared is None:
            self.bare(())  # the first run judges the file's expectations
        virt = self.run(schedule, self.vendor)
        bare = self.bare(schedule, virt.vmm_nmis, virt.vmm_happenings)
        exits = sum(st.exits for st in virt.stats)
        limit = limit_of(bare, virt)
        if limit is not None:
            outcome = Outcome(schedule, "limit", exits, None, limit)
        else:
            view = guest_view(virt.trace)
            pages = self._pages(virt.memory)
            outcome = Outcome(schedule, self.digest(virt, view, pages), exits,
                              self.judge(schedule, bare, virt, view, pages), None)
        self.prepared.recycle(virt.memory)  # nothing refers to `virt` any more
        return outcome

    def _pages(self, memory: bytes | bytearray) -> dict[int, bytes] | None:
        """A run's memory as its changed pages (PageImage), taken once for digest and judge."""
        return self.image.changed(memory) if len(memory) == self.image.size else None

    def digest(self, result: RunResult, view: list, pages: dict[int, bytes] | None) -> str:
        """The outcome: guest-observable trace, final state, and memory (`pages`: its
        changed pages, None if it is not of the image's size)."""
        h = hashlib.blake2b(digest_size=12)
        h.update(repr([o for _, o in view]).encode())
        h.update(repr(result.final).encode())
        h.update(self.image.digest(result.memory, pages))
        return h.hexdigest()

    def run(self, schedule: Schedule, vendor: Vendor,
            vmm_happenings: tuple[Happening, ...] = ()) -> RunResult:
        # The first run judges the file's expectations, so a bad label there is still an
        # error; the others are judged against bare metal only.
        first = self.prepared is None
        if first:
            self.prepared = Prepared(self.scenario)
            self.image = PageImage(self.prepared.cpu.mem)
        if vendor is not Vendor.BARE and not (self.from_reset or first):
            if self.resumer is None:
                self.resumer = Resumer(self.scenario, vendor, self.max_steps, self.prepared,
                                       self.image)
            return self.resumer.run(schedule)
        scenario = apply(self.scenario, schedule)
        if vendor is Vendor.BARE:  # the VMM's counterpart is in the schedule, or here
            scenario = bare_counterpart(scenario, (), vmm_happenings)
        return run(scenario, vendor=vendor, max_steps=self.max_steps,
                   prepared=self.prepared, expectations=first, amd=self.vendor is Vendor.SVM)

    def judge(self, schedule: Schedule, bare: RunResult, virt: RunResult,
              view: list | None = None, pages: dict[int, bytes] | None = None) -> Finding | None:
        """`view`: guest_view() of the KVM run's trace, and `pages`: its memory's changed
        pages, when the caller has them already."""
        if virt.host_bug is not None:
            return Finding("bug", schedule, virt.host_bug)
        if virt.hypervisor_error is not None:
            return Finding("hypervisor_error", schedule, virt.hypervisor_error)
        if virt.warnings:
            return Finding("warn", schedule, "KVM WARN_ON reached: " + "; ".join(virt.warnings))
        views = None
        if id(bare) in self.bare_views and view is not None:
            views = (self.bare_views[id(bare)], view)
        memory = None
        if id(bare) in self.bare_pages:
            memory = partial(self._memory_difference, self.bare_pages[id(bare)], virt.memory, pages)
        d = first_divergence(bare, virt, views, memory)
        if d is not None and not (self.known is not None and d.event_index + 1 == self.known.entry):
            where = f"entry {d.index + 1}" if d.index >= 0 else "the final state"
            return Finding("divergence", schedule, f"the guest sees something else at {where}")
        if virt.final.stop == "budget" and bare.final.stop != "budget":
            return Finding("liveness", schedule,
                           f"bare metal stops ({bare.final.stop}); under KVM the step budget runs out")
        if virt.host is not None and virt.host.problems:
            return Finding("host", schedule, virt.host.problems[0])
        if virt.host is not None and virt.host.starved:
            return Finding("starvation", schedule,
                           f"with Notify VM exits on, the guest held the CPU for "
                           f"{virt.host.longest_windowless} cycles with no event window and no "
                           f"VM exit (limit {virt.host.notify_limit})")
        problem = stats_problem(virt)
        if problem is not None:
            return Finding("stats", schedule, problem)
        return None

    def _memory_difference(self, bare_pages: dict[int, bytes], memory: bytes | bytearray,
                           pages: dict[int, bytes] | None) -> tuple[int, int, int] | None:
        return self.image.first_difference(bare_pages,
                                           self.image.changed(memory) if pages is None else pages)


def limit_of(bare: RunResult, virt: RunResult) -> str | None:
    """Where the model stopped, if it did: nothing of the run can be judged then."""
    if bare.limit is not None:
        return f"on bare metal: {bare.limit}"
    if virt.limit is not None:
        return f"under KVM on {virt.vendor.value.upper()}: {virt.limit}"
    return None


def stats_problem(virt: RunResult) -> str | None:
    """KVM's counters must agree with what it injected and with the exits it took."""
    injected = [o for o in virt.trace if o.kind == "inject"]
    nmi = sum(st.nmi_injections for st in virt.stats)
    irq = sum(st.irq_injections for st in virt.stats)
    nmis = sum(o.what in ("nmi", "vnmi") for o in injected)
    if nmi != nmis:
        return f"nmi_injections = {nmi}, but {nmis} NMIs injected or made pending (vNMI)"
    if irq != sum(o.what in ("irq", "soft-int") for o in injected):
        return f"irq_injections = {irq} disagrees with the interrupts injected"
    notify = sum(st.notify_window_exits for st in virt.stats)
    if notify != sum(o.kind == "vmexit" and o.reason == "NOTIFY" for o in virt.trace):
        return f"notify_window_exits = {notify} disagrees with the Notify VM exits taken"
    return None


# -- the search ----------------------------------------------------------------------------

Progress = Callable[["ExploreResult"], None]  # called as schedules are judged, with the result so far


def check_bounds(bounds: Bounds, time_limit: float | None = None) -> None:
    """Bounds that allow no schedule at all would report an empty search as a clean one."""
    for name in ("max_async", "max_host", "max_vmm"):
        value = getattr(bounds, name)
        if value is not None and value < 0:
            raise KvmodelError(f"{name.replace('_', '-')} {value} allows no schedule: "
                               "it must be 0 or more")
    if time_limit is not None and not time_limit > 0:
        raise KvmodelError(f"time limit {time_limit} allows no schedule: it must be more than 0 s")


def explore(scenario: Scenario, vendor: Vendor, bounds: Bounds | None = None, *,
            workers: int = 1, engine: Engine | None = None, time_limit: float | None = None,
            deadline: float | None = None, bugs: frozenset[str] = frozenset(),
            progress: Progress | None = None, max_steps: int | None = None,
            stop_at_first: bool = False, from_reset: bool = False) -> ExploreResult:
    """Run every schedule within the bounds; findings in schedule order, whatever `workers` or
    the engine is (`engine`: where chunks of schedules run; default: `workers` processes).

    `time_limit` (seconds from now) or `deadline` (a time.monotonic() value, shared by the
    explorations of one command) ends the search early: `complete` is then False. A
    KeyboardInterrupt (SIGINT, or SIGTERM as the CLI maps it) ends it too: the result so far
    comes back with `interrupted` set, and the caller decides whether to go on."""
    start = time.monotonic()
    bounds = bounds or Bounds()
    check_bounds(bounds, time_limit)
    if time_limit is not None:
        deadline = start + time_limit if deadline is None else min(deadline, start + time_limit)
    if scenario.cpus is not None:
        return _explore_cpus(scenario, vendor, bounds, deadline, bugs, start, stop_at_first)
    result = ExploreResult(scenario, vendor)
    result.not_applicable = not_applicable(scenario, vendor)
    if result.not_applicable is not None:
        return result
    search = _Search(result, [k for k in scenario.known_findings if vendor.value in k.vendors],
                     progress)
    try:
        with _faults.switched_on(bugs):
            runner = Runner(scenario, vendor, max_steps)
            base = runner.bare(())
            if base.limit is not None or base.final is None:  # no final state: nothing to bound by
                why = base.limit or base.hypervisor_error or "the run ended without a final state"
                result.limit, result.limit_schedule = f"on bare metal: {why}", ()
                return result
            resolve = Resolver(scenario, base.program)
            choices = choices_for(scenario, resolve, bounds, base.final.retired)
        engine = engine or Engine(workers=workers)
        parallel = not (engine.in_process or stop_at_first)
        with engine.pool() if parallel else nullcontext() as pool:  # one pool for both stages
            run = partial(_run_all, scenario, vendor, pool=pool, workers=engine.workers, bugs=bugs,
                          deadline=deadline, max_steps=max_steps, expired=search.expired,
                          from_reset=from_reset)
            keep = second_stage_possible(choices)
            exits, sizes = array("i"), [0] * (choices.max_async + choices.max_host + 1)
            stopped = False
            for o in run(first_schedules(choices)):
                sizes[len(o.schedule)] += 1
                if keep:
                    exits.append(-1 if o.limit is not None else o.exits)
                stopped = search.add(o) and stop_at_first
                if stopped:
                    break
            if not stopped and search.finished:
                for o in run(second_schedules(choices, exits, sizes)):
                    if search.add(o) and stop_at_first:
                        break
            result.complete = not stop_at_first and search.finished
            if result.complete:
                result.unseen_known = [k for n, k in enumerate(search.declared)
                                       if n not in search.seen and _reachable(k, choices)]
    except KeyboardInterrupt:
        result.interrupted, result.complete = True, False
    finally:
        result.elapsed = time.monotonic() - start
    return result


class _Search:
    """Judged outcomes folded into the result as they come, in schedule order: nothing is kept
    per schedule but its VM exit count (for the second stage)."""

    def __init__(self, result: ExploreResult, declared: list[KnownFinding],
                 progress: Progress | None):
        self.result = result
        self.declared = declared
        self.seen: set[int] = set()
        self.progress = progress
        self.finished = True  # False once a deadline ended a stage before its last schedule
        self.last_report = 0.0

    def add(self, o: Outcome) -> bool:
        """Fold in one outcome; True if it is a new finding."""
        result = self.result
        result.schedules += 1
        new = False
        if o.limit is not None:
            result.met_limit(o.schedule, o.limit)
        else:
            result.outcomes.add(o.digest)
            if o.finding is not None:
                match = _explained_by(o.finding, self.declared)
                if match is None:
                    result.findings.append(o.finding)
                    new = True
                else:
                    result.known.append(o.finding)
                    self.seen.add(match)
        if self.progress is not None:
            now = time.monotonic()
            if now - self.last_report >= 0.1:
                self.last_report = now
                self.progress(result)
        return new

    def expired(self) -> None:
        """The deadline came before the last schedule."""
        self.finished = False


def _reachable(known: KnownFinding, c: Choices) -> bool:
    """The bounds allow a schedule with the declaration's happenings."""
    kinds = [Kind(k) for k in known.involves]
    return (sum(k.is_async for k in kinds) <= c.max_async
            and sum(not k.is_async and k is not Kind.VMM for k in kinds) <= c.max_host
            and sum(k is Kind.VMM for k in kinds) <= c.max_vmm)


def _explained_by(finding: Finding, declared: list[KnownFinding]) -> int | None:
    """The declaration that explains a divergence: its happenings (with repeats) are all there."""
    if finding.kind != "divergence":
        return None
    have = Counter(p.kind.value for p in finding.schedule)
    for n, known in enumerate(declared):
        need = Counter(known.involves)
        if any(have[kind] < count for kind, count in need.items()):
            continue
        if known.same_boundary:
            ats = {p.at for p in finding.schedule if p.kind.value in need}
            if len(ats) != 1:
                continue
        return n
    return None


def _run_all(scenario: Scenario, vendor: Vendor, schedules: Iterator[Schedule], *, pool: Pool | None,
             workers: int, bugs: frozenset[str], deadline: float | None, max_steps: int | None,
             expired: Callable[[], None] = lambda: None, from_reset: bool = False
             ) -> Iterator[Outcome]:
    """The outcomes of `schedules`, in their order, until the deadline (then `expired()` is
    called): here, or in chunks on `pool` (an engine's, with `workers`); the caller may stop
    at any point."""
    if pool is None:
        with _faults.switched_on(bugs):
            runner = Runner(scenario, vendor, max_steps, from_reset)
            for schedule in schedules:
                if deadline is not None and time.monotonic() >= deadline:
                    expired()
                    return
                yield runner.outcome(schedule)
        return
    chunks = iter(lambda: list(itertools.islice(schedules, CHUNK)), [])
    window: deque = deque()  # a few chunks ahead per worker: memory stays bounded
    for chunk in itertools.islice(chunks, 2 * workers):
        window.append(pool.submit(_run_chunk, scenario.path, vendor, chunk, bugs, max_steps,
                                  from_reset))
    while window:
        if deadline is not None and time.monotonic() >= deadline:
            expired()
            return
        outcomes = window.popleft().result()  # in submission order: independent of the engine
        for chunk in itertools.islice(chunks, 1):
            window.append(pool.submit(_run_chunk, scenario.path, vendor, chunk, bugs, max_steps,
                                  from_reset))
        yield from outcomes


CHUNK = 64  # schedules per task sent to a worker process


def _smallest_first(schedule: Schedule) -> tuple:
    """Fewest happenings first, then earliest: the first finding is already small."""
    return (len(schedule), schedule)


def _run_chunk(path: str, vendor: Vendor, schedules: list[Schedule], bugs: frozenset[str],
               max_steps: int | None, from_reset: bool) -> list[Outcome]:
    with _faults.switched_on(bugs):
        runner = _worker_runner(path, vendor, bugs, max_steps, from_reset)
        return [runner.outcome(s) for s in schedules]


_last_runner: list = []  # a worker's (key, Runner) for the scenario its last chunk was of


def _worker_runner(path: str, vendor: Vendor, bugs: frozenset[str], max_steps: int | None,
                   from_reset: bool) -> Runner:
    """The worker's Runner for this scenario: its bare runs and trunks (check/resume.py) serve
    the next chunk of the same scenario too."""
    key = (path, os.stat(path).st_mtime_ns, vendor, bugs, max_steps, from_reset)
    if not _last_runner or _last_runner[0][0] != key:
        _last_runner[:] = [(key, Runner(load(path), vendor, max_steps, from_reset))]
    return _last_runner[0][1]



def _explore_cpus(scenario: Scenario, vendor: Vendor, bounds: Bounds, deadline: float | None,
                  bugs: frozenset[str], start: float, stop_at_first: bool = False) -> ExploreResult:
    """[cpus]: every interleaving at the interaction points (check/interleave.py), on bare
    metal (each must meet the scenario's expectations; the naive search beside it for at most
    NAIVE_SECONDS), then under KVM, where each must also show an outcome bare metal showed
    (or, for a divergence, bare metal with one switch more: interleave.confirm_with_bare()).
    `stop_at_first` (bugs check): no naive search, which checks the reduction, not KVM, and
    the search under KVM ends at its first finding."""
    result = ExploreResult(scenario, vendor)
    result.not_applicable = not_applicable(scenario, vendor)
    if result.not_applicable is not None:
        return result
    with _faults.switched_on(bugs):
        bare = explore_interleavings(scenario, bounds.max_switches, deadline)
        naive_deadline = 0.0 if stop_at_first else time.monotonic() + NAIVE_SECONDS
        naive = explore_interleavings(scenario, bounds.max_switches,
                                      naive_deadline if deadline is None else min(deadline, naive_deadline),
                                      reduce=False)
        virt = None
        if bare.limit is None:
            virt = explore_interleavings(scenario, bounds.max_switches, deadline, vendor=vendor,
                                         bare=bare.outcomes | naive.outcomes,
                                         stop_at_first=stop_at_first)
            if bare.complete and virt.complete:
                bound = DEFAULT_MAX_SWITCHES if bounds.max_switches is None else bounds.max_switches
                result.deeper = confirm_with_bare(scenario, bound, virt, deadline)
    result.interleavings = (bare.explored, naive.explored, naive.complete)
    result.complete = bare.complete and (virt is None or virt.complete)
    if bare.complete and naive.complete and bare.outcomes != naive.outcomes:
        result.findings.append(Finding("interleaving", (), "the partial-order reduction misses "
                                       f"{len(naive.outcomes - bare.outcomes)} outcomes of the "
                                       "naive search (a kvmodel bug)"))
    for schedule, kind, why in bare.failures:
        result.findings.append(Finding(kind, (), f"on bare metal, {describe_interleaving(schedule)}: {why}"))
    if bare.limit is not None:
        schedule, why = bare.limit
        result.met_limit((), f"on bare metal ({describe_interleaving(schedule)}): {why}")
    if virt is not None:
        result.schedules = virt.explored
        result.outcomes = virt.outcomes
        # A divergence of an interleaving has no happenings: a declaration with `involves = []`
        # explains it (the why must say which interleavings); other kinds are never known.
        declared = [k for k in scenario.known_findings if vendor.value in k.vendors and not k.involves]
        seen: set[int] = set()
        for schedule, kind, why in virt.failures:
            finding = Finding(kind, (), f"under KVM, {describe_interleaving(schedule)}: {why}")
            match = _explained_by(finding, declared)
            if match is None:
                result.findings.append(finding)
            else:
                result.known.append(finding)
                seen.add(match)
        if result.complete:
            result.unseen_known = [k for n, k in enumerate(declared) if n not in seen]
        if virt.limit is not None:
            schedule, why = virt.limit
            result.met_limit((), f"under KVM on {vendor.value.upper()} "
                                 f"({describe_interleaving(schedule)}): {why}")
    result.elapsed = time.monotonic() - start
    return result
