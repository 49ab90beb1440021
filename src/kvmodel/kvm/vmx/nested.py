"""kvm_intel's nested VMX (arch/x86/kvm/vmx/nested.c): L0 runs an L1 hypervisor's L2.

L1's VMX instructions exit to L0, which emulates them as SDM 30 says (the
VMCS bookkeeping is the hardware model's: NestedVmx extends hw's VmxRoot).
VMLAUNCH/VMRESUME (nested_vmx_run()) build vmcs02 from vmcs01 and L1's vmcs12
(prepare_vmcs02()) and make it the current VMCS. An exit from L2 either
goes to L1 (nested_vmx_reflect_vmexit() -> nested_vmx_vmexit(), which fills
vmcs12 like hardware would and returns to L1 at HOST_RIP) or is handled by
L0, which then resumes L2. Events for L1 while L2 runs become VM exits to L1
(vmx_check_nested_events()); an event L0 was about to re-inject into L2
goes to L1 as IDT-vectoring information (vmcs12_save_pending_event()).

Modelled: the vmcs12 fields hw/vmx/root.py knows, pin/processor/exception
controls merged as KVM merges them, NMI and external-interrupt exits for
L1, L1-injected events (soft ones with L1's instruction length), the notify
window applied to vmcs02, exceptions L0 queues for L2 that L1 intercepts
(exception_vmexit, an exit at the next check_nested_events()), KVM_REQ_TRIPLE_FAULT in
L2 as EXIT_REASON_TRIPLE_FAULT, L1's I/O and MSR bitmaps (nested_vmx_exit_handled_io/msr():
L0 takes every such exit and emulates those L1 does not want), the monitor trap flag and
mtf_pending. Not modelled: nested EPT (identity), VMCS shadowing, nested SVM.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kvmodel import _faults
from kvmodel.arch.cpu import Cpu
from kvmodel.arch.decode import decode
from kvmodel.arch.events import EventType, Vec
from kvmodel.arch.regs import CR0_PE, DR6_BD, DR6_BS, IF, RCX, TF, Mode, Shadow
from kvmodel.hw.base import EntryFailed, InvalidGuestState
from kvmodel.hw.vmx.cpu import check_entry, io_exits, msr_exits
from kvmodel.hw.vmx.real_l2 import (
    HostMode,
    enters_real_mode,
    load_real_mode,
    restore_host_mode,
    save_real_mode,
)
from kvmodel.hw.vmx.root import VmxError, VmxRoot, check_vmcs_for_model
from kvmodel.hw.vmx.vmcs import (
    EXIT_REASONS,
    FAILED_VMENTRY,
    INTR_INFO_UNBLOCK_NMI,
    INTR_INFO_VALID,
    Activity,
    ExitReason,
    Interruptibility,
    Pin,
    Proc,
    Secondary,
    Vmcs,
    info_type,
    info_vector,
    intr_info,
)  # fmt: skip
from kvmodel.kvm.uapi import InvalidArgument, ShadowBits
from kvmodel.kvm.x86 import (
    DR6_ACTIVE_LOW,
    EBUSY,
    MpState,
    NestedExitRecord,
    QueuedException,
    Request,
    exception_is_soft,
)  # fmt: skip

if TYPE_CHECKING:
    from kvmodel.kvm.vmx.vmx import Vmx

DR6_BT = 1 << 15  # a task switch's T-flag #DB (SDM 17.2.3): not in a #DB exit's qualification
# (SDM Table 27-1), and it outranks MTF

# Exits L0 keeps for itself (nested_vmx_l0_wants_exit()): its host IRQs and NMIs, EPT, notify.
_L0_ALWAYS = (ExitReason.EXTERNAL_INTERRUPT, ExitReason.EPT_VIOLATION, ExitReason.NOTIFY)
# Exits L1 always gets (nested_vmx_l1_wants_exit()): CPUID, the VMX instructions, triple fault.
_L1_ALWAYS = (ExitReason.CPUID, ExitReason.VMCLEAR, ExitReason.VMLAUNCH, ExitReason.VMPTRLD,
              ExitReason.VMREAD, ExitReason.VMRESUME, ExitReason.VMWRITE, ExitReason.VMXON,
              ExitReason.TRIPLE_FAULT, ExitReason.VMCALL)
# L2's state that moves between vmcs12 and vmcs02 (prepare_vmcs02(), sync_vmcs02_to_vmcs12()).
# Not the activity state: a halted L2 is KVM's mp_state (nested_vmx_run() halts the vCPU
# rather than enter L2 in HLT); vmcs02's stays ACTIVE (UNVERIFIED: prepare_vmcs02() read,
# no write of GUEST_ACTIVITY_STATE found).
_L2_STATE = ("guest_rip", "guest_rsp", "guest_rflags", "guest_interruptibility",
             "guest_pending_dbg_exceptions")
_L1_IF_CONTROL = {
    ExitReason.HLT: Proc.HLT_EXITING,
    ExitReason.CR_ACCESS: Proc.CR8_LOAD_EXITING,
    ExitReason.INTERRUPT_WINDOW: Proc.INTR_WINDOW_EXITING,
    ExitReason.NMI_WINDOW: Proc.NMI_WINDOW_EXITING,
    ExitReason.MONITOR_TRAP_FLAG: Proc.MONITOR_TRAP_FLAG,
}
# prepare_vmcs02_early(): L2's I/O always exits to L0 (L1's bitmaps are checked on the exit); the
# model's L0 has no MSR bitmap of its own, so every MSR access of L2 exits to L0 too.
_VMCS02_PROC_CLEAR = Proc.USE_IO_BITMAPS | Proc.USE_MSR_BITMAPS


@dataclass(frozen=True, slots=True)
class NestedState:
    """What KVM_GET_NESTED_STATE carries (struct kvm_nested_state, VMX): the VMXON and current
    VMCS addresses, vmcs12 (here every VMCS L1 has used), and the guest-mode flags."""

    vmxon_region: int
    current: int | None
    vmcss: tuple[tuple[int, Vmcs], ...]
    launched: frozenset[int]
    errors: tuple[tuple[int, int], ...]
    guest_mode: bool
    run_pending: bool
    l1_idtr: tuple[int, int]  # stands for vmcs12's HOST_IDTR_BASE (host state the model keeps apart)
    mtf_pending: bool = False  # KVM_STATE_NESTED_MTF_PENDING
    l1_mode: HostMode | None = None  # a real-mode L2's L1 mode (vmcs12's host state, as l1_idtr)


class NestedVmx(VmxRoot):
    """struct nested_vmx: L1's VMX state and the switch between vmcs01 and vmcs02."""

    def __init__(self, cpu: Cpu, vmx: Vmx):
        super().__init__(cpu)
        self.vmx = vmx
        self.guest_mode = False  # is_guest_mode(): L2 is what runs
        self.run_pending = False  # nested_run_pending: the entry's injection is still to happen
        self.vmcs01: Vmcs | None = None
        self.l1_idtr = (0, 0)
        # An MTF VM exit L0 owes L1 after emulating one of L2's instructions (the hardware's
        # monitor trap flag never saw that instruction run): vmx_update_emulated_instruction().
        self.mtf_pending = False
        self.launching = False  # the entry under way is a VMLAUNCH
        # L1's mode while L2 runs in real mode (hw/vmx/real_l2.py), None otherwise
        self.l1_mode: HostMode | None = None

    @property
    def vmcs12(self) -> Vmcs:
        return self.vmcss[self.current]

    # -- VMLAUNCH / VMRESUME (nested_vmx_run()) --------------------------------------

    def vmentry(self, cpu: Cpu, launch: bool, next_rip: int) -> None:
        """Emulated VM entry: VMfail with RIP advanced, or switch to vmcs02 with RIP unchanged."""
        rip = self.vmx.vmcs.guest_rip
        insn = cpu.icache.get(rip) or decode(cpu, rip)
        blocked_by_mov_ss = bool(self.vmx.get_interrupt_shadow() & ShadowBits.MOV_SS)
        region = self._entry_region(cpu, launch, blocked_by_mov_ss)
        if region is not None:
            try:
                # nested_vmx_check_controls() and the guest-state checks, in software on
                # vmcs12 before vmcs02 exists: the hardware model's own checks.
                check_entry(self.vmcss[region], cpu, guest_cr0=self.vmcss[region].guest_cr0)
            except InvalidGuestState as failed:
                self._entry_failure_exit(self.vmcss[region], failed.check)
                self.vmx.vcpu.retire(rip, insn)
                return
            except EntryFailed:
                self._fail_valid(cpu, VmxError.ENTRY_INVALID_CONTROL)
                region = None
        if region is None:
            self._skip_l1(cpu, next_rip)
            self.vmx.vcpu.retire(rip, insn)
            return
        check_vmcs_for_model(self.vmcss[region], rip)
        self.launching = launch  # vmcs12's launch state waits for a VM exit that is no failure
        self.launched.add(region)
        self._succeed(cpu)
        self.vmx.vcpu.retire(rip, insn)  # before L2's injection, as on the model's CPU
        self._enter_l2()
        if self._enters_halted(self.vmcs12):
            # kvm_emulate_halt_noskip(): L2 waits in L0 as if its HLT had exited; no HLT ran
            self.run_pending = False
            self.vmx.vcpu.stats.halt_exits += 1
            self.vmx.vcpu.mp_state = MpState.HALTED

    @staticmethod
    def _enters_halted(vmcs12: Vmcs) -> bool:
        """nested_vmx_run(): activity state HLT, and nothing that would wake L2 at once (an
        injected event, NMI-window exiting, interrupt-window exiting with IF=1; SDM 26.6.2)."""
        if vmcs12.guest_activity_state != Activity.HLT or vmcs12.entry_intr_info & INTR_INFO_VALID:
            return False
        if vmcs12.proc_based & Proc.NMI_WINDOW_EXITING:
            return False
        return not (vmcs12.proc_based & Proc.INTR_WINDOW_EXITING and vmcs12.guest_rflags & IF)

    def _entry_failure_exit(self, vmcs12: Vmcs, check: str) -> None:
        """nested_vmx_check_guest_state() failed in nested_vmx_enter_non_root_mode(): L1 gets
        the VM exit the CPU makes (SDM 26.7), EXIT_REASON_INVALID_STATE with
        VMX_EXIT_REASONS_FAILED_VMENTRY and qualification ENTRY_FAIL_DEFAULT (0), and resumes
        at HOST_RIP (load_vmcs12_host_state()); vmcs12 is not launched, its other exit
        fields stay (prepare_vmcs12())."""
        vmcs01 = self.vmx.vmcs
        vmcs12.exit_reason = ExitReason.INVALID_GUEST_STATE | FAILED_VMENTRY
        vmcs12.exit_qualification = 0
        vmcs01.guest_rip, vmcs01.guest_rsp = vmcs12.host_rip, vmcs12.host_rsp
        vmcs01.guest_rflags = 0x2  # SDM 27.5.3
        self.vmx.set_interrupt_shadow(0)
        self.vmx.guest.cpu.trace.append(NestedExitRecord(
            f"INVALID_GUEST_STATE ({check})", vmcs12.host_rip, self.vmx.guest.cpu.retired, "vmcs12"))

    def _skip_l1(self, cpu: Cpu, next_rip: int) -> None:
        """VMfail: kvm_skip_emulated_instruction(), which also ends an interrupt shadow and
        single-steps (kvm_vcpu_do_singlestep()); a VM entry that succeeds skips nothing."""
        vmcs = self.vmx.vmcs
        vmcs.guest_rip = next_rip
        vmcs.guest_rflags = cpu.rflags
        self.vmx.set_interrupt_shadow(0)
        if cpu.rflags & TF:
            self.vmx.vcpu.queue_exception(Vec.DB, payload=DR6_BS)

    def _enter_l2(self) -> None:
        vmx, cpu = self.vmx, self.vmx.guest.cpu
        vmcs01 = vmx.guest.vmcs
        vmcs01.guest_rflags = cpu.rflags  # L1 stays at its VMLAUNCH; VMsucceed flags
        self.vmcs01, self.l1_idtr = vmcs01, (cpu.idtr_base, cpu.idtr_limit)
        vmcs02 = self._prepare_vmcs02(vmcs01, self.vmcs12)
        # prepare_vmcs02(): vmcs12's CR0 and segments into the vCPU (vmx_set_cr0(), ...)
        self.l1_mode = (load_real_mode(cpu, self.vmcs12, vmcs01.guest_rip)
                        if enters_real_mode(self.vmcs12) else None)
        vmx.guest.vmcs = vmcs02
        vmx.guest.cpu_windows_changed()
        cpu.idtr_base, cpu.idtr_limit = vmcs02.guest_idtr_base, vmcs02.guest_idtr_limit
        self.guest_mode = self.run_pending = True
        vmx.vcpu.clear_event_queues()  # L1's injected events were L1's (none pend at VMLAUNCH)
        vmx.vcpu.requests |= Request.EVENT

    @staticmethod
    def _prepare_vmcs02(vmcs01: Vmcs, vmcs12: Vmcs) -> Vmcs:
        """prepare_vmcs02(): L0's controls OR L1's; L2's state and L1's injection from vmcs12."""
        vmcs02 = Vmcs()
        vmcs02.pin_based = vmcs01.pin_based | vmcs12.pin_based
        vmcs02.proc_based = ((vmcs01.proc_based & ~(Proc.INTR_WINDOW_EXITING | Proc.NMI_WINDOW_EXITING)
                              ) | vmcs12.proc_based | Proc.UNCOND_IO_EXITING) & ~_VMCS02_PROC_CLEAR
        vmcs02.exception_bitmap = vmcs01.exception_bitmap | vmcs12.exception_bitmap
        if not _faults.on("notify_window_not_in_vmcs02"):
            # prepare_vmcs02_constant_state(): L0's window, or L1 escapes it by running its loop in L2
            vmcs02.secondary_exec = vmcs01.secondary_exec & Secondary.NOTIFY_VM_EXITING
            vmcs02.notify_window = vmcs01.notify_window
        # prepare_vmcs02_early(): L0's secondary controls (its unrestricted guest) and L1's
        secondary = vmcs01.secondary_exec | vmcs12.secondary_exec
        vmcs02.secondary_exec |= secondary & Secondary.UNRESTRICTED_GUEST
        for name in _L2_STATE + ("guest_idtr_base", "guest_idtr_limit", "entry_intr_info",
                                 "entry_exception_error_code", "entry_instruction_len",
                                 "guest_cr0", "guest_cs_selector", "guest_cs_base"):
            setattr(vmcs02, name, getattr(vmcs12, name))
        return vmcs02

    # -- exits from L2 ------------------------------------------------------------------

    def reflect(self) -> bool:
        """nested_vmx_reflect_vmexit(): True when the exit went to L1."""
        self.run_pending = False
        vmcs02, vmcs12 = self.vmx.vmcs, self.vmcs12
        reason = EXIT_REASONS[vmcs02.exit_reason]
        if not self._l1_wants(reason, vmcs02, vmcs12, self.vmx.guest.cpu):
            return False
        self.exit_to_l1(reason, vmcs02.exit_intr_info, vmcs02.exit_intr_error_code,
                        vmcs02.exit_qualification, vmcs02.exit_instruction_len,
                        vmcs02.idt_vectoring_info, vmcs02.idt_vectoring_error_code)
        return True

    @staticmethod
    def _l1_wants(reason: ExitReason, vmcs02: Vmcs, vmcs12: Vmcs, cpu: Cpu) -> bool:
        if reason is ExitReason.NOTIFY and _faults.on("notify_reflected_to_l1"):
            return True  # v2 of the Notify series: L1 never enabled it (seed 002, Paolo Bonzini)
        if reason in _L0_ALWAYS:
            return False
        if reason in _L1_ALWAYS:
            return True
        if reason is ExitReason.EXCEPTION_NMI:
            info = vmcs02.exit_intr_info
            if info_type(info) == EventType.NMI:
                return False  # a host NMI
            return bool(vmcs12.exception_bitmap >> info_vector(info) & 1)
        if reason is ExitReason.IO_INSTRUCTION:  # nested_vmx_exit_handled_io()
            qualification = vmcs02.exit_qualification
            return io_exits(cpu.mem, vmcs12, qualification >> 16, (qualification & 7) + 1)
        if reason in (ExitReason.MSR_READ, ExitReason.MSR_WRITE):  # nested_vmx_exit_handled_msr()
            return msr_exits(cpu.mem, vmcs12, cpu.regs[RCX] & 0xFFFFFFFF,
                             write=reason is ExitReason.MSR_WRITE)
        control = _L1_IF_CONTROL.get(reason)
        return control is not None and bool(vmcs12.proc_based & control)

    def exit_to_l1(self, reason: ExitReason, info: int = 0, error_code: int = 0,
                   qualification: int = 0, insn_len: int = 0, vectoring: int = 0,
                   vectoring_error: int = 0) -> None:
        """nested_vmx_vmexit(): fill vmcs12 as hardware would, then run L1 from HOST_RIP."""
        vmx, cpu, vcpu = self.vmx, self.vmx.guest.cpu, self.vmx.vcpu
        self._discard_pending_mtf()
        vmcs12 = self.vmcs12
        vmcs12.exit_reason, vmcs12.exit_intr_info = reason, info
        vmcs12.exit_intr_error_code, vmcs12.exit_qualification = error_code, qualification
        vmcs12.exit_instruction_len = insn_len
        vmcs12.idt_vectoring_info, vmcs12.idt_vectoring_error_code = vectoring, vectoring_error
        self._save_pending_event(vmcs12)
        self._sync_vmcs02_to_vmcs12()
        vmcs01 = self.vmcs01
        vmcs01.guest_rip, vmcs01.guest_rsp = vmcs12.host_rip, vmcs12.host_rsp
        vmcs01.guest_rflags = 0x2  # SDM 27.5.3
        vmcs01.guest_interruptibility &= Interruptibility.NMI  # no shadow after a VM exit
        vmx.guest.vmcs = vmcs01
        vmx.guest.cpu_windows_changed()
        cpu.idtr_base, cpu.idtr_limit = self.l1_idtr
        self._restore_l1_mode()
        cpu.shadow = Shadow.NONE
        cpu.shutdown = False  # L1's state is loaded and runnable: a triple fault was L2's
        self.guest_mode = self.run_pending = self.launching = False
        vcpu.clear_event_queues()  # prepare_vmcs12(): done for every exit that fills vmcs12
        vcpu.requests |= Request.EVENT
        cpu.trace.append(NestedExitRecord(reason.name, vmcs12.guest_rip, cpu.retired, "vmcs12"))

    def _discard_pending_mtf(self) -> None:
        """nested_vmx_vmexit(), every kind of exit: a pending MTF is a property of this run of L2
        (593a5c2e3c12 "KVM: nVMX: Unconditionally clear mtf_pending on nested VM-Exit"). Before
        it, only an unblocked vmx_check_nested_events() cleared it (check_nested_events())."""
        if not _faults.on("nested_mtf_pending_survives_exit"):
            self.mtf_pending = False

    def _purge_events(self) -> None:
        """nested_vmx_vmexit(), every kind of exit, after vmcs12_save_pending_event(): what was
        queued or re-injected for L2 is not L1's (d953540430c5 "KVM: nVMX: Unconditionally purge
        queued/injected events on nested "exit""). Before it the purge was prepare_vmcs12()'s,
        skipped by a late VM-Fail and by a forced exit (vmx_leave_nested())."""
        if not _faults.on("nested_exit_keeps_queued_events"):
            self.vmx.vcpu.clear_event_queues()

    def late_entry_failure(self) -> None:
        """The hardware refused vmcs02 with VMfail (a control check KVM left to it, or one KVM's
        own part of vmcs02 broke): nested_vmx_reflect_vmexit()'s "late nested VM-Fail", i.e.
        nested_vmx_vmexit() with vmx->fail. vmcs12 stays as it was; L1 is back at its
        VMLAUNCH/VMRESUME from vmcs01 (nested_vmx_restore_host_state()), which then fails with
        VMfailValid(7) and is skipped (nested_vmx_fail(VMXERR_ENTRY_INVALID_CONTROL_FIELD))."""
        vmx, cpu = self.vmx, self.vmx.guest.cpu
        self._discard_pending_mtf()
        self._purge_events()
        self._not_launched()
        vmcs01 = self.vmcs01
        vmx.guest.vmcs = vmcs01
        vmx.guest.cpu_windows_changed()
        cpu.idtr_base, cpu.idtr_limit = self.l1_idtr
        self._restore_l1_mode()
        cpu.shadow = Shadow.NONE
        self.guest_mode = self.run_pending = False
        cpu.rflags = vmcs01.guest_rflags
        self._fail_valid(cpu, VmxError.ENTRY_INVALID_CONTROL)
        vmcs01.guest_rflags = cpu.rflags
        vmcs01.guest_rip += vmcs01.exit_instruction_len
        vmx.set_interrupt_shadow(0)
        if cpu.rflags & TF:  # kvm_skip_emulated_instruction(), after the purge
            vmx.vcpu.queue_exception(Vec.DB, payload=DR6_BS)
        vmx.vcpu.requests |= Request.EVENT
        cpu.trace.append(NestedExitRecord("VM-Fail (late, vmcs02)", vmcs01.guest_rip, cpu.retired,
                                          "vmcs12"))

    def invalid_guest_state_exit(self, check: str) -> None:
        """The hardware's guest-state checks refused vmcs02 after KVM's software checks of
        vmcs12 passed: the VM exit with reason 33 and bit 31 (SDM 26.8), which
        nested_vmx_reflect_vmexit() gives to L1 (nested_vmx_l1_wants_exit():
        EXIT_REASON_INVALID_STATE is always L1's). prepare_vmcs12() leaves out what only an
        entry that succeeded does: vmcs12 stays not launched, its injection stays valid."""
        self._not_launched()
        self.exit_to_l1(ExitReason.INVALID_GUEST_STATE)
        self.vmcs12.exit_reason |= FAILED_VMENTRY
        self.vmx.guest.cpu.trace[-1] = NestedExitRecord(
            f"INVALID_GUEST_STATE ({check}, vmcs02)", self.vmcs12.guest_rip,
            self.vmx.guest.cpu.retired, "vmcs12")

    def _restore_l1_mode(self) -> None:
        """load_vmcs12_host_state() / nested_vmx_restore_host_state(): L1's mode after a
        real-mode L2 (hw/vmx/real_l2.py)."""
        if self.l1_mode is not None:
            restore_host_mode(self.vmx.guest.cpu, self.l1_mode)
            self.l1_mode = None

    def _not_launched(self) -> None:
        """An entry that failed leaves a VMLAUNCHed vmcs12 clear (prepare_vmcs12() sets
        launch_state only for an exit that is no VM-entry failure)."""
        if self.launching:
            self.launched.discard(self.current)

    def _save_pending_event(self, vmcs12: Vmcs) -> None:
        """vmcs12_save_pending_event(): what L0 was about to (re-)inject into L2 goes to L1;
        nothing for a triple fault or a #DF exit, which consumed the event."""
        vcpu = self.vmx.vcpu
        exc, irq = vcpu.exception, vcpu.interrupt
        if vmcs12.exit_reason == ExitReason.TRIPLE_FAULT or (
                vmcs12.exit_reason == ExitReason.EXCEPTION_NMI
                and vmcs12.exit_intr_info & INTR_INFO_VALID
                and info_type(vmcs12.exit_intr_info) == EventType.HW_EXCEPTION
                and info_vector(vmcs12.exit_intr_info) == Vec.DF):
            vmcs12.idt_vectoring_info = vmcs12.idt_vectoring_error_code = 0
        elif exc.injected:
            type_ = EventType.SW_EXCEPTION if exc.vector in (Vec.BP, Vec.OF) else EventType.HW_EXCEPTION
            code = exc.error_code if exc.has_error_code else None
            vmcs12.idt_vectoring_info = intr_info(exc.vector, type_, code)
            vmcs12.idt_vectoring_error_code = exc.error_code if code is not None else 0
            if type_ is EventType.SW_EXCEPTION:
                vmcs12.exit_instruction_len = vcpu.event_exit_inst_len
        elif vcpu.nmi_injected:
            vmcs12.idt_vectoring_info = intr_info(Vec.NMI, EventType.NMI, None)
        elif irq.injected:
            type_ = EventType.SW_INT if irq.soft else EventType.EXT_INT
            vmcs12.idt_vectoring_info = intr_info(irq.nr, type_, None)
            if irq.soft:
                vmcs12.exit_instruction_len = vcpu.event_exit_inst_len

    # -- KVM_GET/SET_NESTED_STATE ----------------------------------------------------------

    def get_state(self) -> NestedState | None:
        """vmx_get_nested_state(): in guest mode, vmcs02's L2 state is synced to vmcs12 first."""
        if self.vmxon_region is None:
            return None
        if self.guest_mode:
            self._sync_vmcs02_to_vmcs12()
        return NestedState(self.vmxon_region, self.current,
                           tuple((k, replace(v)) for k, v in self.vmcss.items()),
                           frozenset(self.launched), tuple(self.errors.items()),
                           self.guest_mode, self.run_pending, self.l1_idtr,
                           self.guest_mode and self.mtf_pending,
                           self.l1_mode if self.guest_mode else None)

    def _sync_vmcs02_to_vmcs12(self) -> None:
        """sync_vmcs02_to_vmcs12(): L2's state as it stands, and the entry's injection done.

        L2 halted by L0 (its HLT emulated, or entered in HLT) saves activity state HLT,
        as the CPU would have (SDM 27.3.4): KVM takes it from mp_state."""
        vmcs02, vmcs12 = self.vmx.vmcs, self.vmcs12
        for name in _L2_STATE:
            setattr(vmcs12, name, getattr(vmcs02, name))
        if self.l1_mode is not None:
            save_real_mode(self.vmx.guest.cpu, vmcs12)
        halted = self.vmx.vcpu.mp_state is MpState.HALTED
        vmcs12.guest_activity_state = Activity.HLT if halted else Activity.ACTIVE
        if self.run_pending:  # the entry's injection has not happened yet: it is still vmcs12's
            return
        vmcs12.entry_intr_info &= ~INTR_INFO_VALID

    def set_state(self, state: NestedState) -> None:
        """vmx_set_nested_state(): InvalidArgument (-EINVAL) before any change for a state that
        does not fit; else back to L1 first if L2 runs (vmx_leave_nested(): the same vCPU), then
        vmcs02 rebuilt from vmcs12 and this vCPU's vmcs01."""
        _check_state(state, self.vmx.guest.cpu.mem_size)
        if self.guest_mode:
            self._leave_nested()
        self.vmxon_region, self.current = state.vmxon_region, state.current
        self.vmcss = {k: replace(v) for k, v in state.vmcss}
        self.launched, self.errors = set(state.launched), dict(state.errors)
        if not state.guest_mode:
            return
        vmx, cpu = self.vmx, self.vmx.guest.cpu
        self.vmcs01, self.l1_idtr = vmx.guest.vmcs, state.l1_idtr
        vmcs02 = self._prepare_vmcs02(self.vmcs01, self.vmcs12)
        if not state.run_pending:
            vmcs02.entry_intr_info = 0
        vmx.guest.vmcs = vmcs02
        vmx.guest.cpu_windows_changed()
        cpu.idtr_base, cpu.idtr_limit = vmcs02.guest_idtr_base, vmcs02.guest_idtr_limit
        self.guest_mode, self.run_pending = True, state.run_pending
        self.mtf_pending = state.mtf_pending
        self.l1_mode = state.l1_mode
        if state.l1_mode is not None and cpu.mode is not Mode.REAL16:
            # this vCPU was in L2 and vmx_leave_nested() gave it L1's mode; the VMM's
            # KVM_SET_SREGS that follows puts L2's back (a fresh vCPU has it already)
            load_real_mode(cpu, self.vmcs12, cpu.rip)
        if self.mtf_pending:
            vmx.vcpu.requests |= Request.EVENT  # vmx_set_nested_state()

    def _leave_nested(self) -> None:
        """vmx_leave_nested() on a vCPU in L2: vmcs01 is current again. nested_vmx_vmexit()
        with reason -1 writes nothing into vmcs12; L1's RIP/RSP/RFLAGS are what the next exit
        to L1 loads from vmcs12's host state anyway. It drops L2's pending MTF and what was
        queued for L2 (d953540430c5): a VMM that puts the events back first loses them
        (vmx_set_nested_state() calls this before anything else)."""
        vmx, cpu = self.vmx, self.vmx.guest.cpu
        self._discard_pending_mtf()
        self._purge_events()
        vmx.guest.vmcs = self.vmcs01
        vmx.guest.cpu_windows_changed()
        cpu.idtr_base, cpu.idtr_limit = self.l1_idtr
        self._restore_l1_mode()
        self.guest_mode = self.run_pending = False

    # -- events for L1 while L2 runs (vmx_check_nested_events()) --------------------------

    def check_nested_events(self) -> int:
        """vmx_check_nested_events(), for the events modelled, in its order: INIT (the
        INIT_SIGNAL VM exit) and a SIPI first; then an exception for L2 goes in (it arose in
        L2's instruction: an NMI or interrupt for L1 exits at the boundary after its delivery,
        KVM asking for an immediate exit), unless it is a debug trap, which a pending MTF VM
        exit outranks; then the MTF VM exit; then an NMI, then an interrupt, that L2 does not
        block. Such an NMI that L1 does not exit on ends the search: it is L2's to take. EBUSY
        while VMLAUNCH's injection is still to go in, and for INIT, SIPI, NMIs and interrupts
        while an event is to be re-injected into L2."""
        if not self.guest_mode:
            return 0
        vmx, vcpu = self.vmx, self.vmx.vcpu
        block_events = self.run_pending or vcpu.event_needs_reinjection()
        mtf_pending = self.mtf_pending
        if _faults.on("nested_mtf_pending_survives_exit") and not block_events:
            self.mtf_pending = False  # before 593a5c2e3c12: "If a higher priority VM-exit is
            # delivered first, this state is discarded", so only when nothing blocks
        block_exceptions = block_events if _faults.on(
            "nested_exception_blocked_by_injected_event") else self.run_pending
        if vcpu.apic_pending_init:
            # SDM 25.2: INIT exits L2 unconditionally. A debug trap queued for L2 goes into the
            # exit's pending debug exceptions (27.3.4; 684c0422da71), a general-detect #DB not
            # (8d178f460772): it is a fault, dropped with the other queued events, and the
            # MOV DR runs again. L2 in wait-for-SIPI (no exit, the INIT consumed) is not modelled.
            if block_events:
                return EBUSY
            self._update_pending_dbg()
            vcpu.apic_pending_init = False
            self.exit_to_l1(ExitReason.INIT_SIGNAL)
            return 0
        if vcpu.apic_pending_sipi:
            # SDM 25.2: a SIPI exits L2 only in wait-for-SIPI (KVM_MP_STATE_INIT_RECEIVED, which
            # needs an INIT in L2 first: not modelled); otherwise it is discarded, and the
            # other events are looked at (c2086eca8658)
            if block_events:
                return EBUSY
            vcpu.apic_pending_sipi = False
            if _faults.on("nested_sipi_in_l2_skips_events"):
                return 0  # before c2086eca8658: ignored, but nothing else looked at
        vcpu.morph_pending_exception_late()  # a fault point: a no-op unless it is on
        exc, vmexit = vcpu.exception, vcpu.exception_vmexit
        # An exception outranks MTF unless it is a debug trap of the instruction just completed
        # (vmx_is_low_priority_db_trap()), which the MTF VM exit saves instead.
        if vmexit.pending and not _low_priority_db_trap(vmexit):
            if block_exceptions:
                return EBUSY
            self.inject_exception_vmexit()
            return 0
        if exc.pending and not _low_priority_db_trap(exc):
            return EBUSY if block_exceptions else 0
        if mtf_pending:
            if block_events:
                return EBUSY
            self._update_pending_dbg()
            self.exit_to_l1(ExitReason.MONITOR_TRAP_FLAG)
            return 0
        if vmexit.pending:
            if block_exceptions:
                return EBUSY
            self.inject_exception_vmexit()
            return 0
        if exc.pending:
            return EBUSY if block_exceptions else 0
        if vcpu.nmi_pending and not vmx.nmi_blocked():
            if block_events:
                return EBUSY
            if vmx.nested_exit_on(Pin.NMI_EXITING):
                self.exit_to_l1(ExitReason.EXCEPTION_NMI, intr_info(Vec.NMI, EventType.NMI, None))
                # The NMI-triggered exit counts as injection: upstream clears every pending
                # NMI, not one (a second one process_nmi() allowed is lost; bare metal keeps
                # it latched behind the exit's NMI blocking, SDM 27.5.5)
                vcpu.nmi_pending = 0
                if not _faults.on("nested_nmi_exit_leaves_nmis_unblocked"):
                    vmx.set_nmi_mask(True)
            return 0
        if vcpu.has_injectable_intr() and not vmx.interrupt_blocked():
            if block_events:
                return EBUSY
            if vmx.nested_exit_on(Pin.EXT_INTR_EXITING):
                self.exit_to_l1(ExitReason.EXTERNAL_INTERRUPT)  # no acknowledge: it stays in the APIC
        return 0

    def _update_pending_dbg(self) -> None:
        """nested_vmx_update_pending_dbg(): a debug trap KVM queued for L2 goes into the pending
        debug exceptions that the MTF or INIT VM exit saves for L1 (SDM 27.3.4), not into L2."""
        trap = _pending_db_trap(self.vmx.vcpu.exception)
        if trap:
            self.vmx.vmcs.guest_pending_dbg_exceptions = trap

    def update_emulated_instruction(self) -> None:
        """vmx_update_emulated_instruction(): L0 completed one of L2's instructions, so an MTF
        VM exit is pending if L1 single-steps L2 with MTF, unless the instruction raised an
        exception other than #DB; with KVM_REQ_EVENT, so vmx_check_nested_events() runs before
        L2 does again."""
        if not self.guest_mode:
            return
        vcpu = self.vmx.vcpu
        if self.vmcs12.proc_based & Proc.MONITOR_TRAP_FLAG and all(
                not exc.pending or exc.vector == Vec.DB for exc in (vcpu.exception, vcpu.exception_vmexit)):
            self.mtf_pending = True
            if not _faults.on("nested_mtf_no_event_request"):
                vcpu.requests |= Request.EVENT
        else:
            self.mtf_pending = False

    def inject_exception_vmexit(self) -> None:
        """nested_vmx_inject_exception_vmexit(): vcpu->arch.exception_vmexit becomes L1's
        EXCEPTION_NMI exit. The payload is the exit qualification, never L2's CR2 or DR6
        (SDM 27.1: a #PF or #DB that exits leaves them alone); the error code keeps 16 bits.
        NMI unblocking (bit 12) is set when no event is being vectored and NMIs are masked,
        as KVM does (it reads vmcs12's IDT-vectoring field; the model reads its queues)."""
        vmx, vcpu = self.vmx, self.vmx.vcpu
        exc = vcpu.exception_vmexit
        if exc.has_payload:
            qualification = exc.payload
        elif exc.vector == Vec.PF:
            qualification = vcpu.cpu.cr2
        elif exc.vector == Vec.DB:
            qualification = (vcpu.cpu.dr6 & ~DR6_BT) ^ DR6_ACTIVE_LOW
        else:
            qualification = 0
        type_ = EventType.SW_EXCEPTION if exception_is_soft(exc.vector) else EventType.HW_EXCEPTION
        # 80962ec912db: no error code from real mode, where VMX never reports one (SDM 27.2.2)
        reports_code = exc.has_error_code and (
            bool(vcpu.cpu.cr0 & CR0_PE) or _faults.on("nested_exit_error_code_in_real_mode"))
        code = exc.error_code & 0xFFFF if reports_code else None
        info = intr_info(exc.vector, type_, code)
        if vmx.get_nmi_mask() and not vcpu.event_needs_reinjection():
            info |= INTR_INFO_UNBLOCK_NMI
        self.exit_to_l1(ExitReason.EXCEPTION_NMI, info, code or 0, qualification,
                        vcpu.event_exit_inst_len if type_ is EventType.SW_EXCEPTION else 0)

    def triple_fault(self) -> None:
        """nested_vmx_triple_fault(): KVM_REQ_TRIPLE_FAULT in L2 is always L1's VM exit.
        L2 shut down as the CPU would have (the Shutdown record); vmcs12_save_pending_event()
        reports no IDT-vectoring information for it."""
        if not self.guest_mode:
            return
        vcpu = self.vmx.vcpu
        vcpu.requests &= ~Request.TRIPLE_FAULT
        vcpu.trace_l2_shutdown()
        self.exit_to_l1(ExitReason.TRIPLE_FAULT)



