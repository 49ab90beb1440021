"""kvm_amd's nested SVM (arch/x86/kvm/svm/nested.c): L0 runs an L1 hypervisor's L2.

L1's VMRUN always exits to L0 (the hardware requires the intercept).
nested_svm_vmrun() reads L1's VMCB (vmcb12) from guest memory, checks it,
saves L1's state in vmcb01 and builds vmcb02 from both
(nested_vmcb02_prepare_control/_save()), which then runs with vmcb12's
EVENTINJ. An exit from L2 either goes to L1 (nested_svm_exit_handled() ->
nested_svm_vmexit(), which writes vmcb12 as the hardware would and resumes L1
after its VMRUN with GIF clear) or is L0's (nested_svm_exit_special(): INTR,
NMI, #NPF, exceptions vmcb01 intercepts), after which L2 resumes. Events for
L1 while L2 runs become #VMEXITs to L1 (svm_check_nested_events()); unlike
VMX, an NMI that exits is not consumed and reaches L1 after its STGI.

Modelled: the VMCB fields hw/svm/vmcb.py reads, intercepts merged as
vmcb01 | vmcb12, exceptions L0 queues for L2 that L1 intercepts (the
vCPU's exception_vmexit, an exit at the next check_nested_events()),
KVM_REQ_TRIPLE_FAULT as SVM_EXIT_SHUTDOWN, L1-injected events (soft ones returning to vmcb12's
next_rip, tracked in soft_int_* and nmi_l1_to_l2 for re-injection), the vNMI
hand-over of L1's pending NMI at VMRUN and #VMEXIT, KVM_GET/SET_NESTED_STATE.
Also L1's events left to L2 (no INTR/NMI intercept: injected into L2 by the
common code), vmcb12's V_IRQ/V_TPR in vmcb02 (nested_svm_virtualize_tpr()) and
nested vGIF (nested_vgif_enabled(), get_vgif_vmcb()). L1's MSR and I/O
permission maps decide which of L2's MSR and IOIO exits are L1's
(nested_svm_exit_handled_msr(), nested_svm_intercept_ioio()); L0 emulates the
rest. Not modelled: nested NPT (L2 shares L1's memory),
VMLOAD/VMSAVE's state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kvmodel import _faults
from kvmodel.arch.cpu import Cpu
from kvmodel.arch.events import Vec
from kvmodel.arch.regs import DR7_GD, EFER_SVME, IF, RAX, RCX, TF
from kvmodel.errors import ModelLimit
from kvmodel.hw.svm.root import check_vmcb_for_model, vmrun_failure
from kvmodel.hw.svm.vmcb import (
    EVTINJ_VALID,
    INTERRUPT_SHADOW,
    IOIO_SIZE_MASK,
    IOIO_SIZE_SHIFT,
    V_GIF,
    V_GIF_ENABLE,
    V_INTR_MASKING,
    V_IRQ,
    V_IRQ_INJECTION_BITS,
    V_NMI_BLOCKING,
    V_NMI_ENABLE,
    V_NMI_PENDING,
    V_TPR_MASK,
    VMCB_SIZE,
    EventInjType,
    ExitCode,
    Intercept,
    Offset,
    Vmcb,
    encode,
    exit_name,
    io_intercepted,
    msr_intercepted,
    read_vmcb,
    write_exit,
    write_field,
)  # fmt: skip
from kvmodel.kvm.uapi import InvalidArgument
from kvmodel.kvm.x86 import EBUSY, NestedExitRecord, Request, exception_is_soft

if TYPE_CHECKING:
    from kvmodel.kvm.svm.svm import Svm

# nested_svm_event_inj_valid_exept(): #CP and #VC only with shadow stacks / SEV-ES, which L1 lacks
_VALID_EXCEPTIONS = frozenset((Vec.DE, Vec.DB, Vec.BP, Vec.OF, Vec.BR, Vec.UD, Vec.NM, Vec.DF,
                               Vec.TS, Vec.NP, Vec.SS, Vec.GP, Vec.PF, Vec.MF, Vec.AC, Vec.MC,
                               Vec.XM, 28, 30))  # 28 #HV, 30 #SX
# nested_svm_exit_special(): exits L0 keeps whatever vmcb12 says.
_L0_ALWAYS = (ExitCode.INTR, ExitCode.NMI, ExitCode.NPF)
_EXIT_INTERCEPT = {
    ExitCode.HLT: Intercept.HLT, ExitCode.CPUID: Intercept.CPUID, ExitCode.IOIO: Intercept.IOIO,
    ExitCode.MSR: Intercept.MSR, ExitCode.WRITE_CR8: Intercept.CR8_WRITE,
    ExitCode.IRET: Intercept.IRET, ExitCode.SWINT: Intercept.INTN, ExitCode.VINTR: Intercept.VINTR,
    ExitCode.SHUTDOWN: Intercept.SHUTDOWN, ExitCode.ICEBP: Intercept.ICEBP,
    ExitCode.VMRUN: Intercept.VMRUN, ExitCode.VMLOAD: Intercept.VMLOAD,
    ExitCode.VMSAVE: Intercept.VMSAVE, ExitCode.STGI: Intercept.STGI, ExitCode.CLGI: Intercept.CLGI,
    ExitCode.VMMCALL: Intercept.VMMCALL,
}


@dataclass(frozen=True, slots=True)
class NestedSvmState:
    """struct kvm_nested_state for SVM (svm_get_nested_state()): the GUEST_MODE, RUN_PENDING and
    GIF_SET flags, vmcb12's address, the cached vmcb12 control area, and L1's state from
    vmcb01's save area. L2's registers travel as the vCPU's own (KVM_GET_REGS)."""

    guest_mode: bool
    run_pending: bool
    gif: bool
    vmcb12_gpa: int
    ctl: Vmcb
    l1: tuple[int, int, int, int]  # vmcb01's RIP, RSP, RFLAGS, RAX
    l1_idtr: tuple[int, int]


