"""kvm_intel's event code (arch/x86/kvm/vmx/vmx.c), over the VMX model in hw/vmx.

Module parameter: `enable_vnmi` (only the virtual-NMI configuration is
modelled; KVM's "soft vNMI" fallback for CPUs without it is not).
`intercept_db` is the model's, not KVM's: KVM always intercepts #DB and
#AC, because a guest can otherwise keep the CPU in an endless chain of
deliveries (CVE-2015-8104, CVE-2015-5307). Turning it off stands for any
such loop KVM cannot see, the case the Notify VM exit exists for.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmodel import _faults
from kvmodel.arch.decode import Exiting
from kvmodel.arch.events import EventType, Vec
from kvmodel.arch.faults import Fault
from kvmodel.arch.regs import IF, RSP
from kvmodel.errors import ModelLimit
from kvmodel.hw.base import EntryFailed, InvalidGuestState
from kvmodel.hw.vmx.cpu import VmxGuest
from kvmodel.hw.vmx.vmcs import (
    EXIT_REASONS,
    INTR_INFO_DELIVER_CODE,
    INTR_INFO_NESTED,
    INTR_INFO_UNBLOCK_NMI,
    INTR_INFO_VALID,
    NOTIFY_VM_CONTEXT_INVALID,
    QUAL_UNBLOCK_NMI,
    ExitReason,
    Interruptibility,
    Pin,
    Proc,
    Secondary,
    info_type,
    info_vector,
    intr_info,
)  # fmt: skip
from kvmodel.kvm import emulate, mmu
from kvmodel.kvm.uapi import KVM_NOTIFY_CONTEXT_INVALID, InvalidArgument, KvmExit, ShadowBits
from kvmodel.kvm.vm import NotifyFlag
from kvmodel.kvm.vmx.host_events import HostCpu
from kvmodel.kvm.vmx.nested import NestedState, NestedVmx
from kvmodel.kvm.x86 import (
    BUDGET,
    EBUSY,
    Request,
    UserspaceExit,
    Vcpu,
    exception_is_soft,
)

# vmx_update_exception_bitmap(): #UD, #MC, #DB and #AC always; #PF only without EPT.
EXCEPTION_BITMAP = (1 << Vec.UD) | (1 << Vec.MC) | (1 << Vec.DB) | (1 << Vec.AC)
_VMX_INSTRUCTIONS = (ExitReason.VMCLEAR, ExitReason.VMLAUNCH, ExitReason.VMPTRLD, ExitReason.VMREAD,
                     ExitReason.VMRESUME, ExitReason.VMWRITE, ExitReason.VMXON)
# Exits KVM can handle while an event was being vectored (__vmx_handle_exit()).
_VECTORING_OK = (ExitReason.EXCEPTION_NMI, ExitReason.EPT_VIOLATION, ExitReason.NOTIFY)


@dataclass(frozen=True, slots=True)
class VmxParams:
    enable_vnmi: bool = True
    intercept_db: bool = True  # the model's switch, see above
    host_fred: bool = False  # the host kernel takes its own IRQs and NMIs through FRED
    nested: bool = False  # kvm_intel.nested, with VMX in the guest's CPUID (nested.py)
    vmware_backdoor: bool = False  # kvm.enable_vmware_backdoor: #GP is intercepted too
    ept: bool = True  # kvm_intel.ept; without it, shadow paging (kvm/mmu.py)


class Vmx:
    """struct vcpu_vmx and the vmx_x86_ops event hooks."""

    def __init__(self, vcpu: Vcpu, guest: VmxGuest, params: VmxParams):
        if not params.enable_vnmi:
            raise NotImplementedError("enable_vnmi=0 (soft vNMI) is not modelled")
        self.vcpu = vcpu
        self.guest = guest
        self.params = params
        self.host_cpu = HostCpu(fred=params.host_fred, problems=vcpu.host_problems)
        self.nested = NestedVmx(guest.cpu, self) if params.nested else None
        self._exit_handled = False  # the hardware refused vmcs02 and run() gave L1 the outcome
        vcpu.ops = self
        vmcs = guest.vmcs
        vmcs.pin_based = Pin.EXT_INTR_EXITING | Pin.NMI_EXITING | Pin.VIRTUAL_NMIS
        vmcs.proc_based = Proc.HLT_EXITING | Proc.UNCOND_IO_EXITING | Proc.CR8_LOAD_EXITING
        vmcs.exception_bitmap = EXCEPTION_BITMAP
        # enable_unrestricted_guest (vmx_secondary_exec_control()): real mode runs natively
        vmcs.secondary_exec = Secondary.UNRESTRICTED_GUEST
        guest.ack_interrupt_on_exit = True  # VM_EXIT_ACK_INTR_ON_EXIT
        if not params.intercept_db:
            vmcs.exception_bitmap &= ~(1 << Vec.DB)
        if params.vmware_backdoor:
            vmcs.exception_bitmap |= 1 << Vec.GP  # vmx_update_exception_bitmap()
        if not params.ept:
            # shadow paging: vmx_update_exception_bitmap() adds #PF, init_vmcs() keeps INVLPG
            # exiting (and CR3 load/store exiting, not modelled: kvm/mmu.py)
            vmcs.exception_bitmap |= 1 << Vec.PF
            vmcs.proc_based |= Proc.INVLPG_EXITING
        if vcpu.kvm.notify_enabled:
            # vmx_secondary_exec_control() and init_vmcs()
            vmcs.secondary_exec |= Secondary.NOTIFY_VM_EXITING
            vmcs.notify_window = vcpu.kvm.notify_window
        cpu = guest.cpu
        vmcs.guest_rip, vmcs.guest_rflags = cpu.rip, cpu.rflags
        vmcs.guest_rsp = cpu.regs[RSP]
        guest.on_external = vcpu.external
        guest.on_nmi_from_apic = vcpu.inject_nmi

    @property
    def vmcs(self):
        return self.guest.vmcs

    guest_state_protected = False  # TDX is not modelled

    @property
    def guest_mode(self) -> bool:
        return self.nested is not None and self.nested.guest_mode

    def get_nested_state(self) -> NestedState | None:
        """KVM_GET_NESTED_STATE: None when L1 is not in VMX operation."""
        return self.nested.get_state() if self.nested is not None else None

    def set_nested_state(self, state: NestedState) -> None:
        if self.nested is None:
            raise InvalidArgument("KVM_SET_NESTED_STATE without nested VMX (kvm_intel.nested=0)")
        self.nested.set_state(state)

    # -- registers -----------------------------------------------------------

    def rip_read(self) -> int:
        return self.vmcs.guest_rip

    def rip_write(self, rip: int) -> None:
        self.vmcs.guest_rip = rip

    def rsp_write(self, rsp: int) -> None:  # kvm_rsp_write()
        self.vmcs.guest_rsp = rsp

    def get_rflags(self) -> int:
        return self.vmcs.guest_rflags

    def set_rflags(self, rflags: int) -> None:
        self.vmcs.guest_rflags = rflags

    def sync_guest_state_to_core(self) -> None:
        """Make the arch core show the guest state as the VMCS holds it (for inspection)."""
        cpu, vmcs = self.guest.cpu, self.vmcs
        cpu.rip, cpu.rflags, cpu.regs[RSP] = vmcs.guest_rip, vmcs.guest_rflags, vmcs.guest_rsp

    def skip_emulated_instruction(self) -> bool:
        """vmx_skip_emulated_instruction(): RIP += VM-exit instruction length; the shadow ends;
        in L2, the instruction's MTF VM exit (vmx_update_emulated_instruction())."""
        if self.nested is not None:
            self.nested.update_emulated_instruction()
        return self._skip()

    def _skip(self) -> bool:
        """skip_emulated_instruction(), vmx.c's own, which INT1's #DB exit uses."""
        self.vmcs.guest_rip += self.vmcs.exit_instruction_len
        self.set_interrupt_shadow(0)
        return True

    # -- shadows and NMI masking ------------------------------------------------

    def get_interrupt_shadow(self) -> int:
        state = self.vmcs.guest_interruptibility
        if state & Interruptibility.MOV_SS:
            return ShadowBits.MOV_SS
        return ShadowBits.STI if state & Interruptibility.STI else 0

    def set_interrupt_shadow(self, shadow: int) -> None:
        """vmx_set_interrupt_shadow(): MOV SS wins; only one bit is ever set."""
        state = self.vmcs.guest_interruptibility & ~(Interruptibility.STI | Interruptibility.MOV_SS)
        if shadow & ShadowBits.MOV_SS:
            state |= Interruptibility.MOV_SS
        elif shadow & ShadowBits.STI:
            state |= Interruptibility.STI
        self.vmcs.guest_interruptibility = state

    def get_nmi_mask(self) -> bool:
        return bool(self.vmcs.guest_interruptibility & Interruptibility.NMI)

    def set_nmi_mask(self, masked: bool) -> None:
        if masked:
            self.vmcs.guest_interruptibility |= Interruptibility.NMI
        else:
            self.vmcs.guest_interruptibility &= ~Interruptibility.NMI

    def is_vnmi_pending(self) -> bool:
        return False  # no hardware NMI latch on VMX (kvm_x86_ops.is_vnmi_pending is NULL)

    def set_vnmi_pending(self) -> bool:
        return False

    def nmi_blocked(self) -> bool:
        """vmx_nmi_blocked(): STI blocks NMIs too; an NMI L1 exits on is never blocked by
        L2's state (it becomes a VM exit, SDM 25.2), so it wakes an L2 halted by L0."""
        if self.nested_exit_on(Pin.NMI_EXITING):
            return False
        return bool(self.vmcs.guest_interruptibility & (
            Interruptibility.MOV_SS | Interruptibility.STI | Interruptibility.NMI))

    def nmi_allowed(self, for_injection: bool) -> int:
        """vmx_nmi_allowed(): never into L2 while L1 wants the NMI as an exit."""
        if self._nested_blocks(for_injection, Pin.NMI_EXITING):
            return EBUSY
        return 0 if self.nmi_blocked() else 1

    def _nested_blocks(self, for_injection: bool, exit_control: Pin) -> bool:
        """An event must not be injected into L2 if it is supposed to exit to L1."""
        n = self.nested
        if n is None or not n.guest_mode:
            return False
        return n.run_pending or (for_injection and self.nested_exit_on(exit_control))

    def nested_exit_on(self, exit_control: Pin) -> bool:
        """nested_exit_on_nmi() / nested_exit_on_intr(): L2 runs and vmcs12 has the pin control."""
        if exit_control is Pin.EXT_INTR_EXITING and _faults.on("nested_irq_injected_into_l2"):
            return False  # the bug: KVM forgets that L1 exits on interrupts
        n = self.nested
        return n is not None and n.guest_mode and bool(n.vmcs12.pin_based & exit_control)

    def has_nested_events(self) -> bool:
        """vmx_has_nested_events(): an MTF VM exit owed to L1 wakes an L2 that L0 halted."""
        n = self.nested
        return n is not None and n.guest_mode and n.mtf_pending

    def check_nested_events(self) -> int:
        return self.nested.check_nested_events() if self.nested is not None else 0

    def apic_init_signal_blocked(self) -> bool:
        """vmx_apic_init_signal_blocked(): INIT is blocked in VMX root operation, i.e. after
        L1's VMXON while L1 itself runs (SDM 24.8 "INIT signals are blocked whenever a logical
        processor is in VMX root operation"); in L2 it is a VM exit instead (SDM 25.2)."""
        n = self.nested
        return n is not None and n.vmxon_region is not None and not n.guest_mode

    def is_exception_vmexit(self, vector: int, error_code: int | None) -> bool:
        """nested_vmx_is_exception_vmexit(): L2 runs and vmcs12's exception bitmap has the
        vector (#PF's error-code mask and match are not modelled: the bitmap bit decides)."""
        n = self.nested
        return n is not None and n.guest_mode and bool(n.vmcs12.exception_bitmap >> vector & 1)

    def nested_triple_fault(self) -> None:
        if self.nested is not None:
            self.nested.triple_fault()

    def interrupt_blocked(self) -> bool:
        """vmx_interrupt_blocked(): an interrupt L1 exits on is never blocked by L2's IF or
        shadow (it becomes a VM exit, SDM 25.2), so it wakes an L2 halted by L0 with IF=0."""
        if self.nested_exit_on(Pin.EXT_INTR_EXITING):
            return False
        return not self.vmcs.guest_rflags & IF or bool(
            self.vmcs.guest_interruptibility & (Interruptibility.STI | Interruptibility.MOV_SS))

    def interrupt_allowed(self, for_injection: bool) -> int:
        """vmx_interrupt_allowed()."""
        if self._nested_blocks(for_injection, Pin.EXT_INTR_EXITING):
            return EBUSY
        return 0 if self.interrupt_blocked() else 1

    # -- injection ---------------------------------------------------------------

    def inject_irq(self, reinjected: bool) -> None:
        """vmx_inject_irq()."""
        vcpu = self.vcpu
        vcpu.stats.irq_injections += 1
        self.vmcs.injected_event_data = 0
        irq = vcpu.interrupt
        if irq.soft:
            self.vmcs.entry_intr_info = intr_info(irq.nr, EventType.SW_INT, None)
            self.vmcs.entry_instruction_len = vcpu.event_exit_inst_len
        else:
            self.vmcs.entry_intr_info = intr_info(irq.nr, EventType.EXT_INT, None)

    def inject_nmi(self) -> str:
        """vmx_inject_nmi(): hardware sets virtual-NMI blocking when it delivers."""
        self.vcpu.stats.nmi_injections += 1
        self.vmcs.injected_event_data = 0
        self.vmcs.entry_intr_info = intr_info(Vec.NMI, EventType.NMI, None)
        return "nmi"

    def inject_exception(self) -> None:
        """vmx_inject_exception()."""
        vcpu = self.vcpu
        exc = vcpu.exception
        vcpu.deliver_exception_payload()
        self.vmcs.injected_event_data = exc.event_data  # FRED: frame +48
        code = exc.error_code & 0xFFFF if exc.has_error_code else None  # bits 31:16 would fail entry
        if exception_is_soft(exc.vector):
            self.vmcs.entry_intr_info = intr_info(exc.vector, EventType.SW_EXCEPTION, code)
            self.vmcs.entry_instruction_len = vcpu.event_exit_inst_len
        else:
            self.vmcs.entry_intr_info = intr_info(exc.vector, EventType.HW_EXCEPTION, code, exc.nested)
        self.vmcs.entry_exception_error_code = code or 0

    def cancel_injection(self) -> None:
        """vmx_cancel_injection(): the programmed event goes back to the queues."""
        vmcs = self.vmcs
        self._complete(vmcs.entry_intr_info, vmcs.entry_instruction_len,
                       vmcs.entry_exception_error_code, vmcs.injected_event_data)
        vmcs.entry_intr_info = 0

    # -- windows -------------------------------------------------------------------

    def enable_irq_window(self) -> None:
        self.vmcs.proc_based |= Proc.INTR_WINDOW_EXITING
        self.guest.cpu_windows_changed()

    def enable_nmi_window(self) -> None:
        """vmx_enable_nmi_window(): under STI blocking the NMI window may never open; use the IRQ window."""
        if self.vmcs.guest_interruptibility & Interruptibility.STI:
            self.enable_irq_window()
            return
        self.vmcs.proc_based |= Proc.NMI_WINDOW_EXITING
        self.guest.cpu_windows_changed()

    def kick(self) -> None:
        self.guest.kick()

    # -- the run and what follows each exit ----------------------------------------

    def run(self, max_steps: int, immediate_exit: bool) -> UserspaceExit | None:
        """vmx_vcpu_run(): enter, then recover NMI blocking and complete interrupts."""
        if immediate_exit:
            self.guest.kick()  # KVM uses a zero preemption timer; any immediate exit will do
        try:
            stop = self.guest.run(max_steps)
        except EntryFailed as failed:
            if not self.guest_mode:
                return UserspaceExit(KvmExit.FAIL_ENTRY, failed.check)
            # vmcs02 refused: no vmx_complete_interrupts(); __vmx_handle_exit() hands it to
            # nested_vmx_reflect_vmexit() before any KVM_EXIT_FAIL_ENTRY ("L2 is handled above")
            self.guest.record("VM_ENTRY_FAILED", failed.check)  # an exit KVM counts
            if isinstance(failed, InvalidGuestState):
                self.nested.invalid_guest_state_exit(failed.check)
            else:
                self.nested.late_entry_failure()  # vmx->fail: "Late nested VM-Fail"
            self._exit_handled = True
            return None
        if stop is not None:
            self.sync_guest_state_to_core()
            return BUDGET
        if self._is_host_nmi():
            self.host_cpu.nmi_exit()  # vmx_handle_nmi(), inside vmx_vcpu_enter_exit()
        self.recover_nmi_blocking()
        vmcs = self.vmcs
        self._complete(vmcs.idt_vectoring_info, vmcs.exit_instruction_len,
                       vmcs.idt_vectoring_error_code, vmcs.original_event_data)
        return None

    def _is_host_nmi(self) -> bool:
        vmcs = self.vmcs
        return (vmcs.exit_reason == ExitReason.EXCEPTION_NMI and bool(vmcs.exit_intr_info & INTR_INFO_VALID)
                and info_type(vmcs.exit_intr_info) == EventType.NMI)

    def recover_nmi_blocking(self) -> None:
        """vmx_recover_nmi_blocking(): a faulting IRET is re-executed with NMIs blocked again."""
        vmcs = self.vmcs
        info = vmcs.exit_intr_info
        if (vmcs.exit_reason == ExitReason.EXCEPTION_NMI and info & INTR_INFO_VALID
                and info & INTR_INFO_UNBLOCK_NMI and info_vector(info) != Vec.DF
                and not vmcs.idt_vectoring_info & INTR_INFO_VALID):
            self.set_nmi_mask(True)

    def _complete(self, info: int, insn_len: int, error_code: int, event_data: int) -> None:
        """__vmx_complete_interrupts(): clear the queues, then requeue what was being vectored."""
        vcpu = self.vcpu
        vcpu.clear_event_queues()
        if not info & INTR_INFO_VALID or _faults.on("no_reinjection"):
            return
        vcpu.requests |= Request.EVENT
        vector, type_ = info_vector(info), info_type(info)
        if type_ == EventType.NMI:
            vcpu.nmi_injected = True
            self.set_nmi_mask(False)  # the retry must not find NMIs blocked
        elif type_ in (EventType.SW_EXCEPTION, EventType.HW_EXCEPTION):
            if type_ == EventType.SW_EXCEPTION:
                vcpu.event_exit_inst_len = insn_len
            code = error_code if info & INTR_INFO_DELIVER_CODE else None
            if _faults.on("fred_no_event_data_reinjection"):
                event_data = 0
            nested = bool(info & INTR_INFO_NESTED) and not _faults.on("fred_no_nested_reinjection")
            vcpu.requeue_exception(vector, code, event_data, nested)
        elif type_ in (EventType.SW_INT, EventType.EXT_INT):
            if type_ == EventType.SW_INT:
                vcpu.event_exit_inst_len = insn_len
            vcpu.queue_interrupt(vector, soft=type_ == EventType.SW_INT)
        # PRIV_SW_EXCEPTION (INT1) and OTHER are dropped: INT1 runs again from RIP.

    def handle_exit(self) -> UserspaceExit | None:
        """__vmx_handle_exit() and the handlers for the exits modelled."""
        vcpu, vmcs = self.vcpu, self.vmcs
        if self._exit_handled:  # a refused vmcs02, already L1's (run())
            self._exit_handled = False
            return None
        reason = EXIT_REASONS[vmcs.exit_reason]
        if self.nested is not None and self.nested.guest_mode and self.nested.reflect():
            return None  # L1 handles it
        if vmcs.idt_vectoring_info & INTR_INFO_VALID and reason not in _VECTORING_OK:
            return UserspaceExit(KvmExit.INTERNAL_ERROR,
                                 f"KVM_INTERNAL_ERROR_DELIVERY_EV: {reason.name} while vectoring")
        if reason is ExitReason.EXCEPTION_NMI:
            return self._handle_exception_nmi()
        if reason is ExitReason.EXTERNAL_INTERRUPT:
            vcpu.stats.irq_exits += 1
            self.host_cpu.irq_exit(info_vector(vmcs.exit_intr_info))  # handle_external_interrupt_irqoff()
        elif reason is ExitReason.INTERRUPT_WINDOW:
            vmcs.proc_based &= ~Proc.INTR_WINDOW_EXITING
            self.guest.cpu_windows_changed()
            if not _faults.on("no_req_event_on_window"):
                vcpu.requests |= Request.EVENT
            vcpu.stats.irq_window_exits += 1
        elif reason is ExitReason.NMI_WINDOW:
            vmcs.proc_based &= ~Proc.NMI_WINDOW_EXITING
            self.guest.cpu_windows_changed()
            vcpu.stats.nmi_window_exits += 1
            if not _faults.on("no_req_event_on_window"):
                vcpu.requests |= Request.EVENT
        elif reason is ExitReason.HLT:
            vcpu.emulate_halt()
        elif reason in (ExitReason.CPUID, ExitReason.IO_INSTRUCTION, ExitReason.MSR_READ,
                        ExitReason.MSR_WRITE, ExitReason.CR_ACCESS):
            vcpu.emulate_and_skip()
        elif reason is ExitReason.VMCALL:
            # handle_vmcall(): L1's own VMCALL is a hypercall to L0 (kvm_emulate_hypercall()),
            # KVM's paravirtual interface, which no bare-metal CPU has (L2's went to L1).
            raise ModelLimit("a hypercall to KVM (VMCALL, kvm_emulate_hypercall()) is not modelled",
                             vmcs.guest_rip)
        elif reason is ExitReason.EPT_VIOLATION:
            self._handle_ept_violation()
        elif reason is ExitReason.INVLPG:
            # handle_invlpg(): kvm_mmu_invlpg() on the qualification, then skip the instruction
            vcpu.stats.invlpg += 1
            vcpu.emulate_and_skip()  # first: its fetch must not meet the page zapped below
            mmu.invlpg(vcpu, vmcs.exit_qualification)
        elif reason is ExitReason.TRIPLE_FAULT:
            return UserspaceExit(KvmExit.SHUTDOWN, "triple fault")
        elif reason is ExitReason.NOTIFY:
            return self._handle_notify()
        elif reason in _VMX_INSTRUCTIONS:
            self._handle_vmx_instruction(reason)
        return None

    def _handle_vmx_instruction(self, reason: ExitReason) -> None:
        """handle_vmlaunch() and friends: #UD without nested; else emulate (nested.py)."""
        vcpu, vmcs = self.vcpu, self.vmcs
        if self.nested is None:
            vcpu.queue_exception(Vec.UD)
        elif reason in (ExitReason.VMLAUNCH, ExitReason.VMRESUME):
            cpu = self.guest.cpu
            cpu.rflags = vmcs.guest_rflags
            try:
                self.nested.vmentry(cpu, reason is ExitReason.VMLAUNCH,
                                    vmcs.guest_rip + vmcs.exit_instruction_len)
            except Fault as fault:  # nested_vmx_check_permission(): #UD outside VMX operation
                vcpu.queue_exception(fault.vector)
        else:
            vcpu.emulate_and_skip()

    def _handle_notify(self) -> UserspaceExit | None:
        """handle_notify(): count it, re-block NMIs for a re-executed IRET, usually resume.

        The exit already broke the guest's hold on the CPU; KVM cannot know the
        guest meant harm, so it never kills it (seed 002, Sean Christopherson).
        """
        vcpu, vmcs = self.vcpu, self.vmcs
        vcpu.stats.notify_window_exits += 1
        qualification = vmcs.exit_qualification
        if _faults.on("notify_kills_guest"):
            return UserspaceExit(KvmExit.INTERNAL_ERROR, "KVM_INTERNAL_ERROR_NO_EVENT_WINDOW")
        if (self.params.enable_vnmi and qualification & QUAL_UNBLOCK_NMI
                and not _faults.on("notify_no_nmi_reblock")):
            self.set_nmi_mask(True)
        context_invalid = bool(qualification & NOTIFY_VM_CONTEXT_INVALID)
        if vcpu.kvm.notify_vmexit_flags & NotifyFlag.USER or context_invalid:
            flags = KVM_NOTIFY_CONTEXT_INVALID if context_invalid else 0
            return UserspaceExit(KvmExit.NOTIFY, "context invalid" if flags else "", flags)
        return None

    def _handle_exception_nmi(self) -> UserspaceExit | None:
        """handle_exception_nmi() for the intercepted vectors."""
        vcpu, vmcs = self.vcpu, self.vmcs
        info = vmcs.exit_intr_info
        vector = info_vector(info)
        if self._is_host_nmi():
            return None  # handled right after the exit (vmx_handle_nmi())
        if vector == Vec.GP and self.params.vmware_backdoor:
            # Before the vectoring check, so a #GP while delivering an event is handled too.
            # A non-zero error code goes back at once; with 0, the emulator takes only the
            # backdoor's IN/OUT/RDPMC (EMULTYPE_VMWARE_GP), which never #GP at CPL 0 (the
            # model's only CPL), and queues #GP(0) for anything else.
            vcpu.queue_exception(Vec.GP, vmcs.exit_intr_error_code)
            return None
        if vector == Vec.PF:
            # Shadow paging only (EPT never intercepts #PF), also while vectoring: the IDT or
            # stack page of a delivery not yet shadowed; the event is re-injected
            # (vmx_complete_interrupts()). kvm_handle_page_fault(), CR2 in the qualification.
            mmu.handle_page_fault(vcpu, vmcs.exit_qualification, vmcs.exit_intr_error_code)
            return None
        if vmcs.idt_vectoring_info & INTR_INFO_VALID:
            return UserspaceExit(KvmExit.INTERNAL_ERROR,
                                 f"KVM_INTERNAL_ERROR_SIMUL_EX: #{vector} while vectoring")
        if vector == Vec.DB:
            if info_type(info) == EventType.PRIV_SW_EXCEPTION:  # is_icebp(): INT1 is skipped first
                self._skip()
                vcpu.cpu.retired += 1
            vcpu.queue_exception(Vec.DB, payload=vmcs.exit_qualification)
        elif vector == Vec.UD:
            emulate.handle_ud(vcpu, Exiting.VMMCALL)
        else:
            return UserspaceExit(KvmExit.INTERNAL_ERROR, f"exception {vector} exit not modelled")
        return None

    def _handle_ept_violation(self) -> None:
        """handle_ept_violation(): re-block NMIs for a re-executed IRET (bit 12), map the page."""
        vmcs = self.vmcs
        if vmcs.exit_qualification & QUAL_UNBLOCK_NMI and not vmcs.idt_vectoring_info & INTR_INFO_VALID:
            self.set_nmi_mask(True)
        cpu = self.guest.cpu
        cpu.set_host_unmapped(cpu.host_unmapped - {vmcs.guest_physical_address >> 12})

