"""VMX root operation on the hardware model: the VMX instructions' results and failures (SDM 30)."""

from pathlib import Path

import pytest

from kvmodel.arch.events import Vec
from kvmodel.hw.vmx.cpu import io_exits, msr_exits
from kvmodel.hw.vmx.vmcs import Proc, Vmcs
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import run

L1 = '''
title = "t"

[cpu]
vmx = {vmx}

[guest]
code = """
    .include "vmx.s"
start:
    {body}
    pushfq
    pop %rbx                     # the status flags the last VMX instruction left
    hlt
ud_handler:
    hlt
    .balign 16
vmx_scratch:
    .skip 16
    .balign 4096
vmxon_region:
    .skip 4096
vmcs_region:
    .skip 4096
"""

[idt]
"#UD" = "ud_handler"
'''
START = "VMX_START vmxon_region, vmcs_region, vmx_scratch\n    "


def l1(body: str, vmx: bool = True):
    return run(parse(L1.replace("{body}", body).replace("{vmx}", str(vmx).lower()), "l1.toml"),
               vendor=Vendor.BARE)


def flags(result) -> int:
    return result.final.value("rbx") & 0x41  # CF | ZF


def test_vmx_instructions_are_ud_without_vmx_and_before_vmxon():
    assert [d.vector for d in l1("vmlaunch", vmx=False).deliveries] == [Vec.UD]
    assert [d.vector for d in l1("vmlaunch").deliveries] == [Vec.UD]  # VMX on, but no VMXON


def test_vmwrite_then_vmread_round_trips_and_succeeds():
    result = l1(START + "VMWRITE_ VMCS_GUEST_RIP, $0x1234\n    VMREAD_ VMCS_GUEST_RIP, %rcx")
    assert result.final.value("rcx") == 0x1234 and flags(result) == 0


@pytest.mark.parametrize("body,error", [
    ("VMWRITE_ VMCS_EXIT_REASON, $1", 13),  # a read-only field
    ("VMWRITE_ 0x7777, $1", 12),  # an unsupported field
    ("vmresume", 5),  # never launched
])
def test_vmfail_valid_sets_zf_and_the_error_number(body, error):
    result = l1(START + body + "\n    pushfq\n    pop %rsi\n    VMREAD_ VMCS_INSTRUCTION_ERROR, %rcx")
    assert result.final.value("rsi") & 0x41 == 0x40 and result.final.value("rcx") == error


def test_vmfail_invalid_without_a_current_vmcs_sets_cf():
    body = ("lea vmxon_region(%rip), %rax\n    mov %rax, vmx_scratch(%rip)\n    vmxon vmx_scratch(%rip)\n"
            "    VMWRITE_ VMCS_GUEST_RIP, $1")
    assert flags(l1(body)) == 0x1


def test_vmlaunch_with_a_bad_injection_fails_valid_and_stays_in_l1():
    body = (START + "L2_SETUP start, 0x30000, start\n    VMWRITE_ VMCS_ENTRY_INTR_INFO, $0x80000102\n"
            "    vmlaunch")  # type 1 is reserved (SDM 26.2.1.3)
    result = l1(body)
    assert flags(result) == 0x40
    assert any(getattr(o, "reason", "") == "VM_ENTRY_FAILED" for o in result.trace)


def test_interrupt_pending_at_vmlaunch_exits_an_l2_entered_in_hlt():
    """An interrupt pending for L1 (IF=0) when VMLAUNCH enters L2 in the HLT activity state,
    with external-interrupt exiting, exits at once (SDM 25.2, 26.6.2): L2 does not stay halted,
    and the exit saves activity state HLT and L2's RIP (SDM 27.3.4). Under KVM, L0 halts the
    vCPU instead of entering L2 in HLT (nested_vmx_run()); the shipped scenario is compared."""
    path = Path(__file__).parents[3] / "scenarios/nested/vmx_interrupt_pending_at_vmlaunch_hlt_state.toml"
    scenario = parse(path.read_text(), str(path))
    result = run(scenario, vendor=Vendor.BARE)
    assert result.passed, [m.message for m in result.mismatches]
    final = result.final
    assert (final.value("rbx"), final.value("rdi"), final.value("rsi")) == (1, 1, 0)


