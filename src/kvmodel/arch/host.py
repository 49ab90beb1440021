"""The points where a virtualization extension can take the CPU away from its guest.

The bare-metal core knows nothing of VMX or SVM. It asks `cpu.host`
(None on bare metal) at the places where hardware checks intercepts:

- before a guest event starts its delivery (exception bitmap / intercepts,
  SDM 25.2, APM 15.12), with `cpu.vectoring` naming the event whose delivery
  was under way when a nested exception arose (SDM 27.2.3, APM 15.7.2);
- at an instruction boundary, before debug traps (the monitor trap
  flag, SDM 25.5.2) and after them (NMI-window and interrupt-window
  exiting, VINTR, a pending host interrupt; SDM 25.2);
- before an instruction that can be intercepted executes (SDM 25.1.3);
- on a guest-physical access to a page the host has not mapped (EPT
  violation, #NPF; SDM 28.2.3, APM 15.25.6);
- when an NMI or interrupt arrives from outside: it belongs to the host;
- as each delivery starts, with `cpu.since_window` cycles gone by without
  an event window (the Notify VM exit; cost.py).

A hook leaves the guest by raising `HostExit`; the core guarantees that
guest state is then as it was before the interrupted instruction or
delivery, apart from what the manuals say the aborted delivery leaves
behind (NMI blocking, CR2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvmodel.arch.cpu import Cpu
    from kvmodel.arch.decode import Decoded
    from kvmodel.arch.events import Event, External
    from kvmodel.arch.faults import Access
    from kvmodel.arch.observe import ArrivalFate


class HostExit(Exception):  # noqa: N818 - a control transfer, not an error
    """Leave guest execution now (a VM exit / #VMEXIT)."""


class VmxInstructions(Protocol):
    """VMX root operation (SDM 30), for an L1 hypervisor running on the hardware model.

    `cpu.vmx` is None unless the CPU may enter VMX operation; the VMX
    instructions are #UD then. Each method sets RFLAGS as VMsucceed /
    VMfail do (SDM 30.2).
    """

    vmxon_region: int | None  # set by VMXON: the CPU is in VMX operation

    def vmxon(self, cpu: Cpu, region: int) -> None: ...
    def vmclear(self, cpu: Cpu, region: int) -> None: ...
    def vmptrld(self, cpu: Cpu, region: int) -> None: ...
    def vmwrite(self, cpu: Cpu, field: int, value: int) -> None: ...
    def vmread(self, cpu: Cpu, field: int) -> int | None: ...
    def vmentry(self, cpu: Cpu, launch: bool, next_rip: int) -> None: ...
    def vmcall(self, cpu: Cpu) -> None: ...
    # A VMM's snapshot of the CPU's VMX state and its rollback to it (Cpu._roll_back()).
    def snapshot_root(self) -> object: ...
    def restore_root(self, cpu: Cpu, saved: object) -> None: ...
    def init_signal(self, cpu: Cpu) -> ArrivalFate:
        """An INIT in VMX operation: latched in root operation, a VM exit in non-root
        (SDM 24.8, 25.2)."""


class SvmInstructions(Protocol):
    """SVM host mode (APM 15.5), for an L1 hypervisor running on the hardware model.

    `cpu.svm` is None unless the CPU has SVM; EFER.SVME gates the instructions
    (#UD when clear). STGI and CLGI only set `cpu.gif`.
    """

    def vmrun(self, cpu: Cpu, vmcb_pa: int, next_rip: int) -> None: ...


class Host(Protocol):
    # The CPU's own EFER.SVME while this host's guest runs: an SVM guest's VMCB must
    # have it set (APM 15.5.1), whatever EFER the guest was shown.
    efer_svme: bool

    def event(self, cpu: Cpu, event: Event) -> None:
        """A guest event is about to be delivered; raise HostExit to intercept it."""

    def before_traps(self, cpu: Cpu) -> None:
        """An instruction boundary, before debug traps are taken; raise HostExit for an exit that
        outranks them (VMX's monitor trap flag, SDM 25.5.2)."""

    def boundary(self, cpu: Cpu) -> None:
        """An instruction boundary with no debug trap due; raise HostExit for a window exit."""

    def wakes(self, cpu: Cpu) -> bool:
        """Whether a VM exit waits for the halted guest (for a machine of several CPUs)."""

    def instruction(self, cpu: Cpu, insn: Decoded) -> None:
        """An interceptable instruction is about to execute."""

    def unmapped(self, cpu: Cpu, addr: int, access: Access) -> None:
        """A guest-physical access to a page the host has not mapped; must raise HostExit."""

    def external(self, cpu: Cpu, event: External, vector: int) -> ArrivalFate:
        """An NMI or interrupt arrives from outside: the host takes it."""

    def nmi_from_apic(self, cpu: Cpu) -> ArrivalFate:
        """The guest's local APIC sent itself an NMI (ICR delivery mode NMI)."""

    def no_event_window(self, cpu: Cpu) -> None:
        """A delivery starts, `cpu.since_window` cycles after the last event window."""
