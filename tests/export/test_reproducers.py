"""The KVM selftest reproducers: every userspace-driven finding a shipped scenario declares
has one or a stated reason, each source names its scenarios, and `kvmodel export` writes them."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest

from kvmodel.cli import Exit, main
from kvmodel.export.reproducers import (
    NOT_REPRODUCED,
    REPRODUCERS,
    reproducers_for,
    scenario_key,
    source,
)
from kvmodel.scenario.load import load

ROOT = Path(__file__).parents[2]
SCENARIOS = {scenario_key(p): p for p in sorted((ROOT / "scenarios").glob("*/*.toml"))}
MAPPED = {key: r for r in REPRODUCERS for key in r.scenarios}
SELFTESTS = resources.files("kvmodel.export").joinpath("selftests")


def _declares_userspace_finding(path: Path) -> bool:
    """A declared finding whose schedule holds a save/restore (KVM_GET/SET_VCPU_EVENTS)."""
    return any("save_restore" in k.involves for k in load(path).known_findings)


def test_every_declared_save_restore_finding_has_a_reproducer_or_a_reason():
    declaring = {key for key, path in SCENARIOS.items() if _declares_userspace_finding(path)}
    assert declaring, "no scenario declares a save/restore finding: the check is vacuous"
    missing = sorted(declaring - MAPPED.keys() - NOT_REPRODUCED.keys())
    assert not missing, f"add a reproducer or a NOT_REPRODUCED reason for {missing}"
    assert not MAPPED.keys() & NOT_REPRODUCED.keys()
    assert all(NOT_REPRODUCED.values())


def test_every_mapped_scenario_exists_and_declares_what_its_reproducer_shows():
    for key, reproducer in MAPPED.items():
        assert key in SCENARIOS, f"{reproducer.name}: no scenario {key}"
        scenario = load(SCENARIOS[key])
        if reproducer.name == "vnmi_set_events_extra_nmi":
            # Not declared in the file: test_kvm_invariants xfails the round trip with vNMI on.
            assert ("vnmi", True) in scenario.kvm_params, key
        elif reproducer.name == "masked_nmi_wakes_hlt" and scenario.divergences:
            assert any("KVM_REQ_NMI" in d.why for d in scenario.divergences), key
        else:
            assert _declares_userspace_finding(SCENARIOS[key]), key
    for key in NOT_REPRODUCED:
        assert key in SCENARIOS, f"NOT_REPRODUCED names no scenario {key}"


@pytest.mark.parametrize("reproducer", REPRODUCERS, ids=lambda r: r.name)
def test_each_selftest_is_shipped_names_its_scenarios_and_says_it_was_not_run(reproducer):
    text = source(f"{reproducer.name}.c")
    assert "int main(" in text and "TEST_ASSERT" in text
    for key in reproducer.scenarios:
        assert key in text, f"{reproducer.name}.c does not name {key}"
    assert "NOT compiled or run" in text
    readme = source("README.md")
    assert f"`{reproducer.name}.c`" in readme
    assert all(key in readme for key in reproducer.scenarios)


def test_no_selftest_source_without_an_entry():
    shipped = {p.name[:-2] for p in SELFTESTS.iterdir() if p.name.endswith(".c")}
    assert shipped == {r.name for r in REPRODUCERS}


def test_the_sources_are_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["kvmodel.export"]
    assert {"selftests/*.c", "selftests/README.md"} <= set(globs)


def test_lookup_goes_by_folder_and_stem():
    assert [r.name for r in reproducers_for("/elsewhere/softint/int3_code_breakpoint.toml")] == [
        "soft_event_retried_after_restore"]
    assert reproducers_for("scenarios/arch/int3_breakpoint.toml") == ()


def test_export_writes_the_selftest_beside_the_image(tmp_path):
    path = SCENARIOS["softint/int3_code_breakpoint"]
    assert main(["export", str(path), "--out", str(tmp_path)]) == Exit.OK
    assert (tmp_path / "kernel.elf").exists()
    assert (tmp_path / "soft_event_retried_after_restore.c").read_text() == source(
        "soft_event_retried_after_restore.c")
    assert (tmp_path / "README.md").read_text() == source("README.md")


def test_export_of_a_scenario_with_no_image_still_writes_its_selftest(tmp_path, capsys):
    path = SCENARIOS["nested/vmx_l1_nmi_while_l2_runs"]
    assert main(["export", str(path), "--out", str(tmp_path)]) == Exit.OK
    assert "no image: an L1 VMX hypervisor" in capsys.readouterr().out
    assert not (tmp_path / "kernel.elf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "masked_nmi_wakes_hlt.c"]


def test_export_of_a_scenario_with_neither_is_still_refused(tmp_path):
    path = SCENARIOS["fred/data_breakpoint_on_frame_no_storm"]
    assert reproducers_for(path) == ()
    assert main(["export", str(path), "--out", str(tmp_path)]) == Exit.BAD_INPUT
    assert not any(tmp_path.iterdir())
