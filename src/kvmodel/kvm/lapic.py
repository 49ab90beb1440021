"""INIT and SIPI for a vCPU with the in-kernel local APIC (arch/x86/kvm/lapic.c).

__apic_accept_irq() records INIT or a SIPI (and its vector) in the target's
pending events, with KVM_REQ_EVENT and a kick; kvm_apic_accept_events(),
before the next entry or while the vCPU blocks, acts on them: INIT resets the
vCPU (kvm_vcpu_reset(vcpu, true)) into KVM_MP_STATE_INIT_RECEIVED (the BSP
into RUNNABLE), and a SIPI starts a vCPU in INIT_RECEIVED at the vector's page;
in any other state it is dropped. An AP vCPU starts UNINITIALIZED (as QEMU
creates it): a SIPI before any INIT is dropped too. In VMX root operation (L1
after VMXON) INIT stays latched and a SIPI is dropped; in L2 they are nested
events (vmx_check_nested_events(): INIT is L1's INIT_SIGNAL VM exit, a SIPI
outside wait-for-SIPI is dropped; wait-for-SIPI in L2, and INIT or SIPI in L2
on SVM, are model limits).

DEVIATION (as on bare metal, arch/machine.py): the SIPI starts the vCPU at
RIP = vector << 12 in the scenario's mode, not in real mode at CS = vector << 8
(kvm_x86_ops.vcpu_deliver_sipi_vector()).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmodel.arch.observe import ArrivalFate
from kvmodel.arch.regs import DR6_RESET, DR7_RESET, RFLAGS_FIXED
from kvmodel.errors import ModelLimit

if TYPE_CHECKING:
    from kvmodel.kvm.x86 import Vcpu


def accept_init(vcpu: Vcpu) -> ArrivalFate:
    """__apic_accept_irq(), APIC_DM_INIT: pending, KVM_REQ_EVENT, kvm_vcpu_kick()."""
    from kvmodel.kvm.x86 import Request

    vcpu.apic_pending_init = True
    vcpu.requests |= Request.EVENT
    vcpu.kick()
    return ArrivalFate.TO_HOST


def accept_sipi(vcpu: Vcpu, vector: int) -> ArrivalFate:
    """__apic_accept_irq(), APIC_DM_STARTUP: the vector, then the pending bit."""
    from kvmodel.kvm.x86 import Request

    vcpu.sipi_vector = vector
    vcpu.apic_pending_sipi = True
    vcpu.requests |= Request.EVENT
    vcpu.kick()
    return ArrivalFate.TO_HOST


def has_pending_init_or_sipi(vcpu: Vcpu) -> bool:
    """kvm_apic_has_pending_init_or_sipi()."""
    return vcpu.apic_pending_init or vcpu.apic_pending_sipi


def init_sipi_allowed(vcpu: Vcpu) -> bool:
    """kvm_apic_init_sipi_allowed(): not in VMX root operation (vmx_apic_init_signal_blocked())
    nor, on SVM, with GIF=0. A vCPU whose INIT stays latched is not woken by it."""
    return not vcpu.ops.apic_init_signal_blocked()


def accept_events(vcpu: Vcpu) -> None:
    """kvm_apic_accept_events(): INIT first, then a SIPI if the vCPU now waits for one."""
    from kvmodel.kvm.x86 import MpState

    if not has_pending_init_or_sipi(vcpu):
        return
    if not init_sipi_allowed(vcpu):
        # INIT stays latched, a SIPI is dropped
        vcpu.apic_pending_sipi = False
        return
    if vcpu.ops.guest_mode:
        # kvm_check_nested_events(): INIT and SIPI are VMX's nested events (a SIPI for L2
        # outside wait-for-SIPI is dropped there)
        if vcpu.ops.check_nested_events() < 0:
            return
        if vcpu.ops.guest_mode and has_pending_init_or_sipi(vcpu):
            raise ModelLimit("INIT or SIPI for a vCPU in L2 on SVM is not modelled",
                             vcpu.cpu.rip)
    init, sipi = vcpu.apic_pending_init, vcpu.apic_pending_sipi
    vcpu.apic_pending_init = vcpu.apic_pending_sipi = False
    if init:
        reset_for_init(vcpu)
        vcpu.mp_state = MpState.RUNNABLE if vcpu.bsp else MpState.INIT_RECEIVED
    if sipi and vcpu.mp_state is MpState.INIT_RECEIVED:
        cpu = vcpu.cpu
        vcpu.ops.rip_write(((vcpu.sipi_vector << 12) - cpu.cs_base) & cpu.addr_mask)
        vcpu.mp_state = MpState.RUNNABLE


def reset_for_init(vcpu: Vcpu) -> None:
    """kvm_vcpu_reset(vcpu, init_event=true), the parts the model holds: the event queues,
    the general registers, RFLAGS, RIP, the debug registers, NMI masking and the shadow,
    and the local APIC's IRR/ISR/TPR (kvm_lapic_reset(); its ID stays)."""
    from kvmodel.kvm.x86 import QueuedException, QueuedInterrupt, Request

    vcpu.nmi_queued = vcpu.nmi_pending = 0
    vcpu.nmi_injected = False
    vcpu.exception = QueuedException()
    vcpu.exception_vmexit = QueuedException()
    vcpu.interrupt = QueuedInterrupt()
    vcpu.requests &= ~(Request.NMI | Request.TRIPLE_FAULT)
    cpu, ops = vcpu.cpu, vcpu.ops
    cpu.regs[:] = [0] * len(cpu.regs)
    ops.rsp_write(0)
    ops.rip_write(0)
    ops.set_rflags(RFLAGS_FIXED)
    ops.set_nmi_mask(False)
    ops.set_interrupt_shadow(0)
    cpu.cr2 = 0
    cpu.dr[:] = [0, 0, 0, 0]
    cpu.dr6, cpu.dr7 = DR6_RESET, DR7_RESET
    cpu.update_breakpoints()
    cpu.apic.irr = cpu.apic.isr = cpu.apic.tpr = 0
