"""The SVG timeline: columns, the divergence's marks, labels and tooltips, escaping."""

import io
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from kvmodel import _faults
from kvmodel.check.oracle import Comparison, compare, first_divergence, guest_view
from kvmodel.kvm.vcpu import Vendor
from kvmodel.report.text import print_result
from kvmodel.report.timeline import timeline_svg
from kvmodel.scenario.load import load, parse
from kvmodel.scenario.runner import run

SCENARIOS = Path(__file__).parents[3] / "scenarios"
INT3 = SCENARIOS / "virt" / "int3_code_breakpoint_host_fault.toml"
TWO_NMIS = SCENARIOS / "arch" / "two_nmis_in_mov_ss_shadow.toml"
NESTED = SCENARIOS / "nested" / "svm_l1_nmi_while_l2_runs.toml"
NS = {"s": "http://www.w3.org/2000/svg"}


def svg_of(result, note="") -> ET.Element:
    return ET.fromstring(timeline_svg(result, note))


def classes(el) -> set[str]:
    return set(el.get("class", "").split())


def find(root, cls: str) -> list[ET.Element]:
    return [el for el in root.iter() if cls in classes(el)]


def marks(root, lane: str | None = None) -> list[ET.Element]:
    return [m for m in find(root, "mark") if lane is None or m.get("data-lane") == lane]


def x_of(mark: ET.Element) -> float:
    """The centre of a mark's shape (circle, square, triangle or diamond)."""
    shape = next(el for el in mark if el.tag != f"{{{NS['s']}}}title")
    if shape.get("cx") is not None:
        return float(shape.get("cx"))
    if shape.get("x") is not None:
        return float(shape.get("x")) + float(shape.get("width")) / 2
    xs = [float(p.split(",")[0].lstrip("MLZ ")) for p in shape.get("d").split(" ") if "," in p]
    return (min(xs) + max(xs)) / 2


def column_x(root, entry: str) -> float:
    col = next(g for g in find(root, "col-guest") + find(root, "col-final")
               if g.get("data-entry") == entry)
    return float(col.find("s:line", NS).get("x1"))


def label_of(mark: ET.Element) -> str:
    return mark.find("s:text", NS).text


@pytest.fixture(scope="module")
def retry_bug():
    """The catalogued svm_retry_soft_exception: the INT3 is retried, its #DB fires twice."""
    with _faults.switched_on(frozenset({"svm_retry_soft_exception"})):
        return compare(load(INT3), Vendor.SVM)


def test_parses_as_svg_with_the_heading(retry_bug):
    root = svg_of(retry_bug)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    heading = [t.text for t in root.findall("s:text", NS)]
    assert heading[0].startswith("INT3 under a code breakpoint")
    assert any("bare metal vs under KVM on SVM" in t for t in heading)
    assert [t.text for t in find(root, "lane-title")] == [
        "bare metal", "under KVM (svm)", "KVM (L0)"]


def test_one_column_per_guest_observable_entry_of_the_longer_run(retry_bug):
    bare, virt = len(guest_view(retry_bug.bare.trace)), len(guest_view(retry_bug.virt.trace))
    assert virt > bare  # the #DB fires twice under the bug: the KVM run is the longer one
    root = svg_of(retry_bug)
    columns = [g.get("data-entry") for g in find(root, "col-guest")]
    assert columns == [str(n) for n in range(1, virt + 1)]
    assert len(find(root, "col-final")) == 1
    assert len(marks(root, "bare metal")) == bare + 1  # + how it stopped
    # entries that correspond share a column
    for n in range(1, bare + 1):
        pair = [m for m in marks(root) if m.get("data-entry") == str(n)]
        assert len(pair) == 2 and x_of(pair[0]) == x_of(pair[1]) == column_x(root, str(n))


def test_hypervisor_records_sit_between_guest_columns(retry_bug):
    root = svg_of(retry_bug)
    guest = {column_x(root, g.get("data-entry")) for g in find(root, "col-guest")}
    l0 = marks(root, "KVM (L0)")
    assert [label_of(m) for m in l0] == ["exit EXCP_1", "inject #DB", "exit NPF (vectoring #BP)",
                                         "exit EXCP_1", "inject #DB", "exit HLT"]
    assert not guest & {x_of(m) for m in l0}
    npf = next(m for m in l0 if "NPF" in label_of(m))
    assert column_x(root, "2") < x_of(npf) < column_x(root, "3")


