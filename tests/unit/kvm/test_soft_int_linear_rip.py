"""svm_complete_soft_interrupt(): is the guest still at the soft event KVM injected?

The match is by linear RIP, CS.base included (kvm_is_linear_rip()); with a based
code segment, leaving the base out never matches (bug svm_soft_int_rip_without_csbase).
"""

import pytest

from kvmodel import _faults
from kvmodel.hw.svm.vmcb import EventInjType
from kvmodel.kvm.svm.svm import SvmParams
from kvmodel.kvm.vcpu import Vendor, create_vcpu
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import prepare

GUEST = """
[cpu]
cs_base = 0x8000

[guest]
mode = "protected32"
code = '''
start:
    int3
after:
    hlt
'''
"""
OLD_RIP, NEXT_RIP = 0x8000, 0x8001  # offsets of start and after (linked at 0x10000 - 0x8000)


def injected_int3(nrips: bool):
    """An SVM vCPU whose INT3 KVM injected, and whose delivery exited before it completed."""
    cpu, program = prepare(parse(GUEST, "unit.toml"))
    assert (program.symbol("start"), program.symbol("after")) == (OLD_RIP, NEXT_RIP)
    svm = create_vcpu(cpu, Vendor.SVM, svm=SvmParams(nrips=nrips)).ops
    assert svm.vmcb.cs_base == 0x8000
    svm.vcpu.queue_exception(3)
    svm.inject_exception()
    svm.vmcb.next_rip = 0  # the CPU clears it on an exit during the delivery
    return svm


@pytest.mark.parametrize(("bug", "restored"), [(False, NEXT_RIP), (True, 0)])
def test_with_nrips_next_rip_is_restored_by_the_linear_match(bug, restored):
    svm = injected_int3(nrips=True)
    assert svm.vmcb.rip == OLD_RIP
    with _faults.switched_on(frozenset({"svm_soft_int_rip_without_csbase"} if bug else ())):
        svm._complete_soft_interrupt(3, EventInjType.EXEPT)
    assert svm.vmcb.next_rip == restored


@pytest.mark.parametrize(("bug", "rip"), [(False, OLD_RIP), (True, NEXT_RIP)])
def test_without_nrips_rip_is_unwound_by_the_linear_match(bug, rip):
    svm = injected_int3(nrips=False)
    assert svm.vmcb.rip == NEXT_RIP  # KVM advanced it to inject
    with _faults.switched_on(frozenset({"svm_soft_int_rip_without_csbase"} if bug else ())):
        svm._complete_soft_interrupt(3, EventInjType.EXEPT)
    assert svm.vmcb.rip == rip
