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
whether its interrupts can exit L2 at all (15.21.1), else L2's IF does.
Without the intercept, L2 takes the NMI or interrupt through its own IDT
(15.21): an interrupt masked by L1's IF at VMRUN under V_INTR_MASKING (the
core's `hif`), else by L2's IF; an NMI by the core's one NMI mask, which
no VMCB field holds without vNMI, so it stays as L2 left it at #VMEXIT.

Not modelled: the host save area (VM_HSAVE_PA; the model keeps L1's state
beside memory), nested paging and ASIDs (L2 shares L1's identity-mapped
memory), segment and control registers (L2 runs flat, as L1: VMRUN checks that the VMCB's
CR0, CR3, CR4 and DR7 are L1's, else a model limit; its segments, GDTR, DR6 and G_PAT are
not read), what VMLOAD/VMSAVE
move, vGIF for L2 without both the
INTR and NMI intercepts (ModelLimit). With vGIF (V_GIF_ENABLE in L1's
VMCB) L2's STGI/CLGI flip V_GIF, which holds its virtual interrupts and
never L1's intercepted events (guest model, cpu.py; APM 15.33).
L1's V_IRQ for L2 exits with VINTR or is taken through L2's IDT, and
with V_INTR_MASKING L2's CR8 is V_TPR (cpu.py; APM 15.21.4). vNMI for L2 (V_NMI_ENABLE in L1's
VMCB) is the guest model's own (cpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmodel.arch.cpu import Cpu, External, Stop
from kvmodel.arch.events import Vec
from kvmodel.arch.faults import Fault
from kvmodel.arch.regs import DR6_BS, EFER_SVME, IF, RAX, RSP, TF, Shadow
from kvmodel.errors import ModelLimit
from kvmodel.hw.base import EntryFailed, ExitRecord, VmExit, back_to_l1, entry_retired
from kvmodel.hw.svm.cpu import SvmGuest
from kvmodel.hw.svm.vmcb import (
    V_GIF_ENABLE,
    V_INTR_MASKING,
    V_NMI_ENABLE,
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
    theirs = (vmcb.cr0, vmcb.cr3, vmcb.cr4, vmcb.dr7)
    if theirs != (cpu.cr0, cpu.cr3, cpu.cr4, cpu.dr7):
        raise ModelLimit("an L2 whose CR0, CR3, CR4 or DR7 differ from L1's is not modelled (L2 "
                         "runs as L1 does; VMCB_SETUP copies them)", rip)
    if vmcb.int_ctl & V_GIF_ENABLE and not {Intercept.INTR, Intercept.NMI} <= vmcb.intercepts:
        raise ModelLimit("vGIF for L2 that takes L1's interrupts or NMIs itself is not modelled", rip)


def vmrun_failure(vmcb: Vmcb) -> str | None:
    """The consistency checks the model makes (APM 15.5.1 "Canonicalization and Consistency
    Checks"): EFER.SVME set and a nonzero ASID (KVM: nested_vmcb_check_save() and
    nested_vmcb_check_controls()). Those on CR0, CR3 and CR4 cannot fail: they are L1's."""
    if not vmcb.efer & EFER_SVME:
        return "EFER.SVME is clear in the guest state"
    if vmcb.asid == 0:
        return "the ASID is zero"
    # vNMI needs the NMI intercept: APM 15.21.10 (UNVERIFIED: the text was not read here);
    # KVM's __nested_vmcb_check_controls() refuses it, and kvm-unit-tests' svm vnmi test
    # expects SVM_EXIT_ERR from hardware as from KVM.
    if vmcb.int_ctl & V_NMI_ENABLE and Intercept.NMI not in vmcb.intercepts:
        return "V_NMI_ENABLE without the NMI intercept"
    return None


class SvmRoot:
    """The CPU's SVM host state: the L2 running, if any, with what L1 left behind."""

    def __init__(self, cpu: Cpu):
        cpu.svm = self
        cpu.has_svm = True
        cpu.amd_ext = True  # an AMD CPU (deliver.py ext_bit())
        self._l2: tuple[SvmGuest, int, L1State] | None = None

    def vmrun(self, cpu: Cpu, vmcb_pa: int, next_rip: int) -> None:
        """VMRUN: L2 runs until a #VMEXIT (run() below); a failed check exits at once."""
        if vmcb_pa & 0xFFF or vmcb_pa + VMCB_SIZE > cpu.mem_size:
            raise Fault(Vec.GP, 0)
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
        guest.tpr_virtualized = lambda: bool(vmcb.int_ctl & V_INTR_MASKING)  # L2's CR8 (15.21.4)
        guest.on_external = lambda event, vector: self._arrival(guest, event, vector)
        guest.on_nmi_from_apic = lambda: self._arrival(guest, External.NMI, Vec.NMI)
        guest.l1_apic_open = lambda: self._l1_interrupts_open(guest, l1)
        self._l2 = (guest, vmcb_pa, l1)
        cpu.regs[RAX] = vmcb.rax
        cpu.cr2 = vmcb.cr2  # VMRUN loads CR2 (APM 15.5.1); #VMEXIT does not restore L1's
        cpu.idtr_base, cpu.idtr_limit = vmcb.idtr_base, vmcb.idtr_limit & 0xFFFF
        cpu.nmi_pending, cpu.nmi_blocked = 0, False
        if Intercept.INTR not in vmcb.intercepts:
            # L1's interrupts are L2's to take through L2's IDT (APM 15.21.1)
            cpu.apic_delivers = True
            cpu.hif = l1.rflags & IF if vmcb.int_ctl & V_INTR_MASKING else None
        # L1's single-step trap over VMRUN comes after the #VMEXIT, before L1's next
        # instruction, not in L2 (_leave_guest()).
        cpu.step_trap_replaced = bool(l1.rflags & TF)
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
            if Intercept.NMI not in vmcb.intercepts:
                cpu.nmi_pending = l1.nmi_pending  # still latched: the exit leaves it so
            self.exit_to_l1(cpu)  # the injection itself exited
            return
        if Intercept.NMI in vmcb.intercepts:
            guest.host_nmi = bool(l1.nmi_pending)  # held by GIF until now: it exits at once
        else:
            cpu.nmi_pending = l1.nmi_pending  # held by GIF until now: L2 takes it (15.21)
        cpu.attn = True  # and so does an interrupt (SvmGuest.boundary())

    @staticmethod
    def _l1_interrupts_open(guest: SvmGuest, l1: L1State) -> bool:
        """Whether a physical interrupt is unmasked in L2, so that its intercept exits (15.21.1):
        with V_INTR_MASKING L1's IF at VMRUN decides, else L2's own IF. Interrupts are not
        recognized in L2's interrupt shadow either (15.21.5), so the intercept waits for its
        end (Bochs event.cc: the shadow gates the INTR intercept check; under KVM the VINTR
        window L0 opens for L2 waits for it in hardware)."""
        if Intercept.INTR not in guest.vmcb.intercepts or guest.cpu.shadow is not Shadow.NONE:
            return False  # L2 takes it (the core's hif), or not yet
        if guest.vmcb.int_ctl & V_INTR_MASKING:
            return bool(l1.rflags & IF)
        return bool(guest.cpu.rflags & IF)

    @staticmethod
    def _arrival(guest: SvmGuest, event: External, vector: int) -> None:
        """An NMI or interrupt for L1 arrives while L2 runs: the intercept exits before it is
        taken (15.13); without one, L2 takes it through its own IDT (15.21)."""
        cpu, intercepts = guest.cpu, guest.vmcb.intercepts
        if event is External.INTERRUPT:
            cpu.apic.request(vector)  # stays pending in L1's APIC until an exit or L2 takes it
        elif Intercept.NMI in intercepts:
            guest.host_nmi = True
        else:
            cpu.raise_nmi()
        cpu.attn = True  # exits or is taken at this boundary if unmasked (boundary())

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
        l2_nmis = None if Intercept.NMI in guest.vmcb.intercepts else (cpu.nmi_pending, cpu.nmi_blocked)
        guest.complete_exit()
        vmcb = guest.vmcb
        vmcb.rax, vmcb.cr2 = cpu.regs[RAX], cpu.cr2  # #VMEXIT saves CR2 (APM 15.6)
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
        if l2_nmis is not None:
            # L2 took NMIs itself: the core's one NMI latch and mask are as L2 left them, no
            # VMCB field holding them without vNMI (UNVERIFIED against APM 15.6; KVM's
            # nmi_masked is likewise one per vCPU, kept across nested_svm_vmexit()).
            cpu.nmi_pending, cpu.nmi_blocked = l2_nmis

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
        if l1.rflags & TF:
            # VMRUN single-stepped: the #DB trap (DR6.BS) follows the #VMEXIT, a failed
            # VMRUN's too, and RIP is after the VMRUN (APM as upstream 9a7de6ecc3ed reads it,
            # and kvm-unit-tests svm host_rflags; UNVERIFIED against the APM's own text)
            cpu.pending_dbg |= DR6_BS
            cpu.attn = True
