"""A vCPU of the KVM model with nested VMX on and in L2, vmcs12 current: where the unit tests
start that craft nested states no scenario reaches."""

from kvmodel.hw.vmx.vmcs import Vmcs
from kvmodel.kvm.vcpu import Vendor, create_vcpu
from kvmodel.kvm.vmx.vmx import VmxParams
from kvmodel.kvm.x86 import Vcpu
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import prepare

GUEST = '''
[guest]
code = """
start:
    hlt
"""
'''
VMXON_REGION, VMCS12 = 0x5000, 0x6000


def vcpu_in_l2(vmcs12: Vmcs) -> Vcpu:
    """In guest mode with `vmcs12` current, no request raised."""
    cpu, _ = prepare(parse(GUEST, "unit.toml"))
    vcpu = create_vcpu(cpu, Vendor.VMX, vmx=VmxParams(nested=True))
    nested = vcpu.ops.nested
    nested.vmxon_region, nested.current = VMXON_REGION, VMCS12
    nested.vmcss[VMCS12] = vmcs12
    nested.guest_mode = True
    vcpu.requests = 0
    return vcpu
