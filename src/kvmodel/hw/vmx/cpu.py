"""VMX non-root operation of the CPU: VM entry with event injection, VM exits.

SDM Vol.3: 25.1-25.2 (what causes exits, and their priority), 26.2-26.3
(entry checks), 26.5-26.6 (event injection and the state after entry),
27.1-27.3 (exit information and the guest state saved).
"""

from __future__ import annotations

from kvmodel.arch import deliver, fred
from kvmodel.arch.cpu import Cpu, Stop
from kvmodel.arch.decode import Decoded, Exiting, IoAccess
from kvmodel.arch.events import Event, EventType, Vec, delivers_error_code, has_error_code, vector_name
from kvmodel.arch.faults import Access
from kvmodel.arch.regs import CR0_PE, CR0_PG, DR6_CONDITIONS, IF, RCX, RDX, RF, RSP, Shadow
from kvmodel.errors import ModelLimit
from kvmodel.hw.base import (
    HOST_VECTOR,
    EntryFailed,
    GuestMode,
    InvalidGuestState,
    VmExit,
    Where,
    event_where,
    frame_rf,
    is_soft,
    shadow_at,
    soft_length,
)  # fmt: skip
from kvmodel.hw.vmx.vmcs import (
    EXIT_REASONS,
    INTR_INFO_DELIVER_CODE,
    INTR_INFO_NESTED,
    INTR_INFO_RESERVED,
    INTR_INFO_UNBLOCK_NMI,
    INTR_INFO_VALID,
    NOTIFY_VM_CONTEXT_INVALID,
    QUAL_UNBLOCK_NMI,
    Activity,
    ExitReason,
    Interruptibility,
    Pin,
    Proc,
    Secondary,
    Vmcs,
    describe_info,
    info_type,
    info_vector,
    intr_info,
)  # fmt: skip

# The VMX instructions exit unconditionally (SDM 25.1.2); the qualification's displacement
# and the instruction-information field are not modelled (KVM decodes the instruction).
_VMX_INSTRUCTION_EXITS = {
    Exiting.VMCLEAR: ExitReason.VMCLEAR, Exiting.VMLAUNCH: ExitReason.VMLAUNCH,
    Exiting.VMPTRLD: ExitReason.VMPTRLD, Exiting.VMREAD: ExitReason.VMREAD,
    Exiting.VMRESUME: ExitReason.VMRESUME, Exiting.VMWRITE: ExitReason.VMWRITE,
    Exiting.VMXON: ExitReason.VMXON,
}
_MSR_EXITS = {Exiting.RDMSR: ExitReason.MSR_READ, Exiting.WRMSR: ExitReason.MSR_WRITE}
IO_QUAL_IN = 1 << 3  # exit qualification for I/O instructions (SDM Table 27-5)
IO_QUAL_IMMEDIATE = 1 << 6
CR8_QUALIFICATION = 8  # MOV to CR8 from a GPR (SDM Table 27-3; register bits not modelled)
# The CPU adds an internal threshold to NOTIFY_WINDOW, so that 0 is a safe window
# (KVM api.rst, KVM_CAP_X86_NOTIFY_VMEXIT). Its value is not architectural; the
# model's is longer than any ordinary chain of deliveries (#DF is three).
NOTIFY_THRESHOLD = 100
IRET_OPCODE = 0xCF


