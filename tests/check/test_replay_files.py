"""Replay files are validated like scenarios: tampered, truncated or mismatched is exit 2 with
the reason; a replay finds its scenario from any working directory."""

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmodel.check.explore import Finding
from kvmodel.check.replay import read, write
from kvmodel.check.schedule import Kind, place
from kvmodel.cli import Exit, main
from kvmodel.errors import KvmodelError
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load

ROOT = Path(__file__).parents[2]
EXPLORE = ROOT / "scenarios" / "virt" / "explore_nmi_with_host_faults.toml"


@pytest.fixture
def replay(tmp_path) -> Path:
    copy = tmp_path / "scenarios" / "explore.toml"
    copy.parent.mkdir()
    shutil.copy(EXPLORE, copy)
    schedule = (place(Kind.NMI, 3), place(Kind.HOST_FAULT, 0, 0x1000))
    return write(tmp_path / "out", load(copy), Vendor.SVM,
                 Finding("divergence", tuple(sorted(schedule)), "m"), frozenset({"no_reinjection"}))


def _tampered(path: Path, change) -> Path:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


def _set(key, value):
    return lambda doc: doc.__setitem__(key, value)


def _entry(n, key, value):
    return lambda doc: doc["schedule"][n].__setitem__(key, value)


TAMPERED = [
    ("unknown bug", _set("bugs", ["no_such_bug"]), "no catalogued bug named 'no_such_bug'"),
    ("vendor bare", _set("vendor", "bare"), "vendor 'bare': a replay runs under KVM"),
    ("vendor number", _set("vendor", 3), "vendor must be text"),
    ("negative placement", _entry(0, "after", -1), "schedule entry 1: after = -1 is not a number"),
    ("huge placement", _entry(0, "after", 1 << 70), "schedule entry 1: after = "),
    ("bool placement", _entry(0, "after", True), "schedule entry 1: after = True"),
    ("vector out of range", lambda d: d["schedule"].append(
        {"event": "interrupt", "after": 1, "vector": 300}), "vector = 300 is not a number in 16..255"),
    ("exception vector", lambda d: d["schedule"].append(
        {"event": "interrupt", "after": 1, "vector": 14}), "vector = 14 is not a number in 16..255"),
    ("page outside memory", _entry(1, "page", 1 << 40), "schedule entry 2: page = "),
    ("unaligned page", _entry(1, "page", 0x1001), "page 0x1001 is not page-aligned"),
    ("unknown event", _entry(0, "event", "smi"), "schedule entry 1: needs event = one of"),
    ("missing field", lambda d: d["schedule"][0].pop("after"), "a nmi has after, got nothing"),
    ("extra field", _entry(0, "vector", 2), "a nmi has after, got after, vector"),
    ("unknown vmm call", lambda d: d["schedule"].append(
        {"event": "vmm", "exit": 1, "call": "KVM_HACK"}), "unknown VMM call 'KVM_HACK'"),
    ("schedule not a list", _set("schedule", {"a": 1}), "schedule must be a list"),
    ("unknown finding kind", lambda d: d["finding"].__setitem__("kind", "boom"),
     "unknown finding kind 'boom'"),
    ("finding not a table", _set("finding", 5), "finding must be"),
    ("missing key", lambda d: d.pop("vendor"), "'vendor' is missing"),
    ("unknown key", _set("extra", 1), "unknown key 'extra'"),
    ("bad hash", _set("scenario_sha256", "zz"), "scenario_sha256 is not a SHA-256"),
    ("other params", _set("kvm_params", {"nrips": False}), "kvm_params {'nrips': False} are not"),
    ("scenario gone", lambda d: [d.__setitem__(k, "/nonexistent/x.toml") for k in (
        "scenario", "scenario_absolute", "scenario_from_replay")], "its scenario is not there"),
    ("format", _set("kvmodel_replay", 2), "not a kvmodel replay file"),
    ("not an object", lambda d: None, None),
]


