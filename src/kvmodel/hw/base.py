"""What VMX and SVM share: running the guest core until the next VM exit.

A vendor model is the `cpu.host` of the guest's arch core (see
arch/host.py). Its hooks fill the exit fields of the VMCS or VMCB and
raise `VmExit`; `GuestMode.run()` catches it, and the vendor saves guest
state. The L0 hypervisor above registers `on_external` and
`on_nmi_from_apic` to receive what arrives from outside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from kvmodel.arch.cpu import Cpu, External
from kvmodel.arch.events import Event, EventType
from kvmodel.arch.host import HostExit
from kvmodel.arch.observe import ArrivalFate
from kvmodel.arch.regs import Shadow


class VmExit(HostExit):
    """The guest stopped; the exit fields of the VMCS/VMCB say why."""


class EntryFailed(Exception):  # noqa: N818 - VMX "VM-entry failure" / SVM VMEXIT_INVALID
    """VM entry refused the guest state or the event to inject."""

    def __init__(self, check: str):
        super().__init__(check)
        self.check = check


class InvalidGuestState(EntryFailed):
    """VMX: a check on the guest-state area failed (SDM 26.3.1): not VMfail, but a VM exit
    with exit reason 33 and bit 31 set that loads the host state (SDM 26.7)."""


class Where(IntEnum):
    """Where in the guest's flow a VM exit happened; decides the saved shadow (SDM 27.3.4)."""

    BOUNDARY = 0  # between instructions
    INSTRUCTION = 1  # while executing an instruction (it will run again)
    DELIVERY = 2  # while delivering an event (the event is reported for re-injection)


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """A VM exit as the hypervisor saw it, for the trace (not guest-observable)."""

    kind: ClassVar[str] = "vmexit"
    reason: str
    rip: int
    retired: int
    detail: str


def event_where(cpu: Cpu, event: Event) -> Where:
    """An event hook call happens at a boundary, inside an instruction, or inside a delivery."""
    if cpu.vectoring is not None:
        return Where.DELIVERY
    if event.push_rf or event.insn_rip is not None:  # a fault, or INT n / INT3 / INTO / INT1
        return Where.INSTRUCTION
    return Where.BOUNDARY


def shadow_at(cpu: Cpu, where: Where) -> Shadow:
    """The interrupt shadow in force at the exit; none during delivery, INT n's included
    (SDM 27.1: no STI or MOV SS blocking when an indirect exit commences; 27.3.4. SVM:
    Bochs interrupt() drops the inhibit before delivery's memory accesses; the APM is silent)."""
    if where is Where.BOUNDARY:
        return cpu.shadow
    if where is Where.INSTRUCTION:
        return cpu.shadow_prev
    return Shadow.NONE


def soft_length(event: Event) -> int:
    """Instruction length of a software event (SDM 27.2.4): next RIP minus its address."""
    return event.rip - event.insn_rip if event.insn_rip is not None else 0


def frame_rf(event: Event) -> bool | None:
    """RF in the frame the interrupted delivery would have pushed (SDM 27.3.3).

    A fault pushes RF=1; a software event's instruction had begun, so RF was
    already cleared; an event taken between instructions keeps the current RF.
    """
    if event.push_rf:
        return True
    return False if event.insn_rip is not None else None  # None: RF as it is


def is_soft(type_: EventType) -> bool:
    return type_ in (EventType.SW_INT, EventType.SW_EXCEPTION, EventType.PRIV_SW_EXCEPTION)


HOST_VECTOR = 0xEC  # the host interrupt's vector (Linux LOCAL_TIMER_VECTOR)


