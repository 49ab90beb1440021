"""KVM's #UD handler rewrites the other vendor's hypercall (emulator_fix_hypercall(),
KVM_X86_QUIRK_FIX_HYPERCALL_INSN), except for L2's VMMCALL on VMX, whose emulation the
intercept check refuses (vmx_check_intercept(): X86EMUL_UNHANDLEABLE, #UD for L2)."""

from pathlib import Path

from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load, parse
from kvmodel.scenario.runner import run

NESTED = Path(__file__).parents[3] / "scenarios" / "nested"


def _reg(result, name):
    return dict(result.final.registers)[name]


def test_l2_vmcall_on_svm_becomes_l1s_vmmcall_exit():
    """svm_vmcall_test.c: SVM_EXIT_VMMCALL at L2's VMCALL, now VMMCALL in guest memory."""
    result = run(load(NESTED / "selftest_svm_vmcall.toml"), vendor=Vendor.SVM)
    assert result.limit is None
    assert _reg(result, "rbx") == 0x81
    assert _reg(result, "rdi") == result.program.symbol("l2_start")
    at = result.program.symbol("l2_start")
    assert bytes(result.memory[at:at + 3]) == b"\x0f\x01\xd9"


VMX_L2_VMMCALL = '''
title = "L2's VMMCALL on VMX, #UD not intercepted by L1"
cite = "test"

[cpu]
vmx = true

[guest]
code = """
    .include "vmx.s"
start:
    VMX_START vmxon_region, vmcs_region, vmx_scratch
    L2_SETUP l2_start, l2_stack, l1_exit
    vmlaunch
    hlt
l1_exit:
    VMREAD_ VMCS_EXIT_REASON, %rbx
    hlt
l2_start:
    vmmcall
    hlt
ud_handler:
    mov $6, %rsi
    hlt
    .balign 16
vmx_scratch:
    .skip 16
    .skip 256
l2_stack:
    .balign 4096
vmxon_region:
    .skip 4096
vmcs_region:
    .skip 4096
"""

[idt]
"#UD" = "ud_handler"
'''


def test_l2_vmmcall_on_vmx_is_ud_for_l2_unpatched(tmp_path):
    scenario = parse(VMX_L2_VMMCALL, tmp_path / "s.toml")
    result = run(scenario, vendor=Vendor.VMX)
    assert result.limit is None
    assert _reg(result, "rsi") == 6  # L2's own #UD handler ran
    assert _reg(result, "rbx") == 12  # then its HLT: EXIT_REASON_HLT
    at = result.program.symbol("l2_start")
    assert bytes(result.memory[at:at + 3]) == b"\x0f\x01\xd9"  # not rewritten
