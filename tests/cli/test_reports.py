"""Reports never crash: every way a run can stop has a text, JSON and SVG rendering, in `run`
and in `replay`; what a scenario or replay file says is printed as text, never as markup;
errors go to stderr."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from kvmodel.check.explore import Finding
from kvmodel.check.replay import write
from kvmodel.cli import Exit, main
from kvmodel.kvm.vcpu import Vendor
from kvmodel.report.json import json_schema
from kvmodel.report.text import MISMATCHES_SHOWN, TRACE_HEAD, TRACE_TAIL
from kvmodel.scenario.load import load

SCENARIOS = Path(__file__).parents[2] / "scenarios"
EXAMPLE = SCENARIOS / "arch" / "nmi_latched_until_iret.toml"
MARKUP = "[link=http://x]a[/link] [blink]b[/blink]"

CMC = """title = "cmc is outside the instruction subset"
[guest]
code = '''
start:
    cmc
    hlt
'''
"""
VMGEXIT = """title = "VMGEXIT outside SEV-ES: #UD on bare metal and VMX, a model limit on SVM"
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


def _undeclared_divergence(tmp_path: Path) -> Path:
    source = SCENARIOS / "arch" / "two_nmis_in_mov_ss_shadow.toml"
    copy = tmp_path / "two_nmis.toml"
    copy.write_text(source.read_text().split("# Under KVM both NMIs")[0])
    return copy


