"""Every shipped scenario, run under KVM on SVM and on VMX, shows the guest what bare
metal shows it, or exactly the divergence the scenario declares and explains."""

from pathlib import Path

import pytest

from kvmodel.check.oracle import compare
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load

ROOT = Path(__file__).parents[2] / "scenarios"
VIRT = sorted((ROOT / "virt").glob("*.toml"))
ALL = sorted(ROOT.glob("*/*.toml"))


def test_the_virt_library_is_large_enough():
    assert len(VIRT) >= 25


@pytest.mark.parametrize("vendor", [Vendor.SVM, Vendor.VMX], ids=lambda v: v.value)
@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_same_as_bare_metal(path, vendor):
    comparison = compare(load(path), vendor)
    assert comparison.bare.passed, [m.message for m in comparison.bare.mismatches]
    if comparison.not_applicable is not None:
        assert ("sti_blocks_nmi" in comparison.not_applicable
                or "KVM's task-switch emulation" in comparison.not_applicable
                or ("SEV-ES" in comparison.not_applicable and vendor is Vendor.VMX)
                or ("FRED" in comparison.not_applicable and vendor is Vendor.SVM)
                or ("does not run on AMD SVM" in comparison.not_applicable and vendor is Vendor.SVM)
                or ("does not run on Intel VMX" in comparison.not_applicable and vendor is Vendor.VMX))
        return
    assert comparison.virt.limit is None and comparison.virt.hypervisor_error is None
    assert comparison.problems == []
    if comparison.known is None:
        assert comparison.virt.mismatches == (), [m.message for m in comparison.virt.mismatches]


@pytest.mark.parametrize("vendor", [Vendor.SVM, Vendor.VMX], ids=lambda v: v.value)
@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_same_as_bare_metal_instruction_by_instruction(path, vendor):
    """With every retired instruction in the trace (`kvmodel run --instructions`), the
    verdict is the same: an instruction KVM completes for the guest (an emulated VMRUN
    or VMLAUNCH) retires where the CPU would retire it, before what L2 shows."""
    comparison = compare(load(path), vendor, record_instructions=True)
    if comparison.not_applicable is None:
        assert comparison.problems == []
        assert sum(o.kind == "retire" for o in comparison.virt.trace) > 0


@pytest.mark.parametrize("vendor", [Vendor.SVM, Vendor.VMX], ids=lambda v: v.value)
@pytest.mark.parametrize("path", VIRT, ids=lambda p: p.stem)
def test_virt_scenarios_exercise_the_hypervisor(path, vendor):
    """Each virt scenario makes KVM inject something, or take an exit other than HLT
    (an exploration scenario does so in the schedules the explorer adds)."""
    scenario = load(path)
    if scenario.explore is not None:
        pytest.skip("exercised by kvmodel explore (tests/check)")
    virt = compare(scenario, vendor).virt
    reasons = {o.reason for o in virt.trace if o.kind == "vmexit"}
    injected = [o for o in virt.trace if o.kind == "inject"]
    assert injected or reasons - {"HLT"}, f"only {reasons}"
