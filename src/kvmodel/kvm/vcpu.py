"""KVM_CREATE_VCPU: a guest core under one vendor's hardware model and KVM's vendor code."""

from __future__ import annotations

from enum import Enum

from kvmodel.arch.cpu import Cpu
from kvmodel.hw.svm.cpu import SvmGuest
from kvmodel.hw.vmx.cpu import VmxGuest
from kvmodel.kvm.svm.svm import Svm, SvmParams
from kvmodel.kvm.vmx.vmx import Vmx, VmxParams
from kvmodel.kvm.x86 import Vcpu


class Vendor(Enum):
    BARE = "bare"
    SVM = "svm"
    VMX = "vmx"


DEFAULT_SVM = SvmParams()
DEFAULT_VMX = VmxParams()


def create_vcpu(cpu: Cpu, vendor: Vendor, *, svm: SvmParams = DEFAULT_SVM,
                vmx: VmxParams = DEFAULT_VMX) -> Vcpu:
    """Put `cpu` in guest mode under KVM; its memory, registers and APIC become the guest's."""
    vcpu = Vcpu(cpu)
    if vendor is Vendor.SVM:
        Svm(vcpu, SvmGuest(cpu), svm)
    elif vendor is Vendor.VMX:
        Vmx(vcpu, VmxGuest(cpu), vmx)
    else:
        raise ValueError(f"no hypervisor for vendor {vendor.value!r}")
    return vcpu
