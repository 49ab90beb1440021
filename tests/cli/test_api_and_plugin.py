"""The Python API (kvmodel.api) and the pytest plugin that collects scenarios as test items."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from kvmodel import api
from kvmodel.check.explore import Finding
from kvmodel.check.replay import write
from kvmodel.report.json import json_schema

ROOT = Path(__file__).parents[2]
SCENARIOS = ROOT / "scenarios"
EXAMPLE = SCENARIOS / "arch" / "nmi_latched_until_iret.toml"
EXPLORE = SCENARIOS / "virt" / "explore_nmi_with_host_faults.toml"


def _diverging(tmp_path: Path) -> Path:
    source = SCENARIOS / "arch" / "two_nmis_in_mov_ss_shadow.toml"
    copy = tmp_path / "diverges.toml"
    copy.write_text(source.read_text().split("# Under KVM both NMIs")[0])
    return copy


def test_api_runs_a_scenario_on_each_vendor_and_reads_the_result():
    scenario = api.load(EXAMPLE)
    bare = api.run(scenario, "bare")
    assert bare.passed and bare.comparison is None and bare.result.final.stop == "halted"
    svm = api.run(scenario, "svm")
    assert svm.passed and svm.model_limit is None and svm.comparison.divergence is None
    assert "SAME AS BARE METAL" in svm.text() and "\x1b" not in svm.text()
    schema = json_schema("run")
    Draft202012Validator(schema).validate({"schema_version": 1, "results": [svm.to_dict()], "errors": []})


def test_api_reports_a_divergence_as_the_cli_does(tmp_path):
    outcome = api.run(api.load(_diverging(tmp_path)), api.Vendor.VMX)
    assert not outcome.passed and outcome.comparison.divergence.event_index == 2
    assert "DIVERGENCE at guest-observable entry 3" in outcome.text()


def test_api_explores_and_replays(tmp_path):
    scenario = api.load(EXPLORE)
    clean = api.explore(scenario, "svm", api.Bounds(max_async=1, max_host=1))
    assert clean.passed and clean.complete and clean.schedules > 10
    buggy = api.explore(scenario, "svm", bugs=["no_reinjection"], stop_at_first=True)
    finding = buggy.findings[0]
    path = write(tmp_path, scenario, api.Vendor.SVM, finding, frozenset({"no_reinjection"}))
    outcome = api.replay(api.read_replay(path))
    assert not outcome.passed and outcome.comparison.divergence is not None
    assert isinstance(finding, Finding)


def test_api_refuses_bad_input_with_kvmodel_error(tmp_path):
    with pytest.raises(api.KvmodelError, match="no catalogued bug named 'nope'"):
        api.run(api.load(EXAMPLE), "svm", bugs=["nope"])
    with pytest.raises(api.KvmodelError, match="explore runs under KVM"):
        api.explore(api.load(EXAMPLE), "bare")
    bad = tmp_path / "bad.toml"
    bad.write_text("title = 5 5\n")
    with pytest.raises(api.KvmodelError, match=r"bad.toml:1: not valid TOML"):
        api.load(bad)
    replay = write(tmp_path, api.load(EXAMPLE), api.Vendor.SVM, Finding("divergence", (), "m"),
                   frozenset())
    doc = json.loads(replay.read_text())
    doc["bugs"] = ["nope"]
    replay.write_text(json.dumps(doc))
    with pytest.raises(api.KvmodelError, match=f"{replay}: no catalogued bug named 'nope'"):
        api.read_replay(replay)


def test_the_plugin_is_registered_as_a_pytest_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"kvmodel": "kvmodel.pytest_plugin"}


def test_the_plugin_collects_scenarios_with_the_report_as_failure_text(tmp_path):
    (tmp_path / "example.toml").write_text(EXAMPLE.read_text())
    (tmp_path / "fred.toml").write_text((SCENARIOS / "fred" / "int1_icebp.toml").read_text())
    _diverging(tmp_path)
    (tmp_path / "broken.toml").write_text("title = 5 5\n[guest]\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "not a scenario"\n')
    (tmp_path / "test_own.py").write_text("def test_own():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:kvmodel", "-p",
                           "kvmodel.pytest_plugin", "-p", "no:cacheprovider", "-rA",
                           "--kvmodel-vendor", "svm", "--kvmodel-vendor", "vmx", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "PASSED example.toml::svm" in out and "PASSED example.toml::vmx" in out
    assert "SKIPPED" in out and "not applicable on svm" in out  # FRED runs on VMX only
    assert "PASSED fred.toml::vmx" in out and "PASSED test_own.py::test_own" in out
    assert "FAILED diverges.toml::vmx" in out and "FAILED diverges.toml::svm" in out
    assert "DIVERGENCE at guest-observable entry 3" in out  # the report is the failure text
    assert "FAILED broken.toml::load" in out and "broken.toml:1: not valid TOML" in out
    assert "pyproject.toml::" not in out and "collected 8 items" in out
    assert "Traceback" not in out