@pytest.mark.parametrize(("change", "reason"), [t[1:] for t in TAMPERED], ids=[t[0] for t in TAMPERED])
def test_a_tampered_replay_is_bad_input_with_the_reason(replay, capsys, change, reason):
    if reason is None:
        replay.write_text("[1, 2]")
        reason = "not a kvmodel replay file"
    else:
        _tampered(replay, change)
    assert main(["replay", str(replay)]) == Exit.BAD_INPUT
    out, err = capsys.readouterr()
    assert out == "" and reason in err.replace("\n", " "), err
    assert str(replay) in err.replace("\n", "")


@pytest.mark.parametrize("cut", [0, 1, 40, -2])
def test_a_truncated_replay_is_bad_input(replay, capsys, cut):
    text = replay.read_text()
    replay.write_bytes(text[:cut].encode() if cut >= 0 else text[:cut].encode() + b"\xff")
    assert main(["replay", str(replay)]) == Exit.BAD_INPUT
    assert "not a readable replay file" in capsys.readouterr().err or cut == 0


def test_a_replay_of_a_changed_scenario_is_refused(replay, tmp_path, capsys):
    scenario = tmp_path / "scenarios" / "explore.toml"
    scenario.write_text(scenario.read_text().replace("nop", "nop\n    nop", 1))
    assert main(["replay", str(replay)]) == Exit.BAD_INPUT
    assert "has changed since this replay was written" in capsys.readouterr().err


def test_a_replay_runs_from_any_working_directory(replay, tmp_path, monkeypatch, capsys):
    # The pair moves together: the replay finds its scenario relative to itself.
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "scenarios", moved / "scenarios")
    shutil.copytree(tmp_path / "out", moved / "out")
    shutil.rmtree(tmp_path / "scenarios")
    monkeypatch.chdir(ROOT / "src")
    again = moved / "out" / replay.name
    assert read(again).scenario.path == str(moved / "out" / ".." / "scenarios" / "explore.toml")
    assert main(["replay", str(again)]) == Exit.FAILED  # the bug's divergence shows again
    assert "side by side" in capsys.readouterr().out


def test_a_replay_written_with_a_relative_scenario_path_runs_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = write(tmp_path, load("scenarios/virt/explore_nmi_with_host_faults.toml"), Vendor.VMX,
                 Finding("divergence", (), "m"), frozenset())
    monkeypatch.chdir(tmp_path)
    assert read(path).scenario.text == EXPLORE.read_text()


def test_no_partial_file_is_left_behind(replay):
    assert [p.name for p in replay.parent.iterdir()] == [replay.name]


def test_reading_an_absent_replay_is_bad_input(tmp_path):
    with pytest.raises(KvmodelError, match="not a readable replay file"):
        read(tmp_path / "none.json")


_JSON = st.recursive(st.none() | st.booleans() | st.integers(min_value=-(1 << 80), max_value=1 << 80)
                     | st.floats(allow_nan=False) | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_PATHS = [("kvmodel_replay",), ("scenario",), ("scenario_from_replay",), ("scenario_sha256",),
          ("vendor",), ("kvm_params",), ("bugs",), ("finding",), ("finding", "kind"),
          ("finding", "message"), ("schedule",), ("schedule", 0), ("schedule", 0, "after"),
          ("schedule", 0, "event"), ("schedule", 1, "page"), ("schedule", 1)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(_PATHS), value=_JSON, drop=st.booleans())
def test_any_tampered_field_is_refused_or_replays_never_crashes(replay, where, value, drop):
    doc = json.loads(replay.read_text())
    target = doc
    for key in where[:-1]:
        target = target[key]
    if drop and isinstance(target, dict):
        target.pop(where[-1], None)
    else:
        target[where[-1]] = value
    tampered = replay.with_name("tampered.json")
    tampered.write_text(json.dumps(doc))
    try:
        loaded = read(tampered)
    except KvmodelError as e:
        assert str(tampered) in str(e)
        event("refused")
        return
    event("accepted")
    loaded.run()  # accepted: it must run
