"""The explorer: enumeration, determinism, findings, shrinking, replay."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from kvmodel.bugs.catalogue import CATALOGUE
from kvmodel.bugs.check import check_bug
from kvmodel.check.explore import Bounds, Choices, Runner, async_schedules, explore, host_schedules
from kvmodel.check.replay import read, shrink, write
from kvmodel.check.schedule import Kind, describe
from kvmodel.errors import KvmodelError
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load
from kvmodel.scenario.schema import ExploreSpec

ROOT = Path(__file__).parents[2]
EXPLORE = ROOT / "scenarios" / "virt" / "explore_nmi_with_host_faults.toml"
VENDORS = pytest.mark.parametrize("vendor", [Vendor.SVM, Vendor.VMX], ids=lambda v: v.value)


def _choices(nmis=0, interrupts=(), host_interrupts=0, pages=(), max_async=2, max_host=2, n=3):
    spec = ExploreSpec(nmis, interrupts, host_interrupts, (), 0, 0)
    return Choices(spec, max_async, max_host, n, pages)


def test_async_schedules_count_nmis_as_interchangeable():
    # 4 positions, up to 2 NMIs: 1 + 4 + C(4+1, 2) = 15 multisets
    schedules = list(async_schedules(_choices(nmis=2)))
    assert len(schedules) == 15 == len(set(schedules))
    assert all(p.kind is Kind.NMI for s in schedules for p in s)


def test_async_schedules_place_each_vector_once_within_the_bound():
    schedules = list(async_schedules(_choices(nmis=1, interrupts=(0x40, 0x50), max_async=2)))
    # none; 1 NMI (4); one vector (2*4); NMI + one vector (4*8); both vectors (16)
    assert len(schedules) == 1 + 4 + 8 + 32 + 16
    assert max(len(s) for s in schedules) == 2


def test_host_schedules_respect_max_host():
    schedules = list(host_schedules(_choices(host_interrupts=1, pages=(0x1000, 0x2f000), max_host=1)))
    assert sorted(describe(s) for s in schedules)[:3] == [
        "host fault on page 0x1000", "host fault on page 0x2f000", "host interrupt after 0 retired"]
    assert len(schedules) == 1 + 2 + 4


@VENDORS
def test_explore_is_deterministic_and_independent_of_workers(vendor):
    scenario = load(EXPLORE)
    one = explore(scenario, vendor, Bounds(max_async=1, max_host=1))
    again = explore(scenario, vendor, Bounds(max_async=1, max_host=1))
    two = explore(scenario, vendor, Bounds(max_async=1, max_host=1), workers=2)
    for other in (again, two):
        assert (other.schedules, other.outcomes, other.findings, other.known) == (
            one.schedules, one.outcomes, one.findings, one.known)
    assert one.passed and one.schedules > 100 and one.distinct > 5


@VENDORS
def test_known_finding_is_recognised_and_required(vendor):
    result = explore(load(EXPLORE), vendor)
    assert result.passed
    assert result.known and all(
        sum(p.kind is Kind.NMI for p in f.schedule) >= 2 for f in result.known)


@pytest.mark.parametrize("bug,vendor", [(b, Vendor(v)) for b in CATALOGUE for v in b.vendors],
                         ids=lambda x: getattr(x, "name", getattr(x, "value", None)))
def test_every_catalogued_bug_is_found_and_replays(tmp_path, bug, vendor):
    check = check_bug(bug, vendor, tmp_path)
    assert check.found and check.reproduced
    scenario = load(bug.scenario)
    if scenario.cpus is not None:
        # several CPUs: the finding is an interleaving (no replay file yet); the same
        # search without the bug finds nothing
        assert check.replay is None
        assert explore(scenario, vendor, Bounds()).findings == []
        return
    doc = json.loads(Path(check.replay).read_text())
    assert doc["bugs"] == [bug.name] and doc["vendor"] == vendor.value
    replayed = read(check.replay).run()
    # a divergence, KVM giving up (hypervisor_error) where bare metal runs on, or a check on
    # the hypervisor's side (a WARN, the host's own NMI handling)
    assert replayed.divergence is not None or replayed.virt.hypervisor_error is not None or (
        replayed.problems and not replayed.passed)


@VENDORS
def test_without_the_bug_the_same_explore_finds_nothing_new(vendor):
    assert explore(load(EXPLORE), vendor, Bounds(max_async=1, max_host=1)).findings == []


def test_shrink_drops_happenings_that_do_not_matter():
    scenario = load(EXPLORE)
    bugs = frozenset({"no_reinjection"})
    result = explore(scenario, Vendor.VMX, Bounds(max_async=2, max_host=2), bugs=bugs)
    biggest = max(result.findings, key=lambda f: len(f.schedule))
    assert len(biggest.schedule) >= 3
    small = shrink(scenario, Vendor.VMX, biggest, bugs)
    assert len(small.schedule) == 2
    assert {p.kind for p in small.schedule} == {Kind.NMI, Kind.HOST_FAULT} or Kind.INTERRUPT in {
        p.kind for p in small.schedule}


def test_replay_of_a_changed_scenario_is_refused(tmp_path):
    copy = tmp_path / "explore.toml"
    shutil.copy(EXPLORE, copy)
    scenario = load(copy)
    bugs = frozenset({"no_reinjection"})
    finding = explore(scenario, Vendor.SVM, bugs=bugs, stop_at_first=True).findings[0]
    path = write(tmp_path / "out", scenario, Vendor.SVM, finding, bugs)
    assert read(path).schedule == finding.schedule
    copy.write_text(copy.read_text().replace("nop", "nop\n    nop", 1))
    with pytest.raises(KvmodelError, match="has changed since this replay was written"):
        read(path)


def test_time_limit_ends_the_search_cleanly_with_what_was_covered():
    full = explore(load(EXPLORE), Vendor.SVM)
    result = explore(load(EXPLORE), Vendor.SVM, time_limit=full.elapsed / 4)
    assert not result.complete and result.schedules < full.schedules
    assert result.unseen_known == []  # an incomplete search does not claim a known finding missing


# Scenarios that need something the model does not cover: the explorer must say so.
OUTSIDE_THE_SUBSET = """title = "cmc is outside the instruction subset"
[guest]
code = '''
start:
    cmc
    hlt
'''
"""
VMGEXIT_OUTSIDE_SEV_ES = """title = "VMGEXIT outside SEV-ES: #UD on bare metal and VMX, a model limit on SVM"
[guest]
code = '''
start:
    .byte 0xf3, 0x0f, 0x01, 0xd9
    hlt
ud_handler:
    hlt
'''
[idt]
"#UD" = "ud_handler"
"""
LIMIT_IN_THE_NMI_HANDLER = """title = "only schedules with an NMI reach the cmc"
[guest]
code = '''
start:
    nop
    hlt
nmi_handler:
    cmc
    iretq
'''
[idt]
NMI = "nmi_handler"
[explore]
nmi = 1
"""


def _scenario(tmp_path, name, text):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load(path)


@VENDORS
def test_a_scenario_stopped_by_a_model_limit_reports_the_limit(tmp_path, vendor):
    result = explore(_scenario(tmp_path, "cmc", OUTSIDE_THE_SUBSET), vendor)
    assert result.schedules == 0 and result.findings == []
    assert result.limit == "on bare metal: instruction outside the modelled subset: 'cmc' at 0x10000"
    assert result.limit_schedule == ()


@VENDORS
def test_a_base_run_without_a_final_state_is_reported_not_explored(monkeypatch, vendor):
    # A reference run that ended with no final state (as a hypervisor error leaves a run)
    # gives no instruction count to place happenings by: reported like a model limit.
    bare = Runner.bare
    monkeypatch.setattr(Runner, "bare", lambda self, schedule: dataclasses.replace(
        bare(self, schedule), final=None, hypervisor_error="KVM_EXIT_FAIL_ENTRY"))
    result = explore(load(EXPLORE), vendor, Bounds(max_async=1, max_host=1))
    assert result.schedules == 0 and result.findings == []
    assert result.limit == "on bare metal: KVM_EXIT_FAIL_ENTRY" and result.limit_schedule == ()


def test_a_model_limit_on_one_vendor_only(tmp_path):
    scenario = _scenario(tmp_path, "vmgexit", VMGEXIT_OUTSIDE_SEV_ES)
    svm, vmx = explore(scenario, Vendor.SVM), explore(scenario, Vendor.VMX)
    assert svm.limit.startswith("under KVM on SVM: VMMCALL outside an SEV-ES guest")
    assert svm.model_limits == svm.schedules > 0 and svm.distinct == 0
    assert vmx.limit is None and vmx.model_limits == 0 and vmx.distinct == 1 and vmx.passed


@VENDORS
def test_schedules_that_reach_a_model_limit_are_counted_and_named(tmp_path, vendor):
    result = explore(_scenario(tmp_path, "nmi_cmc", LIMIT_IN_THE_NMI_HANDLER), vendor)
    assert 0 < result.model_limits < result.schedules and result.distinct >= 1
    assert result.limit == "on bare metal: instruction outside the modelled subset: 'cmc' at 0x10002"
    assert [p.kind for p in result.limit_schedule] == [Kind.NMI]


@VENDORS
def test_save_restore_after_an_int_n_in_an_sti_shadow_lets_the_interrupt_in_first(tmp_path, vendor):
    # Declared candidate upstream finding: GET_VCPU_EVENTS hides the re-queued INT n and the
    # exit during its delivery left no STI shadow to report.
    scenario = load(ROOT / "scenarios" / "softint" / "int_n_in_sti_shadow_interrupt_pending.toml")
    result = explore(scenario, vendor)
    assert result.passed and result.findings == [] and result.known
    assert all(Kind.SAVE_RESTORE in {p.kind for p in f.schedule} for f in result.known)
    assert "save/restore after exit 2" in {describe(f.schedule) for f in result.known}
    small = shrink(scenario, vendor, result.known[0])
    replayed = read(write(tmp_path, scenario, vendor, small, frozenset())).run()
    first = replayed.divergence
    assert first.index == 0 and replayed.divergence_expected is False
    assert (first.bare.vector, first.virt.vector) == (0x80, 0x40)
    assert first.virt.return_rip == replayed.virt.program.symbol("sys")  # the INT n not run yet
