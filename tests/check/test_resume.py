"""Runs resumed from a shorter schedule's copies (check/resume.py) are the runs from reset.

Each exploration below runs twice, from reset and resumed, and every schedule's
outcome (its digest, exits, finding, limit) must be the same, in the same order;
the resumed one must actually have branched most of its runs off a trunk.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmodel.bugs.catalogue import CATALOGUE
from kvmodel.bugs.check import check_bug
from kvmodel.check import explore as explore_module
from kvmodel.check import merge as merge_module
from kvmodel.check import resume as resume_module
from kvmodel.check.explore import Bounds, explore
from kvmodel.check.resume import Branch, trunk_of
from kvmodel.check.schedule import Kind, place
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load

ROOT = Path(__file__).parents[2] / "scenarios"
CASES = [
    # nested, host interrupts by retired count and save/restores after exits
    ("nested/vmx_l2_vmcall_exits_to_l1.toml", Vendor.VMX, Bounds(max_async=1, max_host=1)),
    ("nested/svm_l1_injects_nmi.toml", Vendor.SVM, Bounds(max_async=1, max_host=1)),
    # the VMM's calls as choices, and one placed at a label (every exit returns to userspace)
    ("vmm/explore_vmm_calls.toml", Vendor.VMX, Bounds(max_async=1, max_host=1)),
    ("vmm/kvm_nmi_at_label.toml", Vendor.SVM, Bounds()),
    # the scenario's own save/restore, and a guest that halts (time passes while halted)
    ("virt/save_restore_nmi_latched_in_handler.toml", Vendor.SVM, Bounds()),
    ("virt/eventinj_two_self_ipis_then_sti_nop_cli.toml", Vendor.VMX, Bounds()),
]


ADD = explore_module._Search.add


def _outcomes(monkeypatch, path: str, vendor: Vendor, bounds: Bounds, from_reset: bool):
    seen = []
    add = ADD

    def record(search, outcome):
        seen.append((outcome.schedule, outcome.digest, outcome.exits, outcome.finding,
                     outcome.limit))
        return add(search, outcome)

    monkeypatch.setattr(explore_module._Search, "add", record)
    result = explore(load(ROOT / path), vendor, bounds, from_reset=from_reset)
    return seen, result


@pytest.mark.parametrize("merge", [False, True], ids=["resumed", "merged"])
@pytest.mark.parametrize(("path", "vendor", "bounds"), CASES, ids=[c[0] for c in CASES])
def test_resumed_runs_are_the_runs_from_reset(monkeypatch, path, vendor, bounds, merge):
    """With check/merge.py too: runs that reach an earlier run's state end as it did."""
    monkeypatch.setattr(resume_module, "MERGE_STATES", merge)
    merged = []
    probe_merged = merge_module.Probe.merged
    monkeypatch.setattr(merge_module.Probe, "merged",
                        lambda *a: merged.append(1) or probe_merged(*a))
    resumed = []
    original = resume_module.resume
    monkeypatch.setattr(resume_module, "resume",
                        lambda *a: resumed.append(1) or original(*a))
    fresh, fresh_result = _outcomes(monkeypatch, path, vendor, bounds, from_reset=True)
    assert not resumed
    again, again_result = _outcomes(monkeypatch, path, vendor, bounds, from_reset=False)
    assert again == fresh
    assert again_result.findings == fresh_result.findings
    assert again_result.outcomes == fresh_result.outcomes
    assert len(resumed) > len(fresh) // 3
    assert bool(merged) == merge or path.startswith("vmm/kvm_nmi_at_label")


def test_the_trunk_of_a_schedule():
    nmi, fault = place(Kind.NMI, 3), place(Kind.HOST_FAULT, 0, 0x1000)
    save = place(Kind.SAVE_RESTORE, 2)
    assert trunk_of((nmi,)) == ()
    assert trunk_of((nmi, fault)) == (fault,)
    assert trunk_of((nmi, fault, save)) == (nmi, fault)


def test_a_copy_is_usable_only_before_what_it_would_have_seen():
    branch = Branch(exits=4, retired=10, waits=0, session=None, memory=bytearray(), pages={})
    assert branch.usable_for([place(Kind.NMI, 11), place(Kind.SAVE_RESTORE, 4)])
    assert not branch.usable_for([place(Kind.NMI, 10)])  # its boundary 10 was looked at
    assert not branch.usable_for([place(Kind.SAVE_RESTORE, 3)])
    waited = Branch(exits=4, retired=10, waits=1, session=None, memory=bytearray(), pages={})
    assert not waited.usable_for([place(Kind.HOST_INTERRUPT, 50)])  # a halt brings it early
    assert waited.usable_for([place(Kind.VMM, 5)])


@pytest.mark.parametrize("merge", [False, True], ids=["resumed", "merged"])
def test_every_catalogued_bug_gives_the_same_replay_file_either_way(monkeypatch, tmp_path, merge):
    """`kvmodel bugs check`, resumed (and merged) and from reset: found alike, the same
    shrunk counterexample, byte for byte."""
    monkeypatch.setattr(resume_module, "MERGE_STATES", merge)
    rows = 0
    for bug in CATALOGUE:
        for vendor in bug.vendors:
            checks = [check_bug(bug, Vendor(vendor), tmp_path / f"{bug.name}-{vendor}-{mode}",
                                from_reset=mode == "reset")
                      for mode in ("reset", "resumed")]
            got = [(c.found, c.happenings, c.retired, c.reproduced,
                    Path(c.replay).read_bytes() if c.replay else None) for c in checks]
            assert got[0] == got[1], f"{bug.name} on {vendor}"
            rows += 1
    assert rows >= 60


@pytest.mark.slow
def test_the_whole_shipped_suite_explores_alike_either_way(monkeypatch):
    """Every schedule of every shipped scenario, on both vendors (about 10 minutes)."""
    for path in sorted(ROOT.rglob("*.toml")):
        if load(path).cpus is not None:
            continue  # several CPUs: interleavings (check/interleave.py), nothing resumed
        for vendor in (Vendor.SVM, Vendor.VMX):
            rel = str(path.relative_to(ROOT))
            fresh, _ = _outcomes(monkeypatch, rel, vendor, Bounds(), from_reset=True)
            again, _ = _outcomes(monkeypatch, rel, vendor, Bounds(), from_reset=False)
            assert again == fresh, f"{rel} on {vendor.value}"
