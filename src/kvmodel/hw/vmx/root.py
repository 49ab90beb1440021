"""VMX root operation on the hardware model: an L1 hypervisor runs L2 with real VMX instructions.

This is the oracle for nested virtualization (DESIGN.md): L1's code executes
VMXON, VMCLEAR, VMPTRLD, VMWRITE, VMREAD and VMLAUNCH/VMRESUME on this model,
and L2 runs on the same core, in the same run loop and budget, under hw/vmx's
non-root model (VmxGuest) until a VM exit, which loads the host state and
resumes L1 at HOST_RIP (SDM 27.5). Runs go through VmxRoot.run().

The VMCS format is implementation-specific (SDM 24.2): the model keeps each
VMCS's data beside memory, keyed by its region's address, as a CPU caches it.
Modelled: the fields in FIELDS; VMsucceed / VMfailInvalid / VMfailValid
with the VM-instruction error number (SDM 30.2, 30.4); launch state. Not
modelled: VMXOFF, VMCS shadowing, the host-state checks, host segment and
control registers (flat, unchanged), EPT (identity), MSR areas (so no exit 34).
A failed guest-state check is the VM exit with reason 33 (SDM 26.7).

Events for L1 while L2 runs: with external-interrupt or NMI exiting they exit
(SDM 25.2); without, L2 takes them through its own IDT, masked by L2's IF and
blocking. Without virtual NMIs the blocking by NMI L2 leaves is the core's
after the exit: only an NMI exit changes it (SDM 27.5.5). With virtual NMIs,
VM entry unblocks NMIs (26.7.1), so an L1 that VMLAUNCHes from its NMI
handler is back with NMIs unblocked after any but an NMI exit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvmodel.arch.cpu import Cpu, External, Stop
from kvmodel.arch.events import EventType, Vec
from kvmodel.arch.faults import Fault
from kvmodel.arch.observe import ArrivalFate
from kvmodel.arch.regs import CR0_PE, CR0_PG, RSP, TF, Shadow
from kvmodel.errors import ModelLimit
from kvmodel.hw.base import EntryFailed, ExitRecord, InvalidGuestState, VmExit, back_to_l1, entry_retired
from kvmodel.hw.vmx.cpu import VmxGuest
from kvmodel.hw.vmx.real_l2 import (
    HostMode,
    enters_real_mode,
    load_real_mode,
    restore_host_mode,
    save_real_mode,
)
from kvmodel.hw.vmx.vmcs import (
    FAILED_VMENTRY,
    INTR_INFO_VALID,
    ExitReason,
    Interruptibility,
    Pin,
    Proc,
    Vmcs,
    info_type,
)

# L1's state a VM exit gives back: IDTR base and limit, blocking by NMI, and its mode when L2
# runs in real mode (real_l2.py)
L1State = tuple[int, int, bool, HostMode | None]

CF, ZF = 1 << 0, 1 << 6
_STATUS = 0x8D5  # CF PF AF ZF SF OF: what VMsucceed/VMfail define (SDM 30.2)
VM_INSTRUCTION_ERROR = 0x4400

# Field encodings (SDM Appendix B; Linux asm/vmx.h enum vmcs_field) -> Vmcs attribute.
FIELDS = {
    0x4000: "pin_based", 0x4002: "proc_based", 0x4004: "exception_bitmap",
    0x401E: "secondary_exec", 0x4016: "entry_intr_info", 0x4018: "entry_exception_error_code",
    0x401A: "entry_instruction_len", 0x4024: "notify_window",
    0x4402: "exit_reason", 0x4404: "exit_intr_info", 0x4406: "exit_intr_error_code",
    0x4408: "idt_vectoring_info", 0x440A: "idt_vectoring_error_code",
    0x440C: "exit_instruction_len", 0x6400: "exit_qualification", 0x2400: "guest_physical_address",
    0x4812: "guest_idtr_limit", 0x4824: "guest_interruptibility", 0x4826: "guest_activity_state",
    0x6818: "guest_idtr_base", 0x681C: "guest_rsp", 0x681E: "guest_rip", 0x6820: "guest_rflags",
    0x6822: "guest_pending_dbg_exceptions", 0x6C14: "host_rsp", 0x6C16: "host_rip",
    0x2000: "io_bitmap_a", 0x2002: "io_bitmap_b", 0x2004: "msr_bitmap",
    0x6800: "guest_cr0", 0x0802: "guest_cs_selector", 0x6808: "guest_cs_base",
}
READ_ONLY = {0x4400, 0x4402, 0x4404, 0x4406, 0x4408, 0x440A, 0x440C, 0x6400, 0x2400}


class VmxError:
    """VM-instruction error numbers (SDM 30.4)."""

    VMCALL_IN_ROOT = 1
    VMCLEAR_VMXON_POINTER = 3
    VMLAUNCH_NOT_CLEAR = 4
    VMRESUME_NOT_LAUNCHED = 5
    ENTRY_INVALID_CONTROL = 7
    ENTRY_MOV_SS_BLOCKING = 26  # VM entry with events blocked by MOV SS
    UNSUPPORTED_FIELD = 12
    WRITE_READ_ONLY = 13


@dataclass(frozen=True, slots=True)
class RootState:
    """The VMX state a snapshot keeps (what KVM_GET_NESTED_STATE reports outside guest mode):
    the VMXON region, the current VMCS, each VMCS's data, launch states and error numbers."""

    vmxon_region: int | None
    current: int | None
    vmcss: tuple[tuple[int, Vmcs], ...]
    launched: frozenset[int]
    errors: tuple[tuple[int, int], ...]