def test_no_two_marks_of_a_lane_share_a_column(retry_bug):
    root = svg_of(retry_bug)
    spots = [(m.get("data-lane"), x_of(m)) for m in marks(root)]
    assert len(spots) == len(set(spots))


def test_undeclared_divergence_is_marked_in_its_column(retry_bug):
    assert retry_bug.divergence.index == 2 and not retry_bug.divergence_expected
    root = svg_of(retry_bug)
    [band] = find(root, "divergence")
    assert "undeclared" in classes(band) and band.get("data-entry") == "3"
    x = column_x(root, "3")
    assert float(band.get("x")) < x < float(band.get("x")) + float(band.get("width"))
    outlines = find(root, "outline")
    assert sorted(o.get("data-lane") for o in outlines) == ["bare metal", "under KVM (svm)"]
    for o in outlines:
        assert o.get("data-entry") == "3" and o.get("stroke-dasharray") == "none"
        assert float(o.get("x")) + float(o.get("width")) / 2 == x
    text = " ".join(t.text for t in root.findall("s:text", NS))
    assert "DIVERGENCE at guest-observable entry 3 (not declared)" in text
    assert re.search(r"bare metal:\s+#BP \(sw\) -> bp_handler ret after", text)
    assert re.search(r"under KVM:\s+#DB -> db_handler ret bp", text)


def test_declared_divergence_is_marked_differently():
    declared = compare(load(TWO_NMIS), Vendor.VMX)
    assert declared.divergence_expected
    undeclared_text = TWO_NMIS.read_text().split("# Under KVM both NMIs")[0]
    undeclared = compare(parse(undeclared_text, str(TWO_NMIS)), Vendor.VMX)
    assert undeclared.divergence is not None and not undeclared.divergence_expected
    looks = {}
    for name, comparison in (("declared", declared), ("undeclared", undeclared)):
        root = svg_of(comparison)
        [band] = find(root, "divergence")
        assert name in classes(band) and band.get("data-entry") == "3"
        looks[name] = (band.get("fill"), {o.get("stroke") for o in find(root, "outline")},
                       {o.get("stroke-dasharray") for o in find(root, "outline")})
    assert looks["declared"][0] != looks["undeclared"][0]
    assert looks["declared"][1].isdisjoint(looks["undeclared"][1])
    assert looks["declared"][2] == {"5,3"} and looks["undeclared"][2] == {"none"}
    text = " ".join(t.text for t in svg_of(declared).findall("s:text", NS))
    assert "KNOWN DIVERGENCE at guest-observable entry 3, declared at line" in text


def test_a_side_whose_trace_ended_gets_an_empty_outline():
    text = TWO_NMIS.read_text().split("# Under KVM both NMIs")[0]
    comparison = compare(parse(text, str(TWO_NMIS)), Vendor.VMX)
    # cut bare metal's trace before the entry where KVM delivers the second NMI
    bare = comparison.bare
    cut = guest_view(bare.trace)[2][0]
    short = replace(bare, trace=bare.trace[:cut])
    c = Comparison(short, comparison.virt, first_divergence(short, comparison.virt))
    assert c.divergence.bare is None and c.divergence.index == 2
    root = svg_of(c)
    [empty] = find(root, "empty")
    assert empty.get("data-lane") == "bare metal" and empty.get("data-entry") == "3"
    assert empty.find("s:title", NS).text == "nothing (the trace ended)"


def test_every_tooltip_is_the_text_reports_line():
    result = compare(load(NESTED), Vendor.SVM).virt
    buffer = io.StringIO()
    print_result(Console(file=buffer, width=400, soft_wrap=True, color_system=None), result)
    lines = {line.strip() for line in buffer.getvalue().splitlines()}
    root = svg_of(result)
    tips = [m.find("s:title", NS).text for m in marks(root) if "final" not in classes(m)]
    assert len(tips) == len(result.trace)
    assert all(tip in lines for tip in tips), [t for t in tips if t not in lines]
    final = next(m for m in marks(root) if "final" in classes(m))
    assert final.find("s:title", NS).text.startswith("stop: halted after 50 retired; rip=")