class VmxGuest(GuestMode):
    """The guest's CPU in VMX non-root operation, with one current VMCS."""

    vendor = "vmx"

    def __init__(self, cpu: Cpu, vmcs: Vmcs | None = None):
        super().__init__(cpu)
        self.vmcs = vmcs if vmcs is not None else Vmcs()
        self._where = Where.BOUNDARY
        self._rf: bool | None = None
        self.notify_due: int | None = None  # the notify timer ran out: the exit qualification
        self.ack_interrupt_on_exit = False  # VM-exit control bit 15 (KVM sets it)
        self._mtf_from = 0  # cpu.work at the last VM entry: the monitor trap flag's start
        self._keeps_pending_dbg = False  # the exit being made is an MTF or INIT VM exit
        self.init_pending = False  # an INIT arrived: it exits at the next boundary (SDM 25.2)

    # -- VM entry (SDM 26) ----------------------------------------------------

    def run(self, max_steps: int) -> Stop | None:
        """VMRESUME: enter, inject, run to the next VM exit (None) or until the budget ends."""
        try:
            self.enter()
            stop = self.cpu.run(max_steps)
        except VmExit:
            self.complete_exit()
            return None
        if self.exit_on_stop(stop):
            self.complete_exit()
            return None
        if stop is Stop.HALTED:
            raise EntryFailed("guest halted with HLT exiting off: not modelled")
        self._save_guest_state(Where.BOUNDARY)
        return stop

    def exit_on_stop(self, stop: Stop) -> bool:
        """A triple fault in the guest always exits, with reason 2 (SDM 25.2 "Triple fault"; no
        control to turn it off); complete_exit() follows. Whoever takes the exit decides what
        the shutdown means (the core's flag stays until then)."""
        if stop is not Stop.SHUTDOWN:
            return False
        self._exit(ExitReason.TRIPLE_FAULT, Where.BOUNDARY, raise_=False)
        return True

    def enter(self) -> None:
        """The VM entry itself: checks, guest state, then the injection (which may exit)."""
        check_entry(self.vmcs, self.cpu)
        self._load_guest_state()
        self._mtf_from = self.cpu.work
        self.cpu.open_event_window()
        if self.vmcs.entry_intr_info & INTR_INFO_VALID:
            self._inject()

    def _load_guest_state(self) -> None:
        cpu, vmcs = self.cpu, self.vmcs
        cpu.rip = vmcs.guest_rip
        cpu.regs[RSP] = vmcs.guest_rsp
        cpu.rflags = vmcs.guest_rflags
        state = vmcs.guest_interruptibility
        if state & Interruptibility.MOV_SS:
            cpu.shadow = Shadow.MOV_SS
        elif state & Interruptibility.STI:
            cpu.shadow = Shadow.STI
        else:
            cpu.shadow = Shadow.NONE
        cpu.nmi_blocked = bool(state & Interruptibility.NMI)  # virtual-NMI blocking
        cpu.halted = vmcs.guest_activity_state == Activity.HLT
        cpu.pending_dbg = vmcs.guest_pending_dbg_exceptions
        self.cpu_windows_changed()

    def cpu_windows_changed(self) -> None:
        """Window exiting means the guest core must check every boundary."""
        proc = self.vmcs.proc_based
        self.cpu.host_attn = bool(proc & (Proc.NMI_WINDOW_EXITING | Proc.INTR_WINDOW_EXITING
                                          | Proc.MONITOR_TRAP_FLAG))
        self.cpu.attn = True

    def _inject(self) -> None:
        """Deliver the VM-entry event through the guest IDT (SDM 26.5.1)."""
        cpu, vmcs = self.cpu, self.vmcs
        info = vmcs.entry_intr_info
        vector, type_ = info_vector(info), EventType(info_type(info))
        error = vmcs.entry_exception_error_code if info & INTR_INFO_DELIVER_CODE else None
        data = vmcs.injected_event_data if fred.enabled(cpu) else None  # FRED frame +48
        if is_soft(type_):
            event = Event(vector, type_, cpu.rip + vmcs.entry_instruction_len, error, insn_rip=cpu.rip,
                          data=data)
        else:
            event = Event(vector, type_, cpu.rip, error, data=data,
                          nested=bool(info & INTR_INFO_NESTED))
        # A vectoring entry leaves no shadow and an active CPU (26.6.1, 26.6.2). Pending
        # debug exceptions survive it only under MOV SS blocking (26.6.3); which events
        # then carry them into the handler is arch's rule (deliver._drop_held_debug_traps()).
        if cpu.shadow is not Shadow.MOV_SS:
            cpu.pending_dbg = 0
        cpu.shadow = Shadow.NONE
        cpu.halted = False
        deliver.deliver(cpu, event, injected=True)

    # -- VM exits (SDM 27) ----------------------------------------------------

    def _exit(self, reason: ExitReason, where: Where, *, qualification: int = 0, info: int = 0,
              error_code: int = 0, insn_len: int = 0, gpa: int = 0, rf: bool | None = None,
              raise_: bool = True) -> None:
        """Fill the exit-information fields and leave; `rf`: the RF to save (None: as it is)."""
        vmcs = self.vmcs
        vmcs.exit_reason = reason
        vmcs.exit_qualification = qualification
        vmcs.exit_intr_info = info
        vmcs.exit_intr_error_code = error_code
        vmcs.exit_instruction_len = insn_len
        vmcs.guest_physical_address = gpa
        self._where, self._rf = where, rf
        if raise_:
            raise VmExit

    def complete_exit(self) -> None:
        """After the core unwound: IDT-vectoring information and the guest state (27.2.3, 27.3)."""
        vmcs, cpu = self.vmcs, self.cpu
        vectoring = cpu.vectoring
        rf = self._rf
        if vectoring is not None:
            code = (vectoring.error_code if delivers_error_code(vectoring.vector, vectoring.type, cpu.cr0)
                    else None)
            nested = vectoring.nested and fred.enabled(cpu)
            vmcs.idt_vectoring_info = intr_info(vectoring.vector, vectoring.type, code, nested)
            vmcs.idt_vectoring_error_code = code or 0
            if is_soft(vectoring.type):
                vmcs.exit_instruction_len = soft_length(vectoring)
            if fred.enabled(cpu):
                vmcs.original_event_data = fred.event_data(cpu, vectoring)
            rf = frame_rf(vectoring)  # RF as the interrupted frame would have had it (27.3.3)
            cpu.vectoring = None
        else:
            vmcs.idt_vectoring_info = 0
        vmcs.entry_intr_info &= ~INTR_INFO_VALID  # SDM 24.8.3
        self.notify_due = None  # the notify timer starts again at the next entry
        self._save_guest_state(self._where)
        if rf is not None:
            vmcs.guest_rflags = (vmcs.guest_rflags & ~RF) | (RF if rf else 0)
        self.host_interrupt = self.host_nmi = False  # the host takes them once the guest is out
        detail = f"info {describe_info(vmcs.exit_intr_info, vmcs.exit_intr_error_code)} " \
                 f"idt_vectoring {describe_info(vmcs.idt_vectoring_info, vmcs.idt_vectoring_error_code)}"
        self.record(EXIT_REASONS[vmcs.exit_reason].name, detail)

    def _save_guest_state(self, where: Where) -> None:
        """Guest RIP, RFLAGS, interruptibility and activity as before the exit (SDM 27.3)."""
        cpu, vmcs = self.cpu, self.vmcs
        vmcs.guest_rip = cpu.rip
        vmcs.guest_rsp = cpu.regs[RSP]
        vmcs.guest_rflags = cpu.rflags
        shadow = shadow_at(cpu, where)
        state = Interruptibility.NMI if cpu.nmi_blocked else 0
        if shadow is Shadow.STI:
            state |= Interruptibility.STI
        elif shadow is Shadow.MOV_SS:
            state |= Interruptibility.MOV_SS
        vmcs.guest_interruptibility = state
        vmcs.guest_activity_state = Activity.HLT if cpu.halted else Activity.ACTIVE
        # Pending debug exceptions survive where MOV SS holds them back, and in an MTF or INIT
        # VM exit, which outrank the debug trap (27.3.4); every other exit saves the field clear.
        keep = shadow is Shadow.MOV_SS or self._keeps_pending_dbg
        vmcs.guest_pending_dbg_exceptions = cpu.pending_dbg if keep else 0
        self._keeps_pending_dbg = False
        cpu.pending_dbg = 0
        cpu.halted = False

    # -- arch/host.py hooks ---------------------------------------------------

    def event(self, cpu: Cpu, event: Event) -> None:
        """Exceptions in the exception bitmap exit instead of being delivered (SDM 25.2)."""
        if event.type not in (EventType.HW_EXCEPTION, EventType.SW_EXCEPTION,
                              EventType.PRIV_SW_EXCEPTION):
            return
        if not self.vmcs.exception_bitmap >> event.vector & 1:
            return
        where = event_where(cpu, event)
        code = event.error_code if delivers_error_code(event.vector, event.type, cpu.cr0) else None
        info = intr_info(event.vector, event.type, code, event.nested and fred.enabled(cpu))
        if where is Where.INSTRUCTION and cpu.iret_unblocked_nmi and event.vector != Vec.DF:
            info |= INTR_INFO_UNBLOCK_NMI  # a fault on IRET that had unblocked NMIs (27.2.2)
        # #DB: B3-B0, BD, BS, never the pending-debug field's bit 12 (SDM 27.2.1 Table 27-1);
        # #PF: the faulting linear address, CR2 left alone (SDM 27.2.1, 27.1)
        qualification = event.dr6 & DR6_CONDITIONS if event.vector == Vec.DB else event.fault_address or 0
        self._exit(ExitReason.EXCEPTION_NMI, where, qualification=qualification, info=info,
                   error_code=code or 0, insn_len=soft_length(event), rf=frame_rf(event))

    def init_signal(self) -> None:
        """An INIT in VMX non-root operation: none of its usual effects, a VM exit instead
        (SDM 24.8, 25.2 "INIT signals"), at the next instruction boundary."""
        self.init_pending = True
        self.cpu.attn = True

    def before_traps(self, cpu: Cpu) -> None:
        """An INIT VM exit, then the monitor trap flag, outrank debug traps (SDM 6.9 Table 6-2:
        INIT is class 3, traps on the previous instruction class 4; 25.5.2 puts MTF between
        them). Both save the debug traps as pending debug exceptions (27.3.4); an INIT exit
        from HLT saves activity state HLT and RIP after the HLT (27.3.3, 27.3.4).

        The monitor trap flag (SDM 25.5.2): an MTF VM exit is pending at the boundary after the
        guest's first instruction since the entry, after the delivery of an event the entry
        injected, or of a fault or other event taken before an instruction could complete (all
        counted by cpu.work). It outranks debug traps (KVM's vmx_update_emulated_instruction():
        "MTF takes priority over debug-trap exceptions besides T-bit traps"), which it saves as
        pending debug exceptions (SDM 27.3.4), and every lower-priority event."""
        if self.init_pending:
            self.init_pending = False
            self._keeps_pending_dbg = True
            self._exit(ExitReason.INIT_SIGNAL, Where.BOUNDARY)
        if self.vmcs.proc_based & Proc.MONITOR_TRAP_FLAG and cpu.work != self._mtf_from:
            self._keeps_pending_dbg = True
            self._exit(ExitReason.MONITOR_TRAP_FLAG, Where.BOUNDARY)

    def wakes(self, cpu: Cpu) -> bool:
        """A halted L2 leaves HLT for an INIT, or an interrupt or NMI that L1 exits on (SDM 25.2)."""
        self.l1_interrupt_presented()
        return bool(self.init_pending or self.host_interrupt and self.vmcs.pin_based & Pin.EXT_INTR_EXITING
                    or self.host_nmi and self.vmcs.pin_based & Pin.NMI_EXITING)

    def boundary(self, cpu: Cpu) -> None:
        """Window exits and a waiting host interrupt, in SDM 25.2 priority order."""
        if self.notify_due is not None and not _iret_at(cpu):
            self._notify_exit(Where.BOUNDARY, self.notify_due)
        proc = self.vmcs.proc_based
        shadow = cpu.shadow
        # NMI-window: no virtual-NMI blocking, no MOV SS; STI blocking also holds it
        # here, one of the two behaviours SDM 25.2 allows. It ranks above NMIs (SDM 25.2).
        if (proc & Proc.NMI_WINDOW_EXITING and not cpu.nmi_blocked
                and shadow is Shadow.NONE):
            self._exit(ExitReason.NMI_WINDOW, Where.BOUNDARY)
        if self.host_nmi and self.vmcs.pin_based & Pin.NMI_EXITING:  # NMI before INTR (SDM 25.2)
            self._exit(ExitReason.EXCEPTION_NMI, Where.BOUNDARY,
                       info=intr_info(Vec.NMI, EventType.NMI, None))
        # Interrupt-window: below NMIs, so also below one the guest takes itself (NMI
        # exiting off, an L1 on the model), above external interrupts (SDM 25.2).
        if (proc & Proc.INTR_WINDOW_EXITING and cpu.rflags & IF and shadow is Shadow.NONE
                and not (cpu.nmi_pending and cpu.nmi_can_be_taken())):
            self._exit(ExitReason.INTERRUPT_WINDOW, Where.BOUNDARY)
        self.l1_interrupt_presented()
        if self.host_interrupt and self.vmcs.pin_based & Pin.EXT_INTR_EXITING:
            # acknowledged on exit, the vector is in the exit information (SDM 27.2.2)
            info = intr_info(HOST_VECTOR, EventType.EXT_INT, None) if self.ack_interrupt_on_exit else 0
            self._exit(ExitReason.EXTERNAL_INTERRUPT, Where.BOUNDARY, info=info)

    def instruction(self, cpu: Cpu, insn: Decoded) -> None:
        proc = self.vmcs.proc_based
        kind = insn.exiting
        if kind is Exiting.IRET and self.notify_due is not None:
            # The timer ran out inside IRET, after it ended NMI blocking (SDM 27.2.3 bit 12).
            unblocked = QUAL_UNBLOCK_NMI if cpu.nmi_blocked else 0
            cpu.nmi_blocked = False
            self._notify_exit(Where.INSTRUCTION, self.notify_due | unblocked)
        # HLT, RDMSR/WRMSR, CPUID and VMCALL have no exit qualification: "for all other VM
        # exits, this field is cleared" (SDM 27.2.1).
        if kind is Exiting.HLT and proc & Proc.HLT_EXITING:
            reason, qualification = ExitReason.HLT, 0
        elif kind is Exiting.CR8_WRITE and proc & Proc.CR8_LOAD_EXITING:
            reason, qualification = ExitReason.CR_ACCESS, CR8_QUALIFICATION
        elif kind is Exiting.IO:
            port = insn.io.port if insn.io.port is not None else cpu.regs[RDX] & 0xFFFF
            if not io_exits(cpu.mem, self.vmcs, port, insn.io.size):
                return
            reason, qualification = ExitReason.IO_INSTRUCTION, io_qualification(insn.io, port)
        elif kind in _MSR_EXITS:
            msr = cpu.regs[RCX] & 0xFFFFFFFF
            if not msr_exits(cpu.mem, self.vmcs, msr, write=kind is Exiting.WRMSR):
                return
            reason, qualification = _MSR_EXITS[kind], 0
        elif kind is Exiting.CPUID:
            reason, qualification = ExitReason.CPUID, 0
        elif kind is Exiting.INVLPG and proc & Proc.INVLPG_EXITING:
            # the qualification is the operand's linear address (SDM 27.2.1 Table 27-1)
            reason, qualification = ExitReason.INVLPG, insn.operand(cpu) & cpu.addr_mask
        elif kind is Exiting.VMCALL:  # unconditional, whatever the CPL (SDM 25.1.2)
            reason, qualification = ExitReason.VMCALL, 0
        elif kind in _VMX_INSTRUCTION_EXITS:
            if not cpu.cr0 & CR0_PE:
                raise ModelLimit("VMX instructions in a real-mode guest (#UD before any VM exit, "
                                 "SDM 30.3) are not modelled", cpu.rip)
            reason, qualification = _VMX_INSTRUCTION_EXITS[kind], 0
        else:
            return
        # An instruction exit saves RF=0 (SDM 27.3.3): the instruction counts as done.
        self._exit(reason, Where.INSTRUCTION, qualification=qualification, insn_len=insn.length,
                   rf=False)

    def unmapped(self, cpu: Cpu, addr: int, access: Access) -> None:
        """EPT violation (SDM 28.2.3.2; qualification Table 27-7)."""
        qualification = {Access.READ: 1, Access.WRITE: 2, Access.FETCH: 4}[access]
        where = Where.DELIVERY if cpu.vectoring is not None else Where.INSTRUCTION
        if where is Where.INSTRUCTION and cpu.iret_unblocked_nmi:
            qualification |= QUAL_UNBLOCK_NMI
        # RF=1 outside delivery, so the re-executed instruction's code breakpoint does not
        # fire again (SDM 27.3.3); during delivery the frame's RF wins (complete_exit).
        self._exit(ExitReason.EPT_VIOLATION, where, qualification=qualification, gpa=addr, rf=True)

    # -- Notify VM exit (KVM "Enable Notify VM exit"; kvm-upstream.md 3.7) ----------

    def no_event_window(self, cpu: Cpu) -> None:
        """Exit once the guest has gone NOTIFY_WINDOW (+ the threshold) cycles without a window."""
        super().no_event_window(cpu)
        vmcs = self.vmcs
        if (vmcs.secondary_exec & Secondary.NOTIFY_VM_EXITING
                and cpu.since_window > vmcs.notify_window + NOTIFY_THRESHOLD):
            self._notify_exit(Where.DELIVERY, 0)

    def notify_timer(self, context_invalid: bool) -> None:
        """The timer runs out at the next boundary, or inside the IRET about to run there."""
        if self.vmcs.secondary_exec & Secondary.NOTIFY_VM_EXITING:
            self.notify_due = NOTIFY_VM_CONTEXT_INVALID if context_invalid else 0
            self.cpu.attn = True

    def _notify_exit(self, where: Where, qualification: int) -> None:
        self.notify_due = None
        self._exit(ExitReason.NOTIFY, where, qualification=qualification)


