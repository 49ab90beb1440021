"""SVM host mode on the hardware model and under KVM: the SVM instructions' checks, the VMCB
in memory, GIF (APM 15.4, 15.5, 15.17; Appendix B)."""

import pytest

from kvmodel.arch.events import Vec
from kvmodel.errors import ScenarioError
from kvmodel.hw.svm.vmcb import (
    Intercept,
    Offset,
    Vmcb,
    io_intercepted,
    msr_intercepted,
    read_vmcb,
    write_exit,
    write_field,
)
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import run

L1 = '''
title = "t"

[cpu]
svm = {svm}

[guest]
code = """
    .include "svm.s"
start:
    {body}
    hlt
ud_handler:
    mov $6, %r10
    hlt
gp_handler:
    mov $13, %r10
    hlt
nmi_handler:
    inc %r9
    iretq
l2_start:
    hlt
    .balign 4096
    .skip 4096
l2_stack:
vmcb:
    .skip 4096
"""

[idt]
"#UD" = "ud_handler"
"#GP" = "gp_handler"
NMI = "nmi_handler"
{extra}
'''


def l1(body: str, vendor: Vendor = Vendor.BARE, svm: bool = True, extra: str = ""):
    text = L1.replace("{body}", body).replace("{svm}", str(svm).lower()).replace("{extra}", extra)
    return run(parse(text, "l1.toml"), vendor=vendor)


BOTH = pytest.mark.parametrize("vendor", [Vendor.BARE, Vendor.SVM], ids=lambda v: v.value)


@BOTH
def test_svm_instructions_are_ud_until_efer_svme(vendor):
    for insn in ("stgi", "clgi", "vmrun", "lea vmcb(%rip), %rax\n    vmload"):
        assert l1(insn, vendor).final.value("r10") == Vec.UD, insn


def test_efer_svme_is_gp_on_a_cpu_without_svm():
    assert l1("SVM_START", svm=False).final.value("r10") == Vec.GP


@BOTH
def test_vmrun_and_vmload_need_a_page_aligned_vmcb(vendor):
    for insn in ("vmrun", "vmload", "vmsave"):
        result = l1(f"SVM_START\n    lea vmcb+8(%rip), %rax\n    {insn}", vendor)
        assert result.final.value("r10") == Vec.GP, insn


@BOTH
def test_clgi_holds_an_nmi_until_stgi(vendor):
    extra = '[[happen]]\nevent = "nmi"\nat = "held"'
    result = l1("SVM_START\n    clgi\nheld:\n    nop\n    mov %r9, %r11\n    stgi\n    nop", vendor,
                extra=extra)
    assert result.final.value("r11") == 0  # still held after the CLGI
    assert result.final.value("r9") == 1 and [d.vector for d in result.deliveries] == [Vec.NMI]


@BOTH
def test_vmrun_without_the_vmrun_intercept_is_vmexit_invalid(vendor):
    body = ("SVM_START\n    VMCB_SETUP vmcb, l2_start, l2_stack\n"
            "    movl $0, vmcb+VMCB_INTERCEPT_WORD4(%rip)\n"
            "    RUN_L2 vmcb\n    mov vmcb+VMCB_EXIT_CODE(%rip), %rbx")
    result = l1(body, vendor)
    assert result.final.value("rbx") == (1 << 64) - 1
    assert result.final.value("rip") != 0 and result.limit is None


@BOTH
def test_exit_leaves_l2_state_and_rax_in_the_vmcb_and_l1_rax_restored(vendor):
    body = ("SVM_START\n    VMCB_SETUP vmcb, l2_start, l2_stack\n    movq $0x5a5a, vmcb+VMCB_RAX(%rip)\n"
            "    RUN_L2 vmcb\n    mov vmcb+VMCB_RIP(%rip), %rbx\n    mov vmcb+VMCB_RAX(%rip), %rcx\n"
            "    mov vmcb+VMCB_EXIT_CODE(%rip), %rdx")
    result = l1(body, vendor)
    final = result.final
    assert final.value("rdx") == 0x78  # HLT
    assert final.value("rcx") == 0x5A5A  # L2's RAX, from VMRUN's load to the exit's save
    assert final.value("rbx") == result.program.symbol("l2_start")  # RIP on the HLT
    assert final.value("rax") == result.program.symbol("vmcb")  # L1's RAX after #VMEXIT


def test_vmcb_layout_round_trips_and_intercepts_are_bits_of_their_words():
    mem = bytearray(0x2000)
    write_field(mem, 0x1000, Offset.INTERCEPT_WORD3, (1 << 24) | 1)  # HLT, INTR
    write_field(mem, 0x1000, Offset.INTERCEPT_WORD4, 1 << 4)  # STGI
    write_field(mem, 0x1000, Offset.RIP, 0x1234)
    vmcb = read_vmcb(mem, 0x1000)
    assert vmcb.intercepts == {Intercept.HLT, Intercept.INTR, Intercept.STGI} and vmcb.rip == 0x1234
    out = Vmcb(exit_code=-1, exit_int_info=0x80000302, rsp=0x9000)
    write_exit(mem, 0x1000, out)
    assert mem[0x1070:0x1078] == b"\xff" * 8  # VMEXIT_INVALID is -1 in a 64-bit field
    assert read_vmcb(mem, 0x1000).rsp == 0x9000
    assert int.from_bytes(mem[0x1088:0x108C], "little") == 0x80000302


def test_vmx_and_svm_together_is_refused():
    text = L1.replace("{body}", "nop").replace("{svm}", "true\nvmx = true").replace("{extra}", "")
    with pytest.raises(ScenarioError, match="vmx and svm"):
        parse(text, "l1.toml")


@BOTH
def test_vmmcall_outside_a_guest_and_vmcall_on_an_amd_cpu_are_ud(vendor):
    """APM 15.18: an unintercepted VMMCALL raises #UD; VMCALL is no AMD instruction. Under KVM the
    first is L1's hypercall (a model limit) and the second an emulated one: both stop."""
    for insn in ("vmmcall", "vmcall"):
        result = l1("SVM_START\n    " + insn, vendor=vendor)
        if vendor is Vendor.BARE:
            assert result.final.value("r10") == Vec.UD
        else:
            assert result.limit is not None and "not modelled" in result.limit


@BOTH
def test_vm_hsave_pa_is_gp_on_a_cpu_without_svm(vendor):
    result = l1("mov $0xc0010117, %ecx\n    rdmsr", vendor=vendor, svm=False)
    assert result.final.value("r10") == Vec.GP


def test_permission_maps_select_the_intercepts():
    """APM 15.10.1: one IOPM bit per port, every byte checked; 15.11: two MSRPM bits per MSR in
    three ranges, read then write; an MSR outside them and a VMCB without a map always intercept."""
    mem = bytearray(0x6000)
    mem[0x1000 + 0x81 // 8] |= 1 << (0x81 % 8)
    mem[0x4000 + 0x1000 + (2 * 0x117 + 1) // 8] |= 1 << ((2 * 0x117 + 1) % 8)  # write C0010117
    assert not io_intercepted(mem, 0x1000, 0x80, 1) and io_intercepted(mem, 0x1000, 0x80, 2)
    assert io_intercepted(mem, None, 0xE9, 1)
    assert msr_intercepted(mem, 0x4000, 0xC0010117, write=True)
    assert not msr_intercepted(mem, 0x4000, 0xC0010117, write=False)
    assert msr_intercepted(mem, 0x4000, 0x2000, write=False) and msr_intercepted(mem, None, 0x10, write=False)
