"""FRED: the scenario table, ERETS's checks, and the host's dispatch of its own NMIs and IRQs."""

import pytest

from kvmodel import _faults
from kvmodel.arch.events import EventType, Vec
from kvmodel.errors import ScenarioError
from kvmodel.kvm.vcpu import Vendor
from kvmodel.kvm.vmx.host_events import HostCpu
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import run

GUEST = '''
title = "t"

[guest]
code = """
    .include "fred.s"
start:
    {body}
    hlt
    .balign 4096
fred_entry:
    .skip 256
kernel_entry:
    hlt
"""

[fred]
entry = "fred_entry"
'''


def final(body: str, vendor: Vendor = Vendor.BARE):
    return run(parse(GUEST.replace("{body}", body), "f.toml"), vendor=vendor)


@pytest.mark.parametrize("text,why", [
    (GUEST.replace("[guest]", "[guest]\nmode = \"protected32\""), "needs long64"),
    (GUEST.replace('entry = "fred_entry"', "redzone = 1"), "needs entry"),
    (GUEST + 'stack_levels = { 0x40 = 1 }\n', "IA32_FRED_STKLVLS covers 0-31"),
])
def test_bad_fred_tables(text, why):
    with pytest.raises(ScenarioError, match=why):
        parse(text.replace("{body}", "nop"), "f.toml")


def test_entry_must_be_page_aligned():
    text = GUEST.replace("{body}", "nop").replace('entry = "fred_entry"', 'entry = "kernel_entry"')
    with pytest.raises(ScenarioError, match="not 4 KiB aligned"):
        run(parse(text, "f.toml"))


def test_erets_rejects_a_frame_with_another_cs():
    # a hand-made frame whose CS word is 0x28: ERETS raises #GP(0), delivered through FRED
    body = ("sub $48, %rsp\n    movq $0x28, 16(%rsp)\n    movq $0x2, 24(%rsp)\n"
            "    movq $0x10, 40(%rsp)\n    ERETS")
    result = final(body)
    assert [(d.vector, d.error_code) for d in result.deliveries] == [(Vec.GP, 0)]


def test_erets_and_eretu_without_fred_are_ud_and_eretu_is_a_limit():
    text = GUEST.replace("{body}", "ERETS").split("[fred]")[0] + '\n[idt]\n"#UD" = "kernel_entry"\n'
    assert [d.vector for d in run(parse(text, "f.toml")).deliveries] == [Vec.UD]
    assert "ERETU" in final("ERETU").limit


def test_host_fred_nmi_ends_nmi_blocking_and_an_irq_leaves_it_alone():
    host = HostCpu(fred=True)
    host.nmi_exit()
    host.irq_exit(0xEC)
    assert not host.nmi_blocked and host.problems == [] and (host.nmis, host.irqs) == (1, 1)


@pytest.mark.parametrize("bug,expect", [
    ("fred_nmi_bit_in_cs", ["host NMIs are still blocked"]),
    ("fred_nmi_return_without_erets", ["host NMIs are still blocked"]),
    ("fred_event_type_zero", ["saw event type EXT_INT vector 2 for a host NMI",
                              "host NMIs are still blocked"]),
])
def test_host_fred_bugs_leave_nmis_blocked(bug, expect):
    host = HostCpu(fred=True)
    with _faults.switched_on(frozenset({bug})):
        host.nmi_exit()
    assert host.nmi_blocked and len(host.problems) == len(expect)
    assert all(e in p for e, p in zip(expect, host.problems, strict=True))


def test_host_idt_path_needs_no_frame_bits():
    host = HostCpu(fred=False)
    with _faults.switched_on(frozenset({"fred_nmi_bit_in_cs"})):
        host.nmi_exit()
    assert not host.nmi_blocked and host.problems == []


def test_vmx_injects_the_payload_as_event_data():
    # KVM intercepts #DB on VMX and re-injects it; the FRED frame must still carry B0
    body = ("lea data(%rip), %rax\n    mov %rax, %dr0\n    mov $0x000d0002, %eax\n"
            "    mov %rax, %dr7\n    movl $1, data(%rip)\n    jmp over\ndata: .quad 0\nover:")
    for vendor in (Vendor.BARE, Vendor.VMX):
        (delivery,) = final(body, vendor).deliveries
        assert delivery.vector == Vec.DB and delivery.type is EventType.HW_EXCEPTION
        assert delivery.frame[6] == 1, vendor