class NestedSvm:
    """struct svm_nested_state: vmcb12's address and cached copy, and L2's turn."""

    def __init__(self, cpu: Cpu, svm: Svm):
        cpu.has_svm = True  # the guest's CPUID offers SVM: EFER.SVME can be set
        self.svm = svm
        self.vmcb01 = svm.guest.vmcb
        self.vmcb12_gpa = 0
        self.ctl = Vmcb()  # vmcb12 as read at VMRUN (nested_copy_vmcb_control_to_cache())
        self.guest_mode = False
        self.run_pending = False  # nested_run_pending: vmcb12's EVENTINJ is still to go in
        self.l1_idtr = (0, 0)  # stands for vmcb01's save-area IDTR

    # -- VMRUN (nested_svm_vmrun()) ------------------------------------------------------

    def vmrun(self, cpu: Cpu, vmcb_pa: int) -> None:
        """nested_svm_vmrun(), called by vmrun_interception() once the permission checks passed."""
        vcpu = self.svm.vcpu
        if vmcb_pa & 0xFFF or vmcb_pa + VMCB_SIZE > cpu.mem_size:  # page_address_valid()
            vcpu.queue_exception(Vec.GP, 0)
            return
        vmcb12 = read_vmcb(cpu.mem, vmcb_pa)
        check_vmcb_for_model(vmcb12, cpu)
        if vmcb12.int_ctl & V_GIF_ENABLE and not self.svm.vgif:
            raise ModelLimit("V_GIF_ENABLE in vmcb12 on an L0 without vGIF (L1 is not offered it, "
                             "KVM ignores the bit) is not modelled", cpu.rip)
        failure = vmrun_failure(vmcb12) or self._check_controls(vmcb12)
        # svm_skip_emulated_instruction(): no single-step #DB for L1's TF here (upstream's
        # FIXME); vmexit() queues one, and a VMRUN whose checks fail gets none.
        self.svm.skip_svm_instruction(single_step=False)
        if failure is not None:
            self._vmrun_failed(cpu, vmcb_pa, vmcb12.rip)
            return
        l1 = self.vmcb01
        l1.rax, self.l1_idtr = cpu.regs[RAX], (cpu.idtr_base, cpu.idtr_limit)
        self.vmcb12_gpa, self.ctl = vmcb_pa, vmcb12
        self.run_pending = True
        self._enter_guest_mode(cpu, vmcb12)

    # -- KVM_GET/SET_NESTED_STATE (svm_get_nested_state(), svm_set_nested_state()) ---------

    def get_state(self) -> NestedSvmState:
        """In guest mode the cached control area first takes what L2's last run left in vmcb02
        (nested_sync_control_from_vmcb02()): an EVENTINJ that went in is gone from it."""
        ctl = self.ctl
        if self.guest_mode:
            vmcb02 = self.svm.vmcb
            ctl.event_inj, ctl.event_inj_err = vmcb02.event_inj, vmcb02.event_inj_err
            ctl.int_state = vmcb02.int_state
            ctl.int_ctl = self._int_ctl_for_l1(vmcb02)
        l1 = self.vmcb01
        return NestedSvmState(self.guest_mode, self.run_pending, self.svm.gif_set(),
                              self.vmcb12_gpa, replace(ctl, intercepts=set(ctl.intercepts)),
                              (l1.rip, l1.rsp, l1.rflags, l1.rax), self.l1_idtr)

    def set_state(self, state: NestedSvmState) -> None:
        """svm_set_nested_state(): InvalidArgument (-EINVAL) before any change for a state that
        does not fit; GIF first (on vmcb01), then vmcb02 from the cached control area and the
        vCPU's registers, which are L2's; vmcb01 gets L1's state back."""
        svm = self.svm
        cpu = svm.guest.cpu
        _check_state(state, cpu)
        # L2's registers: on a fresh vCPU what KVM_SET_REGS put in vmcb01; on this vCPU in L2,
        # vmcb02's save area, which svm_leave_nested() leaves as it is.
        l2 = svm.guest.vmcb
        if not state.guest_mode:
            if self.guest_mode:  # svm_leave_nested()
                svm.guest.vmcb = self.vmcb01
                cpu.idtr_base, cpu.idtr_limit = self.l1_idtr
                self.guest_mode = self.run_pending = False
            svm.set_gif(state.gif)
            return
        # svm_leave_nested() comes before svm_set_gif(): GIF is written to vmcb01, where
        # vmcb02 takes L1's GIF from (nested_vmcb02_prepare_control()); written to the old
        # vmcb02 it would be lost, and L2 would run with L1's GIF as it was at VMRUN. (The
        # core keeps L2's IDTR: vmcb02's save area, which L2 gets back below.)
        svm.guest.vmcb = self.vmcb01
        self.guest_mode = self.run_pending = False
        svm.set_gif(state.gif)
        self.vmcb12_gpa = state.vmcb12_gpa
        self.ctl = replace(state.ctl, intercepts=set(state.ctl.intercepts))
        self.l1_idtr, self.run_pending = state.l1_idtr, state.run_pending
        vmcb02 = self._prepare_vmcb02(self.ctl, l2.rip)
        vmcb02.rip, vmcb02.rsp, vmcb02.rflags = l2.rip, l2.rsp, l2.rflags
        vmcb02.cr2 = l2.cr2  # the save area's copy, which only a run of L2 syncs with CR2
        vmcb02.int_state = l2.int_state
        l1 = self.vmcb01
        l1.rip, l1.rsp, l1.rflags, l1.rax = state.l1
        svm.guest.vmcb = vmcb02
        self.guest_mode = True

    @staticmethod
    def _check_controls(vmcb12: Vmcb) -> str | None:
        """nested_vmcb_check_controls(): the VMRUN intercept, vNMI only with the NMI intercept,
        and a valid EVENTINJ."""
        if Intercept.VMRUN not in vmcb12.intercepts:
            return "the VMRUN intercept is clear"
        if vmcb12.int_ctl & V_NMI_ENABLE and Intercept.NMI not in vmcb12.intercepts:
            return "V_NMI_ENABLE without the NMI intercept"  # "KVM: nSVM: Implement support for nested VNMI"
        word = vmcb12.event_inj
        if not word & EVTINJ_VALID:
            return None
        type_, vector = (word >> 8) & 7, word & 0xFF
        if type_ not in EventInjType._value2member_map_:
            return f"EVENTINJ type {type_} is reserved"
        if type_ == EventInjType.EXEPT and vector not in _VALID_EXCEPTIONS:
            return f"EVENTINJ exception with vector {vector}"
        return None

    def _vmrun_failed(self, cpu: Cpu, vmcb_pa: int, l2_rip: int) -> None:
        """The consistency checks failed: SVM_EXIT_ERR in vmcb12, L1 goes on after VMRUN."""
        for offset, value in ((Offset.EXIT_CODE, ExitCode.INVALID), (Offset.EXIT_INFO_1, 0),
                              (Offset.EXIT_INFO_2, 0), (Offset.EVENT_INJ, 0),
                              (Offset.EVENT_INJ_ERR, 0)):
            write_field(cpu.mem, vmcb_pa, offset, value)
        self.svm.set_gif(False)
        cpu.trace.append(NestedExitRecord("INVALID", l2_rip, cpu.retired, "vmcb12"))

    def _enter_guest_mode(self, cpu: Cpu, vmcb12: Vmcb) -> None:
        """enter_svm_guest_mode(): vmcb02 becomes current, then GIF is set."""
        svm = self.svm
        vmcb02 = self._prepare_vmcb02(vmcb12, vmcb12.rip)
        vmcb02.rip, vmcb02.rsp, vmcb02.rflags = vmcb12.rip, vmcb12.rsp, vmcb12.rflags | 0x2
        svm.guest.vmcb = vmcb02
        cpu.regs[RAX] = vmcb12.rax
        cpu.cr2 = vmcb12.cr2  # nested_vmcb02_prepare_save(): vcpu->arch.cr2
        cpu.idtr_base, cpu.idtr_limit = vmcb12.idtr_base, vmcb12.idtr_limit & 0xFFFF
        self.guest_mode = True
        svm.vcpu.requests |= Request.EVENT  # kvm_set_rflags() of L2's RFLAGS
        svm.set_gif(True)

    def _prepare_vmcb02(self, vmcb12: Vmcb, l2_rip: int) -> Vmcb:
        """nested_vmcb02_prepare_control(); `l2_rip` is where L2 starts (soft_int_old_rip)."""
        svm, vmcb01 = self.svm, self.vmcb01
        vmcb02 = Vmcb(cs_base=vmcb12.cs_base)  # nested_vmcb02_prepare_save()
        self._merge_intercepts(vmcb02, vmcb12)
        # V_GIF/V_GIF_ENABLE are L2's own with nested vGIF, else vmcb01's (L1's GIF)
        gif_from = vmcb12.int_ctl if self.vgif_enabled() else vmcb01.int_ctl
        vmcb02.int_ctl = (vmcb12.int_ctl & (V_TPR_MASK | V_IRQ_INJECTION_BITS | self._vnmi_bits())) | (
            vmcb01.int_ctl & V_INTR_MASKING) | (gif_from & (V_GIF | V_GIF_ENABLE))
        self._take_l1_vnmi()
        vmcb02.int_vector = vmcb12.int_vector & 0xFF
        vmcb02.int_state = vmcb12.int_state & INTERRUPT_SHADOW
        vmcb02.event_inj, vmcb02.event_inj_err = vmcb12.event_inj, vmcb12.event_inj_err
        l1_has_nrips = svm.nrips  # L1 is offered NRIPS when L0 uses it
        if (l1_has_nrips or not self.run_pending) and not _faults.on("nested_svm_next_rip_not_synced"):
            vmcb02.next_rip = vmcb12.next_rip  # the return address of an injected soft event
        svm.nmi_l1_to_l2 = (vmcb12.event_inj & (EVTINJ_VALID | 0x700)) == (
            EVTINJ_VALID | EventInjType.NMI << 8)
        if _is_soft(vmcb12.event_inj) and not _faults.on("nested_svm_soft_int_not_tracked"):
            svm.soft_int_injected = True
            svm.soft_int_csbase = vmcb12.cs_base
            svm.soft_int_old_rip = l2_rip
            svm.soft_int_next_rip = vmcb12.next_rip if l1_has_nrips or not self.run_pending else l2_rip
        return vmcb02

    def _merge_intercepts(self, vmcb02: Vmcb, vmcb12: Vmcb) -> None:
        """nested_vmcb02_recalc_intercepts(): vmcb01 | vmcb12."""
        vmcb01 = self.vmcb01
        intercepts = set(vmcb01.intercepts)
        if vmcb12.int_ctl & V_INTR_MASKING:
            intercepts.discard(Intercept.CR8_WRITE)  # L2's CR8 is V_TPR, none of L1's business
            if not vmcb01.rflags & IF:
                intercepts.discard(Intercept.VINTR)  # L1's window cannot open while L2 runs
        vmcb02.intercepts = intercepts | vmcb12.intercepts
        vmcb02.exception_intercepts = vmcb01.exception_intercepts | vmcb12.exception_intercepts

    def restore_l1_v_irq(self) -> None:
        """svm_clear_vintr() in L2: vmcb02's V_IRQ bits and vector are L1's again."""
        vmcb02, ctl = self.svm.vmcb, self.ctl
        vmcb02.int_ctl |= ctl.int_ctl & V_IRQ_INJECTION_BITS
        vmcb02.int_vector = ctl.int_vector

    def recalc_intercepts(self) -> None:
        """recalc_intercepts(): vmcb01 changed while L2 runs."""
        self._merge_intercepts(self.svm.vmcb, self.ctl)

    def vgif_enabled(self) -> bool:
        """nested_vgif_enabled(): L1 is offered vGIF when L0 uses it, and vmcb12 enables it."""
        return self.svm.vgif and bool(self.ctl.int_ctl & V_GIF_ENABLE)

    def _vnmi_bits(self) -> int:
        """nested_vnmi_enabled(): L1 is offered vNMI when L0 uses it, and vmcb12 enables it."""
        if self.svm.vnmi and self.ctl.int_ctl & V_NMI_ENABLE:
            return V_NMI_PENDING | V_NMI_ENABLE | V_NMI_BLOCKING
        return 0

    def _take_l1_vnmi(self) -> None:
        """With vNMI, an NMI the CPU holds for L1 moves into nmi_pending while L2 runs."""
        svm, vmcb01 = self.svm, self.vmcb01
        if not svm.vnmi or not vmcb01.int_ctl & V_NMI_PENDING:
            return
        vcpu = svm.vcpu
        # B1 of the vNMI review (v2 10/11): the masked bit's value was added, not one
        vcpu.nmi_pending += V_NMI_PENDING if _faults.on("nested_vnmi_pending_adds_bit") else 1
        vcpu.requests |= Request.EVENT

    # -- exits from L2 -----------------------------------------------------------------

    def reflect(self) -> bool:
        """nested_svm_exit_special() / nested_svm_exit_handled(): True when L1 got the exit."""
        code = self.svm.vmcb.exit_code
        if not self._l1_wants(code):
            return False
        self.vmexit()
        return True

    def _l1_wants(self, code: int) -> bool:
        if code in _L0_ALWAYS:
            return False
        if ExitCode.EXCP_BASE <= code < ExitCode.EXCP_BASE + 32:
            vector = code - ExitCode.EXCP_BASE
            return not self.vmcb01.exception_intercepts >> vector & 1
        intercept = _EXIT_INTERCEPT.get(code)
        if intercept is None or intercept not in self.ctl.intercepts:
            return False
        vmcb02, cpu = self.svm.vmcb, self.svm.guest.cpu
        if code == ExitCode.MSR:  # nested_svm_exit_handled_msr(): L1's MSR permission map
            return msr_intercepted(cpu.mem, self.ctl.msrpm_base_pa, cpu.regs[RCX] & 0xFFFFFFFF,
                                   write=bool(vmcb02.exit_info_1 & 1))
        if code == ExitCode.IOIO:  # nested_svm_intercept_ioio(): L1's I/O permission map
            info = vmcb02.exit_info_1
            return io_intercepted(cpu.mem, self.ctl.iopm_base_pa, info >> 16,
                                  (info & IOIO_SIZE_MASK) >> IOIO_SIZE_SHIFT)
        return True

    def is_exception_vmexit(self, vector: int) -> bool:
        """nested_svm_is_exception_vmexit(): an exception KVM queues for L2 that L1 intercepts."""
        return self.guest_mode and bool(self.ctl.exception_intercepts >> vector & 1)

    def inject_exception_vmexit(self) -> None:
        """nested_svm_inject_exception_vmexit(): vcpu->arch.exception_vmexit becomes L1's
        #VMEXIT. A #DB's payload goes to DR6 first, as the CPU writes DR6 before a #DB
        intercept (KVM's db_interception() reads it from the VMCB); #PF's to EXITINFO2."""
        vcpu = self.svm.vcpu
        exc, vmcb02 = vcpu.exception_vmexit, self.svm.vmcb
        vmcb02.exit_code = ExitCode.EXCP_BASE + exc.vector
        if exc.has_error_code:
            vmcb02.exit_info_1 = exc.error_code
        if exc.vector == Vec.PF:
            vmcb02.exit_info_2 = exc.payload if exc.has_payload else vcpu.cpu.cr2
        elif exc.vector == Vec.DB:
            vcpu.deliver_exception_payload(exc)
            vcpu.cpu.dr7 &= ~DR7_GD
        self.vmexit()

    def triple_fault(self) -> None:
        """nested_svm_triple_fault(): KVM_REQ_TRIPLE_FAULT in L2 is SVM_EXIT_SHUTDOWN for an L1
        that intercepts SHUTDOWN."""
        if not self.guest_mode or Intercept.SHUTDOWN not in self.ctl.intercepts:
            return
        vcpu = self.svm.vcpu
        vcpu.requests &= ~Request.TRIPLE_FAULT
        vcpu.trace_l2_shutdown()  # L2 shut down, as on a CPU
        self.simple_vmexit(ExitCode.SHUTDOWN)

    def simple_vmexit(self, code: ExitCode) -> None:
        """nested_svm_simple_vmexit(): an exit with no information of its own."""
        vmcb02 = self.svm.vmcb
        vmcb02.exit_code, vmcb02.exit_info_1, vmcb02.exit_info_2 = code, 0, 0
        self.vmexit()

    def vmexit(self) -> None:
        """nested_svm_vmexit(): write vmcb12 as the hardware would, then resume L1."""
        svm, vcpu = self.svm, self.svm.vcpu
        cpu = svm.guest.cpu
        vmcb02, vmcb01 = svm.vmcb, self.vmcb01
        write_exit(cpu.mem, self.vmcb12_gpa, self._vmcb12_at_exit(vmcb02, cpu))
        self.guest_mode = self.run_pending = False
        # L1's state is loaded and runnable: a shutdown that exited (SHUTDOWN intercept) was L2's
        cpu.shutdown = False
        svm.guest.vmcb = vmcb01
        cpu.regs[RAX] = vmcb01.rax
        cpu.idtr_base, cpu.idtr_limit = self.l1_idtr
        if Intercept.INTR not in self.ctl.intercepts:
            vcpu.requests |= Request.EVENT
        self._give_back_l1_vnmi(vmcb02)
        svm.set_gif(False)
        vcpu.requests |= Request.EVENT  # kvm_set_rflags() of L1's RFLAGS
        svm.nmi_l1_to_l2 = svm.soft_int_injected = False
        if _faults.on("nested_svm_exitintinfo_from_vmcb02"):
            # before the fix: only the exception and interrupt queues were cleared
            nmi_injected = vcpu.nmi_injected
            vcpu.clear_event_queues()
            vcpu.nmi_injected = nmi_injected
        else:
            vcpu.clear_event_queues()
        if vmcb01.rflags & TF and not _faults.on("nested_svm_vmexit_no_vmrun_single_step"):
            # L1 single-stepped its VMRUN: the trap comes now, before L1's next instruction
            # (9a7de6ecc3ed); queued with no payload, so DR6.BS is not set for it
            vcpu.queue_exception(Vec.DB)
        cpu.trace.append(NestedExitRecord(exit_name(vmcb02.exit_code), vmcb02.rip, cpu.retired, "vmcb12"))

    def _vmcb12_at_exit(self, vmcb02: Vmcb, cpu: Cpu) -> Vmcb:
        """nested_svm_vmexit_update_vmcb12() and nested_save_pending_event_to_vmcb12()."""
        svm = self.svm
        vmcb12 = Vmcb()
        vmcb12.rip, vmcb12.rsp, vmcb12.rflags = vmcb02.rip, vmcb02.rsp, svm.get_rflags()
        vmcb12.rax = cpu.regs[RAX]
        vmcb12.cr2 = self._l2_cr2(vmcb02, cpu)
        vmcb12.idtr_base, vmcb12.idtr_limit = cpu.idtr_base, cpu.idtr_limit
        vmcb12.int_state = vmcb02.int_state
        vmcb12.exit_code = vmcb02.exit_code
        vmcb12.exit_info_1, vmcb12.exit_info_2 = vmcb02.exit_info_1, vmcb02.exit_info_2
        vmcb12.exit_int_info, vmcb12.exit_int_info_err = self._pending_event()
        vmcb12.next_rip = vmcb02.next_rip if svm.nrips else 0
        vmcb12.int_ctl = self._int_ctl_for_l1(vmcb02)
        return vmcb12

    @staticmethod
    def _l2_cr2(vmcb02: Vmcb, cpu: Cpu) -> int:
        """vcpu->arch.cr2 (5c247d08bc81 "KVM: nSVM: Use vcpu->arch.cr2 when updating vmcb12 on
        nested #VMEXIT"). Before it, vmcb02's CR2, which svm_vcpu_run() syncs only around a run
        of L2: stale when the exit is synthesized before L2 ran, e.g. right after a restore
        (KVM_SET_SREGS put CR2 in vcpu->arch.cr2 only) or after KVM injected a #PF into L2."""
        return vmcb02.cr2 if _faults.on("nested_svm_vmexit_cr2_from_vmcb02") else cpu.cr2

    def _pending_event(self) -> tuple[int, int]:
        """nested_save_pending_event_to_vmcb12(): what L0 was about to (re-)inject into L2 goes
        to L1 as EXITINTINFO ("KVM: nSVM: synthesize correct EXITINTINFO on vmexit"; before it,
        vmcb02's EXITINTINFO as the last real exit left it, the bug of that name)."""
        if _faults.on("nested_svm_exitintinfo_from_vmcb02"):
            vmcb02 = self.svm.vmcb
            return vmcb02.exit_int_info, vmcb02.exit_int_info_err
        vcpu = self.svm.vcpu
        exc, irq = vcpu.exception, vcpu.interrupt
        if exc.injected:
            code = exc.error_code if exc.has_error_code else None
            return encode(exc.vector, EventInjType.EXEPT, code), exc.error_code if code is not None else 0
        if vcpu.nmi_injected:
            return EVTINJ_VALID | EventInjType.NMI << 8, 0
        if irq.injected:
            return encode(irq.nr, EventInjType.SOFT if irq.soft else EventInjType.INTR, None), 0
        return 0, 0

    def _int_ctl_for_l1(self, vmcb02: Vmcb) -> int:
        """nested_sync_control_from_vmcb02(): V_TPR, V_IRQ and (nested vNMI) L2's NMI bits as
        L2 left them, unless the VINTR intercept (and so V_IRQ) is L0's own window."""
        mask = V_TPR_MASK | V_IRQ | (self._vnmi_bits() & ~V_NMI_ENABLE)
        if self.vgif_enabled():
            mask |= V_GIF  # L2's own vGIF
        if Intercept.VINTR in vmcb02.intercepts and Intercept.VINTR not in self.ctl.intercepts:
            mask &= ~V_IRQ
        return (self.ctl.int_ctl & ~mask) | (vmcb02.int_ctl & mask)

    def _give_back_l1_vnmi(self, vmcb02: Vmcb) -> None:
        """With vNMI, L1's NMI state goes back to vmcb01: blocking, and one pending NMI.

        vmcb01's V_NMI_BLOCKING is taken from vmcb02 whatever vmcb02's bits stand for: with
        nested vNMI they are L2's (see nested/svm_l2_vnmi_blocking_leaks_to_l1)."""
        svm, vmcb01 = self.svm, self.vmcb01
        if not svm.vnmi:
            return
        vcpu = svm.vcpu
        vmcb01.int_ctl = (vmcb01.int_ctl & ~V_NMI_BLOCKING) | (vmcb02.int_ctl & V_NMI_BLOCKING)
        if vcpu.nmi_pending:
            vcpu.nmi_pending -= 1
            vmcb01.int_ctl |= V_NMI_PENDING
        else:
            vmcb01.int_ctl &= ~V_NMI_PENDING

    # -- events for L1 while L2 runs (svm_check_nested_events()) --------------------------

    def check_nested_events(self) -> int:
        """svm_check_nested_events(), for the events modelled, in its order: an exception L1
        intercepts ends L2's turn; an exception for L2 goes in first (it arose in L2's
        instruction: an NMI or interrupt for L1 exits at the boundary after its delivery, KVM
        asking for an immediate exit); then an NMI, then an interrupt, L1 intercepts ends L2's
        turn, the NMI staying pending (APM 15.13). EBUSY while VMRUN's injection is still to go
        in, and for NMIs and interrupts while an event is to be re-injected into L2."""
        if not self.guest_mode:
            return 0
        svm, vcpu = self.svm, self.svm.vcpu
        block_events = self.run_pending or vcpu.event_needs_reinjection()
        # "KVM: x86: pending exceptions must not be blocked by an injected event" (4020da3b9f0c):
        # only VMRUN's own injection holds an exception back; an event L0 is re-injecting goes
        # to L1 as EXITINTINFO of the exception's exit, or is lost to the exception in L2.
        block_exceptions = block_events if _faults.on(
            "nested_exception_blocked_by_injected_event") else self.run_pending
        vcpu.morph_pending_exception_late()  # a fault point: a no-op unless it is on
        if vcpu.exception_vmexit.pending:
            if block_exceptions:
                return EBUSY
            self.inject_exception_vmexit()
            return 0
        if vcpu.exception.pending:
            return EBUSY if block_exceptions else 0
        if vcpu.nmi_pending and not svm.nmi_blocked():
            if block_events:
                return EBUSY
            if Intercept.NMI in self.ctl.intercepts:
                self.simple_vmexit(ExitCode.NMI)
            return 0
        if vcpu.has_injectable_intr() and not svm.interrupt_blocked():
            if block_events:
                return EBUSY
            if Intercept.INTR in self.ctl.intercepts:
                self.simple_vmexit(ExitCode.INTR)
        return 0