def test_labels_name_vectors_handlers_and_exits():
    root = svg_of(compare(load(NESTED), Vendor.SVM))
    guest = [label_of(m) for m in marks(root, "under KVM (svm)")]
    assert guest == ["NMI: to_host", "NMI -> l1_nmi_handler ret after_stgi", "IRET -> after_stgi",
                     "HLT", "stop: halted"]
    l0 = [label_of(m) for m in marks(root, "KVM (L0)")]
    assert "L1 VMRUN" in l0 and "nested exit NMI -> L1" in l0 and "inject NMI" in l0


def test_nested_runs_keep_one_guest_lane_and_mark_the_level_switches():
    root = svg_of(compare(load(NESTED), Vendor.SVM))
    assert len(find(root, "lane-title")) == 3
    tags = [g.find("s:text", NS).text for g in find(root, "switch")]
    # bare metal: the hardware's #VMEXIT to L1; under KVM: L1's VMRUN, then L0's nested exit
    assert tags == ["-> L1", "VMRUN", "-> L1"]
    bare_exit = next(m for m in marks(root, "bare metal") if "nested" in classes(m))
    assert label_of(bare_exit) == "exit NMI -> L1"


def test_a_bare_run_has_one_lane_and_no_divergence():
    result = run(load(TWO_NMIS), vendor=Vendor.BARE)
    root = svg_of(result)
    assert [t.text for t in find(root, "lane-title")] == ["bare metal"]
    assert not find(root, "divergence") and not find(root, "outline")
    assert len(find(root, "col-guest")) == len(guest_view(result.trace))
    assert "PASS every expectation holds" in [t.text for t in root.findall("s:text", NS)]


def test_text_is_escaped(tmp_path):
    text = ('title = "a <b> & \\"c\\" \'d\'"\n[guest]\ncode = \'\'\'\nstart:\n'
            " mov $0xe9, %dx\n mov $'<', %al\n out %al, %dx\n mov $'&', %al\n out %al, %dx\n"
            " hlt\n'''\n")
    scenario = parse(text, str(tmp_path / "amp&<.toml"))
    source = timeline_svg(run(scenario, vendor=Vendor.BARE), note="note <&>")
    assert "a &lt;b&gt; &amp;" in source and "out '&lt;'" in source and "out '&amp;'" in source
    assert "<b>" not in source
    root = ET.fromstring(source)
    assert root.find("s:title", NS).text == "a <b> & \"c\" 'd'"
    assert [label_of(m) for m in marks(root) if "output" in classes(m)] == ["out '<'", "out '&'"]
    texts = [t.text for t in root.findall("s:text", NS)]
    assert "note <&>" in texts and any(str(tmp_path / "amp&<.toml") in t for t in texts)


@pytest.mark.parametrize("vendor", [Vendor.SVM, Vendor.VMX], ids=lambda v: v.value)
def test_every_shipped_scenario_draws(vendor):
    """Each record kind the model traces has a label; columns and divergence as the oracle says."""
    for path in sorted(SCENARIOS.glob("*/*.toml")):
        c = compare(load(path), vendor)
        root = svg_of(c)
        if c.virt is None:
            assert [t.text for t in find(root, "lane-title")] == ["bare metal"], path
            continue
        longer = max(len(guest_view(c.bare.trace)), len(guest_view(c.virt.trace)))
        assert len(find(root, "col-guest")) == longer, path
        assert len(marks(root)) == len(c.bare.trace) + len(c.virt.trace) + 2 + (
            c.virt.hypervisor_error is not None), path
        bands = find(root, "divergence")
        if c.divergence is None:
            assert not bands, path
        else:
            entry = str(c.divergence.index + 1) if c.divergence.index >= 0 else "final"
            assert [b.get("data-entry") for b in bands] == [entry], path
