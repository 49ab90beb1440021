"""Runs that reach a state an earlier run reached end as that run did (issue 24, item 3).

At its first branch points (where KVM has handled an exit and looks whether
userspace wants control) a resumed run takes the key of its whole state
(kvmodel._util.state_key): the session, the vCPU and KVM, the hardware
model, the core, the guest's memory, every counter and budget. Left out are
what the run only writes (its trace) and caches (decoded instructions). Two
runs with one key go on alike, so the later one stops there: its result is
the earlier one's, with its own trace up to that point and the earlier run's
trace from there on. Nothing else of a result depends on the way to the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvmodel._util.state_key import state_key
from kvmodel.check.pages import PageImage
from kvmodel.scenario.runner import RunResult
from kvmodel.scenario.schema import Scenario
from kvmodel.scenario.session import KvmSession

# What a key leaves out: the session's watch (this module's), its scenario (the schedule's
# happenings, which are in the CPU's state where they still matter; make() reads only
# its [kvm] parameters and exit-0 calls, the same for every schedule), the trace the run
# writes, and the decoded-instruction cache (a cache: decode() gives the same instruction).
IGNORED = frozenset({"KvmSession.watch", "KvmSession.scenario", "Cpu.trace", "Cpu.icache",
                     "Cpu.code_lines"})
POINTS = 3  # branch points at which a run looks for an earlier one's state
KEPT = 20_000  # keys remembered per scenario and vendor (the oldest go first)


@dataclass(slots=True)
class Continuation:
    """Where a run stood at a key: its trace's length then, and how it ended."""

    trace_at: int
    result: RunResult | None = None  # memory left out: `pages` holds it
    pages: dict[int, bytes] = field(default_factory=dict)


class Merged(Exception):  # noqa: N818 - a control transfer, not an error
    """Raised at a branch point whose state an earlier run reached."""

    def __init__(self, continuation: Continuation):
        super().__init__()
        self.continuation = continuation


class States:
    """The keys of the states resumed runs reached, for one scenario and vendor.

    A key costs about as much as a copy of the run; most states are reached once. So a
    key is taken only where an earlier run stood at the same place by a cheap measure
    (where(): counts, RIP, registers): the first run there is never merged into, the
    second registers its state, and from the third on runs can merge."""

    def __init__(self, image: PageImage):
        self.image = image
        self.continuations: dict[bytes, Continuation] = {}
        self.places: set[tuple] = set()
        self.merged = 0  # runs that ended by reaching an earlier run's state

    def probe(self) -> Probe:
        return Probe(self)

    def key(self, session: KvmSession) -> bytes:
        memory = session.vcpu.cpu.mem
        return state_key(session, IGNORED, {id(memory): tuple(self.image.changed(memory).items())})

    def remember(self, key: bytes, continuation: Continuation) -> None:
        self.continuations[key] = continuation
        if len(self.continuations) > KEPT:
            del self.continuations[next(iter(self.continuations))]

    def visited(self, session: KvmSession) -> bool:
        """Whether a run stood here before, by a cheap measure (and note that one did)."""
        cpu, vcpu = session.vcpu.cpu, session.vcpu
        place = (cpu.retired, cpu.work, cpu.rip, cpu.rflags, cpu.window_retired,
                 session.earlier_exits, vcpu.stats.exits, vcpu.requests, vcpu.nmi_pending,
                 tuple(cpu.scheduled), tuple(cpu.regs))
        if place in self.places:
            return True
        if len(self.places) > KEPT:
            self.places.clear()
        self.places.add(place)
        return False


class Probe:
    """KvmSession.watch for one resumed run: looks up its first POINTS states."""

    def __init__(self, states: States):
        self.states = states
        self.points = 0
        self.registered: list[Continuation] = []

    def __call__(self, session: KvmSession) -> None:
        self.points += 1
        if self.points > POINTS or not self.states.visited(session):
            return
        key = self.states.key(session)
        earlier = self.states.continuations.get(key)
        if earlier is not None and earlier.result is not None:
            raise Merged(earlier)
        continuation = Continuation(len(session.vcpu.cpu.trace))
        self.states.remember(key, continuation)
        self.registered.append(continuation)

    def finished(self, result: RunResult) -> None:
        """The run ended: the states it registered end like this."""
        kept = replace(result, memory=b"")
        pages = self.states.image.changed(result.memory) if len(result.memory) else {}
        for continuation in self.registered:
            continuation.result, continuation.pages = kept, pages

    def merged(self, merged: Merged, session: KvmSession, scenario: Scenario,
               memory: bytearray | None) -> RunResult:
        """The result of the run that stopped in `merged`'s state (`memory`: a buffer)."""
        self.states.merged += 1
        earlier = merged.continuation
        trace = tuple(session.vcpu.cpu.trace) + earlier.result.trace[earlier.trace_at:]
        result = replace(earlier.result, scenario=scenario, trace=trace,
                         memory=self.states.image.restore(earlier.pages, memory))
        self.finished(result)
        return result
