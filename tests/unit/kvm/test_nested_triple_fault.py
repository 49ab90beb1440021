"""KVM_REQ_TRIPLE_FAULT while L2 runs: nested_ops->triple_fault() makes it L1's VM exit
(nested_svm_triple_fault(): SVM_EXIT_SHUTDOWN if vmcb12 intercepts SHUTDOWN;
nested_vmx_triple_fault(): always EXIT_REASON_TRIPLE_FAULT), else KVM_EXIT_SHUTDOWN."""


from kvmodel.kvm.uapi import KvmVcpuEvents, VcpuEventsFlag
from kvmodel.kvm.vcpu import Vendor
from kvmodel.kvm.x86 import Vcpu
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import run

SVM_L1 = '''
title = "t"
[cpu]
svm = true
[guest]
code = """
    .include "svm.s"
start:
    SVM_START
    VMCB_SETUP vmcb, l2_start, l2_stack
    {setup}
    RUN_L2 vmcb
    mov vmcb+VMCB_EXIT_CODE(%rip), %rbx
    hlt
l2_start:
    nop
    hlt
    .balign 4096
    .skip 4096
l2_stack:
vmcb:
    .skip 4096
"""
'''

VMX_L1 = '''
title = "t"
[cpu]
vmx = true
[guest]
code = """
    .include "vmx.s"
start:
    VMX_START vmxon_region, vmcs_region, vmx_scratch
    L2_SETUP l2_start, l2_stack, l1_after
    vmlaunch
l1_after:
    VMREAD_ VMCS_EXIT_REASON, %rbx
    hlt
l2_start:
    nop
    hlt
    .balign 16
vmx_scratch:
    .skip 16
    .balign 4096
    .skip 4096
l2_stack:
vmxon_region:
    .skip 4096
vmcs_region:
    .skip 4096
"""
'''


def run_with_triple_fault_in_l2(monkeypatch, text: str, vendor: Vendor):
    """The VMM sets a pending triple fault (KVM_SET_VCPU_EVENTS) once L2 is running."""
    enter = Vcpu.enter_guest
    done = [False]

    def set_triple_fault_then_enter(self, max_steps):
        if not done[0] and self.ops.nested.guest_mode:
            done[0] = True
            events = self.get_vcpu_events()
            events.triple_fault_pending = 1
            events.flags |= VcpuEventsFlag.VALID_TRIPLE_FAULT
            self.set_vcpu_events(KvmVcpuEvents.unpack(events.pack()))
        return enter(self, max_steps)

    monkeypatch.setattr(Vcpu, "enter_guest", set_triple_fault_then_enter)
    result = run(parse(text, "l1.toml"), vendor=vendor)
    assert done[0]
    return result


def test_svm_triple_fault_in_l2_is_l1s_shutdown_exit(monkeypatch):
    result = run_with_triple_fault_in_l2(monkeypatch, SVM_L1.replace("{setup}", ""), Vendor.SVM)
    assert result.final.stop == "halted"
    assert result.final.value("rbx") == 0x7F  # SVM_EXIT_SHUTDOWN


def test_svm_triple_fault_in_l2_shuts_down_without_the_intercept(monkeypatch):
    setup = "andl $~INTERCEPT_SHUTDOWN, vmcb+VMCB_INTERCEPT_WORD3(%rip)"
    result = run_with_triple_fault_in_l2(monkeypatch, SVM_L1.replace("{setup}", setup), Vendor.SVM)
    assert result.final.stop == "shutdown"


def test_vmx_triple_fault_in_l2_is_l1s_exit(monkeypatch):
    result = run_with_triple_fault_in_l2(monkeypatch, VMX_L1, Vendor.VMX)
    assert result.final.stop == "halted"
    assert result.final.value("rbx") == 2  # EXIT_REASON_TRIPLE_FAULT