class VmxRoot:
    """The CPU's VMX state: VMXON, the current VMCS, the VMCSs it has seen."""

    def __init__(self, cpu: Cpu):
        cpu.vmx = self
        self.vmxon_region: int | None = None
        self.current: int | None = None
        self.vmcss: dict[int, Vmcs] = {}
        self.launched: set[int] = set()
        self.errors: dict[int, int] = {}  # VM-instruction error field, per VMCS
        self._l2: tuple[VmxGuest, Vmcs, L1State] | None = None  # while L2 runs
        self.init_latched = False  # an INIT blocked in root operation (SDM 24.8)

    # -- a VMM's snapshot and rollback (Cpu._roll_back()) --------------------------------

    def snapshot_root(self) -> RootState:
        if self._l2 is not None:
            raise ModelLimit("a snapshot while L2 runs on the model is not modelled")
        return RootState(self.vmxon_region, self.current,
                         tuple((k, replace(v)) for k, v in self.vmcss.items()),
                         frozenset(self.launched), tuple(self.errors.items()))

    def restore_root(self, cpu: Cpu, saved: RootState) -> None:
        """Back to `saved`: an L2 that runs is left with no VM exit (its VMCS keeps what it
        had), L1's view of the core restored; an NMI for L1 that had yet to exit L2 stays
        pending, as the core's latch keeps it."""
        if self._l2 is not None:
            guest, _, l1 = self._l2
            self._l2 = None
            cpu.step_trap_replaced = False
            self._leave_guest(cpu, l1, guest.host_nmi)
        self.vmxon_region, self.current = saved.vmxon_region, saved.current
        self.vmcss = {k: replace(v) for k, v in saved.vmcss}
        self.launched, self.errors = set(saved.launched), dict(saved.errors)

    # -- results (SDM 30.2) ------------------------------------------------------

    @staticmethod
    def _succeed(cpu: Cpu) -> None:
        cpu.rflags &= ~_STATUS

    @staticmethod
    def _fail_invalid(cpu: Cpu) -> None:
        cpu.rflags = (cpu.rflags & ~_STATUS) | CF

    def _fail_valid(self, cpu: Cpu, error: int) -> None:
        if self.current is None:
            self._fail_invalid(cpu)
            return
        self.errors[self.current] = error
        cpu.rflags = (cpu.rflags & ~_STATUS) | ZF

    # -- the instructions ----------------------------------------------------------

    def vmxon(self, cpu: Cpu, region: int) -> None:
        if self.vmxon_region is not None:
            raise ModelLimit("VMXON in VMX root operation is not modelled", cpu.rip)
        self.vmxon_region = region
        self._succeed(cpu)

    def _require_vmxon(self, cpu: Cpu) -> None:
        if self.vmxon_region is None:
            raise Fault(Vec.UD)  # outside VMX operation (SDM 30.3)

    def vmclear(self, cpu: Cpu, region: int) -> None:
        self._require_vmxon(cpu)
        if region == self.vmxon_region:
            self._fail_valid(cpu, VmxError.VMCLEAR_VMXON_POINTER)
            return
        self.vmcss.setdefault(region, Vmcs())
        self.launched.discard(region)
        if self.current == region:
            self.current = None
        self._succeed(cpu)

    def vmptrld(self, cpu: Cpu, region: int) -> None:
        self._require_vmxon(cpu)
        self.vmcss.setdefault(region, Vmcs())
        self.current = region
        self._succeed(cpu)

    def vmwrite(self, cpu: Cpu, field: int, value: int) -> None:
        self._require_vmxon(cpu)
        if self.current is None:
            self._fail_invalid(cpu)
        elif field in READ_ONLY:
            self._fail_valid(cpu, VmxError.WRITE_READ_ONLY)
        elif field not in FIELDS:
            self._fail_valid(cpu, VmxError.UNSUPPORTED_FIELD)
        else:
            setattr(self.vmcss[self.current], FIELDS[field], value)
            self._succeed(cpu)

    def vmread(self, cpu: Cpu, field: int) -> int | None:
        self._require_vmxon(cpu)
        if self.current is None:
            self._fail_invalid(cpu)
            return None
        if field == VM_INSTRUCTION_ERROR:
            self._succeed(cpu)
            return self.errors.get(self.current, 0)
        if field not in FIELDS:
            self._fail_valid(cpu, VmxError.UNSUPPORTED_FIELD)
            return None
        self._succeed(cpu)
        return int(getattr(self.vmcss[self.current], FIELDS[field]))

    def vmcall(self, cpu: Cpu) -> None:
        """VMCALL in VMX root operation, without the dual-monitor treatment of SMIs and SMM:
        VMfail with error 1, "VMCALL executed in VMX root operation" (SDM Vol.2 VMCALL, 30.4)."""
        self._require_vmxon(cpu)
        self._fail_valid(cpu, VmxError.VMCALL_IN_ROOT)

    def init_signal(self, cpu: Cpu) -> ArrivalFate:
        """INIT in VMX operation (SDM 24.8: "INIT signals are blocked whenever a logical
        processor is in VMX root operation. They are not blocked in VMX non-root operation.
        Instead, INITs cause VM exits"): L2's VM exit, or latched until L1 enters L2 (VMXOFF,
        which would unblock it in root operation, is not modelled)."""
        if self._l2 is not None:
            self._l2[0].init_signal()
        else:
            self.init_latched = True
        return ArrivalFate.PENDING

    def vmentry(self, cpu: Cpu, launch: bool, next_rip: int) -> None:
        """VMLAUNCH/VMRESUME: the core goes on in L2 until a VM exit (SDM 26); see run()."""
        rip, cpu.rip = cpu.rip, next_rip  # where L1 continues if the entry fails
        # The MOV SS shadow the VMLAUNCH/VMRESUME itself executes in (boundary() moved it).
        region = self._entry_region(cpu, launch, blocked_by_mov_ss=cpu.shadow_prev is Shadow.MOV_SS)
        if region is None:
            return
        vmcs = self.vmcss[region]
        if not vmcs.proc_based & Proc.NMI_WINDOW_EXITING:  # else VMfail (check_nmi_controls())
            check_vmcs_for_model(vmcs, rip)
        # a real-mode L2 (unrestricted guest): its mode now, for the entry checks and the run
        host_mode = load_real_mode(cpu, vmcs, rip) if enters_real_mode(vmcs) else None
        l1 = (cpu.idtr_base, cpu.idtr_limit, cpu.nmi_blocked, host_mode)
        guest = VmxGuest(cpu, vmcs)
        guest.on_external = lambda event, vector: _arrival(guest, event, vector)
        guest.on_nmi_from_apic = lambda: _arrival(guest, External.NMI, Vec.NMI)
        if vmcs.pin_based & Pin.EXT_INTR_EXITING:
            guest.l1_apic_open = lambda: True  # external-interrupt exiting, whatever L2's IF
        else:
            cpu.apic_delivers = True  # L2 takes them through its own IDT (SDM 25.2: no exit)
        _pending_events_exit(guest)
        if self.init_latched:  # no longer blocked: it exits at L2's first boundary (SDM 24.8)
            self.init_latched = False
            guest.init_signal()
        cpu.idtr_base, cpu.idtr_limit = vmcs.guest_idtr_base, vmcs.guest_idtr_limit
        self._l2 = (guest, vmcs, l1)
        # An entry that succeeds takes its trap state from the guest's pending debug exceptions
        # (SDM 26.7.3; Bochs VMenterLoadCheckGuestState() replaces debug_trap, and VM exit
        # clears it): L1's single-step over VMLAUNCH/VMRESUME traps only if VMfail.
        cpu.step_trap_replaced = bool(cpu.rflags & TF)
        with entry_retired(cpu):
            try:
                guest.enter()
            except InvalidGuestState as failed:
                # no single-step trap: the host state is loaded as at a VM exit (SDM 26.8),
                # which clears it (Bochs VMexit())
                self._leave_guest(cpu, l1, guest.host_nmi)
                self._l2 = None
                self._entry_failure_exit(cpu, vmcs, failed.check)
                return
            except EntryFailed as failed:
                cpu.step_trap_replaced = False  # VMfail: an ordinary instruction's trap
                self._leave_guest(cpu, l1, guest.host_nmi)
                self._l2 = None
                cpu.trace.append(ExitRecord("VM_ENTRY_FAILED", cpu.rip, cpu.retired, failed.check))
                self._fail_valid(cpu, VmxError.ENTRY_INVALID_CONTROL)
                return
            except VmExit:
                self.launched.add(region)  # the entry succeeded; its injection exited
                self._exit_to_l1(cpu)
                return
        self.launched.add(region)
        self._succeed(cpu)

    def run(self, cpu: Cpu, max_steps: int) -> Stop:
        """The core's run loop with VM exits from L2 turned back into L1 execution (SDM 27.5)."""
        start = cpu.work
        while True:
            try:
                stop = cpu.run(max(0, max_steps - (cpu.work - start)))
            except VmExit:
                self._exit_to_l1(cpu)
                continue
            if self._l2 is not None and self._l2[0].exit_on_stop(stop):
                self._exit_to_l1(cpu)  # L2's triple fault: L1 goes on at HOST_RIP
                continue
            return stop

    def _exit_to_l1(self, cpu: Cpu) -> None:
        guest, vmcs, l1 = self._l2
        self._l2 = None
        nmi_waiting = guest.host_nmi  # an NMI for L1 that had yet to exit L2
        guest.complete_exit()
        if l1[3] is not None:
            save_real_mode(cpu, vmcs)
        nmi_exit = vmcs.exit_reason == ExitReason.EXCEPTION_NMI and bool(
            vmcs.exit_intr_info & INTR_INFO_VALID) and info_type(vmcs.exit_intr_info) == EventType.NMI
        l2_blocked = cpu.nmi_blocked
        self._leave_guest(cpu, l1, nmi_waiting and not nmi_exit)
        if not vmcs.pin_based & Pin.VIRTUAL_NMIS:
            # L2's blocking by NMI was the physical one; only an NMI exit changes it (SDM 27.5.5)
            cpu.nmi_blocked = l2_blocked
        else:
            # With virtual NMIs, VM entry unblocked NMIs (SDM 26.7.1: bit 3 is virtual-NMI
            # blocking only) and the exit leaves them so (27.5.5): L1 that entered from its NMI
            # handler comes back with NMIs unblocked (bugzilla 217304, Sean Christopherson).
            cpu.nmi_blocked = False
        if nmi_exit:
            cpu.nmi_blocked = True  # an NMI that exits leaves NMIs blocked for L1 (SDM 27.5.5)
        cpu.rip, cpu.regs[RSP] = vmcs.host_rip, vmcs.host_rsp
        cpu.rflags = 0x2  # SDM 27.5.3: RFLAGS is cleared except bit 1

    @staticmethod
    def _entry_failure_exit(cpu: Cpu, vmcs: Vmcs, check: str) -> None:
        """A failed guest-state check (SDM 26.7): exit reason 33 with bit 31 and a zero
        qualification, the other exit fields and the launch state unchanged, the host state
        loaded as at a VM exit (27.5), NMI blocking as before the entry."""
        vmcs.exit_reason = ExitReason.INVALID_GUEST_STATE | FAILED_VMENTRY
        vmcs.exit_qualification = 0
        cpu.trace.append(ExitRecord("VM_ENTRY_FAILURE_INVALID_GUEST_STATE", cpu.rip, cpu.retired, check))
        cpu.rip, cpu.regs[RSP] = vmcs.host_rip, vmcs.host_rsp
        cpu.rflags = 0x2  # SDM 27.5.3

    def _entry_region(self, cpu: Cpu, launch: bool, blocked_by_mov_ss: bool) -> int | None:
        """The VMCS VMLAUNCH/VMRESUME may enter, or None after VMfail.

        The checks in the order of SDM 30.3's VMLAUNCH/VMRESUME pseudocode (Bochs
        vmx.cc and KVM nested_vmx_run() keep it): VMX operation, a current VMCS,
        no blocking by MOV SS, then the launch state.
        """
        self._require_vmxon(cpu)
        region = self.current
        if region is None:
            self._fail_invalid(cpu)
        elif blocked_by_mov_ss:
            self._fail_valid(cpu, VmxError.ENTRY_MOV_SS_BLOCKING)
            return None
        elif launch == (region in self.launched):
            self._fail_valid(cpu, VmxError.VMLAUNCH_NOT_CLEAR if launch else VmxError.VMRESUME_NOT_LAUNCHED)
            return None
        return region

    @staticmethod
    def _leave_guest(cpu: Cpu, l1: L1State, nmi_waiting: bool) -> None:
        """Back to L1's state; an NMI that L2 left before it could exit is L1's, pending."""
        back_to_l1(cpu)
        cpu.shutdown = False  # a triple fault that exited was L2's
        cpu.idtr_base, cpu.idtr_limit, cpu.nmi_blocked, host_mode = l1
        if host_mode is not None:
            restore_host_mode(cpu, host_mode)
        if nmi_waiting:
            cpu.nmi_pending += 1
            cpu.attn = True


