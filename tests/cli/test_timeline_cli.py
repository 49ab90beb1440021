"""`kvmodel run --svg` and `kvmodel replay --svg`: the picture, the exit codes, the output."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from kvmodel.cli import Exit, main

SCENARIOS = Path(__file__).parents[2] / "scenarios"
EXAMPLE = SCENARIOS / "arch" / "nmi_latched_until_iret.toml"
INT3 = SCENARIOS / "virt" / "int3_code_breakpoint_host_fault.toml"
NS = {"s": "http://www.w3.org/2000/svg"}


def picture(path: Path) -> ET.Element:
    return ET.fromstring(path.read_text())


def with_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [el for el in root.iter() if cls in el.get("class", "").split()]


def test_run_svg_writes_the_comparison_and_changes_nothing_else(tmp_path, capsys):
    svg = tmp_path / "t.svg"
    args = ["run", "--vendor", "svm", str(EXAMPLE)]
    assert main(args) == Exit.OK
    plain = capsys.readouterr().out
    assert main([*args, "--svg", str(svg)]) == Exit.OK
    assert capsys.readouterr().out == plain + f"timeline written to {svg}\n"
    root = picture(svg)
    assert [t.text for t in with_class(root, "lane-title")] == [
        "bare metal", "under KVM (svm)", "KVM (L0)"]
    assert root.find("s:title", NS).text.startswith("An NMI arriving inside the NMI handler")
    delivered = [m for m in with_class(root, "mark") if "nmi" in m.get("class").split()]
    assert len(delivered) == 4  # two NMIs, on bare metal and under KVM


def test_run_svg_of_a_bare_run_has_the_bare_lane_only(tmp_path, capsys):
    svg = tmp_path / "bare.svg"
    assert main(["run", "--vendor", "bare", "--svg", str(svg), str(EXAMPLE)]) == Exit.OK
    assert [t.text for t in with_class(picture(svg), "lane-title")] == ["bare metal"]


def test_run_svg_refuses_two_scenarios(tmp_path, capsys):
    svg = tmp_path / "two.svg"
    code = main(["run", "--svg", str(svg), str(EXAMPLE), str(INT3)])
    assert code == Exit.BAD_INPUT
    assert "error: --svg draws one scenario; 2 were given" in capsys.readouterr().err
    assert not svg.exists()


def test_run_svg_with_json_keeps_stdout_one_document(tmp_path, capsys):
    svg = tmp_path / "j.svg"
    assert main(["run", "--json", "--vendor", "vmx", "--svg", str(svg), str(EXAMPLE)]) == Exit.OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["vendor"] == "vmx"
    assert "under KVM (vmx)" in [t.text for t in with_class(picture(svg), "lane-title")]


def test_unwritable_svg_is_bad_input(tmp_path, capsys):
    code = main(["run", "--svg", str(tmp_path / "missing" / "t.svg"), str(EXAMPLE)])
    assert code == Exit.BAD_INPUT
    assert "cannot write the timeline to" in capsys.readouterr().err


def test_replay_svg_marks_the_catalogued_bugs_divergence(tmp_path, capsys):
    code = main(["explore", "--bug", "svm_retry_soft_exception", "--vendor", "svm",
                 "--out", str(tmp_path), str(INT3)])
    assert code == Exit.FAILED
    [replay] = sorted(tmp_path.glob("*.json"))
    capsys.readouterr()
    svg = tmp_path / "replay.svg"
    assert main(["replay", "--svg", str(svg), str(replay)]) == Exit.FAILED
    assert f"timeline written to {svg}" in capsys.readouterr().out
    root = picture(svg)
    [band] = with_class(root, "divergence")
    assert "undeclared" in band.get("class").split() and band.get("data-entry") == "3"
    outlined = {o.get("data-lane") for o in with_class(root, "outline")}
    assert outlined == {"bare metal", "under KVM (svm)"}
    texts = [t.text for t in root.findall("s:text", NS)]
    assert any("schedule no happenings, bugs: svm_retry_soft_exception" in t for t in texts)