def check_entry(vmcs: Vmcs, cpu: Cpu, guest_cr0: int | None = None) -> None:
    """The VM-entry checks the model makes, EntryFailed for the first that fails.

    One source for the CPU (VmxGuest.enter()) and for nested KVM, which checks
    vmcs12 before it builds vmcs02 (nested_vmx_run()). `guest_cr0`: the guest's CR0
    when the core does not hold it yet (vmcs12's); None: the core's.
    """
    cr0 = cpu.cr0 if guest_cr0 is None else guest_cr0
    check_nmi_controls(vmcs)
    check_entry_controls(vmcs, fred.enabled(cpu), protected=bool(cr0 & CR0_PE))
    check_guest_cr0(vmcs, cr0)
    check_entry_interruptibility(vmcs)


def check_guest_cr0(vmcs: Vmcs, cr0: int) -> None:
    """CR0.PE and PG are fixed to 1 in VMX operation except under "unrestricted guest", and
    PG=1 needs PE=1 (SDM 26.3.1.1, 23.8; KVM nested_guest_cr0_valid() in
    nested_vmx_check_guest_state()). The "enable EPT" control unrestricted guest needs
    (26.2.1.1) is not modelled: L2's memory is L1's, as under an identity EPT."""
    if cr0 & CR0_PG and not cr0 & CR0_PE:
        raise InvalidGuestState("guest CR0: PG set with PE clear")
    if not cr0 & CR0_PE and not vmcs.secondary_exec & Secondary.UNRESTRICTED_GUEST:
        raise InvalidGuestState('guest CR0: PE clear without "unrestricted guest"')