def _pending_db_trap(exc: QueuedException) -> int:
    """vmx_get_pending_dbg_trap(): the DR6 bits of a pending #DB, a general-detect #DB aside
    (always fault-like, 8d178f460772)."""
    if not exc.pending or exc.vector != Vec.DB:
        return 0
    if _faults.on("nested_gd_db_as_trap"):
        return exc.payload  # before 8d178f460772: any payload, DR6.BD too, made it a trap
    return exc.payload & ~DR6_BD


def _low_priority_db_trap(exc: QueuedException) -> bool:
    """vmx_is_low_priority_db_trap(): a debug trap MTF outranks (all but the TSS T-flag's)."""
    return bool(_pending_db_trap(exc) & ~DR6_BT)


def _check_state(state: NestedState, mem_size: int) -> None:
    """The -EINVAL cases of KVM_SET_NESTED_STATE the model's state can express:
    kvm_arch_vcpu_ioctl() ("nested_run_pending implies guest_mode") and
    vmx_set_nested_state() (page_address_valid() of the VMXON region and of vmcs12, which
    must not be the VMXON region; guest mode needs a current vmcs12)."""
    if state.run_pending and not state.guest_mode:
        raise InvalidArgument("KVM_SET_NESTED_STATE: RUN_PENDING without GUEST_MODE")
    if not _page_address_valid(state.vmxon_region, mem_size):
        raise InvalidArgument(f"KVM_SET_NESTED_STATE: vmxon_pa {state.vmxon_region:#x} is no page")
    if state.current is not None and (state.current == state.vmxon_region
                                      or not _page_address_valid(state.current, mem_size)):
        raise InvalidArgument(f"KVM_SET_NESTED_STATE: vmcs12_pa {state.current:#x} is no page "
                              "apart from the VMXON region")
    if state.guest_mode and state.current is None:
        raise InvalidArgument("KVM_SET_NESTED_STATE: GUEST_MODE without a vmcs12")


def _page_address_valid(gpa: int, mem_size: int) -> bool:
    """page_address_valid(): page aligned and within the guest's physical memory."""
    return not gpa & 0xFFF and gpa < mem_size
