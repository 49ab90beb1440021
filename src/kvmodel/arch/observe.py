"""What a guest-observable trace is made of: one frozen record per happening."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import ClassVar

from kvmodel.arch.events import EventType


class ArrivalFate(IntEnum):
    """What became of an NMI or interrupt when it reached the CPU (SDM 6.7.1, 10.8)."""

    PENDING = 0  # will be delivered when unblocked
    LATCHED = 1  # NMI held while NMIs are blocked
    DROPPED = 2  # NMI lost: one is already latched
    MERGED = 3  # interrupt vector already requested in the IRR
    TO_HOST = 4  # taken by the hypervisor, which decides when the guest sees it


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event delivered through the IDT; `frame` is the pushed words, lowest address first.

    The model pushes a value for every bit, but the architecture leaves some
    undefined (a #DF's saved CS:RIP): `undefined` holds, per frame word, the
    bits no guest can rely on (empty: all defined), and `return_undefined`
    says the return address is such a value. Comparisons leave them out.
    """

    kind: ClassVar[str] = "delivery"
    vector: int
    type: EventType
    error_code: int | None
    return_rip: int
    retired: int
    handler: int
    rsp: int
    frame: tuple[int, ...]
    undefined: tuple[int, ...] = ()
    return_undefined: bool = False

    def observable(self) -> tuple:
        """What a guest can rely on (the event type aside): the undefined bits cleared,
        an undefined return address as None."""
        frame = self.frame
        if self.undefined:
            frame = tuple(word & ~mask for word, mask in zip(frame, self.undefined, strict=True))
        return_rip = None if self.return_undefined else self.return_rip
        return ("delivery", self.vector, self.error_code, return_rip, self.retired, self.handler,
                self.rsp, frame)


@dataclass(frozen=True, slots=True)
class Arrival:
    kind: ClassVar[str] = "arrival"
    event: str  # "nmi" or "interrupt"
    vector: int
    retired: int
    rip: int
    fate: ArrivalFate


@dataclass(frozen=True, slots=True)
class Halt:
    kind: ClassVar[str] = "halt"
    rip: int
    retired: int


@dataclass(frozen=True, slots=True)
class Iret:
    kind: ClassVar[str] = "iret"
    rip: int
    to_rip: int
    retired: int
    nmi_unblocked: bool


NO_VECTOR = -1  # Shutdown.first/second: no event's delivery led to it


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault: the processor stops (SDM 6.15 Interrupt 8). `first` and `second` are
    NO_VECTOR for a triple fault no delivery caused (one a VMM set, KVM_VCPUEVENT_VALID_TRIPLE_FAULT)."""

    kind: ClassVar[str] = "shutdown"
    rip: int
    retired: int
    first: int
    second: int


@dataclass(frozen=True, slots=True)
class Output:
    """A byte written to the debug port 0xE9 (the Bochs/QEMU convention)."""

    kind: ClassVar[str] = "output"
    port: int
    value: int
    retired: int


@dataclass(frozen=True, slots=True)
class Retire:
    kind: ClassVar[str] = "retire"
    rip: int
    text: str
    retired: int


Observation = Delivery | Arrival | Halt | Iret | Shutdown | Output | Retire


def to_dict(obs: Observation) -> dict:
    """Plain JSON-ready form with the record's kind first."""
    d = {"kind": obs.kind}
    d.update(asdict(obs))
    if isinstance(obs, Delivery):
        d["type"] = obs.type.name.lower()
        d["frame"] = list(obs.frame)
    if isinstance(obs, Arrival):
        d["fate"] = obs.fate.name.lower()
    return d
