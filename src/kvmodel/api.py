"""kvmodel as a library: load a scenario, run it on a vendor, explore it, read the result.

    from kvmodel import api

    scenario = api.load("scenarios/virt/nmi_wakes_hlt.toml")
    outcome = api.run(scenario, "svm")          # under KVM on SVM, compared with bare metal
    assert outcome.passed, outcome.text()         # the report `kvmodel run` prints, as plain text
    explored = api.explore(scenario, "vmx", api.Bounds(max_async=1))
    assert explored.passed and explored.complete, explored.findings

    replay = api.read_replay("kvmodel-findings/x.json")   # validated: bad files raise
    outcome = api.replay(replay)

Every bad input (a scenario or replay file, a bug name, a bound) raises KvmodelError with
the file:line and the reason, as `kvmodel` exits 2 with it. The `kvmodel` command is a thin
layer over these functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from kvmodel import _faults
from kvmodel.bugs.catalogue import lookup
from kvmodel.check.campaign import Explored, explore_all, vendors_for
from kvmodel.check.engine import Engine, EngineKind
from kvmodel.check.explore import Bounds, ExploreResult, Finding
from kvmodel.check.explore import explore as _explore
from kvmodel.check.oracle import Comparison, compare
from kvmodel.check.replay import Replay
from kvmodel.check.replay import read as _read_replay
from kvmodel.errors import KvmodelError
from kvmodel.kvm.vcpu import Vendor
from kvmodel.report.json import comparison_dict, result_dict
from kvmodel.report.text import print_comparison, print_result
from kvmodel.scenario.load import load as _load
from kvmodel.scenario.runner import RunResult
from kvmodel.scenario.runner import run as _run
from kvmodel.scenario.schema import Scenario

__all__ = ["Bounds", "Engine", "EngineKind", "Explored", "ExploreResult", "Finding", "KvmodelError",
           "Outcome", "Replay", "Scenario", "Vendor", "check_bugs", "explore", "explore_all", "load",
           "read_replay", "replay", "run", "vendors_for"]


def load(path: str | Path) -> Scenario:
    """A scenario file, validated and its guest assembled."""
    return _load(str(path))


def check_bugs(bugs: Iterable[str]) -> frozenset[str]:
    """Catalogued bug names (`kvmodel bugs list`); an unknown one raises."""
    names = frozenset(bugs)
    for name in names:
        lookup(name)
    return names


@dataclass(frozen=True, slots=True)
class Outcome:
    """One run: on bare metal (`comparison` None) or under KVM beside bare metal."""

    result: RunResult  # the run the scenario asked for (under KVM when there is one)
    comparison: Comparison | None

    @property
    def model_limit(self) -> str | None:
        """The model could not run the guest to the end (in either run): no verdict."""
        c = self.comparison
        if c is None:
            return self.result.limit
        return c.bare.limit or (c.virt.limit if c.virt is not None else None)

    @property
    def passed(self) -> bool:
        """Every expectation holds, and under KVM the guest saw what bare metal shows it."""
        return (self.comparison or self.result).passed and self.model_limit is None

    @property
    def not_applicable(self) -> str | None:
        return None if self.comparison is None else self.comparison.not_applicable

    def text(self, width: int = 120) -> str:
        """The report `kvmodel run` prints, as plain text (no colours, no markup)."""
        console = Console(width=width, no_color=True, highlight=False, soft_wrap=True,
                          force_terminal=False, record=True, file=_Null())
        if self.comparison is None:
            print_result(console, self.result)
        else:
            print_comparison(console, self.comparison)
        return console.export_text()

    def to_dict(self) -> dict:
        """The entry of `kvmodel run --json`'s "results"."""
        return result_dict(self.result) if self.comparison is None else comparison_dict(self.comparison)


class _Null:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def run(scenario: Scenario, vendor: str | Vendor | None = None, *, bugs: Iterable[str] = (),
        max_steps: int | None = None, instructions: bool = False) -> Outcome:
    """Run on bare metal ("bare") or under KVM ("svm", "vmx"; compared with bare metal).
    Default: the scenario's [cpu] vendor, else bare."""
    vendor = Vendor(vendor or scenario.vendor)
    with _faults.switched_on(check_bugs(bugs)):
        if vendor is Vendor.BARE:
            result = _run(scenario, vendor=vendor, record_instructions=instructions,
                          max_steps=max_steps)
            return Outcome(result, None)
        comparison = compare(scenario, vendor, record_instructions=instructions, max_steps=max_steps)
    return Outcome(comparison.virt or comparison.bare, comparison)


def explore(scenario: Scenario, vendor: str | Vendor, bounds: Bounds | None = None, *,
            bugs: Iterable[str] = (), time_limit: float | None = None, workers: int = 1,
            engine: Engine | None = None, stop_at_first: bool = False,
            from_reset: bool = False) -> ExploreResult:
    """Every schedule of the scenario's choice points within the bounds, under KVM on `vendor`
    ("svm" or "vmx"): `findings` (new), `known` (declared), `complete` (False if the time
    limit or an interrupt ended it), `limit` (a model limit met). Findings are not shrunk or
    written: explore_all() does that. `engine` (default: `workers` processes) says where
    chunks of schedules run, e.g. Engine(EngineKind.RAY): the results are the same, as they are
    with `from_reset` (every run under KVM from reset, none resumed from a shorter one's)."""
    vendor = Vendor(vendor)
    if vendor is Vendor.BARE:
        raise KvmodelError("explore runs under KVM: vendor svm or vmx")
    return _explore(scenario, vendor, bounds, bugs=check_bugs(bugs), time_limit=time_limit,
                    workers=workers, engine=engine, stop_at_first=stop_at_first,
                    from_reset=from_reset)


def read_replay(path: str | Path) -> Replay:
    """A replay file written by explore, validated (its bugs too)."""
    replay = _read_replay(path)
    try:
        check_bugs(replay.bugs)
    except KvmodelError as e:
        raise KvmodelError(f"{path}: {e}") from None
    return replay


def replay(replay: Replay) -> Outcome:
    comparison = replay.run()
    return Outcome(comparison.virt or comparison.bare, comparison)
