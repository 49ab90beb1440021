"""The VMM actor's calls: what each returns, and that a rejected call changes nothing
(kvm_vcpu_ioctl_x86_set_vcpu_events() returns -EINVAL before touching the vCPU)."""

import copy

import pytest

from kvmodel import _faults
from kvmodel.check.explore import Bounds, choices_for, with_vmm_calls
from kvmodel.errors import ModelLimit, ScenarioError
from kvmodel.kvm.uapi import EINTR, EINVAL, VcpuEventsFlag
from kvmodel.kvm.x86 import Request
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import Resolver, prepare
from kvmodel.scenario.vmm import CHOICE_NAMES, ImmediateExit, KvmNmi, SetVcpuEvents

GUEST = '''
[guest]
code = """
start:
    nop
    hlt
"""
'''  # the same guest as the `vcpu` fixture's (tests/unit/conftest.py)


def _state(vcpu):
    """What KVM_SET_VCPU_EVENTS could change."""
    return (copy.copy(vcpu.exception), copy.copy(vcpu.exception_vmexit), copy.copy(vcpu.interrupt),
            vcpu.nmi_queued, vcpu.nmi_pending, vcpu.nmi_injected, vcpu.ops.get_nmi_mask(),
            vcpu.ops.get_interrupt_shadow(), vcpu.requests, vcpu.exception_from_userspace)


REJECTED = [
    ((("flags", 0x80),), "unknown kvm_vcpu_events flags"),
    ((("exception_injected", 1), ("exception_nr", 2)), "exception vector 2"),
    ((("exception_injected", 1), ("exception_nr", 32)), "exception vector 32"),
    ((("exception_pending", 1), ("exception_nr", 255)), "exception vector 255"),
]


@pytest.mark.parametrize("changes,why", REJECTED, ids=[w for _, w in REJECTED])
def test_rejected_set_vcpu_events_is_einval_and_changes_nothing(vcpu, changes, why):
    vcpu.inject_nmi()
    vcpu.queue_interrupt(0x41, soft=False)
    vcpu.get_vcpu_events()  # process_nmi(), which the call's own GET repeats
    before = _state(vcpu)
    done = SetVcpuEvents(changes).perform(vcpu)
    assert done.result == EINVAL and why in done.detail and done.nmis == 0
    assert _state(vcpu) == before


def test_payload_flag_without_the_capability_is_einval(vcpu):
    vcpu.exception_payload_enabled = False
    before = _state(vcpu)
    done = SetVcpuEvents((("flags", int(VcpuEventsFlag.VALID_PAYLOAD)),)).perform(vcpu)
    assert done.result == EINVAL and "KVM_CAP_EXCEPTION_PAYLOAD" in done.detail
    assert _state(vcpu) == before


def test_kvm_nmi_queues_and_requests(vcpu):
    done = KvmNmi().perform(vcpu)
    assert (done.result, done.nmis) == (0, 1)
    assert vcpu.nmi_queued == 1 and vcpu.requests & Request.NMI


def test_same_vcpu_round_trip_keeps_two_pending_nmis(vcpu):
    vcpu.inject_nmi()
    vcpu.inject_nmi()
    assert SetVcpuEvents().perform(vcpu).result == 0
    assert vcpu.get_vcpu_events().nmi_pending == 2


def test_before_ab2ee212a57b_get_reported_one_nmi(vcpu):
    vcpu.inject_nmi()
    vcpu.inject_nmi()
    with _faults.switched_on(frozenset({"get_vcpu_events_nmi_pending_bool"})):
        assert vcpu.get_vcpu_events().nmi_pending == 1


def test_crafted_nmi_pending_goes_through_process_nmi(vcpu):
    done = SetVcpuEvents((("nmi_pending", 3),)).perform(vcpu)
    assert (done.result, done.nmis) == (0, 3)  # bare metal gets three, and drops one
    assert vcpu.nmi_queued == 3 and vcpu.requests & Request.NMI
    assert vcpu.get_vcpu_events().nmi_pending == 2  # process_nmi(): one to inject, one held


def test_crafted_nmi_pending_unclamped_before_the_fix(vcpu):
    with _faults.switched_on(frozenset({"set_vcpu_events_nmi_unclamped"})):
        SetVcpuEvents((("nmi_pending", 3),)).perform(vcpu)
    assert vcpu.nmi_pending == 3 and not vcpu.requests & Request.NMI


def test_crafted_state_without_counterpart_is_a_model_limit(vcpu):
    with pytest.raises(ModelLimit, match="nmi_masked"):
        SetVcpuEvents((("nmi_masked", 1),)).perform(vcpu)


def test_immediate_exit_is_eintr_and_runs_nothing(vcpu):
    retired, exits = vcpu.cpu.retired, vcpu.stats.exits
    assert ImmediateExit().perform(vcpu).result == EINTR
    assert (vcpu.cpu.retired, vcpu.stats.exits) == (retired, exits)


# -- the scenario syntax and the explorer's choice points -----------------------------------

def test_vmm_script_is_parsed():
    s = parse(GUEST + '[[vmm]]\ncall = "KVM_SET_VCPU_EVENTS"\nexit = 2\nnmi_pending = 3\n'
              '[[vmm]]\ncall = "KVM_NMI"\nat = "start"\n', "unit.toml")
    assert [(v.call, v.exit, v.at, v.args) for v in s.vmm] == [
        ("KVM_SET_VCPU_EVENTS", 2, None, (("nmi_pending", 3),)), ("KVM_NMI", None, "start", ())]


@pytest.mark.parametrize("text,message", [
    ('call = "KVM_NMIX"\nexit = 1', "is not one of"),
    ('call = "KVM_NMI"', "exactly one of exit"),
    ('call = "KVM_NMI"\nexit = 1\nnmi_pending = 1', 'unknown key "nmi_pending"'),
    ('call = "KVM_NMI"\nexit = 0', "exit must be an integer"),
])
def test_bad_vmm_steps_are_scenario_errors(text, message):
    with pytest.raises(ScenarioError, match=message):
        parse(GUEST + "[[vmm]]\n" + text + "\n", "unit.toml")


def test_explore_vmm_names_are_checked():
    with pytest.raises(ScenarioError, match="vmm = "):
        parse(GUEST + '[explore]\nvmm = ["nmi", "teleport"]\n', "unit.toml")


def _choices(text: str, bounds: Bounds):
    s = parse(GUEST + text, "unit.toml")
    _, program = prepare(s)
    return choices_for(s, Resolver(s, program), bounds, 2)


def test_vmm_choice_points_are_opt_in():
    assert list(with_vmm_calls(_choices("", Bounds()), (), 3)) == []
    offered = _choices('[explore]\nvmm = ["nmi", "events_same_vcpu"]\n', Bounds())
    assert len(list(with_vmm_calls(offered, (), 3))) == 6 + 21  # one or two of 3 exits x 2 calls
    asked = _choices("", Bounds(max_vmm=1))
    assert len(list(with_vmm_calls(asked, (), 1))) == len(CHOICE_NAMES)  # every call, once
