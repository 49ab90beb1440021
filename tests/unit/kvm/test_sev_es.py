"""SEV-ES: what KVM can and cannot see, the GHCB NMI_COMPLETE request, #VC, DebugSwap."""

from pathlib import Path

import pytest

from kvmodel.arch.events import Vec
from kvmodel.errors import ScenarioError
from kvmodel.hw.svm.vmcb import GUEST_INTERRUPT_MASK, SEV_FEATURE_DEBUG_SWAP, Intercept
from kvmodel.kvm.svm.svm import SvmParams
from kvmodel.kvm.vcpu import Vendor, create_vcpu
from kvmodel.scenario.load import load, parse
from kvmodel.scenario.runner import prepare, run

SEV_ES = Path(__file__).parents[3] / "scenarios" / "sev_es"

GUEST = '''
title = "t"

[kvm]
sev_es = true

[guest]
code = """
    .include "sev_es.s"
start:
    GHCB_SETUP ghcb
    sti
    {body}
    hlt
vc_handler:
    hlt
    .balign 4096
ghcb:
    .skip 4096
"""

[idt]
29 = "vc_handler"
'''


def scenario(body: str = "nop"):
    return parse(GUEST.replace("{body}", body), "sev.toml")


@pytest.mark.parametrize("debug_swap", [False, True])
def test_init_vmcb(debug_swap):
    cpu, _ = prepare(scenario())
    vcpu = create_vcpu(cpu, Vendor.SVM, svm=SvmParams(sev_es=True, debug_swap=debug_swap))
    vmcb = vcpu.ops.vmcb
    assert vmcb.sev_es and vcpu.ops.guest_state_protected
    assert not vmcb.exception_intercepts & ((1 << Vec.UD) | (1 << Vec.GP))
    assert bool(vmcb.exception_intercepts & (1 << Vec.DB)) is not debug_swap
    assert bool(vmcb.sev_features & SEV_FEATURE_DEBUG_SWAP) is debug_swap
    assert (Intercept.DR7_WRITE in vmcb.intercepts) is not debug_swap


@pytest.mark.parametrize("kvm,why", [
    ("sev_es = true\nnrips = false", "need NRIPS"),
    ("debug_swap = true", "add sev_es = true"),
    ("sev_es = true\nvnmi = true", "vNMI with SEV-ES is not modelled"),
])
def test_bad_combinations_are_refused_with_the_line(kvm, why):
    with pytest.raises(ScenarioError, match=why):
        parse(f'title = "t"\n[kvm]\n{kvm}\n[guest]\ncode = "hlt"\n', "s.toml")


def test_kvm_sees_only_if_and_the_guest_keeps_its_registers():
    result = run(scenario(), vendor=Vendor.SVM)
    assert result.passed and result.final.stop == "halted"
    assert result.final.rip == result.program.symbol("vc_handler")  # past the HLT, in the core
    cpu, _ = prepare(scenario())
    vcpu = create_vcpu(cpu, Vendor.SVM, svm=SvmParams(sev_es=True))
    stale = vcpu.ops.vmcb.rip
    vcpu.run(1000)
    assert vcpu.ops.vmcb.rip == stale  # the VMSA is encrypted: the VMCB save area is not updated
    assert vcpu.ops.vmcb.int_state & GUEST_INTERRUPT_MASK  # IF=1 after the STI


def test_a_non_automatic_exit_is_vc_with_the_exit_code():
    result = run(scenario("at_cpuid: cpuid"), vendor=Vendor.SVM)
    vc = [d for d in result.deliveries if d.vector == Vec.VC]
    assert len(vc) == 1 and vc[0].error_code == 0x72  # SVM_EXIT_CPUID
    assert vc[0].return_rip == result.program.symbol("at_cpuid")  # a fault: the CPUID itself


def test_vmgexit_outside_sev_es_is_not_modelled_and_without_ghcb_is_ud():
    text = GUEST.replace("{body}", "nop").replace("sev_es = true", "nrips = true")
    assert run(parse(text, "s.toml"), vendor=Vendor.SVM).limit is None
    with_vmgexit = text.replace("    sti\n", "    sti\n    .byte 0xf3, 0x0f, 0x01, 0xd9\n")
    assert "VMMCALL outside an SEV-ES guest" in run(parse(with_vmgexit, "s.toml"),
                                                     vendor=Vendor.SVM).limit
    bare = with_vmgexit.replace("    GHCB_SETUP ghcb\n", "").replace('29 = "vc_handler"',
                                                                      '"#UD" = "vc_handler"')
    result = run(parse(bare, "s.toml"), vendor=Vendor.BARE)
    assert [d.vector for d in result.deliveries] == [Vec.UD]


def test_an_unknown_ghcb_request_is_a_limit_on_bare_metal_and_an_error_under_kvm():
    body = "movl $0x72, ghcb+0x390(%rip)\n    .byte 0xf3, 0x0f, 0x01, 0xd9"
    assert "GHCB request 0x72" in run(scenario(body), vendor=Vendor.BARE).limit
    assert "GHCB request 0x72" in run(scenario(body), vendor=Vendor.SVM).hypervisor_error


def test_nmi_complete_is_kvms_nmi_window_and_iret_is_never_intercepted():
    scenario_ = load(SEV_ES / "nmi_complete_unmasks_at_once.toml")
    result = run(scenario_, vendor=Vendor.SVM)
    reasons = [o.reason for o in result.trace if o.kind == "vmexit"]
    assert reasons.count("VMGEXIT") == 2 and "IRET" not in reasons
    assert result.stats[0].nmi_window_exits == 2 and result.passed
