"""pytest plugin: kvmodel scenarios as test items, beside a project's own tests.

Installed with kvmodel (entry point `pytest11`), it collects every `*.toml` file that is a
kvmodel scenario (a top-level `[guest]` table; other TOML files are left alone) as one test
item per vendor: `pytest tests/ kvm-scenarios/`. An item passes when `kvmodel run --vendor V`
would exit 0; it fails with the text report (the divergence, both sides, KVM's last steps)
as the failure text; it is skipped when the vendor cannot run the scenario at all (an AMD
SVM L1 on VMX, ...). A scenario file with an error is one failing item naming file:line.

Vendors: `--kvmodel-vendor svm` (repeatable) or the ini option `kvmodel_vendors = svm vmx`;
default bare, svm and vmx. `-p no:kvmodel` switches the plugin off.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from kvmodel import api

VENDORS = ("bare", "svm", "vmx")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmodel", "kvmodel scenarios as test items")
    group.addoption("--kvmodel-vendor", action="append", choices=VENDORS, default=None,
                    dest="kvmodel_vendors", metavar="VENDOR",
                    help="run each scenario on this vendor (repeatable; default: bare, svm, vmx)")
    parser.addini("kvmodel_vendors", "vendors to run each kvmodel scenario on", type="args",
                  default=list(VENDORS))


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".toml" and _is_scenario(file_path):
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


def _is_scenario(path: Path) -> bool:
    """A kvmodel scenario has a [guest] table. A file that is not even TOML is still collected
    when it mentions one, so its error shows as a failing item rather than nothing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    try:
        return isinstance(tomllib.loads(text).get("guest"), dict)
    except (tomllib.TOMLDecodeError, RecursionError):
        return "[guest]" in text


class ScenarioFile(pytest.File):
    def collect(self):
        vendors = self.config.getoption("kvmodel_vendors") or self.config.getini("kvmodel_vendors")
        try:
            scenario = api.load(self.path)
        except api.KvmodelError as e:
            yield ScenarioItem.from_parent(self, name="load", scenario=None, vendor=None, error=str(e))
            return
        for vendor in vendors:
            yield ScenarioItem.from_parent(self, name=vendor, scenario=scenario, vendor=vendor)


class ScenarioFailure(Exception):
    """The scenario's report, as the failure text."""


class ScenarioItem(pytest.Item):
    def __init__(self, *, scenario: api.Scenario | None, vendor: str | None, error: str | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.scenario, self.vendor, self.error = scenario, vendor, error

    def runtest(self) -> None:
        if self.error is not None:
            raise ScenarioFailure(self.error)
        try:
            outcome = api.run(self.scenario, self.vendor)
        except api.KvmodelError as e:
            raise ScenarioFailure(str(e)) from None
        if outcome.not_applicable is not None:
            pytest.skip(f"not applicable on {self.vendor}: {outcome.not_applicable}")
        if not outcome.passed:
            raise ScenarioFailure(outcome.text())

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ScenarioFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        title = self.scenario.title if self.scenario is not None else "scenario file"
        return self.path, None, f"kvmodel {self.vendor or 'load'}: {title}"
