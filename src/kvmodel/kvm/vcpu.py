"""KVM_CREATE_VCPU: a guest core under one vendor's hardware model and KVM's vendor code."""

from __future__ import annotations

from enum import Enum

from kvmodel.arch.cpu import Cpu
from kvmodel.hw.svm.cpu import SvmGuest
from kvmodel.hw.vmx.cpu import VmxGuest
from kvmodel.kvm.svm.svm import Svm, SvmParams
from kvmodel.kvm.vm import Vm
from kvmodel.kvm.vmx.vmx import Vmx, VmxParams
from kvmodel.kvm.x86 import Vcpu


class Vendor(Enum):
    BARE = "bare"
    SVM = "svm"
    VMX = "vmx"


DEFAULT_SVM = SvmParams()
DEFAULT_VMX = VmxParams()


def create_vm(vendor: Vendor) -> Vm:
    """KVM_CREATE_VM on a host of this vendor."""
    return Vm(has_notify_vmexit=vendor is Vendor.VMX)


def create_vcpu(cpu: Cpu, vendor: Vendor, *, svm: SvmParams = DEFAULT_SVM,
                vmx: VmxParams = DEFAULT_VMX, vm: Vm | None = None) -> Vcpu:
    """Put `cpu` in guest mode under KVM; its memory, registers and APIC become the guest's."""
    vm = vm or create_vm(vendor)
    vm.created_vcpus += 1
    vcpu = Vcpu(cpu, kvm=vm)
    if vendor is Vendor.SVM:
        Svm(vcpu, SvmGuest(cpu), svm)
    elif vendor is Vendor.VMX:
        Vmx(vcpu, VmxGuest(cpu), vmx)
    else:
        raise ValueError(f"no hypervisor for vendor {vendor.value!r}")
    return vcpu
