"""kvm_amd's event code (arch/x86/kvm/svm/svm.c), over the SVM model in hw/svm.

Module parameters: `nrips` (use the CPU's next-RIP save), `vnmi`, `vgif`,
`nested` (nested.py), `debug_swap` (SEV-ES guests own DR0-3/DR7); `sev_es`
is the VM type (KVM_SEV_ES_INIT), see sev.py. Without vNMI,
KVM tracks NMI masking itself: `nmi_masked`, the IRET intercept,
`awaiting_iret_completion` until RIP moves past the IRET, and single-step
(TF|RF) to get an exit as soon as a blocked NMI could be taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmodel import _faults
from kvmodel.arch.decode import Exiting, decode
from kvmodel.arch.events import Vec
from kvmodel.arch.regs import EFER_SVME, IF, RAX, RF, RSP, TF, Mode
from kvmodel.errors import ModelLimit
from kvmodel.hw.base import EntryFailed
from kvmodel.hw.svm.cpu import SvmGuest
from kvmodel.hw.svm.vmcb import (
    EVTINJ_VALID,
    EVTINJ_VALID_ERR,
    GUEST_INTERRUPT_MASK,
    INTERRUPT_SHADOW,
    V_GIF,
    V_GIF_ENABLE,
    V_INTR_MASKING,
    V_INTR_PRIO_SHIFT,
    V_IRQ,
    V_IRQ_INJECTION_BITS,
    V_NMI_BLOCKING,
    V_NMI_ENABLE,
    V_NMI_PENDING,
    VMCB_SIZE,
    EventInjType,
    ExitCode,
    Intercept,
    encode,
)  # fmt: skip
from kvmodel.kvm import emulate, mmu
from kvmodel.kvm.svm import sev
from kvmodel.kvm.svm.nested import NestedSvm, NestedSvmState
from kvmodel.kvm.uapi import InvalidArgument, KvmExit, ShadowBits
from kvmodel.kvm.x86 import (
    BUDGET,
    DR6_ACTIVE_LOW,
    EBUSY,
    Request,
    UserspaceExit,
    Vcpu,
    exception_is_soft,
)

# init_vmcb(): #UD, #MC, #AC and #DB (CVE-2015-8104) always; #PF only without NPT.
EXCEPTION_INTERCEPTS = (1 << Vec.UD) | (1 << Vec.MC) | (1 << Vec.AC) | (1 << Vec.DB)
INTERCEPTS = {Intercept.INTR, Intercept.NMI, Intercept.SHUTDOWN, Intercept.HLT, Intercept.CPUID,
              Intercept.IOIO, Intercept.MSR, Intercept.CR8_WRITE, Intercept.VMRUN,
              Intercept.VMLOAD, Intercept.VMSAVE, Intercept.STGI, Intercept.CLGI, Intercept.VMMCALL}
_SVM_INSTRUCTION_INTERCEPTS = (Intercept.VMLOAD, Intercept.VMSAVE, Intercept.STGI, Intercept.CLGI)
_INSTRUCTION_EXITS = (ExitCode.CPUID, ExitCode.IOIO, ExitCode.MSR, ExitCode.WRITE_CR8)


@dataclass(frozen=True, slots=True)
class SvmParams:
    nrips: bool = True
    vnmi: bool = False  # kvm_amd.vnmi on a CPU with the vNMI feature (the model's CPU has it)
    sev_es: bool = False  # the VM is an SEV-ES guest
    debug_swap: bool = False  # kvm_amd.debug_swap (SEV-ES only)
    vgif: bool = True  # kvm_amd.vgif on a CPU with vGIF: the guest's STGI/CLGI need no exit
    nested: bool = False  # kvm_amd.nested, with SVM in the guest's CPUID (nested.py)
    vmware_backdoor: bool = False  # kvm.enable_vmware_backdoor: #GP is intercepted too
    npt: bool = True  # kvm_amd.npt; without it, shadow paging (kvm/mmu.py)


class Svm:
    """struct vcpu_svm (event fields) and the svm_x86_ops event hooks."""

    def __init__(self, vcpu: Vcpu, guest: SvmGuest, params: SvmParams):
        if params.sev_es and not params.nrips:
            raise InvalidArgument("SEV-ES guests need NRIPS (\"KVM: SVM: Require nrips support "
                                  "for SEV guests\")")
        if params.sev_es and params.vnmi:
            raise NotImplementedError("vNMI with SEV-ES is not modelled")
        if params.debug_swap and not params.sev_es:
            raise InvalidArgument("debug_swap applies to SEV-ES guests only")
        self.vcpu = vcpu
        self.sev_es = params.sev_es
        self.guest = guest
        self.nrips = params.nrips
        vcpu.ops = self
        self.vnmi = params.vnmi
        self.vgif = params.vgif
        self.guest_gif = True  # GIF when the hardware has no vGIF to hold it
        self.nmi_l1_to_l2 = False  # the NMI in EVENTINJ is L1's injection into L2
        self.nmi_masked = False
        self.awaiting_iret_completion = False
        self.nmi_iret_rip = 0
        self.nmi_singlestep = False
        self.nmi_singlestep_guest_rflags = 0
        self.soft_int_injected = False
        self.soft_int_csbase = 0
        self.soft_int_old_rip = 0
        self.soft_int_next_rip = 0
        self.late_completion = False  # the bug nested_svm_exitintinfo_from_vmcb02's order
        vmcb = guest.vmcb
        vmcb.intercepts = set(INTERCEPTS)
        vmcb.exception_intercepts = EXCEPTION_INTERCEPTS
        if params.vmware_backdoor:
            vmcb.exception_intercepts |= 1 << Vec.GP  # init_vmcb()
        if not params.npt:
            # shadow paging, init_vmcb(): INVLPG and #PF intercepted (CR3 too, not modelled)
            vmcb.exception_intercepts |= 1 << Vec.PF
            vmcb.intercepts.add(Intercept.INVLPG)
        vmcb.int_ctl = V_INTR_MASKING | (V_NMI_ENABLE if params.vnmi else 0) | (
            V_GIF_ENABLE | V_GIF if params.vgif else 0)
        cpu = guest.cpu
        vmcb.rip, vmcb.rflags, vmcb.rsp = cpu.rip, cpu.rflags, cpu.regs[RSP]
        vmcb.cs_base = cpu.cs_base  # KVM_SET_SREGS
        guest.on_external = vcpu.external
        guest.on_nmi_from_apic = vcpu.inject_nmi
        guest.tpr_virtualized = self._virtualize_tpr
        if params.sev_es:
            sev.init_vmcb(self, params.debug_swap)
        self.nested = NestedSvm(cpu, self) if params.nested else None
        self._recalc_instruction_intercepts()

    def _virtualize_tpr(self) -> bool:
        """nested_svm_virtualize_tpr(): L2 with L1's V_INTR_MASKING owns vmcb02's V_TPR; otherwise
        V_TPR mirrors the APIC's TPR (svm_sync_lapic_to_cr8() skips only this case)."""
        return self.guest_mode and bool(self.nested.ctl.int_ctl & V_INTR_MASKING)

    @property
    def guest_mode(self) -> bool:
        return self.nested is not None and self.nested.guest_mode

    @property
    def vmcb(self):
        return self.guest.vmcb

    @property
    def guest_state_protected(self) -> bool:
        return self.sev_es

    def get_nested_state(self) -> NestedSvmState | None:
        """KVM_GET_NESTED_STATE: None without nested SVM (the VMM skips it then)."""
        return self.nested.get_state() if self.nested is not None else None

    def set_nested_state(self, state: NestedSvmState) -> None:
        if self.nested is None:
            raise InvalidArgument("KVM_SET_NESTED_STATE without nested SVM (kvm_amd.nested=0)")
        self.nested.set_state(state)

    # -- registers -----------------------------------------------------------

    def rip_read(self) -> int:
        return self.vmcb.rip

    def rip_write(self, rip: int) -> None:
        self.vmcb.rip = rip

    def rsp_write(self, rsp: int) -> None:  # kvm_rsp_write()
        self.vmcb.rsp = rsp

    def get_rflags(self) -> int:
        """svm_get_rflags(): hide KVM's own TF/RF while single-stepping for an NMI window."""
        rflags = self.vmcb.rflags
        if self.nmi_singlestep:
            rflags &= ~((TF | RF) & ~self.nmi_singlestep_guest_rflags)
        return rflags

    def set_rflags(self, rflags: int) -> None:
        """svm_set_rflags(): keep TF|RF forced while single-stepping."""
        if self.nmi_singlestep:
            rflags |= TF | RF
        self.vmcb.rflags = rflags

    def sync_guest_state_to_core(self) -> None:
        """Make the arch core show the guest state as KVM_GET_REGS reports it (for inspection).

        For SEV-ES there is nothing to report: the core itself stands for the VMSA."""
        if self.sev_es:
            return
        cpu = self.guest.cpu
        cpu.rip, cpu.rflags, cpu.regs[RSP] = self.vmcb.rip, self.get_rflags(), self.vmcb.rsp

    def skip_emulated_instruction(self) -> bool:
        return self._skip(commit=True)

    def _skip(self, commit: bool, soft_int: int | None = None) -> bool:
        """__svm_skip_emulated_instruction(): next_rip when NRIPS gives it, else decode.

        `soft_int`: the vector of a soft interrupt being re-injected (EMULTYPE_SKIP_SOFT_INT):
        False, nothing skipped, if the instruction at RIP no longer raises it."""
        vmcb = self.vmcb
        if self.sev_es:
            pass  # the guest's RIP is not KVM's to move: the CPU or the guest advances it
        elif self.nrips and vmcb.next_rip:
            vmcb.rip = vmcb.next_rip
        else:
            cpu = self.guest.cpu
            insn = cpu.icache.get(vmcb.rip) or decode(cpu, vmcb.rip)  # EMULTYPE_SKIP
            if (soft_int is not None and not _faults.on("svm_skip_replaced_soft_int")
                    and not emulate.is_soft_int_instruction(self.vcpu, vmcb.rip, soft_int)):
                return False  # x86_emulate_instruction() fails: the event is dropped
            vmcb.rip += insn.length
            if commit:  # x86_emulate_instruction(EMULTYPE_SKIP) also clears RF
                vmcb.rflags &= ~RF
        if commit:
            self.set_interrupt_shadow(0)
        return True

    # -- shadows and NMI masking ------------------------------------------------

    def get_interrupt_shadow(self) -> int:
        """SVM has one shadow bit; KVM reports it as both kinds."""
        return ShadowBits.STI | ShadowBits.MOV_SS if self.vmcb.int_state & INTERRUPT_SHADOW else 0

    def set_interrupt_shadow(self, shadow: int) -> None:
        if shadow:
            self.vmcb.int_state |= INTERRUPT_SHADOW
        else:
            self.vmcb.int_state &= ~INTERRUPT_SHADOW

    def _vnmi_vmcb(self):
        """get_vnmi_vmcb_l1(): the VMCB whose vNMI bits hold L1's NMI state, or None.

        The nested seam: while L2 runs this must return None (vmcb01 is not the one
        the CPU is using) and KVM falls back to nmi_masked + the IRET intercept.
        """
        if self.guest_mode:
            return None
        return self.vmcb if self.vmcb.int_ctl & V_NMI_ENABLE else None

    def is_vnmi_enabled(self) -> bool:
        return self._vnmi_vmcb() is not None

    def get_nmi_mask(self) -> bool:
        """svm_get_nmi_mask(): V_NMI_BLOCKING with vNMI, else KVM's own nmi_masked."""
        vmcb = self._vnmi_vmcb()
        if vmcb is not None:
            return bool(vmcb.int_ctl & V_NMI_BLOCKING)
        return self.nmi_masked

    def set_nmi_mask(self, masked: bool) -> None:
        """svm_set_nmi_mask(): with vNMI the hardware bit; else nmi_masked and the IRET intercept."""
        vmcb = self._vnmi_vmcb()
        if vmcb is not None:
            vmcb.int_ctl = vmcb.int_ctl | V_NMI_BLOCKING if masked else vmcb.int_ctl & ~V_NMI_BLOCKING
            return
        self.nmi_masked = masked
        self._set_iret_intercept(masked)

    def _set_iret_intercept(self, on: bool) -> None:
        """svm_set/clr_iret_intercept(): never for SEV-ES, whose IRET KVM cannot see."""
        if not self.sev_es:
            self._set_intercept(Intercept.IRET, on)

    def _set_intercept(self, intercept: Intercept, on: bool) -> None:
        """svm_set/clr_intercept(): KVM's intercepts live in vmcb01; in L2, vmcb02 is
        recalculated from it (recalc_intercepts())."""
        vmcb01 = self.nested.vmcb01 if self.guest_mode else self.vmcb
        if on:
            vmcb01.intercepts.add(intercept)
        else:
            vmcb01.intercepts.discard(intercept)
        if self.guest_mode:
            self.nested.recalc_intercepts()
        self.guest.intercepts_changed()

    def is_vnmi_pending(self) -> bool:
        """svm_is_vnmi_pending()."""
        vmcb = self._vnmi_vmcb()
        return vmcb is not None and bool(vmcb.int_ctl & V_NMI_PENDING)

    def set_vnmi_pending(self) -> bool:
        """svm_set_vnmi_pending(): hand one NMI to the hardware if its latch is free."""
        vmcb = self._vnmi_vmcb()
        if vmcb is None or vmcb.int_ctl & V_NMI_PENDING:
            return False
        vmcb.int_ctl |= V_NMI_PENDING
        self.vcpu.stats.nmi_injections += 1
        self.vcpu.trace_injection("vnmi", Vec.NMI)
        return True

    def nmi_blocked(self) -> bool:
        """svm_nmi_blocked(): an NMI L1 intercepts is never blocked by L2's state."""
        if not self.gif_set():
            return True
        if self._l1_intercepts(Intercept.NMI):
            return False
        return self.get_nmi_mask() or bool(self.vmcb.int_state & INTERRUPT_SHADOW)

    def nmi_allowed(self, for_injection: bool) -> int:
        """svm_nmi_allowed(): -EBUSY while vmcb12's injection is pending or L1 wants an exit."""
        if self.nested is not None and self.nested.run_pending:
            return EBUSY
        if self.nmi_blocked():
            return 0
        return EBUSY if for_injection and self._l1_intercepts(Intercept.NMI) else 1

    def _l1_intercepts(self, intercept: Intercept) -> bool:
        """nested_exit_on_nmi() / nested_exit_on_intr()."""
        return self.guest_mode and intercept in self.nested.ctl.intercepts

    def interrupt_blocked(self) -> bool:
        """svm_interrupt_blocked(); SEV-ES's IF is int_state's copy (svm_get_if_flag()).

        In L2 with V_INTR_MASKING, L1's IF (saved in vmcb01) decides."""
        if not self.gif_set():
            return True
        if self.guest_mode and self.nested.ctl.int_ctl & V_INTR_MASKING:
            if_flag = self.nested.vmcb01.rflags & IF
        elif self.sev_es:
            if_flag = self.vmcb.int_state & GUEST_INTERRUPT_MASK
        else:
            if_flag = self.get_rflags() & IF
        if not if_flag:
            return True
        if self._l1_intercepts(Intercept.INTR):
            return False
        return bool(self.vmcb.int_state & INTERRUPT_SHADOW)

    def interrupt_allowed(self, for_injection: bool) -> int:
        """svm_interrupt_allowed(): the same shape as svm_nmi_allowed()."""
        if self.nested is not None and self.nested.run_pending:
            return EBUSY
        if self.interrupt_blocked():
            return 0
        return EBUSY if for_injection and self._l1_intercepts(Intercept.INTR) else 1

    # -- GIF (APM 15.17) -----------------------------------------------------------

    def gif_set(self) -> bool:
        """gif_set(): with vGIF, V_GIF of get_vgif_vmcb(); otherwise KVM's own guest_gif."""
        return bool(self._vgif_vmcb().int_ctl & V_GIF) if self.vgif else self.guest_gif

    def _vgif_vmcb(self):
        """get_vgif_vmcb(): L1's GIF is vmcb02's V_GIF while L2 runs, unless L1 uses nested
        vGIF: then vmcb02's V_GIF is L2's and L1's stays in vmcb01."""
        if self.guest_mode and self.nested.vgif_enabled():
            return self.nested.vmcb01
        return self.vmcb

    def set_gif(self, value: bool) -> None:
        """svm_set_gif() (STGI, CLGI, VMRUN, #VMEXIT)."""
        vmcb = self.vmcb
        if value:
            if self.vgif:
                self._set_intercept(Intercept.STGI, False)
            if Intercept.VINTR in vmcb.intercepts:
                self.clear_vintr()
            self._write_gif(True)
            vcpu = self.vcpu
            if vcpu.nmi_pending or vcpu.has_injectable_intr():  # svm_has_pending_gif_event()
                vcpu.requests |= Request.EVENT
        else:
            self._write_gif(False)
            if not self.vgif:
                self.clear_vintr()

    def _write_gif(self, value: bool) -> None:
        if self.vgif:
            vmcb = self._vgif_vmcb()
            vmcb.int_ctl = vmcb.int_ctl | V_GIF if value else vmcb.int_ctl & ~V_GIF
        else:
            self.guest_gif = value

    # -- injection ---------------------------------------------------------------

    def inject_nmi(self) -> str:
        """svm_inject_nmi(): without vNMI, KVM masks NMIs and intercepts IRET; with vNMI the
        CPU sets V_NMI_BLOCKING itself when it injects (APM 15.21.10). The NMI L1 injected into L2,
        re-injected, is not KVM's: no masking, no count ("l1-nmi" in the trace)."""
        self.vmcb.event_inj = EVTINJ_VALID | (EventInjType.NMI << 8)
        if self.nmi_l1_to_l2 and not _faults.on("nested_svm_nmi_l1_to_l2_untracked"):
            return "l1-nmi"
        if not self.is_vnmi_enabled():
            self.nmi_masked = True
            self._set_iret_intercept(True)
        self.vcpu.stats.nmi_injections += 1
        return "nmi"

    def inject_irq(self, reinjected: bool) -> None:
        """svm_inject_irq(): INTn goes through EVENTINJ with next_rip as its return address.

        Whatever GIF is: userspace can queue an interrupt while the guest's GIF is clear
        (KVM_INTERRUPT with a userspace irqchip, KVM_SET_VCPU_EVENTS), so it is not KVM's
        bug to WARN on ("KVM: SVM: Don't BUG if userspace injects an interrupt with GIF=0",
        f17c31c48e5c, dropped the BUG_ON 219b65dcf6c0 had added)."""
        if _faults.on("svm_bug_on_irq_with_gif_clear"):
            self.vcpu.bug_on(not self.gif_set(), "svm_inject_irq: BUG_ON(!gif_set(svm))")
        irq = self.vcpu.interrupt
        if irq.soft and not self._update_soft_interrupt_rip(irq.nr):
            return
        self.vcpu.stats.irq_injections += 1
        kind = EventInjType.SOFT if irq.soft else EventInjType.INTR
        self.vmcb.event_inj = encode(irq.nr, kind, None)

    def inject_exception(self) -> None:
        """svm_inject_exception()."""
        vcpu = self.vcpu
        exc = vcpu.exception
        vcpu.deliver_exception_payload()
        if exception_is_soft(exc.vector) and not self._update_soft_interrupt_rip(exc.vector):
            return
        self.vmcb.event_inj = encode(exc.vector, EventInjType.EXEPT,
                                     exc.error_code if exc.has_error_code else None)
        self.vmcb.event_inj_err = exc.error_code

    def _update_soft_interrupt_rip(self, vector: int) -> bool:
        """svm_update_soft_interrupt_rip(): find the next RIP and remember both ends. False:
        the instruction at RIP is no longer the one that raised `vector` (another vCPU wrote
        over it); the event is dropped and the guest runs what is there now, as if the write
        had come first (4da3768e1820)."""
        old_rip = self.vmcb.rip
        if not self._skip(commit=not self.nrips, soft_int=vector):
            return False
        next_rip = self.vmcb.rip
        self.soft_int_injected = True
        self.soft_int_csbase = self.vmcb.cs_base
        self.soft_int_old_rip = old_rip
        self.soft_int_next_rip = next_rip
        if self.nrips:
            self.vmcb.rip = old_rip  # hardware pushes next_rip; RIP stays on the instruction
        self.vmcb.next_rip = next_rip  # the CPU has NRIPS
        return True

    def cancel_injection(self) -> None:
        """svm_cancel_injection()."""
        vmcb = self.vmcb
        vmcb.exit_int_info, vmcb.exit_int_info_err = vmcb.event_inj, vmcb.event_inj_err
        vmcb.event_inj = 0
        self.complete_interrupts()

    # -- windows -------------------------------------------------------------------

    def enable_nmi_window(self) -> None:
        """svm_enable_nmi_window(): wait for the IRET intercept, else single-step."""
        if _faults.on("vnmi_warn_outside_masked"):
            self.vcpu.warn_on(self.is_vnmi_enabled(), "svm_enable_nmi_window: vNMI and an NMI window")
        if self.get_nmi_mask():
            # With vNMI a second NMI waits in V_NMI_PENDING: no window is ever needed (2024 fix).
            self.vcpu.warn_on(self.is_vnmi_enabled(), "svm_enable_nmi_window: vNMI and NMIs masked")
            if not self.awaiting_iret_completion:
                return  # the IRET intercept will exit
        if self.sev_es and not _faults.on("sev_es_nmi_singlestep"):
            return  # no single-step: the guest signals NMI_COMPLETE (seed 001)
        if not self.gif_set():
            if self.vgif:
                self._set_intercept(Intercept.STGI, True)  # without vGIF, STGI always exits
            return
        self.vcpu.warn_on(self.sev_es, "model check, not a KVM WARN: KVM single-steps an SEV-ES "
                          "guest for an NMI window; TF/RF in the VMCB save area have no effect")
        self.nmi_singlestep_guest_rflags = self.get_rflags()
        self.nmi_singlestep = True
        self.vmcb.rflags |= TF | RF

    def disable_nmi_singlestep(self) -> None:
        """disable_nmi_singlestep(): give back the guest's own TF and RF."""
        self.nmi_singlestep = False
        self.vmcb.rflags &= ~((TF | RF) & ~self.nmi_singlestep_guest_rflags)

    def enable_irq_window(self) -> None:
        """svm_enable_irq_window() / svm_set_vintr(): a dummy V_IRQ that exits with VINTR.

        With vGIF the CPU holds V_IRQ until V_GIF is set, so GIF=0 needs no STGI exit."""
        if not (self.vgif or self.gif_set()):
            return
        if self.guest_mode and self.nested.ctl.int_ctl & V_INTR_MASKING and not (
                self.nested.vmcb01.rflags & IF):
            return  # the intercept merge drops VINTR: L1's window cannot open while L2 runs
        vmcb = self.vmcb
        vmcb.int_vector = 0
        vmcb.int_ctl = (vmcb.int_ctl & ~V_IRQ_INJECTION_BITS) | V_IRQ | (0xF << V_INTR_PRIO_SHIFT)
        self._set_intercept(Intercept.VINTR, True)

    def clear_vintr(self) -> None:
        """svm_clear_vintr(): drop KVM's dummy V_IRQ; in L2, vmcb02 gets L1's own V_IRQ back."""
        self._set_intercept(Intercept.VINTR, False)
        self.vmcb.int_ctl &= ~V_IRQ_INJECTION_BITS
        if self.guest_mode:
            self.nested.vmcb01.int_ctl &= ~V_IRQ_INJECTION_BITS
            self.nested.restore_l1_v_irq()

    def kick(self) -> None:
        self.guest.kick()

    def has_nested_events(self) -> bool:
        return False  # svm_nested_ops has no has_events

    def apic_init_signal_blocked(self) -> bool:
        """svm_apic_init_signal_blocked(): GIF=0 holds INIT (APM 15.17.1)."""
        return not self.gif_set()

    def check_nested_events(self) -> int:
        return self.nested.check_nested_events() if self.nested is not None else 0

    def is_exception_vmexit(self, vector: int, error_code: int | None) -> bool:
        return self.nested is not None and self.nested.is_exception_vmexit(vector)

    def nested_triple_fault(self) -> None:
        if self.nested is not None:
            self.nested.triple_fault()

    # -- the run and what follows each exit ----------------------------------------

    def run(self, max_steps: int, immediate_exit: bool) -> UserspaceExit | None:
        """svm_vcpu_run(): never push KVM's TF into a frame; complete interrupts after the exit."""
        if (self.nmi_singlestep and self.vmcb.event_inj & EVTINJ_VALID
                and not _faults.on("nmi_window_race")):  # the 2011 code had no such guard
            self.disable_nmi_singlestep()
            immediate_exit = True
        if immediate_exit:
            self.guest.kick()  # smp_send_reschedule() to itself: exits right after entry
        # The guest's DR6 is vcpu->arch.dr6 (the core's dr6 here); the VMCB gets a clean one.
        self.vmcb.dr6 = DR6_ACTIVE_LOW
        try:
            stop = self.guest.run(max_steps)
        except EntryFailed as failed:
            return UserspaceExit(KvmExit.FAIL_ENTRY, failed.check)
        self.vmcb.cr2 = self.guest.cpu.cr2  # vcpu->arch.cr2 <-> save.cr2 around the run
        if self.guest_mode:
            self.nested.run_pending = False  # the VMRUN's injection went in
        if stop is not None:
            self.sync_guest_state_to_core()
            return BUDGET
        self.late_completion = self.guest_mode and _faults.on("nested_svm_exitintinfo_from_vmcb02")
        if not self.late_completion:
            # Before the nested exit decision ("KVM: nSVM: synthesize correct EXITINTINFO on
            # vmexit" moved it there): what was being vectored is requeued first, and a VM
            # exit to L1 reports it from the queues.
            self.complete_interrupts()
        return None

    def complete_interrupts(self) -> None:
        """svm_complete_interrupts(): IRET completion, then requeue from EXITINTINFO."""
        vcpu, vmcb = self.vcpu, self.vmcb
        soft_int_injected, self.soft_int_injected = self.soft_int_injected, False
        nmi_l1_to_l2, self.nmi_l1_to_l2 = self.nmi_l1_to_l2, False
        # The 2020 SEV-ES code unmasked at any exit here, RIP being unreadable (seed 001).
        late_sev_es_unmask = self.sev_es and _faults.on("sev_es_nmi_unmask_late")
        if self.awaiting_iret_completion and (vmcb.rip != self.nmi_iret_rip or late_sev_es_unmask):
            self.awaiting_iret_completion = False
            self.nmi_masked = False
            vcpu.requests |= Request.EVENT
        vcpu.clear_event_queues()
        info = vmcb.exit_int_info
        if not info & EVTINJ_VALID or _faults.on("no_reinjection"):
            return
        vcpu.requests |= Request.EVENT
        vector, kind = info & 0xFF, EventInjType((info >> 8) & 7)
        if soft_int_injected:
            self._complete_soft_interrupt(vector, kind)
        if kind is EventInjType.NMI:
            vcpu.nmi_injected = True
            self.nmi_l1_to_l2 = nmi_l1_to_l2
        elif kind is EventInjType.SOFT and _faults.on("svm_retry_soft_interrupt"):
            return  # before 7e5b5ef8dca3: INT n was dropped and the instruction retried
        elif kind is EventInjType.EXEPT:
            if exception_is_soft(vector) and _faults.on("svm_retry_soft_exception"):
                return  # the pre-2022 "re-execute the instruction instead"
            code = vmcb.exit_int_info_err if info & EVTINJ_VALID_ERR else None
            vcpu.requeue_exception(vector, code)
        else:
            vcpu.queue_interrupt(vector, soft=kind is EventInjType.SOFT)

    def _complete_soft_interrupt(self, vector: int, kind: EventInjType) -> None:
        """svm_complete_soft_interrupt(): next_rip is lost on the exit; put it back or unwind RIP.

        The guest is still at the injection if its linear RIP is unchanged (kvm_is_linear_rip()).
        """
        is_soft = kind is EventInjType.SOFT
        is_exception = kind is EventInjType.EXEPT
        vmcb = self.vmcb
        base = 0 if _faults.on("svm_soft_int_rip_without_csbase") else self.soft_int_csbase
        linear_rip = self._linear_rip()
        if self.nrips and (is_soft or (is_exception and exception_is_soft(vector))) and (
                linear_rip == self.soft_int_old_rip + base):
            vmcb.next_rip = self.soft_int_next_rip
        elif (not self.nrips and (is_soft or is_exception)
                and linear_rip == self.soft_int_next_rip + base
                and not _faults.on("svm_no_rip_unwind")):
            vmcb.rip = self.soft_int_old_rip

    def _linear_rip(self) -> int:
        """kvm_get_linear_rip(): outside 64-bit mode, CS.base + EIP, truncated to 32 bits;
        0 when the guest state is protected (SEV-ES: KVM cannot read RIP)."""
        if self.guest_state_protected:
            return 0
        if self.guest.cpu.mode is Mode.LONG64:
            return self.vmcb.rip
        return (self.vmcb.cs_base + self.vmcb.rip) & 0xFFFFFFFF

    def handle_exit(self) -> UserspaceExit | None:
        """svm_handle_exit() and the interception handlers modelled."""
        vcpu, vmcb = self.vcpu, self.vmcb
        code = vmcb.exit_code
        if self.guest_mode and self.nested.reflect():
            return None  # L1 handles it
        if self.late_completion:  # the bug's order: completion only for exits L0 keeps
            self.late_completion = False
            self.complete_interrupts()
        if code == ExitCode.EXCP_BASE + Vec.DB:
            self._db_interception()
        elif code == ExitCode.EXCP_BASE + Vec.GP:
            self._gp_interception()
        elif code == ExitCode.EXCP_BASE + Vec.UD:
            emulate.handle_ud(vcpu, Exiting.VMCALL)  # ud_interception()
        elif code == ExitCode.EXCP_BASE + Vec.PF:
            # pf_interception(): kvm_handle_page_fault() with EXITINFO1 the error code and
            # EXITINFO2 the address; an event being delivered was re-queued by
            # svm_complete_interrupts() and is re-injected after
            mmu.handle_page_fault(vcpu, vmcb.exit_info_2, vmcb.exit_info_1)
        elif code == ExitCode.INVLPG:
            # invlpg_interception() with decode assists: kvm_mmu_invlpg(EXITINFO1), then skip
            vcpu.stats.invlpg += 1
            vcpu.emulate_and_skip()  # first: its fetch must not meet the page zapped below
            mmu.invlpg(vcpu, vmcb.exit_info_1)
        elif code == ExitCode.VMMCALL:
            self._vmmcall_interception()
        elif code == ExitCode.INTR:
            vcpu.stats.irq_exits += 1
        elif code == ExitCode.NMI:
            pass  # nmi_interception(): the host takes its NMI at STGI (IDT; not modelled)
        elif code == ExitCode.VINTR:
            if not _faults.on("no_req_event_on_window"):
                vcpu.requests |= Request.EVENT
            self.clear_vintr()
            vcpu.stats.irq_window_exits += 1
        elif code == ExitCode.IRET:
            self.vcpu.warn_on(self.sev_es, "iret_interception: SEV-ES")
            self.iret_interception()
        elif code == ExitCode.VMGEXIT:
            return sev.handle_vmgexit(self)
        elif code == ExitCode.HLT:
            vcpu.emulate_halt()
        elif code in _INSTRUCTION_EXITS:
            vcpu.emulate_and_skip()
            if code == ExitCode.MSR:
                self._recalc_instruction_intercepts()  # svm_set_efer(): EFER.SVME may have changed
        elif code == ExitCode.VMRUN:
            self._vmrun_interception()
        elif code in (ExitCode.STGI, ExitCode.CLGI):
            self._gif_interception(code == ExitCode.STGI)
        elif code in (ExitCode.VMLOAD, ExitCode.VMSAVE):
            self._vmload_vmsave_interception()
        elif code == ExitCode.NPF:
            cpu = self.guest.cpu
            cpu.set_host_unmapped(cpu.host_unmapped - {vmcb.exit_info_2 >> 12})
        elif code == ExitCode.SHUTDOWN:
            return UserspaceExit(KvmExit.SHUTDOWN, "shutdown intercept")
        else:
            return UserspaceExit(KvmExit.INTERNAL_ERROR, f"exit {code:#x} not modelled")
        return None

    # -- the SVM instructions, for an L1 hypervisor (nested.py) -------------------------

    def _svm_permitted(self) -> bool:
        """nested_svm_check_permissions(): #UD unless EFER.SVME (the model runs at CPL 0)."""
        if self.nested is not None and self.guest.cpu.efer & EFER_SVME:
            return True
        self.vcpu.queue_exception(Vec.UD)
        return False

    def skip_svm_instruction(self, single_step: bool = True) -> None:
        cpu = self.guest.cpu
        rip = self.vmcb.rip
        self.vcpu.skip_emulated_instruction(cpu.icache.get(rip) or decode(cpu, rip), single_step)

    def _vmrun_interception(self) -> None:
        """vmrun_interception() -> nested_svm_vmrun()."""
        if not self._svm_permitted():
            return
        cpu = self.guest.cpu
        if self.get_nmi_mask():
            raise ModelLimit("VMRUN with NMIs blocked (in an NMI handler) is not modelled", self.vmcb.rip)
        self.nested.vmrun(cpu, cpu.regs[RAX] & cpu.addr_mask)

    def _gif_interception(self, value: bool) -> None:
        """stgi_interception() / clgi_interception()."""
        if self._svm_permitted():
            self.skip_svm_instruction()
            self.set_gif(value)

    def _vmload_vmsave_interception(self) -> None:
        """vmload_interception() / vmsave_interception(): the state they move is not modelled."""
        if not self._svm_permitted():
            return
        cpu = self.guest.cpu
        address = cpu.regs[RAX]
        if address & 0xFFF or address + VMCB_SIZE > cpu.mem_size:
            self.vcpu.queue_exception(Vec.GP, 0)
            return
        self.skip_svm_instruction()

    def _recalc_instruction_intercepts(self) -> None:
        """svm_recalc_instruction_intercepts(): with EFER.SVME and vGIF, STGI/CLGI run in the guest.

        Until EFER.SVME is set they stay intercepted, so that KVM gives the #UD the hardware,
        which sees SVME set, would not (Kevin Cheng's 2026 fix; before it, init_vmcb()
        dropped them whenever vGIF was on)."""
        svme = bool(self.guest.cpu.efer & EFER_SVME) or _faults.on("svm_gif_instructions_without_svme")
        for intercept in _SVM_INSTRUCTION_INTERCEPTS:  # VMLOAD/VMSAVE stay (no virtual VMLOAD)
            keep = not svme or intercept in (Intercept.VMLOAD, Intercept.VMSAVE) or not self.vgif
            self._set_intercept(intercept, keep)
        vcpu = self.vcpu
        if svme and self.vgif and (vcpu.nmi_pending or vcpu.has_injectable_intr()):
            vcpu.requests |= Request.EVENT  # an event GIF holds may need its window again

    def _vmmcall_interception(self) -> None:
        """vmmcall_interception(): L2's VMMCALL that L1 does not intercept is #UD, as the APM has
        it for an unintercepted VMMCALL ("KVM: SVM: Raise #UD if VMMCALL instruction is not
        intercepted", Kevin Cheng, 2026, with Sean Christopherson's change that keeps vmcb02's
        intercept); L1's own is a hypercall to KVM (kvm_emulate_hypercall()), KVM's paravirtual
        interface, which no bare-metal CPU has."""
        if self.guest_mode:
            self.vcpu.queue_exception(Vec.UD)
            return
        raise ModelLimit("a hypercall to KVM (VMMCALL, kvm_emulate_hypercall()) is not modelled",
                         self.vmcb.rip)

    def _db_interception(self) -> None:
        """db_interception(): the guest's own #DB goes back to it, KVM's single-step ends."""
        if not self.nmi_singlestep:
            self.vcpu.queue_exception(Vec.DB, payload=self.vmcb.dr6 ^ DR6_ACTIVE_LOW)
            return
        vcpu = self.vcpu
        self.disable_nmi_singlestep()
        vcpu.requests |= Request.EVENT

    def _gp_interception(self) -> None:
        """gp_interception() (#GP intercepted for the VMware backdoor): a non-zero error code
        goes back at once; with 0, KVM decodes the instruction, and for anything but the SVM
        instructions and (outside L2) the backdoor's IN/OUT/RDPMC, which never #GP at CPL 0,
        the model's only CPL, queues #GP(0) again. In L2 the queueing may make it L1's exit."""
        self.vcpu.queue_exception(Vec.GP, self.vmcb.exit_info_1)

    def iret_interception(self) -> None:
        """iret_interception(): NMIs stay masked until RIP has moved past this IRET."""
        vcpu = self.vcpu
        vcpu.stats.nmi_window_exits += 1
        self.awaiting_iret_completion = True
        self._set_iret_intercept(False)
        self.nmi_iret_rip = self.vmcb.rip
        if not _faults.on("no_req_event_on_window"):
            vcpu.requests |= Request.EVENT
