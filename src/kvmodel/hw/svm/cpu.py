"""SVM guest mode of the CPU: VMRUN with EVENTINJ, intercepts, #VMEXIT.

APM Vol.2: 15.5 (VMRUN), 15.6-15.7 (#VMEXIT, EXITINTINFO), 15.7.1 (next
RIP), 15.9-15.13 (intercepts), 15.20 (event injection), 15.21 (interrupt
shadow, virtual interrupts), 15.25.6 (#NPF).
"""

from __future__ import annotations

from collections.abc import Callable

from kvmodel.arch import deliver
from kvmodel.arch.cpu import Cpu, Stop
from kvmodel.arch.decode import Decoded, Exiting
from kvmodel.arch.events import Event, EventType, Vec, delivers_error_code
from kvmodel.arch.faults import Access, Fault
from kvmodel.arch.ghcb import MSR_AMD64_SEV_ES_GHCB
from kvmodel.arch.observe import Halt, Retire
from kvmodel.arch.priority import Source
from kvmodel.arch.regs import DR6_B0_B3, IF, RCX, RDX, RF, RSP, Shadow
from kvmodel.errors import ModelLimit
from kvmodel.hw.base import EntryFailed, GuestMode, VmExit, Where, event_where, frame_rf, shadow_at
from kvmodel.hw.svm.vmcb import (
    EVTINJ_VALID,
    EVTINJ_VALID_ERR,
    GUEST_INTERRUPT_MASK,
    INTERRUPT_SHADOW,
    NPF_FETCH,
    NPF_GUEST_FINAL,
    NPF_WRITE,
    V_GIF,
    V_GIF_ENABLE,
    V_IGN_TPR,
    V_INTR_MASKING,
    V_INTR_PRIO_MASK,
    V_INTR_PRIO_SHIFT,
    V_IRQ,
    V_NMI_BLOCKING,
    V_NMI_ENABLE,
    V_NMI_PENDING,
    V_TPR_MASK,
    EventInjType,
    ExitCode,
    Intercept,
    Vmcb,
    describe,
    encode,
    event_inj_type,
    exit_name,
    io_intercepted,
    ioio_info,
    msr_intercepted,
)  # fmt: skip

_INSTRUCTION_EXITS = {
    Exiting.HLT: (Intercept.HLT, ExitCode.HLT),
    Exiting.CPUID: (Intercept.CPUID, ExitCode.CPUID),
    Exiting.IO: (Intercept.IOIO, ExitCode.IOIO),
    Exiting.RDMSR: (Intercept.MSR, ExitCode.MSR),  # MSR_PROT, with the MSR permission map
    Exiting.WRMSR: (Intercept.MSR, ExitCode.MSR),
    Exiting.CR8_WRITE: (Intercept.CR8_WRITE, ExitCode.WRITE_CR8),
    Exiting.INVLPG: (Intercept.INVLPG, ExitCode.INVLPG),
    Exiting.IRET: (Intercept.IRET, ExitCode.IRET),
    Exiting.INT_N: (Intercept.INTN, ExitCode.SWINT),
    Exiting.VMRUN: (Intercept.VMRUN, ExitCode.VMRUN),
    Exiting.VMLOAD: (Intercept.VMLOAD, ExitCode.VMLOAD),
    Exiting.VMSAVE: (Intercept.VMSAVE, ExitCode.VMSAVE),
    Exiting.STGI: (Intercept.STGI, ExitCode.STGI),
    Exiting.CLGI: (Intercept.CLGI, ExitCode.CLGI),
    Exiting.VMMCALL: (Intercept.VMMCALL, ExitCode.VMMCALL),
}
_NEXT_RIP_EXCEPTIONS = (Vec.BP, Vec.OF)  # with BOUND, the exceptions that save nRIP (15.7.1)
# NMI and the vectors below 32 that are no exception on AMD (APM 8.2 Table 8-1)
_NOT_EXCEPTIONS = frozenset((Vec.NMI, 9, 15, 20, 22, 23, 24, 25, 26, 27, 31))


