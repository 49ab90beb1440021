"""The host side of a VM exit caused by a host NMI or interrupt (seed 004; kvm-upstream.md 3.8).

With "acknowledge interrupt on exit" and NMI exiting, the event that caused
the exit has not been delivered to the host yet: KVM hands it to the host's
handler itself, with IRQs off. With host FRED it builds a FRED frame
(fred_entry_from_kvm(): SS + event info with the type, vector, NMI bit and
64-bit bit; kernel CS; a 64-byte-aligned stack below the red zone) and the
handler returns with ERETS, which ends the NMI blocking the exit left only
if the frame's NMI bit says so; without FRED, vmx_do_nmi_irqoff() builds an
IRET frame and IRET ends it. `HostCpu` is the physical CPU's state those
steps touch; every check that fails is a problem the explorer reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmodel import _faults
from kvmodel.arch.events import EventType, Vec
from kvmodel.arch.fred import CS_LEVEL_SHIFT, FRAME_SIZE, SS_64BIT, SS_NMI

KERNEL_CS = 0x10  # Linux __KERNEL_CS / __KERNEL_DS
KERNEL_DS = 0x18
FRED_REDZONE = 64  # Linux FRED_CONFIG_REDZONE_AMOUNT (1) << 6
HOST_STACK = 0xFFFF_C900_0000_7F48  # some kernel stack pointer at the exit (not 64-aligned)
NMI_BIT_REV3 = 1 << 18  # where the May 2022 spec (rev 3.0) had the NMI bit: the CS word


@dataclass(slots=True)
class HostCpu:
    """The physical CPU under the vCPU, as far as host event dispatch goes."""

    fred: bool = False  # the host kernel uses FRED
    nmi_blocked: bool = False
    nmis: int = 0  # host NMIs handled
    irqs: int = 0
    problems: list[str] = field(default_factory=list)

    def nmi_exit(self) -> None:
        """A host NMI caused the exit: the CPU blocks NMIs as if it had delivered it (SDM 27.1)."""
        self.nmi_blocked = True
        self.nmis += 1
        if self.fred:
            self._fred_entry_from_kvm(EventType.NMI, Vec.NMI)
        else:
            self.nmi_blocked = False  # vmx_do_nmi_irqoff(): an IRET frame, and the handler IRETs
        if self.nmi_blocked:
            self.problems.append("host NMIs are still blocked after KVM handled the host NMI: "
                                 "the next host NMI would be lost")

    def irq_exit(self, vector: int) -> None:
        """An external interrupt caused the exit (acknowledged on exit)."""
        self.irqs += 1
        if self.fred:
            self._fred_entry_from_kvm(EventType.EXT_INT, vector)
        # vmx_do_interrupt_irqoff(): the IDT handler; IRQs return with a plain RET either way

    def _fred_entry_from_kvm(self, event: EventType, vector: int) -> None:
        """Build the frame KVM builds for `event`, then play the host's FRED entry code on it."""
        type_ = EventType.EXT_INT if _faults.on("fred_event_type_zero") else event  # "0 | vector"
        ss = KERNEL_DS | (vector << 32) | (int(type_) << 48) | SS_64BIT
        cs = KERNEL_CS
        if type_ is EventType.NMI:
            if _faults.on("fred_nmi_bit_in_cs"):
                cs |= NMI_BIT_REV3
            else:
                ss |= SS_NMI
        rsp = ((HOST_STACK - FRED_REDZONE) & ~(FRAME_SIZE - 1)) - FRAME_SIZE
        self._check_frame(rsp, cs, ss)
        self._dispatch_and_return(event, ss)

    def _check_frame(self, rsp: int, cs: int, ss: int) -> None:
        """What the host's FRED entry code relies on (Linux entry_64_fred.S, fred.c)."""
        if rsp % FRAME_SIZE or rsp + FRAME_SIZE > HOST_STACK - FRED_REDZONE:
            self.problems.append(f"host FRED frame at {rsp:#x} is not 64-byte aligned below the "
                                 "red zone")
        if cs & 0xFFFF != KERNEL_CS or (cs >> CS_LEVEL_SHIFT) & 3:
            self.problems.append(f"host FRED frame CS word {cs:#x} is not the kernel CS at level 0")
        if not ss & SS_64BIT or ss & 0xFFFF != KERNEL_DS:
            self.problems.append(f"host FRED frame SS word {ss:#x} lacks 64-bit mode or kernel SS")

    def _dispatch_and_return(self, event: EventType, ss: int) -> None:
        """__fred_entry_from_kvm(): EXTINT to the IRQ handler, NMI to the NMI handler; ERETS for NMIs."""
        type_, vector = EventType((ss >> 48) & 0xF), (ss >> 32) & 0xFF
        if type_ is not event:
            self.problems.append(f"the host's FRED entry saw event type {type_.name} vector {vector} "
                                 f"for a host {event.name}: it runs the wrong handler")
        if type_ is EventType.NMI and _faults.on("fred_nmi_return_without_erets"):
            return  # a plain RET, as for IRQs: NMIs stay blocked
        if ss & SS_NMI:  # ERETS ends NMI blocking only when the frame says NMI
            self.nmi_blocked = False