class GuestMode:
    """The guest side of the CPU while it runs under a VMM."""

    vendor: ClassVar[str] = ""
    efer_svme: ClassVar[bool] = False  # see arch/host.py

    def __init__(self, cpu: Cpu):
        self.cpu = cpu
        cpu.host = self
        cpu.apic_delivers = False  # every guest interrupt is injected by the VMM
        cpu.icache.clear()  # decoded instructions must pass the intercept checks
        cpu.code_lines.clear()
        self.host_interrupt = False  # a host IRQ (e.g. a kick IPI) is waiting to exit the guest
        self.host_nmi = False  # a host NMI is waiting to exit the guest
        self.on_external: Callable[[External, int], None] = _unclaimed
        self.on_nmi_from_apic: Callable[[], None] = _unclaimed_nmi
        # An L1 on the model (hw/*/root.py): the core's APIC is L1's, and whether the
        # interrupts it presents may exit L2 now. Under KVM the core's APIC is the guest's.
        self.l1_apic_open: Callable[[], bool] = _never
        self.exits = 0
        self.longest_windowless = 0  # cycles, the most the guest held the CPU with no event window

    # -- arch/host.py hooks shared by both vendors ----------------------------

    def external(self, cpu: Cpu, event: External, vector: int) -> ArrivalFate:
        if event is External.HOST_INTERRUPT:
            self.kick()
        elif event is External.HOST_NMI:
            self.host_nmi = True
            self.cpu.attn = True
        elif event is External.NOTIFY_TIMER:
            self.notify_timer(bool(vector))
        else:
            self.on_external(event, vector)
        return ArrivalFate.TO_HOST

    def nmi_from_apic(self, cpu: Cpu) -> ArrivalFate:
        self.on_nmi_from_apic()
        return ArrivalFate.TO_HOST

    def no_event_window(self, cpu: Cpu) -> None:
        """Note how long the guest has held the CPU; VMX may exit here (Notify VM exit)."""
        if cpu.since_window > self.longest_windowless:
            self.longest_windowless = cpu.since_window

    def before_traps(self, cpu: Cpu) -> None:
        """Exits that outrank debug traps: only VMX's monitor trap flag has one (hw/vmx)."""

    def notify_timer(self, context_invalid: bool) -> None:
        """The notify timer ran out early (see hw/vmx); nothing else has one."""

    def l1_interrupt_presented(self) -> None:
        """An interrupt L1's APIC presents exits L2 at this boundary, however it came to be
        presented: it arrived, was pending at the entry, or L2 lowered the TPR or sent it
        (SDM 25.2 external-interrupt exiting, 10.8.3.1; APM 15.13.1 INTR intercept)."""
        if not self.host_interrupt and self.l1_apic_open() and self.cpu.apic.pending_vector() is not None:
            self.host_interrupt = True

    def wakes(self, cpu: Cpu) -> bool:
        """Whether a VM exit waits for the halted guest; VMX says (hw/vmx), SVM UNVERIFIED."""
        return False

    def kick(self) -> None:
        """A host interrupt (IPI) for this CPU: it leaves the guest at the next boundary."""
        self.host_interrupt = True
        self.cpu.attn = True

    def record(self, reason: str, detail: str = "") -> None:
        self.exits += 1
        self.cpu.trace.append(ExitRecord(reason, self.cpu.rip, self.cpu.retired, detail))


def back_to_l1(cpu: Cpu) -> None:
    """A VM exit on the model hands the core back to L1 (the root's side of GuestMode.__init__):
    no intercept checks, L1's APIC delivers again, no shadow or debug trap of L2's left."""
    cpu.host = None
    cpu.host_attn = False
    cpu.apic_delivers = True
    cpu.hif = None
    cpu.vtpr = None
    cpu.icache.clear()  # decoded instructions lose their intercept checks again
    cpu.code_lines.clear()
    cpu.shadow = Shadow.NONE
    cpu.pending_dbg = 0
    cpu.attn = True


@contextmanager
def entry_retired(cpu: Cpu) -> Iterator[None]:
    """L1's VMRUN/VMLAUNCH/VMRESUME retires as L2's state is loaded, before anything L2 shows
    (its injected event first). The core counts it once the instruction returns, so it is
    counted here only meanwhile, and its Retire goes here in the trace, not after the entry."""
    cpu.retired += 1
    if cpu.record_instructions:
        cpu.retire_at = (len(cpu.trace), cpu.retired)
    try:
        yield
    finally:
        cpu.retired -= 1


def _never() -> bool:
    return False


def _unclaimed(event: External, vector: int) -> None:
    raise RuntimeError("no hypervisor registered for external events")


def _unclaimed_nmi() -> None:
    raise RuntimeError("no hypervisor registered for APIC NMIs")
