"""SVM host mode on the hardware model: an L1 hypervisor runs L2 with VMRUN.

This is the oracle for nested SVM (DESIGN.md): L1's code executes VMRUN,
VMLOAD, VMSAVE, STGI and CLGI on this model. VMRUN reads the VMCB L1 wrote in
memory (APM Appendix B), and L2 runs on the same core, in the same run loop
and budget, under hw/svm's guest model (SvmGuest) until a #VMEXIT, which
writes the VMCB back, clears GIF and resumes L1 after its VMRUN (APM 15.5,
15.6). Runs go through SvmRoot.run().

Events for L1 while L2 runs (APM 15.13): the NMI and INTR intercepts exit
before the event is taken, and the event stays pending for L1, held by GIF
until L1's STGI. With V_INTR_MASKING, L1's RFLAGS.IF at VMRUN decides
whether its interrupts can exit L2 at all (15.21.1).

Not modelled: the host save area (VM_HSAVE_PA; the model keeps L1's state
beside memory), nested paging and ASIDs (L2 shares L1's identity-mapped
memory), segment and control registers (flat, as L1's), what VMLOAD/VMSAVE
move, vGIF for L2, V_TPR, virtual interrupts taken by L2, an L1 that leaves
NMI or INTR unintercepted or V_INTR_MASKING clear (ModelLimit). vNMI for L2
(V_NMI_ENABLE in L1's VMCB) is the guest model's own (cpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmodel.arch.cpu import Cpu, External, Stop
from kvmodel.arch.events import Vec
from kvmodel.arch.faults import Fault
from kvmodel.arch.regs import EFER_SVME, IF, RAX, RSP, TF
from kvmodel.errors import ModelLimit
from kvmodel.hw.base import EntryFailed, ExitRecord, VmExit, back_to_l1, entry_retired
from kvmodel.hw.svm.cpu import SvmGuest
from kvmodel.hw.svm.vmcb import (
    V_GIF_ENABLE,
    V_INTR_MASKING,
    V_IRQ,
    VMCB_SIZE,
    ExitCode,
    Intercept,
    Offset,
    Vmcb,
    read_vmcb,
    write_exit,
    write_field,
)  # fmt: skip


@dataclass(slots=True)
class L1State:
    """What VMRUN saves of the host and #VMEXIT reloads (APM 15.5.1, 15.6)."""

    rip: int
    rsp: int
    rax: int
    rflags: int
    idtr: tuple[int, int]
    nmi_pending: int  # NMIs are not blocked: VMRUN in an NMI handler is a model limit


def check_vmcb_for_model(vmcb: Vmcb, cpu: Cpu) -> None:
    """The L1 setups the model covers; anything else stops the run with a clear message."""
    rip = cpu.rip
    if vmcb.cs_base or cpu.cs_base:
        raise ModelLimit("code segments with a base (CS.base) in nested SVM are not modelled", rip)
    if not {Intercept.INTR, Intercept.NMI} <= vmcb.intercepts:
        raise ModelLimit("an L1 that does not intercept INTR and NMI is not modelled", rip)
    if not vmcb.int_ctl & V_INTR_MASKING:
        raise ModelLimit("an L1 without V_INTR_MASKING is not modelled", rip)
    if vmcb.int_ctl & V_GIF_ENABLE:
        raise ModelLimit("vGIF for L2 is not modelled", rip)
    if vmcb.int_ctl & V_IRQ and Intercept.VINTR not in vmcb.intercepts:
        raise ModelLimit("virtual interrupts (V_IRQ) taken by L2 are not modelled", rip)


def vmrun_failure(vmcb: Vmcb) -> str | None:
    """Consistency checks of the save area the model has (APM 15.5.1): EFER.SVME must be set."""
    return None if vmcb.efer & EFER_SVME else "EFER.SVME is clear in the guest state"


