"""Schedules: which asynchronous happenings occur, and where.

A placement is one happening at one point: an external NMI, an interrupt or
a host interrupt at guest boundary `at` (after `at` retired instructions,
or while halted when that count is reached), a page missing from EPT/NPT
from the start (`at` is 0: the first touch exits), or a save/restore after
VM exit number `at`, or a VMM call (`value` indexes scenario/vmm.py's
CHOICES) after VM exit number `at`. A schedule is a sorted tuple of
placements, so equal schedules are equal values; calls at one exit are made
in CHOICES order.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvmodel._util.records import replacer
from kvmodel.arch.cpu import External
from kvmodel.arch.events import Vec
from kvmodel.scenario.schema import Happening, HostEvent, HostHappening, Scenario, VmmStep
from kvmodel.scenario.vmm import CHOICE_NAMES, CHOICES


class Kind(Enum):
    NMI = "nmi"
    INTERRUPT = "interrupt"
    HOST_INTERRUPT = "host_interrupt"
    HOST_NMI = "host_nmi"
    HOST_FAULT = "host_fault"
    SAVE_RESTORE = "save_restore"
    VMM = "vmm"  # a VMM call (scenario/vmm.py CHOICES) after VM exit `at`

    @property
    def is_async(self) -> bool:
        """Guest-visible arrivals (bounded by --max-async); the rest is host time."""
        return self in (Kind.NMI, Kind.INTERRUPT)


@dataclass(frozen=True, slots=True, order=True)
class Placement:
    kind_order: int  # sorts NMIs before interrupts before host happenings
    at: int
    value: int  # interrupt vector or page address; 0 otherwise

    @property
    def kind(self) -> Kind:
        return _KINDS[self.kind_order]

    def to_dict(self) -> dict:
        if self.kind is Kind.VMM:
            return {"event": "vmm", "exit": self.at, "call": CHOICE_NAMES[self.value]}
        key = {Kind.HOST_FAULT: "page", Kind.SAVE_RESTORE: "exit"}.get(self.kind, "after")
        out = {"event": self.kind.value, key: self.value if self.kind is Kind.HOST_FAULT else self.at}
        if self.kind is Kind.INTERRUPT:
            out["vector"] = self.value
        return out

    def describe(self) -> str:
        if self.kind is Kind.HOST_FAULT:
            return f"host fault on page {self.value:#x}"
        if self.kind is Kind.SAVE_RESTORE:
            return f"save/restore after exit {self.at}"
        if self.kind is Kind.VMM:
            return f"VMM {CHOICE_NAMES[self.value]} after exit {self.at}"
        what = f"interrupt {self.value:#x}" if self.kind is Kind.INTERRUPT else self.kind.value
        return f"{what.replace('_', ' ')} after {self.at} retired"


_KINDS = list(Kind)
Schedule = tuple[Placement, ...]


def place(kind: Kind, at: int, value: int = 0) -> Placement:
    return Placement(_KINDS.index(kind), at, value)


def from_dict(d: dict) -> Placement:
    kind = Kind(d["event"])
    if kind is Kind.HOST_FAULT:
        return place(kind, 0, int(d["page"]))
    if kind is Kind.SAVE_RESTORE:
        return place(kind, int(d["exit"]))
    if kind is Kind.VMM:
        return place(kind, int(d["exit"]), CHOICE_NAMES.index(d["call"]))
    return place(kind, int(d["after"]), int(d.get("vector", 0)))


def describe(schedule: Schedule) -> str:
    return "; ".join(p.describe() for p in schedule) or "no happenings"


_with_events = replacer(Scenario, "happenings", "host", "vmm")


def apply(scenario: Scenario, schedule: Schedule) -> Scenario:
    """The scenario with the schedule's happenings added to its own."""
    if not schedule:
        return scenario
    happenings = list(scenario.happenings)
    host = list(scenario.host)
    vmm = list(scenario.vmm)
    for p in schedule:
        if p.kind is Kind.NMI:  # `value` 1 + n: a VMM's NMI, after n deliveries (bare metal)
            happenings.append(Happening(External.NMI, Vec.NMI, p.at, None, 0,
                                        p.value - 1 if p.value else None))
        elif p.kind is Kind.VMM:
            call, args = CHOICES[CHOICE_NAMES[p.value]]
            vmm.append(VmmStep(call, p.at, None, args, 0))
        elif p.kind is Kind.INTERRUPT:
            happenings.append(Happening(External.INTERRUPT, p.value, p.at, None, 0))
        elif p.kind is Kind.HOST_INTERRUPT:
            happenings.append(Happening(External.HOST_INTERRUPT, 0, p.at, None, 0))
        elif p.kind is Kind.HOST_NMI:
            happenings.append(Happening(External.HOST_NMI, 0, p.at, None, 0))
        elif p.kind is Kind.HOST_FAULT:
            host.append(HostHappening(HostEvent.FAULT, p.value, None, 0))
        else:
            host.append(HostHappening(HostEvent.SAVE_RESTORE, None, p.at, 0))
    return _with_events(scenario, tuple(happenings), tuple(host), tuple(vmm))
