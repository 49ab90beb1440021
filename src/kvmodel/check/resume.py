"""Runs under KVM resumed from copies of another run, instead of from reset (issue 24).

Two schedules of one scenario run alike until the first happening one of them
has and the other lacks. A trunk is a run of the shorter one that copies itself
(kvmodel._util.snapshot) at every branch point: each time KVM has handled a VM
exit and looks whether userspace wants control (Vcpu.run()'s `at_exit`). A
schedule with more happenings then starts from the trunk's last copy that none
of them could have touched yet, adds them, and goes on (scenario/session.py
KvmSession.resume()).

Which runs are trunks: the base, the scenario's run with what acts from the
start (pages missing from EPT/NPT), from which every NMI, interrupt and host
interrupt placed by retired instructions branches off; and for a schedule with
save/restores or VMM calls (the explorer's second stage), its first-stage part
(trunk_of()), branched off the base in turn, when that part's own happenings
end the base's usable copies before the exits those come after.

A copy is usable for a happening that has not happened yet in it:
- placed after `at` retired instructions: the copy stands before that count, and
  the vCPU never waited while halted before it (time passing while halted brings
  every event scheduled by count, however late: Cpu.next_arrival());
- after VM exit `at` (save/restore, VMM call): the copy has seen at most `at`
  exits; at exactly `at`, userspace takes control right where the copy was made.

Bare-metal runs are not resumed: the explorer shares them already (Runner.bare()).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvmodel._util.snapshot import copy_graph, shared
from kvmodel.arch import observe
from kvmodel.arch.cpu import Forced, Scheduled
from kvmodel.arch.decode import Decoded
from kvmodel.check.merge import Merged, States
from kvmodel.check.pages import PageImage
from kvmodel.check.schedule import Kind, Placement, Schedule, apply
from kvmodel.guest.asm import Program
from kvmodel.hw.base import ExitRecord
from kvmodel.kvm.migrate import SaveRestoreRecord
from kvmodel.kvm.vcpu import Vendor
from kvmodel.kvm.x86 import InjectRecord, NestedExitRecord
from kvmodel.scenario.runner import Prepared, Resolver, RunResult, resume, run
from kvmodel.scenario.schema import Happening, Scenario, VmmStep
from kvmodel.scenario.session import KvmSession, UserspaceStop, VmmStop
from kvmodel.scenario.vmm import VmmRecord

# Made once and never changed: a copy of a run shares them.
shared(Decoded, Scheduled, Forced, Scenario, Happening, VmmStep, Program, Resolver,
       observe.Delivery, observe.Arrival, observe.Halt, observe.Iret, observe.Shutdown,
       observe.Output, observe.Retire, ExitRecord, NestedExitRecord, InjectRecord, VmmRecord,
       SaveRestoreRecord, VmmStop)

AFTER_EXIT = (Kind.SAVE_RESTORE, Kind.VMM)
FROM_THE_START = (Kind.HOST_FAULT,)
# Resumed runs stop at a state an earlier one reached (check/merge.py). Off: the same results,
# but a key costs more than the runs it ends save (README, "Search").
MERGE_STATES = False
TRUNKS_KEPT = 8  # first-stage schedules' trunks kept (the second stage takes them in order)


def trunk_of(schedule: Schedule) -> Schedule:
    """The schedule whose run `schedule` branches off (see the module's docstring)."""
    if any(p.kind in AFTER_EXIT for p in schedule):
        return tuple(p for p in schedule if p.kind not in AFTER_EXIT)
    return tuple(p for p in schedule if p.kind in FROM_THE_START)


@dataclass(frozen=True, slots=True)
class Branch:
    """A copy of a trunk's session where KVM looked whether userspace wants control."""

    exits: int  # VM exits so far, over every vCPU of the run
    retired: int
    waits: int  # times the vCPU waited while halted (Cpu.waits)
    session: KvmSession  # never run itself: each resumption copies it again
    memory: bytearray  # what stands for the guest's memory in `session` (empty)
    pages: dict[int, bytes]  # the memory's pages that differ from the scenario's image

    def usable_for(self, placements: list[Placement]) -> bool:
        for p in placements:
            if p.kind in AFTER_EXIT:
                if self.exits > p.at:
                    return False
            elif self.waits or self.retired >= p.at:
                return False
        return True


class Trunk:
    """A run that copies itself at every branch point."""

    def __init__(self, happenings: int, image: PageImage) -> None:
        self.branches: list[Branch] = []
        self.happenings = happenings  # its scenario's: a branch's arrivals come after them
        self.image = image

    def watch(self, session: KvmSession) -> None:
        """KvmSession.watch: called at each branch point of the trunk's run. The copy keeps
        the memory as its changed pages (a copy of all of it would cost a page fault a page)."""
        cpu = session.vcpu.cpu
        memory = bytearray()
        watch, session.watch = session.watch, None  # the copy must not refer to the trunk
        try:
            copy = copy_graph(session, {id(cpu.mem): memory})
        finally:
            session.watch = watch
        self.branches.append(Branch(session.earlier_exits + session.vcpu.stats.exits, cpu.retired,
                                    cpu.waits, copy, memory, self.image.changed(cpu.mem)))

    def last_usable(self, placements: list[Placement]) -> Branch | None:
        """The latest copy none of `placements` could have touched (usability is monotonic:
        counts only grow along a run)."""
        found = None
        for branch in self.branches:
            if not branch.usable_for(placements):
                break
            found = branch
        return found


class Resumer:
    """Runs a scenario's schedules under KVM from the copies of their trunks (one vendor)."""

    def __init__(self, scenario: Scenario, vendor: Vendor, max_steps: int | None,
                 prepared: Prepared, image: PageImage):
        self.scenario, self.vendor, self.max_steps, self.prepared = scenario, vendor, max_steps, prepared
        self.image = image
        self.states = States(image) if MERGE_STATES else None  # check/merge.py
        self.bases: dict[Schedule, Trunk] = {}  # by what acts from the start: a few
        self.trunks: OrderedDict[Schedule, Trunk] = OrderedDict()  # first-stage schedules'

    def run(self, schedule: Schedule) -> RunResult:
        start = _start_of(schedule)
        base = self.bases.get(start)
        if base is None:
            base, result = self._record(start, None, None)
            if start == schedule:
                return result
        extra = _minus(schedule, start)
        branch = base.last_usable(extra)
        top = trunk_of(schedule)
        if top != start:
            # Save/restores and VMM calls after exits: if the first-stage part's own
            # placements, not theirs, end the base trunk's usable copies, that part's trunk
            # (branched off the base) has later ones.
            before_top = base.last_usable(_minus(top, start))
            if branch is before_top:
                trunk = self.trunks.get(top)
                if trunk is None:
                    trunk, _ = self._record(top, base, before_top)
                self.trunks.move_to_end(top)
                after = _minus(schedule, top)
                deeper = trunk.last_usable(after)
                if deeper is not None:
                    return self._resume(trunk, deeper, schedule, after)
        if branch is None:
            return self._fresh(schedule)
        return self._resume(base, branch, schedule, extra)

    def _resume(self, trunk: Trunk, branch: Branch, schedule: Schedule, extra: list[Placement],
                watch: Callable[[KvmSession], None] | None = None) -> RunResult:
        """`schedule`'s run from `branch` of `trunk`, whose own happenings it has, and
        `extra` ones besides (their copy: `watch`)."""
        spares = self.prepared.spare
        memory = self.image.restore(branch.pages, spares.pop() if spares else None)
        session = copy_graph(branch.session, {id(branch.memory): memory})
        scenario = apply(self.scenario, schedule)
        _add_happenings(session, scenario.happenings[trunk.happenings:])
        _add_stops(session, scenario, extra)
        if watch is not None or self.states is None:
            session.watch = watch
            return resume(session, scenario, self.prepared.program)
        probe = session.watch = self.states.probe()
        try:
            result = resume(session, scenario, self.prepared.program)
        except Merged as merged:
            return probe.merged(merged, session, scenario, memory)
        probe.finished(result)
        return result

    def _record(self, schedule: Schedule, parent: Trunk | None, branch: Branch | None
                ) -> tuple[Trunk, RunResult]:
        """`schedule`'s trunk: its run from reset, or from `branch` of `parent`."""
        trunk = Trunk(len(apply(self.scenario, schedule).happenings), self.image)
        if branch is None:
            result = self._fresh(schedule, trunk.watch)
        else:
            result = self._resume(parent, branch, schedule, _minus(schedule, _start_of(schedule)),
                                  trunk.watch)
        if parent is None:
            self.bases[schedule] = trunk
        else:
            self.trunks[schedule] = trunk
            if len(self.trunks) > TRUNKS_KEPT:
                self.trunks.popitem(last=False)
        return trunk, result

    def _fresh(self, schedule: Schedule,
               watch: Callable[[KvmSession], None] | None = None) -> RunResult:
        """`schedule`'s run from reset (`watch`: its session's)."""
        return run(apply(self.scenario, schedule), vendor=self.vendor, max_steps=self.max_steps,
                   prepared=self.prepared, expectations=False, watch=watch)


def _start_of(schedule: Schedule) -> Schedule:
    return tuple(p for p in schedule if p.kind in FROM_THE_START)


def _minus(schedule: Schedule, part: Schedule) -> list[Placement]:
    """The placements of `schedule` that `part` (a part of it) lacks."""
    rest = list(schedule)
    for p in part:
        rest.remove(p)
    return rest


def _add_happenings(session: KvmSession, happenings: tuple[Happening, ...]) -> None:
    """The schedule's arrivals, where runner._schedule() put them in a run from reset: after
    the scenario's own, before the markers of the VMM's label-placed calls."""
    if not happenings:
        return
    cpu = session.vcpu.cpu
    markers = {id(stop.marker) for stop in session.stops if stop.marker is not None}
    new = [Scheduled(h.event, h.vector, h.after, None, h.delivered, h.state) for h in happenings]
    cpu.schedule([s for s in cpu.scheduled if id(s) not in markers] + new
                 + [s for s in cpu.scheduled if id(s) in markers])


def _add_stops(session: KvmSession, scenario: Scenario, extra: list[Placement]) -> None:
    """The schedule's save/restores and VMM calls, in the order of a run from reset
    (session.py _userspace_stops(): save/restores, then calls, stably sorted by exit), and the
    exit after which the current KVM_RUN returns, as the VMM set it before the run."""
    added = [p for p in extra if p.kind in AFTER_EXIT]
    if not added:
        return
    calls = iter(scenario.vmm[len(scenario.vmm) - sum(p.kind is Kind.VMM for p in added):])
    new = [UserspaceStop(p.at, None, None if p.kind is Kind.SAVE_RESTORE else next(calls))
           for p in sorted(added, key=lambda p: p.kind is Kind.VMM)]
    old = session.stops
    ordered = ([s for s in old if s.call is None] + [s for s in new if s.call is None]
               + [s for s in old if s.call is not None] + [s for s in new if s.call is not None])
    session.stops = sorted(ordered, key=lambda s: s.exit if s.exit is not None else 0)
    if any(s.marker is not None for s in old):
        return  # every exit returns to userspace already
    vcpu = session.vcpu
    earlier = session.earlier_exits
    following = [p.at for p in added] + ([vcpu.stop_at_exit + earlier] if vcpu.stop_at_exit else [])
    vcpu.stop_at_exit = min(following) - earlier

