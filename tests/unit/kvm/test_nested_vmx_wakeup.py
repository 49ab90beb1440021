"""An L2 that L0 halted (its HLT emulated) wakes for the events L1 exits on, whatever L2's
own blocking: vmx_nmi_blocked() and vmx_interrupt_blocked() in guest mode."""

import pytest

from kvmodel.hw.vmx.vmcs import Interruptibility, Pin, Vmcs
from kvmodel.kvm.vcpu import Vendor, create_vcpu
from kvmodel.kvm.vmx.vmx import VmxParams
from kvmodel.kvm.x86 import MpState
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import prepare

GUEST = '''
[guest]
code = """
start:
    hlt
"""
'''
VMCS12 = 0x6000


def halted_l2(pin_based: int):
    """A vCPU halted by L0 in L2, which runs with IF=0, in an STI shadow and NMIs blocked."""
    cpu, _ = prepare(parse(GUEST, "unit.toml"))
    vcpu = create_vcpu(cpu, Vendor.VMX, vmx=VmxParams(nested=True))
    nested = vcpu.ops.nested
    nested.vmxon_region, nested.current = 0x5000, VMCS12
    nested.vmcss[VMCS12] = Vmcs(pin_based=pin_based)
    nested.guest_mode = True
    vmcs02 = vcpu.ops.vmcs
    vmcs02.guest_rflags = 0x2
    vmcs02.guest_interruptibility = Interruptibility.STI | Interruptibility.NMI
    vcpu.requests = 0
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
