"""An L2 that L0 halted (its HLT emulated) wakes for the events L1 exits on, whatever L2's
own blocking: vmx_nmi_blocked() and vmx_interrupt_blocked() in guest mode."""

import pytest
from nested_vmx_vcpu import vcpu_in_l2

from kvmodel.hw.vmx.vmcs import Interruptibility, Pin, Vmcs
from kvmodel.kvm.x86 import MpState


def halted_l2(pin_based: int):
    """A vCPU halted by L0 in L2, which runs with IF=0, in an STI shadow and NMIs blocked."""
    vcpu = vcpu_in_l2(Vmcs(pin_based=pin_based))
    vmcs02 = vcpu.ops.vmcs
    vmcs02.guest_rflags = 0x2
    vmcs02.guest_interruptibility = Interruptibility.STI | Interruptibility.NMI
    vcpu.mp_state = MpState.HALTED
    return vcpu


@pytest.mark.parametrize("l1_exits", [True, False], ids=["l1-exits-on-nmi", "l1-does-not"])
def test_pending_nmi_wakes_l2_when_l1_exits_on_it(l1_exits):
    vcpu = halted_l2(Pin.NMI_EXITING | Pin.VIRTUAL_NMIS if l1_exits else 0)
    vcpu.nmi_pending = 1
    assert vcpu.ops.nmi_blocked() is not l1_exits
    assert vcpu.has_events() is l1_exits


@pytest.mark.parametrize("l1_exits", [True, False], ids=["l1-exits-on-intr", "l1-does-not"])
def test_pending_interrupt_wakes_l2_when_l1_exits_on_it(l1_exits):
    vcpu = halted_l2(Pin.EXT_INTR_EXITING if l1_exits else 0)
    vcpu.lapic.request(0x30)
    assert vcpu.ops.interrupt_blocked() is not l1_exits
    assert vcpu.has_events() is l1_exits