def _is_soft(word: int) -> bool:
    """is_evtinj_soft(): INT n, or INT3/INTO injected as exceptions."""
    if not word & EVTINJ_VALID:
        return False
    kind, vector = (word >> 8) & 7, word & 0xFF
    return kind == EventInjType.SOFT or (kind == EventInjType.EXEPT and exception_is_soft(vector))



def _check_state(state: NestedSvmState, cpu: Cpu) -> None:
    """The -EINVAL cases of KVM_SET_NESTED_STATE the model's state can express:
    kvm_arch_vcpu_ioctl() ("nested_run_pending implies guest_mode") and
    svm_set_nested_state() (with EFER.SVME clear only GIF_SET, no guest mode; vmcb12's address
    page_address_valid(); the cached controls pass nested_vmcb_check_controls())."""
    if state.run_pending and not state.guest_mode:
        raise InvalidArgument("KVM_SET_NESTED_STATE: RUN_PENDING without GUEST_MODE")
    if not cpu.efer & EFER_SVME and (state.guest_mode or not state.gif):
        raise InvalidArgument("KVM_SET_NESTED_STATE: EFER.SVME is clear: only GIF_SET allowed")
    if not state.guest_mode:
        return
    if state.vmcb12_gpa & 0xFFF or state.vmcb12_gpa >= cpu.mem_size:
        raise InvalidArgument(f"KVM_SET_NESTED_STATE: vmcb12 at {state.vmcb12_gpa:#x} is no page")
    failure = NestedSvm._check_controls(state.ctl)
    if failure is not None:
        raise InvalidArgument(f"KVM_SET_NESTED_STATE: {failure}")
