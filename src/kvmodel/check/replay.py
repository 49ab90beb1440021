"""Counterexamples: shrinking a finding, and replay files that re-run it exactly.

Shrinking removes happenings while the finding (same kind) persists, then
moves each remaining one as early as it can go: the fewest happenings and
the shortest guest prefix that still show it. A replay file (JSON) names the
scenario by path and SHA-256 of its text, the vendor, the KVM module
parameters and bugs switched on, and the exact schedule.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from kvmodel import _faults
from kvmodel.check.explore import Finding, Runner
from kvmodel.check.oracle import Comparison, compare
from kvmodel.check.schedule import Schedule, apply, from_dict
from kvmodel.errors import KvmodelError
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load
from kvmodel.scenario.schema import Scenario

REPLAY_FORMAT = 1


def shrink(scenario: Scenario, vendor: Vendor, finding: Finding,
           bugs: frozenset[str] = frozenset()) -> Finding:
    """The smallest schedule, earliest placements, that still shows a finding of this kind."""
    with _faults.switched_on(bugs):
        runner = Runner(scenario, vendor)

        def still(schedule: Schedule) -> Finding | None:
            found = runner.outcome(schedule).finding
            return found if found is not None and found.kind == finding.kind else None

        best = finding
        progress = True
        while progress:
            progress = False
            for n in range(len(best.schedule)):
                found = still(best.schedule[:n] + best.schedule[n + 1:])
                if found is not None:
                    best, progress = found, True
                    break
        for n in range(len(best.schedule)):
            p = best.schedule[n]
            for at in range(min(p.at, 64)):
                found = still(tuple(sorted(best.schedule[:n] + (replace(p, at=at),)
                                           + best.schedule[n + 1:])))
                if found is not None:
                    best = found
                    break
        return best


def digest(scenario: Scenario) -> str:
    return hashlib.sha256(scenario.text.encode()).hexdigest()


def replay_document(scenario: Scenario, vendor: Vendor, finding: Finding,
                    bugs: frozenset[str]) -> dict:
    return {
        "kvmodel_replay": REPLAY_FORMAT,
        "scenario": scenario.path,
        "scenario_sha256": digest(scenario),
        "vendor": vendor.value,
        "kvm_params": dict(scenario.kvm_params),
        "bugs": sorted(bugs),
        "finding": {"kind": finding.kind, "message": finding.message},
        "schedule": [p.to_dict() for p in finding.schedule],
    }


def write(directory: Path, scenario: Scenario, vendor: Vendor, finding: Finding,
          bugs: frozenset[str]) -> Path:
    doc = replay_document(scenario, vendor, finding, bugs)
    text = json.dumps(doc, indent=1, sort_keys=True)
    name = f"{Path(scenario.path).stem}-{vendor.value}-{finding.kind}-"
    name += hashlib.sha256(text.encode()).hexdigest()[:8] + ".json"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text + "\n")
    return path


@dataclass(frozen=True, slots=True)
class Replay:
    document: dict
    scenario: Scenario
    vendor: Vendor
    schedule: Schedule
    bugs: frozenset[str]

    def run(self) -> Comparison:
        with _faults.switched_on(self.bugs):
            return compare(apply(self.scenario, self.schedule), self.vendor)


def read(path: str | Path) -> Replay:
    """Load a replay file; refuse it if the scenario changed since it was written."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KvmodelError(f"{path}: not a readable replay file ({e})") from None
    if doc.get("kvmodel_replay") != REPLAY_FORMAT:
        raise KvmodelError(f"{path}: not a kvmodel replay file (format {REPLAY_FORMAT})")
    scenario = load(doc["scenario"])
    if digest(scenario) != doc["scenario_sha256"]:
        raise KvmodelError(f"{path}: {doc['scenario']} has changed since this replay was written "
                           "(its SHA-256 differs); explore it again to get a fresh counterexample")
    schedule = tuple(sorted(from_dict(d) for d in doc["schedule"]))
    return Replay(doc, scenario, Vendor(doc["vendor"]), schedule, frozenset(doc.get("bugs", ())))