def check_nmi_controls(vmcs: Vmcs) -> None:
    """The NMI controls (SDM 26.2.1.1; KVM nested_vmx_check_nmi_controls()): "virtual NMIs"
    needs "NMI exiting", and "NMI-window exiting" needs "virtual NMIs" (there is no
    virtual-NMI blocking for the window to watch without them)."""
    pin = vmcs.pin_based
    if pin & Pin.VIRTUAL_NMIS and not pin & Pin.NMI_EXITING:
        raise EntryFailed('"virtual NMIs" set with "NMI exiting" clear')
    if vmcs.proc_based & Proc.NMI_WINDOW_EXITING and not pin & Pin.VIRTUAL_NMIS:
        raise EntryFailed('"NMI-window exiting" set with "virtual NMIs" clear')


def check_entry_controls(vmcs: Vmcs, fred_on: bool, protected: bool = True) -> None:
    """The VM-entry event-injection fields (SDM 26.2.1.3; KVM nested_check_vm_entry_controls()).

    `protected`: the guest's CR0.PE. With it clear (real mode under unrestricted guest, the
    only real mode the model has) no exception delivers an error code, so the deliver bit
    must be 0 (SDM 26.2.1.3)."""
    info = vmcs.entry_intr_info
    if not info & INTR_INFO_VALID:
        return
    vector, type_ = info_vector(info), info_type(info)
    nested_ok = INTR_INFO_NESTED if fred_on and type_ == EventType.HW_EXCEPTION else 0
    if info & INTR_INFO_RESERVED & ~nested_ok:
        raise EntryFailed("VM-entry interruption information: reserved bits set")
    if type_ not in (0, 2, 3, 4, 5, 6):
        raise EntryFailed(f"VM-entry interruption type {type_} is reserved")
    if type_ == EventType.NMI and vector != Vec.NMI:
        raise EntryFailed("NMI injection with a vector other than 2")
    if type_ == EventType.HW_EXCEPTION and vector > 31:
        raise EntryFailed(f"hardware exception vector {vector} > 31")
    wants_code = (protected and type_ == EventType.HW_EXCEPTION
                  and has_error_code(vector, EventType.HW_EXCEPTION))
    if bool(info & INTR_INFO_DELIVER_CODE) != wants_code:
        raise EntryFailed(f"deliver-error-code bit wrong for {vector_name(vector)} type {type_}")
    if wants_code and vmcs.entry_exception_error_code >> 16:
        raise EntryFailed("VM-entry exception error code bits 31:16 set")
    if is_soft(EventType(type_)) and not 1 <= vmcs.entry_instruction_len <= 15:
        raise EntryFailed(f"instruction length {vmcs.entry_instruction_len} for a software event")


