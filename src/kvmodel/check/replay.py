"""Counterexamples: shrinking a finding, and replay files that re-run it exactly.

Shrinking removes happenings while the finding (same kind) persists, then
moves each remaining one as early as it can go: the fewest happenings and
the shortest guest prefix that still show it. A replay file (JSON) names the
scenario by path (as given, and relative to the replay file, so it replays
from any working directory) and SHA-256 of its text, the vendor, the KVM
module parameters and bugs switched on, and the exact schedule. Reading one
validates it as strictly as a scenario: anything tampered, truncated or
mismatched is a KvmodelError naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from kvmodel import _faults
from kvmodel.check.explore import FINDING_KINDS, Finding, Runner
from kvmodel.check.oracle import Comparison, compare
from kvmodel.check.schedule import Kind, Placement, Schedule, apply, place
from kvmodel.errors import KvmodelError
from kvmodel.guest.layout import PAGE
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load
from kvmodel.scenario.schema import MAX_STEPS, Scenario
from kvmodel.scenario.vmm import CHOICE_NAMES

REPLAY_FORMAT = 1


def shrink(scenario: Scenario, vendor: Vendor, finding: Finding,
           bugs: frozenset[str] = frozenset(), from_reset: bool = False) -> Finding:
    """The smallest schedule, earliest placements, that still shows a finding of this kind
    (`from_reset`: as explore()'s)."""
    with _faults.switched_on(bugs):
        runner = Runner(scenario, vendor, from_reset=from_reset)

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
        "scenario_absolute": str(Path(scenario.path).resolve()),
        "scenario_sha256": digest(scenario),
        "vendor": vendor.value,
        "kvm_params": dict(scenario.kvm_params),
        "bugs": sorted(bugs),
        "finding": {"kind": finding.kind, "message": finding.message},
        "schedule": [p.to_dict() for p in finding.schedule],
    }


def write(directory: Path, scenario: Scenario, vendor: Vendor, finding: Finding,
          bugs: frozenset[str]) -> Path:
    """Written whole or not at all (a temporary file renamed), so an interrupted run never
    leaves a truncated replay behind."""
    directory.mkdir(parents=True, exist_ok=True)
    doc = replay_document(scenario, vendor, finding, bugs)
    # Relative to the replay's folder: the pair can move together, or be replayed from anywhere.
    doc["scenario_from_replay"] = os.path.relpath(Path(scenario.path).resolve(), directory.resolve())
    text = json.dumps(doc, indent=1, sort_keys=True)
    name = f"{Path(scenario.path).stem}-{vendor.value}-{finding.kind}-"
    name += hashlib.sha256(text.encode()).hexdigest()[:8] + ".json"
    path = directory / name
    partial = directory / f".{name}.partial"
    partial.write_text(text + "\n")
    partial.replace(path)
    return path


@dataclass(frozen=True, slots=True)
class Replay:
    document: dict
    scenario: Scenario
    vendor: Vendor
    schedule: Schedule
    bugs: frozenset[str]

    @property
    def finding_kind(self) -> str:
        return self.document["finding"]["kind"]

    def run(self) -> Comparison:
        with _faults.switched_on(self.bugs):
            return compare(apply(self.scenario, self.schedule), self.vendor)


_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYS = {"kvmodel_replay", "scenario", "scenario_absolute", "scenario_from_replay",
         "scenario_sha256", "vendor", "kvm_params", "bugs", "finding", "schedule"}