def check_vmcs_for_model(vmcs: Vmcs, rip: int) -> None:
    """The L1 setups the model covers, checked once VM entry would succeed; anything else
    stops the run with a clear message (on this model and under nested KVM alike)."""
    if vmcs.pin_based & Pin.NMI_EXITING and not vmcs.pin_based & Pin.VIRTUAL_NMIS:
        # SDM 26.7.1: blocking by NMI is then the physical one, IRET in L2 leaves it, and an
        # NMI for L1 waits behind it instead of exiting. KVM's vmcs02 always has L0's virtual
        # NMIs (prepare_vmcs02_early()), so it would run such an L2 with virtual-NMI blocking.
        raise ModelLimit('"NMI exiting" without "virtual NMIs" is not modelled (IRET keeps '
                         'blocking by NMI in L2, SDM 26.7.1)', rip)
    if vmcs.guest_cr0 & CR0_PE and not vmcs.guest_cr0 & CR0_PG:
        # L2 runs in L1's mode unless it is in real mode (real_l2.py)
        raise ModelLimit("an L2 in protected mode without paging (guest CR0.PE=1, PG=0) is "
                         "not modelled", rip)


def _pending_events_exit(guest: VmxGuest) -> None:
    """An NMI L1 left pending at VMLAUNCH/VMRESUME exits at L2's first boundary, after any
    injection: with virtual NMIs no NMI is blocked in VMX non-root operation (SDM 26.6.1),
    so it exits at once (NMI exiting) and stays L1's. A pending interrupt exits the same way
    (VmxGuest.boundary(), l1_interrupt_presented()).
    """
    cpu, vmcs = guest.cpu, guest.vmcs
    if not vmcs.pin_based & Pin.NMI_EXITING:
        return  # it stays in the core's latch: L2 takes it through its IDT once unblocked
    if cpu.nmi_pending and (vmcs.pin_based & Pin.VIRTUAL_NMIS
                            or not vmcs.guest_interruptibility & Interruptibility.NMI):
        cpu.nmi_pending -= 1
        guest.host_nmi = True


def _arrival(guest: VmxGuest, event: External, vector: int) -> None:
    """An NMI or interrupt for L1 arrives while L2 runs: with the pin control set, it exits;
    without, L2 takes it through its own IDT as a CPU outside VMX would (SDM 25.2, 26.7.5)."""
    cpu = guest.cpu
    if event is External.INTERRUPT:
        cpu.apic.request(vector)  # stays pending in L1's APIC (no acknowledge on exit)
    elif guest.vmcs.pin_based & Pin.NMI_EXITING:
        guest.host_nmi = True
    else:
        cpu.raise_nmi()
    cpu.attn = True  # exits, or is taken, at this boundary if unblocked