def check_entry_interruptibility(vmcs: Vmcs) -> None:
    """The guest's RFLAGS.IF and interruptibility, alone and with the event to inject
    (SDM 26.3.1.4, 26.3.1.5: checks on the guest-state area, so InvalidGuestState).

    Not modelled: "a processor may require" no blocking by STI for an injected NMI
    (26.3.1.5, model-specific); the model's CPU does not.
    """
    state = vmcs.guest_interruptibility
    if state & Interruptibility.STI and state & Interruptibility.MOV_SS:
        raise InvalidGuestState("interruptibility: STI and MOV SS blocking both set")
    if state & Interruptibility.STI and not vmcs.guest_rflags & IF:
        raise InvalidGuestState("interruptibility: STI blocking with RFLAGS.IF=0")
    info = vmcs.entry_intr_info
    if not info & INTR_INFO_VALID:
        return
    type_ = info_type(info)
    if type_ == EventType.EXT_INT and not vmcs.guest_rflags & IF:
        raise InvalidGuestState("external interrupt injected with RFLAGS.IF=0")
    if type_ == EventType.EXT_INT and state & (Interruptibility.STI | Interruptibility.MOV_SS):
        raise InvalidGuestState("external interrupt injected in an STI or MOV SS shadow")
    if type_ == EventType.NMI and state & Interruptibility.MOV_SS:
        raise InvalidGuestState("NMI injected under blocking by MOV SS")
    if (type_ == EventType.NMI and state & Interruptibility.NMI
            and vmcs.pin_based & Pin.VIRTUAL_NMIS):
        raise InvalidGuestState("NMI injected under virtual-NMI blocking")