def read(path: str | Path) -> Replay:
    """Load and validate a replay file; refuse it if the scenario changed since it was written.

    Bug names are checked by the caller (the catalogue lives in a layer above)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise KvmodelError(f"{path}: not a readable replay file ({e})") from None
    if not isinstance(doc, dict) or doc.get("kvmodel_replay") != REPLAY_FORMAT:
        raise KvmodelError(f"{path}: not a kvmodel replay file (format {REPLAY_FORMAT})")
    try:
        return _validated(path, doc)
    except _Bad as e:
        raise KvmodelError(f"{path}: {e}") from None


class _Bad(Exception):
    """What is wrong with a replay document (read() adds the file name)."""


def _validated(path: Path, doc: dict) -> Replay:
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise _Bad(f"unknown key {unknown[0]!r}")
    for key in ("scenario", "scenario_sha256", "vendor", "finding", "schedule"):
        if key not in doc:
            raise _Bad(f"{key!r} is missing")
    sha = _text(doc, "scenario_sha256")
    if not _HEX64.fullmatch(sha):
        raise _Bad("scenario_sha256 is not a SHA-256 in hex")
    vendor = _text(doc, "vendor")
    if vendor not in (Vendor.SVM.value, Vendor.VMX.value):
        raise _Bad(f"vendor {vendor!r}: a replay runs under KVM, on \"svm\" or \"vmx\"")
    finding = doc["finding"]
    if not isinstance(finding, dict) or set(finding) != {"kind", "message"}:
        raise _Bad("finding must be {\"kind\": ..., \"message\": ...}")
    if not isinstance(finding["kind"], str) or finding["kind"] not in FINDING_KINDS:
        raise _Bad(f"unknown finding kind {finding['kind']!r}; known: {', '.join(FINDING_KINDS)}")
    if not isinstance(finding["message"], str):
        raise _Bad("finding message must be text")
    bugs = doc.get("bugs", [])
    if not isinstance(bugs, list) or not all(isinstance(b, str) for b in bugs):
        raise _Bad("bugs must be a list of bug names")
    if not isinstance(doc["schedule"], list):
        raise _Bad("schedule must be a list of happenings")
    scenario = load(_scenario_path(path, doc))
    if digest(scenario) != sha:
        raise _Bad(f"{scenario.path} has changed since this replay was written (its SHA-256 "
                   "differs); explore it again to get a fresh counterexample")
    params = doc.get("kvm_params", dict(scenario.kvm_params))
    if params != dict(scenario.kvm_params):
        raise _Bad(f"kvm_params {params!r} are not the scenario's ({dict(scenario.kvm_params)!r})")
    schedule = tuple(sorted(_placement(n + 1, d, scenario) for n, d in enumerate(doc["schedule"])))
    return Replay(doc, scenario, Vendor(vendor), schedule, frozenset(bugs))


def _text(doc: dict, key: str) -> str:
    value = doc[key]
    if not isinstance(value, str):
        raise _Bad(f"{key} must be text, not {type(value).__name__}")
    return value


def _scenario_path(path: Path, doc: dict) -> Path:
    """Beside the replay file first (where `write` put the relative path), then as given
    (absolute, or from the working directory), then the absolute path at writing time."""
    tried = []
    for key, base in (("scenario_from_replay", path.parent), ("scenario", None),
                      ("scenario_absolute", None)):
        if key not in doc:
            continue
        name = _text(doc, key)
        candidate = Path(name) if base is None else base / name
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    raise _Bad(f"its scenario is not there any more (tried {', '.join(tried)})")


_FIELDS = {Kind.HOST_FAULT: {"page"}, Kind.SAVE_RESTORE: {"exit"}, Kind.VMM: {"exit", "call"},
           Kind.INTERRUPT: {"after", "vector"}}


def _placement(n: int, d: object, scenario: Scenario) -> Placement:
    """One schedule entry, with the same fields and ranges Placement.to_dict() writes."""
    where = f"schedule entry {n}"
    if not isinstance(d, dict) or not isinstance(d.get("event"), str) or d["event"] not in (
            k.value for k in Kind):
        raise _Bad(f"{where}: needs event = one of {', '.join(k.value for k in Kind)}")
    kind = Kind(d["event"])
    fields = _FIELDS.get(kind, {"after"})
    if set(d) != fields | {"event"}:
        raise _Bad(f"{where}: a {kind.value} has {', '.join(sorted(fields))}, got "
                   f"{', '.join(sorted(set(d) - {'event'})) or 'nothing'}")

    def number(key: str, low: int, high: int) -> int:
        value = d[key]
        if type(value) is not int or not low <= value <= high:
            raise _Bad(f"{where}: {key} = {value!r} is not a number in {low}..{high:,}")
        return value

    if kind is Kind.HOST_FAULT:
        page = number("page", 0, scenario.memory_size - 1)
        if page % PAGE:
            raise _Bad(f"{where}: page {page:#x} is not page-aligned")
        return place(kind, 0, page)
    if kind is Kind.VMM:
        if not isinstance(d["call"], str) or d["call"] not in CHOICE_NAMES:
            raise _Bad(f"{where}: unknown VMM call {d['call']!r}; known: {', '.join(CHOICE_NAMES)}")
        return place(kind, number("exit", 0, MAX_STEPS), CHOICE_NAMES.index(d["call"]))
    if kind is Kind.SAVE_RESTORE:
        return place(kind, number("exit", 0, MAX_STEPS))
    # As a scenario's [explore] interrupts: 16-255 (SDM 10.5.2, the APIC's illegal vectors).
    vector = number("vector", 16, 255) if kind is Kind.INTERRUPT else 0
    return place(kind, number("after", 0, MAX_STEPS), vector)