class SvmGuest(GuestMode):
    """The guest's CPU between VMRUN and #VMEXIT, on a CPU with NRIP save."""

    vendor = "svm"
    efer_svme = True  # VMRUN requires EFER.SVME in the guest state (APM 15.5.1)

    def __init__(self, cpu: Cpu):
        super().__init__(cpu)
        cpu.amd_ext = True  # an AMD CPU (deliver.py ext_bit())
        self.vmcb = Vmcb()
        self._saved_shadow = Shadow.NONE  # the shadow kind behind int_state at the last exit
        self._where = Where.BOUNDARY
        self._rf = False
        # Where the guest's DR6 is while it runs: the VMCB's, which KVM clears for each run
        # (the core's dr6 stands for vcpu->arch.dr6), or, for an L1 on the model (root.py),
        # the core's own DR6.
        self.dr6_in_core = False
        # Whether V_TPR is the guest's own CR8 (an L2 whose L1 set V_INTR_MASKING), rather
        # than a copy of the APIC's TPR a VMM keeps in step (KVM's sync_lapic_to_cr8()).
        self.tpr_virtualized: Callable[[], bool] = _never

    # -- VMRUN (APM 15.5, 15.20) ----------------------------------------------

    def run(self, max_steps: int) -> Stop | None:
        """VMRUN: load, inject EVENTINJ, run to the next #VMEXIT (None) or the budget's end."""
        self.check_vmcb()
        self._load_guest_state()
        try:
            self.inject()
            stop = self.cpu.run(max_steps)
        except VmExit:
            self.complete_exit()
            return None
        if self.exit_on_stop(stop):
            self.complete_exit()
            return None
        if stop is Stop.SHUTDOWN:
            return stop
        if stop is Stop.HALTED:
            raise EntryFailed("guest halted with the HLT intercept off: not modelled")
        self.save_at_stop()
        return stop

    def enter(self) -> None:
        """VMRUN for an L1 on the model (hw/svm/root.py): the injection may already exit."""
        self.check_vmcb()
        self._load_guest_state()
        self.inject()

    def exit_on_stop(self, stop: Stop) -> bool:
        """A shutdown in the guest is a #VMEXIT when intercepted (APM 15.13.5); complete_exit()
        follows."""
        if stop is not Stop.SHUTDOWN or Intercept.SHUTDOWN not in self.vmcb.intercepts:
            return False
        self._exit(ExitCode.SHUTDOWN, Where.BOUNDARY, raise_=False)
        return True

    def save_at_stop(self) -> None:
        """The run ended with the guest still in (budget): the VMCB shows its state."""
        self._save_guest_state(Where.BOUNDARY)
        self._save_vnmi(None)

    def check_vmcb(self) -> None:
        """VMRUN's consistency checks on what the model has (APM 15.5.1): VMEXIT_INVALID."""
        if Intercept.VMRUN not in self.vmcb.intercepts:
            raise EntryFailed("the VMRUN intercept is clear")
        self._check_event_inj()

    def _check_event_inj(self) -> None:
        """VMRUN fails on reserved types and on exceptions with a non-exception vector (15.20)."""
        word = self.vmcb.event_inj
        if not word & EVTINJ_VALID:
            return
        type_, vector = (word >> 8) & 7, word & 0xFF
        if type_ not in EventInjType._value2member_map_:
            raise EntryFailed(f"EVENTINJ type {type_} is reserved")
        if type_ == EventInjType.EXEPT and (vector > 31 or vector in _NOT_EXCEPTIONS):
            raise EntryFailed(f"EVENTINJ exception with vector {vector}")

    def _load_guest_state(self) -> None:
        cpu, vmcb = self.cpu, self.vmcb
        if not vmcb.sev_es:  # SEV-ES: the registers come from the VMSA, which the core is
            cpu.rip = vmcb.rip
            cpu.regs[RSP] = vmcb.rsp
            cpu.rflags = vmcb.rflags
        # One shadow bit (APM 15.21.5). The kind (STI or MOV SS) matters for chained
        # MOV SS and debug traps; the model keeps the kind it saved (UNVERIFIED) and
        # treats a bit set by the VMM as an STI shadow.
        if not vmcb.int_state & INTERRUPT_SHADOW:
            cpu.shadow = Shadow.NONE
        else:
            cpu.shadow = self._saved_shadow if self._saved_shadow is not Shadow.NONE else Shadow.STI
        cpu.halted = False
        # vGIF (APM 15.33): STGI/CLGI in the guest flip V_GIF, which gates virtual interrupts and vNMI
        cpu.gif = bool(vmcb.int_ctl & V_GIF) if vmcb.int_ctl & V_GIF_ENABLE else True
        cpu.vtpr = vmcb.int_ctl & V_TPR_MASK if self.tpr_virtualized() else None
        self._load_vnmi()
        self.intercepts_changed()

    def _load_vnmi(self) -> None:
        """vNMI (APM 15.21.10): the core's NMI latch and blocking are V_NMI_PENDING/BLOCKING.

        The CPU takes a pending vNMI through the guest IDT when NMIs are unblocked
        (no shadow either, as for a real NMI: UNVERIFIED) and never exits for it.
        Without vNMI the guest has no NMI state the host can see: both are cleared.
        """
        cpu, int_ctl = self.cpu, self.vmcb.int_ctl
        if int_ctl & V_NMI_ENABLE:
            cpu.nmi_pending = 1 if int_ctl & V_NMI_PENDING else 0
            cpu.nmi_blocked = bool(int_ctl & V_NMI_BLOCKING)
        else:
            cpu.nmi_pending = 0
        cpu.attn = True

    def _save_vnmi(self, vectoring: Event | None, where: Where = Where.BOUNDARY) -> None:
        """V_NMI_BLOCKING at #VMEXIT (vNMI cover letter): only an IRET that completes clears it,
        so an exit in the middle of one keeps it; an exit while delivering an NMI clears it."""
        vmcb, cpu = self.vmcb, self.cpu
        if not vmcb.int_ctl & V_NMI_ENABLE:
            return
        blocked = cpu.nmi_blocked or (where is Where.INSTRUCTION and cpu.iret_unblocked_nmi)
        if vectoring is not None and vectoring.type is EventType.NMI:
            blocked = False
        vmcb.int_ctl &= ~(V_NMI_PENDING | V_NMI_BLOCKING)
        vmcb.int_ctl |= (V_NMI_PENDING if cpu.nmi_pending else 0) | (V_NMI_BLOCKING if blocked else 0)

    def intercepts_changed(self) -> None:
        self.cpu.host_attn = bool(self.vmcb.int_ctl & V_IRQ)  # a virtual interrupt, taken or exiting
        self.cpu.attn = True

    def inject(self) -> None:
        """Deliver EVENTINJ through the guest IDT; software events return to nRIP (15.7.1)."""
        cpu, vmcb = self.cpu, self.vmcb
        word = vmcb.event_inj
        if not word & EVTINJ_VALID:
            return
        vector, inj = word & 0xFF, EventInjType((word >> 8) & 7)
        error = vmcb.event_inj_err if word & EVTINJ_VALID_ERR else None
        if inj is EventInjType.INTR:
            event = Event(vector, EventType.EXT_INT, cpu.rip)
        elif inj is EventInjType.NMI:
            event = Event(Vec.NMI, EventType.NMI, cpu.rip)  # the vector field is ignored
        elif inj is EventInjType.SOFT:
            event = Event(vector, EventType.SW_INT, vmcb.next_rip, insn_rip=cpu.rip)
        elif vector in _NEXT_RIP_EXCEPTIONS:
            event = Event(vector, EventType.SW_EXCEPTION, vmcb.next_rip, insn_rip=cpu.rip)
        else:
            event = Event(vector, EventType.HW_EXCEPTION, cpu.rip, error)
        cpu.shadow = Shadow.NONE  # injection clears the shadow (reference x86-arch 8.4)
        deliver.deliver(cpu, event, injected=True)

    # -- #VMEXIT (APM 15.6, 15.7) ---------------------------------------------

    def _exit(self, code: int, where: Where, *, info_1: int = 0, info_2: int = 0,
              next_rip: int = 0, rf: bool = False, raise_: bool = True) -> None:
        """Fill the exit fields and leave; `rf`: the intercepted fault's frame RF."""
        vmcb = self.vmcb
        vmcb.exit_code = code
        vmcb.exit_info_1 = info_1
        vmcb.exit_info_2 = info_2
        vmcb.next_rip = next_rip  # 0 for every exit that does not save nRIP (15.7.1)
        self._where, self._rf = where, rf
        if raise_:
            raise VmExit

    def complete_exit(self) -> None:
        """After the core unwound: EXITINTINFO and the guest state (15.7.2)."""
        vmcb, cpu = self.vmcb, self.cpu
        vectoring = cpu.vectoring
        self._save_vnmi(vectoring, self._where)
        rf = True if self._rf else None
        if vectoring is not None:
            code = (vectoring.error_code if delivers_error_code(vectoring.vector, vectoring.type, cpu.cr0)
                    else None)
            vmcb.exit_int_info = encode(vectoring.vector, event_inj_type(vectoring.type), code)
            vmcb.exit_int_info_err = code or 0
            rf = frame_rf(vectoring)  # as VMX does (SDM 27.3.3); for SVM UNVERIFIED
            cpu.vectoring = None
        else:
            vmcb.exit_int_info = 0
        vmcb.event_inj &= ~EVTINJ_VALID
        if vmcb.sev_es and vmcb.exit_code in (ExitCode.VMGEXIT, ExitCode.HLT):
            cpu.rflags &= ~RF  # the instruction completed (_exit_after)
        self._save_guest_state(self._where)
        if rf is not None and not vmcb.sev_es:
            vmcb.rflags = (vmcb.rflags & ~RF) | (RF if rf else 0)
        self.host_interrupt = self.host_nmi = False
        self.record(exit_name(vmcb.exit_code),
                    "exit_int_info " + describe(vmcb.exit_int_info, vmcb.exit_int_info_err))

    def _save_guest_state(self, where: Where) -> None:
        cpu, vmcb = self.cpu, self.vmcb
        if vmcb.int_ctl & V_GIF_ENABLE:
            vmcb.int_ctl = vmcb.int_ctl | V_GIF if cpu.gif else vmcb.int_ctl & ~V_GIF
        if cpu.vtpr is not None:
            vmcb.int_ctl = (vmcb.int_ctl & ~V_TPR_MASK) | cpu.vtpr
        shadow = shadow_at(cpu, where)
        self._saved_shadow = shadow
        vmcb.int_state = INTERRUPT_SHADOW if shadow is not Shadow.NONE else 0
        if vmcb.sev_es:  # the VMSA keeps the registers; the host sees only IF (APM 15.35.3)
            vmcb.int_state |= GUEST_INTERRUPT_MASK if cpu.rflags & IF else 0
            return
        vmcb.rip = cpu.rip
        vmcb.rsp = cpu.regs[RSP]
        vmcb.rflags = cpu.rflags
        vmcb.cs_base = cpu.cs_base  # moves in real mode when CS does (SDM 20.1.1)

    # -- arch/host.py hooks ---------------------------------------------------

    def event(self, cpu: Cpu, event: Event) -> None:
        """Exception intercepts (APM 15.12); INT n has its own intercept, checked as an instruction."""
        if event.type in (EventType.EXT_INT, EventType.NMI, EventType.SW_INT):
            return
        if event.type is EventType.PRIV_SW_EXCEPTION and Intercept.ICEBP in self.vmcb.intercepts:
            self._exit(ExitCode.ICEBP, Where.INSTRUCTION, next_rip=event.rip)
        if not self.vmcb.exception_intercepts >> event.vector & 1:
            return
        where = event_where(cpu, event)
        if event.type is EventType.PRIV_SW_EXCEPTION:
            # INT1's #DB is a trap: the intercept sees RIP after the INT1, which has
            # completed (UNVERIFIED against the APM; KVM's db_interception() re-injects
            # #DB at the saved RIP, which only works so).
            cpu.rip = event.rip
            cpu.retired += 1
            where = Where.BOUNDARY
        code = event.error_code if delivers_error_code(event.vector, event.type, cpu.cr0) else None
        if event.vector == Vec.DB:
            # DR6 is written before the intercept: UNVERIFIED against APM 15.12; KVM's
            # db_interception() takes the #DB's condition from the VMCB's DR6.
            if self.dr6_in_core:
                cpu.dr6 = (cpu.dr6 & ~DR6_B0_B3) | event.dr6
            else:
                self.vmcb.dr6 = (self.vmcb.dr6 & ~DR6_B0_B3) | event.dr6
        soft = event.type is EventType.SW_EXCEPTION and event.vector in _NEXT_RIP_EXCEPTIONS
        # #PF: EXITINFO2 is the faulting address; CR2 is left alone (APM 15.12)
        self._exit(ExitCode.EXCP_BASE + event.vector, where, info_1=code or 0,
                   info_2=event.fault_address or 0,
                   next_rip=event.rip if soft else 0, rf=event.push_rf)

    def boundary(self, cpu: Cpu) -> None:
        """A physical interrupt exits first; then a virtual interrupt, which exits with VINTR
        (KVM's window) or, unintercepted, is taken through the guest IDT (APM 15.21.4)."""
        vmcb = self.vmcb
        # A guest's unintercepted CLGI without vGIF clears the real GIF, which holds physical
        # NMIs and interrupts, intercepted ones too, until its STGI (APM 15.17).
        real_gif = cpu.gif or bool(vmcb.int_ctl & V_GIF_ENABLE)
        if self.host_nmi and Intercept.NMI in vmcb.intercepts and real_gif:
            self._exit(ExitCode.NMI, Where.BOUNDARY)
        self.l1_interrupt_presented()
        if self.host_interrupt and Intercept.INTR in vmcb.intercepts and real_gif:
            self._exit(ExitCode.INTR, Where.BOUNDARY)
        if not self._virtual_interrupt_due(cpu):
            return
        if Intercept.VINTR in vmcb.intercepts:
            self._exit(ExitCode.VINTR, Where.BOUNDARY)
        # It ranks below NMIs and physical interrupts the guest takes, above code breakpoints
        # (APM 15.21.4, SDM 6.9); taking it clears V_IRQ (Bochs SvmVirtualInterruptAcknowledge()).
        if cpu.pending_source() in (None, Source.CODE_BREAKPOINT):
            vmcb.int_ctl &= ~V_IRQ
            cpu.host_attn = False
            deliver.deliver(cpu, Event(vmcb.int_vector & 0xFF, EventType.EXT_INT, cpu.rip))

    def _virtual_interrupt_due(self, cpu: Cpu) -> bool:
        """V_IRQ with the guest's IF (under V_INTR_MASKING, the virtual IF), GIF (or V_GIF), no
        shadow, and V_IGN_TPR or a priority of at least V_TPR (APM 15.21.4; the comparison is
        QEMU's ctl_has_irq(), UNVERIFIED against the APM's wording)."""
        int_ctl = self.vmcb.int_ctl
        if not (int_ctl & V_IRQ and cpu.rflags & IF and cpu.shadow is Shadow.NONE and cpu.gif):
            return False
        if int_ctl & V_IGN_TPR:
            return True
        tpr = cpu.vtpr if cpu.vtpr is not None else int_ctl & V_TPR_MASK
        return (int_ctl & V_INTR_PRIO_MASK) >> V_INTR_PRIO_SHIFT >= tpr

    def instruction(self, cpu: Cpu, insn: Decoded) -> None:
        if self.vmcb.sev_es:
            self._sev_es_instruction(cpu, insn)
            return
        if insn.exiting is Exiting.VMGEXIT:
            raise ModelLimit("VMMCALL outside an SEV-ES guest (a hypercall) is not modelled", cpu.rip)
        intercept_exit = _INSTRUCTION_EXITS.get(insn.exiting)
        if intercept_exit is None or intercept_exit[0] not in self.vmcb.intercepts:
            if (insn.exiting is Exiting.CR8_WRITE and self.vmcb.int_ctl & V_INTR_MASKING
                    and cpu.vtpr is None):
                raise ModelLimit("a CR8 write to V_TPR the VMM keeps in step with the APIC's TPR "
                                 "is not modelled", cpu.rip)
            return
        kind, info_1, info_2 = insn.exiting, 0, 0
        next_rip = cpu.rip + insn.length
        if kind in (Exiting.RDMSR, Exiting.WRMSR):
            info_1 = 1 if kind is Exiting.WRMSR else 0
            if not msr_intercepted(cpu.mem, self.vmcb.msrpm_base_pa, cpu.regs[RCX] & 0xFFFFFFFF,
                                   write=kind is Exiting.WRMSR):
                return
        elif kind is Exiting.IO:
            port = insn.io.port if insn.io.port is not None else cpu.regs[RDX] & 0xFFFF
            if not io_intercepted(cpu.mem, self.vmcb.iopm_base_pa, port, insn.io.size):
                return
            info_1, info_2 = ioio_info(port, insn.io.size, insn.io.is_in), next_rip  # APM 15.10.2
        elif kind is Exiting.INVLPG:
            info_1 = insn.operand(cpu) & cpu.addr_mask  # decode assists: the linear address (APM 15.33.2)
        self._exit(intercept_exit[1], Where.INSTRUCTION, info_1=info_1, info_2=info_2, next_rip=next_rip)

    def unmapped(self, cpu: Cpu, addr: int, access: Access) -> None:
        """#NPF: exit_info_1 is the error code, exit_info_2 the guest-physical address (15.25.6)."""
        error = NPF_GUEST_FINAL | (NPF_WRITE if access is Access.WRITE else 0) | (
            NPF_FETCH if access is Access.FETCH else 0)
        where = Where.DELIVERY if cpu.vectoring is not None else Where.INSTRUCTION
        self._exit(ExitCode.NPF, where, info_1=error, info_2=addr)

    # -- SEV-ES (APM 15.35; GHCB specification) ---------------------------------

    def _sev_es_instruction(self, cpu: Cpu, insn: Decoded) -> None:
        """Automatic exits (VMGEXIT, HLT) leave with the instruction done, as the VMM cannot
        advance RIP; any other intercept becomes #VC in the guest (a non-automatic exit)."""
        kind, vmcb = insn.exiting, self.vmcb
        if kind is Exiting.VMGEXIT:
            vmcb.ghcb_gpa = cpu.ghcb_msr
            self._exit_after(cpu, insn, ExitCode.VMGEXIT)
        if kind is Exiting.DR7_WRITE:
            if Intercept.DR7_WRITE in vmcb.intercepts:
                raise Fault(Vec.VC, int(ExitCode.WRITE_DR7))
            return
        if kind in (Exiting.RDMSR, Exiting.WRMSR) and cpu.regs[RCX] & 0xFFFFFFFF == MSR_AMD64_SEV_ES_GHCB:
            return  # the GHCB MSR belongs to the hardware: VMGEXIT hands it over
        intercept_exit = _INSTRUCTION_EXITS.get(kind)
        if intercept_exit is None or intercept_exit[0] not in vmcb.intercepts:
            return
        if kind is Exiting.HLT:
            self._exit_after(cpu, insn, ExitCode.HLT)
        raise Fault(Vec.VC, int(intercept_exit[1]))  # #VC's error code is the exit code

    def _exit_after(self, cpu: Cpu, insn: Decoded, code: ExitCode) -> None:
        """The VMSA's RIP is past the instruction (UNVERIFIED against the APM; KVM's
        __svm_skip_emulated_instruction() leaves SEV-ES RIP alone, which needs it)."""
        rip = cpu.rip
        cpu.rip += insn.length
        cpu.retired += 1
        if cpu.record_instructions:
            cpu.trace.append(Retire(rip, insn.text, cpu.retired))
        if insn.exiting is Exiting.HLT:
            cpu.trace.append(Halt(rip, cpu.retired))
        self._exit(code, Where.BOUNDARY, next_rip=cpu.rip)


def _never() -> bool:
    return False