def _iret_at(cpu: Cpu) -> bool:
    """Is the next instruction IRET (CF, or REX.W CF)? Read without fetch side effects."""
    at = cpu.linear(cpu.rip)
    first, second = cpu.mem[at:at + 2].ljust(2, b"\0")
    return first == IRET_OPCODE or (cpu.mode.value == 64 and first >> 4 == 4 and second == IRET_OPCODE)


def io_exits(mem: bytearray, vmcs: Vmcs, port: int, size: int) -> bool:
    """Does an IN/OUT of `size` bytes at `port` exit (SDM 25.1.3)? With "use I/O bitmaps", when
    the bit of any port it touches is set in bitmap A (ports 0-7FFF) or B (8000-FFFF), or when it
    wraps around the port space; else "unconditional I/O exiting" decides. One source for the
    CPU and for nested KVM (nested_vmx_exit_handled_io(), nested_vmx_check_io_bitmaps())."""
    if not vmcs.proc_based & Proc.USE_IO_BITMAPS:
        return bool(vmcs.proc_based & Proc.UNCOND_IO_EXITING)
    for each in range(port, port + size):
        if each > 0xFFFF:
            return True
        bitmap = vmcs.io_bitmap_a if each < 0x8000 else vmcs.io_bitmap_b
        if _bit(mem, bitmap, each & 0x7FFF):
            return True
    return False


