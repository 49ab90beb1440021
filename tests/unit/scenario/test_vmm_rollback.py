"""The VMM's vcpu_snapshot and vcpu_rollback (scenario/vmm.py VcpuSnapshotTake, VcpuRollback): a
rollback to a snapshot of L1 while L2 runs is a forced nested exit (vmx_set_nested_state() ->
vmx_leave_nested()), which must leave nothing of L2's behind (d953540430c5, 593a5c2e3c12); bare
metal continues from its own state at the snapshot (arch/cpu.py Forced.snapshot/rollback)."""

from dataclasses import replace
from pathlib import Path

import pytest

from kvmodel import _faults
from kvmodel.check.oracle import compare
from kvmodel.errors import ModelLimit
from kvmodel.kvm.vcpu import Vendor, create_vcpu
from kvmodel.kvm.vmx.vmx import VmxParams
from kvmodel.scenario.load import load
from kvmodel.scenario.runner import prepare
from kvmodel.scenario.vmm import VCPU_ROLLBACK, Pic, VcpuRollback, VcpuSnapshotTake, VmmRecord

NESTED = Path(__file__).parents[3] / "scenarios" / "nested"
SCENARIOS = {
    "nested_exit_keeps_queued_events": NESTED / "vmx_rollback_purges_l2_reinjected_exception.toml",
    "nested_mtf_pending_survives_exit": NESTED / "vmx_rollback_discards_pending_mtf.toml",
}


def _with_events(scenario):
    """The same script, but the rollback puts the snapshot's events back too."""
    steps = tuple(replace(s, args=s.args + (("events", 1),)) if s.call == VCPU_ROLLBACK else s
                  for s in scenario.vmm)
    return replace(scenario, vmm=steps)


@pytest.mark.parametrize("bug", list(SCENARIOS))
def test_the_rollback_reaches_the_bug_and_the_fix_matches_bare_metal(bug):
    scenario = load(SCENARIOS[bug])
    fixed = compare(scenario, Vendor.VMX)
    assert fixed.passed and fixed.divergence is None
    calls = [(o.call.split()[0], o.result) for o in fixed.virt.trace if isinstance(o, VmmRecord)]
    assert calls == [("vcpu_snapshot", 0), ("vcpu_rollback", 0)]
    with _faults.switched_on(frozenset({bug})):
        buggy = compare(scenario, Vendor.VMX)
    assert not buggy.passed and buggy.divergence is not None


def test_with_the_bug_l1_takes_l2s_reinjected_exception():
    with _faults.switched_on(frozenset({"nested_exit_keeps_queued_events"})):
        comparison = compare(load(SCENARIOS["nested_exit_keeps_queued_events"]), Vendor.VMX)
    virt = dict(comparison.virt.final.registers)
    assert virt["r9"] == 6 and comparison.bare.final.value("rbx") == 2


def test_with_the_bug_l1_gets_an_mtf_exit_it_did_not_ask_for():
    with _faults.switched_on(frozenset({"nested_mtf_pending_survives_exit"})):
        comparison = compare(load(SCENARIOS["nested_mtf_pending_survives_exit"]), Vendor.VMX)
    assert comparison.virt.final.value("rbx") == 37  # EXIT_REASON_MONITOR_TRAP_FLAG
    assert comparison.bare.final.value("rbx") == 18  # VMCALL: L2 ran to it


@pytest.mark.parametrize("bug", list(SCENARIOS))
def test_kvm_set_vcpu_events_after_the_forced_exit_hides_the_bug(bug):
    """Upstream: the forced exit's bug "has likely gone unnoticed because userspace probably
    follows the forced exit with KVM_SET_VCPU_EVENTS". It purges the queued #UD; mtf_pending
    is no event state, so that bug stays."""
    scenario = _with_events(load(SCENARIOS[bug]))
    assert compare(scenario, Vendor.VMX).passed
    with _faults.switched_on(frozenset({bug})):
        hidden = compare(scenario, Vendor.VMX).passed
    assert hidden is (bug == "nested_exit_keeps_queued_events")


def _vcpu_at_exit(exits: int):
    scenario = load(SCENARIOS["nested_mtf_pending_survives_exit"])
    cpu, _ = prepare(scenario)
    vcpu = create_vcpu(cpu, Vendor.VMX, vmx=VmxParams(nested=True))
    vcpu.stop_at_exit = exits
    vcpu.run(100_000)
    return vcpu


def test_a_rollback_with_no_snapshot_makes_no_call():
    vcpu = _vcpu_at_exit(5)
    rip = vcpu.ops.rip_read()
    done = VcpuRollback(3).perform(vcpu, Pic())
    assert done.result == 0 and done.states == () and "no snapshot 3" in done.detail
    assert vcpu.ops.rip_read() == rip


def test_a_snapshot_while_l2_runs_is_a_model_limit():
    vcpu = _vcpu_at_exit(15)  # the VMLAUNCH exit: L2 is what runs
    assert vcpu.ops.nested.guest_mode
    with pytest.raises(ModelLimit, match="while L2 runs"):
        VcpuSnapshotTake(0).perform(vcpu, Pic())


def test_a_snapshot_then_a_rollback_in_l1_restores_registers_and_vmcs12():
    vcpu = _vcpu_at_exit(5)
    pic = Pic()
    taken = VcpuSnapshotTake(0).perform(vcpu, pic)
    assert taken.states[0].snapshot == 0
    rip, state = vcpu.ops.rip_read(), repr(vcpu.ops.get_nested_state())
    vcpu.stop_at_exit = 9
    vcpu.run(100_000)
    assert vcpu.ops.rip_read() != rip
    done = VcpuRollback(0).perform(vcpu, pic)
    assert done.result == 0 and done.states[0].rollback == 0
    assert vcpu.ops.rip_read() == rip and repr(vcpu.ops.get_nested_state()) == state