def _written(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# (id, vendor, scenario (a path, or a function of tmp_path), extra args, exit code, a line the
# text report prints, the JSON field that says it)
STOPS = [
    ("halted", "svm", EXAMPLE, [], Exit.OK, "SAME AS BARE METAL", ("final", "stop", "halted")),
    ("shutdown", "svm", SCENARIOS / "arch" / "triple_fault_without_idt_entries.toml", [], Exit.OK,
     "triple fault", ("final", "stop", "shutdown")),
    ("budget", "svm", EXAMPLE, ["--max-steps", "3"], Exit.FAILED, "stop: budget after",
     ("final", "stop", "budget")),
    ("budget_bare", "bare", EXAMPLE, ["--max-steps", "3"], Exit.FAILED, "stop: budget after",
     ("final", "stop", "budget")),
    ("vmm_stop", "vmx", SCENARIOS / "notify" / "storm_stops_vmm.toml", [], Exit.OK,
     "the VMM stops the VM", ("final", "stop", "vmm")),
    ("model_limit_bare", "bare", lambda t: _written(t, "cmc.toml", CMC), [], Exit.BAD_INPUT,
     "MODEL LIMIT instruction outside", ("verdict", "model_limit", "instruction outside the "
                                         "modelled subset: 'cmc' at 0x10000")),
    ("model_limit_both", "svm", lambda t: _written(t, "cmc.toml", CMC), [], Exit.BAD_INPUT,
     "nothing to compare with", ("verdict", "model_limit", "instruction outside the modelled "
                                 "subset: 'cmc' at 0x10000")),
    ("model_limit_kvm", "svm", lambda t: _written(t, "vmgexit.toml", VMGEXIT), [], Exit.BAD_INPUT,
     "NOT COMPARED", ("final", None, None)),
    ("hypervisor_error", "vmx", SCENARIOS / "notify" / "db_storm_notify_exits.toml",
     ["--bug", "notify_kills_guest"], Exit.FAILED, "HYPERVISOR ERROR KVM_RUN returned",
     ("final", None, None)),
    ("not_applicable", "svm", SCENARIOS / "fred" / "triple_fault_on_missing_stack.toml", [], Exit.OK,
     "NOT APPLICABLE", ("comparison", "not_applicable", "[fred]: KVM runs FRED guests on VMX only "
                        "(the model has no SVM FRED)")),
    ("divergence", "vmx", _undeclared_divergence, [], Exit.FAILED, "DIVERGENCE at guest-observable "
     "entry 3", ("comparison", "passed", False)),
    ("declared_divergence", "vmx", SCENARIOS / "arch" / "two_nmis_in_mov_ss_shadow.toml", [], Exit.OK,
     "KNOWN DIVERGENCE", ("comparison", "passed", True)),
]


def valid(doc: dict, command: str) -> dict:
    """The document as its shipped JSON Schema says (kvmodel/report/schemas/)."""
    Draft202012Validator(json_schema(command)).validate(doc)
    return doc


def _path(tmp_path: Path, scenario) -> Path:
    return scenario(tmp_path) if callable(scenario) else scenario


def _field(doc: dict, where: tuple) -> object:
    top, key, _ = where
    return doc[top] if key is None else doc[top][key]


@pytest.mark.parametrize(("vendor", "scenario", "extra", "code", "line", "field"),
                         [s[1:] for s in STOPS], ids=[s[0] for s in STOPS])
def test_run_renders_every_stop_as_text_json_and_svg(tmp_path, capsys, vendor, scenario, extra,
                                                     code, line, field):
    path = str(_path(tmp_path, scenario))
    args = ["run", "--vendor", vendor, *extra, path]
    assert main(args) == code
    out, err = capsys.readouterr()
    assert line in out and err == ""
    assert main([*args[:1], "--json", *args[1:]]) == code
    result, = valid(json.loads(capsys.readouterr().out), "run")["results"]
    assert _field(result, field) == field[2]
    svg = tmp_path / "run.svg"
    assert main([*args[:1], "--svg", str(svg), *args[1:]]) == code
    ET.fromstring(svg.read_text())  # well-formed


@pytest.mark.parametrize(("vendor", "scenario", "extra", "code", "line", "field"),
                         [s[1:] for s in STOPS if s[1] != "bare"],
                         ids=[s[0] for s in STOPS if s[1] != "bare"])
def test_replay_renders_every_stop_as_text_json_and_svg(tmp_path, capsys, vendor, scenario, extra,
                                                        code, line, field):
    path = _path(tmp_path, scenario)
    if "--max-steps" in extra:  # a replay has no step override: the scenario's own budget
        path = _written(tmp_path, "short.toml", "max_steps = 3\n" + path.read_text())
    bugs = frozenset(extra[1:2]) if "--bug" in extra else frozenset()
    replay = write(tmp_path / "out", load(path), Vendor(vendor),
                   Finding("divergence", (), "as a test writes it"), bugs)
    expected = Exit.BAD_INPUT if code == Exit.BAD_INPUT or "not_applicable" in field else (
        Exit.OK if code == Exit.OK else Exit.FAILED)
    assert main(["replay", str(replay)]) == expected
    out, err = capsys.readouterr()
    assert line in out and "side by side" in out or "NOT APPLICABLE" in out
    assert err == ""
    assert main(["replay", "--json", str(replay)]) == expected
    doc = valid(json.loads(capsys.readouterr().out), "run")
    assert doc["replay"]["vendor"] == vendor and doc["replay"]["bugs"] == sorted(bugs)
    assert _field(doc["results"][0], field) == field[2]
    svg = tmp_path / "replay.svg"
    assert main(["replay", "--svg", str(svg), str(replay)]) == expected
    ET.fromstring(svg.read_text())


def test_scenario_text_is_printed_never_read_as_markup(tmp_path, capsys):
    head, body = EXAMPLE.read_text().split("\n[guest]", 1)
    assert head.startswith("title = ") and "cite = " in head
    marked = _written(tmp_path, "marked.toml", f'title = "{MARKUP}"\ncite = "{MARKUP}"\n[guest]'
                      + body)
    assert main(["run", "--vendor", "svm", str(marked)]) == Exit.OK
    out = capsys.readouterr().out
    assert f"{MARKUP} under KVM on SVM  ({MARKUP})" in out


def test_replay_text_is_printed_never_read_as_markup(tmp_path, capsys):
    scenario = load(EXAMPLE)
    replay = write(tmp_path, scenario, Vendor.SVM, Finding("divergence", (), MARKUP), frozenset())
    doc = json.loads(replay.read_text())
    doc["scenario"] = str(EXAMPLE)
    replay.write_text(json.dumps(doc))
    assert main(["replay", str(replay)]) == Exit.OK
    assert f"replaying {replay}" in capsys.readouterr().out
    doc["finding"]["kind"] = MARKUP  # refused; the refusal quotes it as text
    replay.write_text(json.dumps(doc))
    assert main(["replay", str(replay)]) == Exit.BAD_INPUT
    out, err = capsys.readouterr()
    assert out == "" and MARKUP in err.replace("\n", "")


def test_errors_go_to_stderr(tmp_path, capsys):
    bad = _written(tmp_path, "bad.toml", "title = 5 5\n")
    assert main(["run", str(bad)]) == Exit.BAD_INPUT
    out, err = capsys.readouterr()
    assert out == "" and f"error: {bad}:1: not valid TOML" in err
    assert main(["run", "--json", str(bad), str(EXAMPLE)]) == Exit.BAD_INPUT
    doc = valid(json.loads(capsys.readouterr().out), "run")  # stdout: the document, nothing else
    assert doc["errors"][0]["path"] == str(bad) and len(doc["results"]) == 1


@pytest.mark.parametrize("command", ["run", "explore"])
def test_the_shipped_json_schemas_are_schemas_and_not_vacuous(command):
    schema = json_schema(command)
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    assert not validator.is_valid({"schema_version": 1})
    assert not validator.is_valid({})


def test_a_long_run_shows_the_head_and_tail_of_its_trace_and_json_keeps_all(tmp_path, capsys):
    """A guest looping through #BP 3,000 times: the text shows TRACE_HEAD + TRACE_TAIL trace
    lines around one elision line and the first mismatches; --json has every entry."""
    looping = _written(tmp_path, "looping.toml", '''title = "3,000 INT3s"
[guest]
code = """
start:
    mov $3000, %ecx
again:
    int3
    loop again
    hlt
bp_handler:
    iretq
"""
[idt]
"#BP" = "bp_handler"
[expect]
delivery = []
''')
    assert main(["run", "--vendor", "bare", str(looping)]) == Exit.FAILED
    out = capsys.readouterr().out
    shown = [line for line in out.splitlines()
             if any(what in line for what in ("#BP delivered", "IRET ->", "HLT: halted"))]
    assert len(shown) == TRACE_HEAD + TRACE_TAIL
    assert "... 3,801 trace entries not shown (--json has them all) ..." in out
    assert out.count("unexpected #BP") == MISMATCHES_SHOWN
    assert f"and {3000 - MISMATCHES_SHOWN:,} more mismatches (--json has them all)" in out
    assert main(["run", "--vendor", "bare", "--json", str(looping)]) == Exit.FAILED
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert len(result["trace"]) == 6001 and len(result["verdict"]["mismatches"]) == 3000