def msr_exits(mem: bytearray, vmcs: Vmcs, msr: int, write: bool) -> bool:
    """Does RDMSR/WRMSR of `msr` exit (SDM 25.1.3, 24.6.9)? Always without "use MSR bitmaps" and
    for MSRs outside 0-1FFF and C0000000-C0001FFF; else the bit in the read or write bitmap for
    low or high MSRs (at offsets 0, 1024, 2048, 3072). One source for the CPU and for nested KVM
    (nested_vmx_exit_handled_msr())."""
    if not vmcs.proc_based & Proc.USE_MSR_BITMAPS:
        return True
    offset = 2048 if write else 0
    if msr >= 0xC0000000:
        msr -= 0xC0000000
        offset += 1024
    if msr >= 0x2000:
        return True
    return _bit(mem, vmcs.msr_bitmap + offset, msr)


def io_qualification(io: IoAccess, port: int) -> int:
    """Exit qualification of an IN/OUT (SDM Table 27-5): size - 1, direction, operand encoding,
    port; string and REP forms are not modelled."""
    return ((io.size - 1) | (IO_QUAL_IN if io.is_in else 0)
            | (IO_QUAL_IMMEDIATE if io.port is not None else 0) | port << 16)


def _bit(mem: bytearray, base: int, n: int) -> bool:
    at = base + n // 8
    return at >= len(mem) or bool(mem[at] >> (n % 8) & 1)  # no memory there: KVM exits