class SvmRoot:
    """The CPU's SVM host state: the L2 running, if any, with what L1 left behind."""

    def __init__(self, cpu: Cpu):
        cpu.svm = self
        cpu.has_svm = True
        self._l2: tuple[SvmGuest, int, L1State] | None = None

    def vmrun(self, cpu: Cpu, vmcb_pa: int, next_rip: int) -> None:
        """VMRUN: L2 runs until a #VMEXIT (run() below); a failed check exits at once."""
        if vmcb_pa & 0xFFF or vmcb_pa + VMCB_SIZE > cpu.mem_size:
            raise Fault(Vec.GP, 0)
        if cpu.rflags & TF:
            raise ModelLimit("single-stepping VMRUN is not modelled", cpu.rip)
        if cpu.nmi_blocked:
            raise ModelLimit("VMRUN with NMIs blocked (in an NMI handler) is not modelled", cpu.rip)
        vmcb = read_vmcb(cpu.mem, vmcb_pa)
        check_vmcb_for_model(vmcb, cpu)
        l1 = L1State(next_rip, cpu.regs[RSP], cpu.regs[RAX], cpu.rflags,
                     (cpu.idtr_base, cpu.idtr_limit), cpu.nmi_pending)
        guest = SvmGuest(cpu)
        guest.vmcb = vmcb
        # L2 runs on the core's DR6 (VMRUN's load of DR6 from the VMCB is not modelled), and
        # #VMEXIT leaves it as L2 had it: it reloads DR7, not DR6 (UNVERIFIED against APM
        # 15.6; KVM's nested_svm_vmexit() likewise keeps L2's DR6 as L1's).
        guest.dr6_in_core = True
        guest.on_external = lambda event, vector: self._for_l1(guest, event, vector)
        guest.on_nmi_from_apic = lambda: self._for_l1(guest, External.NMI, Vec.NMI)
        guest.l1_apic_open = lambda: self._l1_interrupts_open(l1)
        self._l2 = (guest, vmcb_pa, l1)
        cpu.regs[RAX] = vmcb.rax
        cpu.idtr_base, cpu.idtr_limit = vmcb.idtr_base, vmcb.idtr_limit & 0xFFFF
        cpu.nmi_pending, cpu.nmi_blocked = 0, False
        with entry_retired(cpu):
            self._enter(cpu, guest, vmcb, l1)

    def _enter(self, cpu: Cpu, guest: SvmGuest, vmcb: Vmcb, l1: L1State) -> None:
        try:
            failure = vmrun_failure(vmcb)
            if failure is not None:
                raise EntryFailed(failure)
            guest.enter()
        except EntryFailed as failed:
            self._vmrun_failed(cpu, failed.check)
            return
        except VmExit:
            self.exit_to_l1(cpu)  # the injection itself exited
            return
        guest.host_nmi = bool(l1.nmi_pending)  # held by GIF until now: it exits at once
        cpu.attn = True  # and so does an interrupt (SvmGuest.boundary())

    @staticmethod
    def _l1_interrupts_open(l1: L1State) -> bool:
        """With V_INTR_MASKING, L1's IF at VMRUN masks physical interrupts during L2 (15.21.1)."""
        return bool(l1.rflags & IF)

    def _for_l1(self, guest: SvmGuest, event: External, vector: int) -> None:
        """An NMI or interrupt for L1 arrives while L2 runs: the intercept exits before it is taken."""
        if event is External.INTERRUPT:
            guest.cpu.apic.request(vector)  # stays pending in L1's APIC (no acknowledge)
            guest.cpu.attn = True  # exits at this boundary if L1's IF lets it (boundary())
        else:
            guest.host_nmi = True
            guest.cpu.attn = True

    def run(self, cpu: Cpu, max_steps: int) -> Stop:
        """The core's run loop with #VMEXITs from L2 turned back into L1 execution."""
        start = cpu.work
        while True:
            try:
                stop = cpu.run(max(0, max_steps - (cpu.work - start)))
            except VmExit:
                self.exit_to_l1(cpu)
                continue
            if self._l2 is not None and self._l2[0].exit_on_stop(stop):
                self.exit_to_l1(cpu)
                continue
            return stop

    def exit_to_l1(self, cpu: Cpu) -> None:
        """#VMEXIT: the VMCB gets L2's state and the exit fields; L1 resumes after VMRUN (15.6)."""
        guest, vmcb_pa, l1 = self._l2
        nmi_for_l1 = guest.host_nmi
        guest.complete_exit()
        vmcb = guest.vmcb
        vmcb.rax = cpu.regs[RAX]
        vmcb.idtr_base, vmcb.idtr_limit = cpu.idtr_base, cpu.idtr_limit
        # The exit clears EVENTINJ.V (APM 15.20; Bochs). Whether the other bits survive is
        # UNVERIFIED; the model clears the word, as KVM's nested_svm_vmexit() does, since
        # nothing reads them once V is clear.
        vmcb.event_inj = vmcb.event_inj_err = 0
        write_exit(cpu.mem, vmcb_pa, vmcb)
        self._leave_guest(cpu, l1)
        # An intercepted NMI was never taken: it is still the one NMI latched for L1 (one
        # pending at VMRUN became host_nmi; another arriving meanwhile was lost), held by GIF.
        cpu.nmi_pending = 1 if nmi_for_l1 else l1.nmi_pending

    def _vmrun_failed(self, cpu: Cpu, check: str) -> None:
        """VMEXIT_INVALID: nothing ran; the exit code and infos change (APM 15.5.1), and EVENTINJ
        is cleared as at every #VMEXIT (see exit_to_l1())."""
        _, vmcb_pa, l1 = self._l2
        for offset, value in ((Offset.EXIT_CODE, ExitCode.INVALID), (Offset.EXIT_INFO_1, 0),
                              (Offset.EXIT_INFO_2, 0), (Offset.EVENT_INJ, 0), (Offset.EVENT_INJ_ERR, 0)):
            write_field(cpu.mem, vmcb_pa, offset, value)
        cpu.trace.append(ExitRecord("VMEXIT_INVALID", l1.rip, cpu.retired, check))
        self._leave_guest(cpu, l1)
        cpu.nmi_pending = l1.nmi_pending

    def _leave_guest(self, cpu: Cpu, l1: L1State) -> None:
        self._l2 = None
        back_to_l1(cpu)
        cpu.shutdown = False  # an intercepted shutdown is L2's
        cpu.halted = False
        cpu.gif = False  # #VMEXIT clears GIF (APM 15.6)
        cpu.rip, cpu.regs[RSP], cpu.regs[RAX], cpu.rflags = l1.rip, l1.rsp, l1.rax, l1.rflags
        cpu.idtr_base, cpu.idtr_limit = l1.idtr
        cpu.nmi_blocked = False  # L2's NMI blocking is L2's (APM 15.21.4: no VMCB field without vNMI)