def test_entry_into_the_hlt_activity_state_records_no_hlt():
    """VMLAUNCH with activity state HLT (SDM 26.6.2) halts L2, but no HLT instruction ran:
    the run ends on the halted L2 (nothing wakes it) with no HLT in the trace."""
    body = (START + "L2_SETUP l2, 0x30000, start\n    VMWRITE_ VMCS_GUEST_ACTIVITY_STATE, $1\n"
            "    vmlaunch\n    hlt\nl2:\n    nop")
    result = l1(body)
    assert result.final.halted
    assert [o for o in result.trace if o.kind == "halt"] == []


def test_vmcall_in_vmx_root_fails_valid_with_error_1_and_is_ud_outside_vmx_operation():
    """SDM Vol.2 VMCALL: #UD outside VMX operation; in VMX root operation without the dual-monitor
    treatment, VMfail "VMCALL executed in VMX root operation" (error 1, SDM 30.4)."""
    assert [d.vector for d in l1("vmcall", vmx=False).deliveries] == [Vec.UD]
    assert [d.vector for d in l1("vmcall").deliveries] == [Vec.UD]  # VMX on, but no VMXON
    result = l1(START + "vmcall\n    pushfq\n    pop %rsi\n    VMREAD_ VMCS_INSTRUCTION_ERROR, %rcx")
    assert result.final.value("rsi") & 0x41 == 0x40 and result.final.value("rcx") == 1


def test_vmmcall_is_ud_on_an_intel_cpu():
    assert [d.vector for d in l1("vmmcall").deliveries] == [Vec.UD]


def test_l1s_own_vmcall_under_kvm_is_a_hypercall_the_model_stops_at():
    """handle_vmcall(): L1's VMCALL is a hypercall to KVM, not the VMfail the hardware gives."""
    text = L1.replace("{body}", START + "vmcall").replace("{vmx}", "true")
    result = run(parse(text, "l1.toml"), vendor=Vendor.VMX)
    assert result.limit is not None and "kvm_emulate_hypercall" in result.limit


def test_io_and_msr_bitmaps_select_the_exits():
    """SDM 25.1.3: bitmap A/B by port, every byte of a wide access, wrap-around always exits;
    MSRs outside the two ranges always exit; the write bitmaps sit 2048 bytes on."""
    mem = bytearray(0x4000)
    vmcs = Vmcs(proc_based=Proc.USE_IO_BITMAPS | Proc.USE_MSR_BITMAPS,
                io_bitmap_a=0x1000, io_bitmap_b=0x2000, msr_bitmap=0x3000)
    mem[0x1000 + 0x81 // 8] |= 1 << (0x81 % 8)  # port 0x81
    mem[0x2000 + 0x7FFF // 8] |= 0x80  # port 0xFFFF
    mem[0x3000 + 2048 + 1024 + 0x80 // 8] |= 1  # write of 0xC0000080
    assert not io_exits(mem, vmcs, 0x80, 1) and io_exits(mem, vmcs, 0x80, 2)
    assert io_exits(mem, vmcs, 0xFFFF, 1) and io_exits(mem, vmcs, 0xFFFE, 4)
    assert io_exits(mem, Vmcs(proc_based=Proc.UNCOND_IO_EXITING), 0xE9, 1)
    assert not io_exits(mem, Vmcs(), 0xE9, 1)
    assert msr_exits(mem, vmcs, 0xC0000080, write=True) and not msr_exits(mem, vmcs, 0xC0000080, write=False)
    assert msr_exits(mem, vmcs, 0x2000, write=False) and msr_exits(mem, Vmcs(), 0x10, write=False)
