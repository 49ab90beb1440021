"""The picture: one run, or bare metal beside KVM, as a timeline in a self-contained SVG.

Lanes are rows, time runs left to right in columns. A comparison has three
lanes: "bare metal" (the guest on the oracle), "under KVM (svm|vmx)" (the
same guest under the KVM model) and "KVM (L0)" (VM exits, injections and
re-injections, save/restores, nested VM exits to L1, the VMM stopping the
VM, host interrupts and NMIs). A single run has its guest lane, plus the L0
lane when it ran under KVM.

Columns. The n-th entry of `check.oracle.guest_view()` of both runs shares
one *guest column* (numbered n + 1, as in the text report), so the two
guest lanes line up entry by entry. What is not guest-observable sits in
*gap columns* between two guest columns, one record per column, in trace
order: the hypervisor's records in the L0 lane, arrivals of NMIs and
interrupts in their run's guest lane. A gap is as wide as the longer of the
two runs' gaps there, so the width KVM's records take is the host time it
added. A last column shows how each run stopped (and is the divergence's
column when the final state differs).

The first divergence (`Comparison.divergence`) gets its column shaded and
both sides' marks outlined (a dashed box where a trace had ended), with a
caption naming both sides; an undeclared one in red, solid, one the
scenario declares (`[[expect.divergence]]`) in amber, dashed.

Every mark has a short label (rotated, so neighbouring labels never
overlap) and a `<title>` tooltip with the line `report/text.py` prints for
that record. Text is escaped with `xml.sax.saxutils`.

L1 and L2 (nested runs) share one guest lane, with the level switches
marked; the lane is not split. The trace cannot tell the levels apart
robustly: every exit to L1 is recorded (under KVM a `NestedExitRecord`; on
bare metal the hardware model's `ExitRecord`, the only kind of exit there),
but no entry into L2 is. Under KVM, L1's VMRUN/VMLAUNCH/VMRESUME shows as
L0's VM exit for that instruction, and whether L2 then ran (or the entry
failed with VMfail, #GP or a consistency check) leaves no record of its
own; on bare metal the entry shows at most as a retired instruction. So the
L0 lane shows "L1 VMRUN" (or VMLAUNCH, VMRESUME) at each entry instruction
and the exits to L1 in their own colour, and a dashed line drops through
the guest's mark row at each, tagged "VMRUN" or "-> L1"; the handler labels
(`l1_*`, `l2_*` by convention) tell the rest.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from rich.text import Text

from kvmodel.arch.events import EventType, vector_name
from kvmodel.arch.observe import NO_VECTOR, Arrival, Delivery, Halt, Iret, Output, Retire, Shutdown
from kvmodel.arch.regs import describe_rflags
from kvmodel.check.oracle import GUEST_OBSERVABLE, Comparison, Divergence
from kvmodel.hw.base import ExitRecord
from kvmodel.kvm.migrate import SaveRestoreRecord
from kvmodel.kvm.vcpu import Vendor
from kvmodel.kvm.x86 import InjectRecord, NestedExitRecord
from kvmodel.report.text import arrival_text, line_for
from kvmodel.scenario.runner import RunResult
from kvmodel.scenario.session import VmmStop
from kvmodel.scenario.vmm import VmmRecord

COL_W = 24  # px per column; rotated labels need COL_W * sin(ANGLE) > the font's height
ANGLE = 60  # label rotation, degrees above the horizontal
LABEL_CHARS = 40  # longer labels are cut (the tooltip has the whole line)
LEFT = 160  # lane titles
RIGHT = 130  # room for the last column's rotated label
LABEL_H = 215  # per lane: the rotated labels
ROW_H = 44  # per lane: the marks, and the level-switch tags under them (two staggered rows)
LANE_H = LABEL_H + ROW_H
MIN_WIDTH = 900
LEGEND_W = 170
_CHAR_W = {"title": 9, "sub": 7, "note": 7, "same": 8, "bad": 8, "known": 8}  # px, rounded up

COLOURS = {  # kind -> (fill, legend text)
    "ext_int": ("#1f77b4", "interrupt"),
    "nmi": ("#d62728", "NMI"),
    "hw_exception": ("#ff7f0e", "exception"),
    "sw_int": ("#2ca02c", "INT n"),
    "priv_sw_exception": ("#17becf", "INT1"),
    "sw_exception": ("#9467bd", "INT3 / INTO"),
    "iret": ("#7f7f7f", "IRET"),
    "halt": ("#222222", "HLT"),
    "shutdown": ("#8b0000", "shutdown"),
    "output": ("#8c564b", "port output"),
    "retire": ("#c7c7c7", "instruction"),
    "arrival": ("#bcbd22", "arrival (NMI, IRQ, host)"),
    "vmexit": ("#4682b4", "VM exit"),
    "inject": ("#008b8b", "KVM injects"),
    "reinject": ("#e377c2", "KVM re-injects"),
    "save_restore": ("#a05195", "save/restore"),
    "nested": ("#daa520", "L1/L2 switch"),
    "vmm_stop": ("#6a3d9a", "VMM stops the VM"),
    "vmm": ("#6a3d9a", "VMM uAPI call"),
    "final": ("#555555", "how the run stopped"),
}
DIVERGENCE = {False: ("#d00000", "#fde0e0", "none", "divergence"),  # stroke, band, dash, legend
              True: ("#d08000", "#fff1c8", "5,3", "declared divergence")}
L0_LANE = "KVM (L0)"
_ENTRY_REASONS = ("VMRUN", "VMLAUNCH", "VMRESUME")
_VECTORING = re.compile(r"(?:exit_int_info|idt_vectoring) vector (\d+)")
_HOST_ARRIVALS = ("host_interrupt", "host_nmi", "notify_timer")


@dataclass(frozen=True, slots=True)
class Mark:
    """One record drawn at (lane, column)."""

    lane: int
    col: int
    kind: str  # a COLOURS key
    label: str
    tooltip: str
    entry: int | None = None  # guest-observable index, for guest entries
    switch: str | None = None  # a level-switch tag drawn across the guest lane


@dataclass(slots=True)
class _Layout:
    lanes: list[str]
    columns: list[int | None]  # per column: its guest-observable index, -1 final, None a gap
    marks: list[Mark]


def timeline_svg(result: RunResult | Comparison, note: str = "") -> str:
    """The SVG text for a run or a comparison; `note`: an extra heading line (e.g. the schedule)."""
    if isinstance(result, Comparison) and result.virt is not None:
        layout = _layout_comparison(result)
        heading = _comparison_heading(result)
    else:
        run = result.bare if isinstance(result, Comparison) else result
        layout = _layout_run(run)
        heading = _run_heading(result, run)
    if note:
        heading.insert(2, (note, "note"))
    return _Picture(layout, heading, result if isinstance(result, Comparison) else None).svg()


# -- labels ---------------------------------------------------------------------------------

def label(obs, program) -> str:
    """The short label of a trace record: "NMI -> nmi_handler ret main+0x1", "exit NPF"."""
    if isinstance(obs, Delivery):
        tag = {EventType.SW_INT: " (sw)", EventType.SW_EXCEPTION: " (sw)",
               EventType.PRIV_SW_EXCEPTION: " (int1)"}.get(obs.type, "")
        undefined = " (undefined)" if obs.return_undefined else ""
        return (f"{vector_name(obs.vector)}{tag} -> {program.where(obs.handler)} "
                f"ret {program.where(obs.return_rip)}{undefined}")
    if isinstance(obs, Iret):
        return f"IRET -> {program.where(obs.to_rip)}"
    if isinstance(obs, Halt):
        return "HLT"
    if isinstance(obs, Shutdown) and obs.first == NO_VECTOR:
        return "shutdown (set from outside)"
    if isinstance(obs, Shutdown):
        return f"shutdown ({vector_name(obs.second)} in {vector_name(obs.first)})"
    if isinstance(obs, Output):
        return f"out {chr(obs.value)!r}"
    if isinstance(obs, Retire):
        return obs.text
    if isinstance(obs, Arrival):
        return arrival_text(obs).replace(" arrives", "")
    if isinstance(obs, ExitRecord):
        if obs.reason in _ENTRY_REASONS:
            return f"L1 {obs.reason}"
        m = _VECTORING.search(obs.detail)
        vectoring = f" (vectoring {vector_name(int(m.group(1)))})" if m else ""
        return f"exit {obs.reason}{vectoring}"
    if isinstance(obs, InjectRecord):
        return f"{'re-inject' if obs.reinjected else 'inject'} {vector_name(obs.vector)}"
    if isinstance(obs, SaveRestoreRecord):
        return "save/restore"
    if isinstance(obs, NestedExitRecord):
        return f"nested exit {obs.reason} -> L1"
    if isinstance(obs, VmmStop):
        return f"VMM stops: {obs.reason}"
    if isinstance(obs, VmmRecord):
        return f"VMM {obs.call}" + (f" = {obs.result}" if obs.result else "")
    raise TypeError(f"no timeline label for {type(obs).__name__}")


def tooltip(obs, result: RunResult) -> str:
    """The line `report/text.py` prints for this record, without its markup."""
    retired, where, what = line_for(obs, result.program, result.scenario.mode)
    return f"{retired:>7}  {where:<22} {Text.from_markup(what).plain}".strip()


def _kind(obs) -> str:
    if isinstance(obs, Delivery):
        return EventType(obs.type).name.lower()
    if isinstance(obs, InjectRecord):
        return "reinject" if obs.reinjected else "inject"
    if isinstance(obs, NestedExitRecord) or (
            isinstance(obs, ExitRecord) and obs.reason in _ENTRY_REASONS):
        return "nested"
    return {Iret: "iret", Halt: "halt", Shutdown: "shutdown", Output: "output", Retire: "retire",
            Arrival: "arrival", ExitRecord: "vmexit", SaveRestoreRecord: "save_restore",
            VmmStop: "vmm_stop", VmmRecord: "vmm"}[type(obs)]


def _cut(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "\u2026"


# -- layout ---------------------------------------------------------------------------------

def _split(trace) -> tuple[list[list], list]:
    """(gaps, entries): gaps[k] holds the records before guest-observable entry k; one more
    gap after the last entry. Same selection as `oracle.guest_view()`."""
    gaps: list[list] = [[]]
    entries = []
    for obs in trace:
        if type(obs) in GUEST_OBSERVABLE:
            entries.append(obs)
            gaps.append([])
        else:
            gaps[-1].append(obs)
    return gaps, entries


def _lane_of(obs, guest: int, l0: int | None) -> int:
    """Arrivals of guest events stay in the guest lane; everything else not guest-observable is
    the hypervisor's (on bare metal, the hardware model's failed nested entries stay put)."""
    if l0 is None:
        return guest
    if isinstance(obs, Arrival) and obs.event not in _HOST_ARRIVALS:
        return guest
    return l0


def _mark(obs, result: RunResult, lane: int, col: int, entry: int | None = None) -> Mark:
    kind, text, switch = _kind(obs), label(obs, result.program), None
    if isinstance(obs, NestedExitRecord):
        switch = "-> L1"
    elif isinstance(obs, ExitRecord) and result.vendor is Vendor.BARE:
        # On the hardware model only L2 runs under a GuestMode: every exit there goes to L1
        # (VMEXIT_INVALID and VM_ENTRY_FAILED too: L1 goes on after its entry instruction).
        kind, text, switch = "nested", f"exit {obs.reason} -> L1", "-> L1"
    elif isinstance(obs, ExitRecord) and obs.reason in _ENTRY_REASONS:
        switch = obs.reason
    return Mark(lane, col, kind, _cut(text), tooltip(obs, result), entry, switch)


def _layout_comparison(c: Comparison) -> _Layout:
    bare, virt = c.bare, c.virt
    layout = _Layout(["bare metal", f"under KVM ({virt.vendor.value})", L0_LANE], [], [])
    b_gaps, b_entries = _split(bare.trace)
    v_gaps, v_entries = _split(virt.trace)
    for k in range(max(len(b_entries), len(v_entries)) + 1):
        _gap(layout, (b_gaps[k] if k < len(b_gaps) else [], bare, 0, None),
             (v_gaps[k] if k < len(v_gaps) else [], virt, 1, 2))
        if k < max(len(b_entries), len(v_entries)):
            col = len(layout.columns)
            layout.columns.append(k)
            for entries, result, lane in ((b_entries, bare, 0), (v_entries, virt, 1)):
                if k < len(entries):
                    layout.marks.append(_mark(entries[k], result, lane, col, k))
    _final(layout, ((bare, 0), (virt, 1)))
    return layout


def _layout_run(result: RunResult) -> _Layout:
    under_kvm = result.vendor is not Vendor.BARE
    lanes = [f"under KVM ({result.vendor.value})", L0_LANE] if under_kvm else ["bare metal"]
    layout = _Layout(lanes, [], [])
    gaps, entries = _split(result.trace)
    for k, gap in enumerate(gaps):
        _gap(layout, (gap, result, 0, 1 if under_kvm else None))
        if k < len(entries):
            layout.columns.append(k)
            layout.marks.append(_mark(entries[k], result, 0, len(layout.columns) - 1, k))
    _final(layout, ((result, 0),))
    return layout


def _gap(layout: _Layout, *sides) -> None:
    """Gap columns: each side's records one per column from the left; as wide as the widest."""
    start = len(layout.columns)
    width = max(len(records) for records, *_ in sides)
    layout.columns += [None] * width
    for records, result, guest, l0 in sides:
        for n, obs in enumerate(records):
            layout.marks.append(_mark(obs, result, _lane_of(obs, guest, l0), start + n))


def _final(layout: _Layout, sides) -> None:
    col = len(layout.columns)
    layout.columns.append(-1)
    for result, lane in sides:
        layout.marks.append(_final_mark(result, lane, col))
        if result.hypervisor_error is not None:
            layout.marks.append(Mark(lane + 1, col, "vmm_stop", "KVM gave up",
                                     f"HYPERVISOR ERROR {result.hypervisor_error}"))


def _final_mark(result: RunResult, lane: int, col: int) -> Mark:
    if result.final is None:
        text = f"MODEL LIMIT {result.limit}" if result.limit else "no final state"
        return Mark(lane, col, "final", "model limit", text, -1)
    f = result.final
    regs = " ".join(f"{n}={v:#x}" for n, v in f.registers if v)
    return Mark(lane, col, "final", f"stop: {f.stop}",
                f"stop: {f.stop} after {f.retired} retired; rip={result.program.where(f.rip)} "
                f"rflags={describe_rflags(f.rflags)} {regs}".strip(), -1)


# -- headings -------------------------------------------------------------------------------

def _comparison_heading(c: Comparison) -> list[tuple[str, str]]:
    s, virt = c.virt.scenario, c.virt
    lines = [(s.title, "title"),
             (f"{s.path} \u2014 bare metal vs under KVM on {virt.vendor.value.upper()}", "sub")]
    d = c.divergence
    if d is None:
        lines.append(("SAME AS BARE METAL: the guest-observable trace and final state match",
                      "same"))
    else:
        lines += _divergence_caption(c, d)
    lines += [(f"KVM WARN {w}", "bad") for w in virt.warnings]
    if virt.hypervisor_error is not None:
        lines.append((f"HYPERVISOR ERROR {virt.hypervisor_error}", "bad"))
    for r in (c.bare, virt):
        if r.limit is not None:
            lines.append((f"MODEL LIMIT ({r.vendor.value}) {r.limit}", "bad"))
    return lines


def _divergence_caption(c: Comparison, d: Divergence) -> list[tuple[str, str]]:
    where = f"guest-observable entry {d.event_index + 1}" if d.index >= 0 else "the final state"
    if c.divergence_expected:
        head = f"KNOWN DIVERGENCE at {where}, declared at line {c.known.line}: {c.known.why}"
    else:
        head = f"DIVERGENCE at {where} (not declared)"
    style = "known" if c.divergence_expected else "bad"
    return [(head, style), (f"  bare metal: {_side(d.bare, c.bare)}", style),
            (f"  under KVM:  {_side(d.virt, c.virt)}", style)]


def _side(entry, result: RunResult) -> str:
    if entry is None:
        return "nothing (the trace ended)"
    if isinstance(entry, str):
        return entry
    return label(entry, result.program)


def _run_heading(result: RunResult | Comparison, run: RunResult) -> list[tuple[str, str]]:
    s = run.scenario
    where = "bare metal" if run.vendor is Vendor.BARE else f"under KVM on {run.vendor.value.upper()}"
    lines = [(s.title, "title"), (f"{s.path} \u2014 {where}", "sub")]
    if isinstance(result, Comparison) and result.not_applicable:
        lines.append((f"NOT APPLICABLE under KVM: {result.not_applicable}", "known"))
    if run.limit is not None:
        lines.append((f"MODEL LIMIT {run.limit}", "bad"))
    elif run.passed:
        lines.append(("PASS every expectation holds", "same"))
    else:
        lines += [(f"FAIL line {m.line}: {m.message}", "bad") for m in run.mismatches]
    return lines


# -- drawing --------------------------------------------------------------------------------

_STYLE = """
text { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 10px; fill: #222; }
text.title { font-size: 15px; font-weight: bold; }
text.sub, text.note { font-size: 11px; fill: #555; }
text.same { font-size: 12px; fill: #1a7f37; font-weight: bold; }
text.bad { font-size: 12px; fill: #c00000; font-weight: bold; }
text.known { font-size: 12px; fill: #a06000; font-weight: bold; }
text.lane-title { font-size: 12px; font-weight: bold; }
text.axis { font-size: 9px; fill: #888; text-anchor: middle; }
text.switch-tag { font-size: 9px; fill: #8a6d00; }
text.divhead { font-size: 9px; font-weight: bold; text-anchor: middle; }
"""


class _Picture:
    """Geometry of one picture: heading, axis, lanes of LANE_H (labels above the marks), legend."""

    def __init__(self, layout: _Layout, heading: list[tuple[str, str]],
                 comparison: Comparison | None):
        self.layout, self.comparison = layout, comparison
        self.width = max(MIN_WIDTH, LEFT + len(layout.columns) * COL_W + RIGHT)
        self.title = heading[0][0]
        self.heading = [(part, cls) for text, cls in heading
                        for part in textwrap.wrap(text, (self.width - 24) // _CHAR_W[cls],
                                                  subsequent_indent="    ") or [""]]
        self.axis_y = 38 + 17 * len(self.heading)
        self.lanes_top = self.axis_y + 10
        self.bottom = self.lanes_top + len(layout.lanes) * LANE_H
        self.kinds = list(dict.fromkeys(m.kind for m in layout.marks))
        self.per_row = max(1, (self.width - 24) // LEGEND_W)
        self.legend_y = self.bottom + 24
        self.height = self.legend_y + 20 * ((len(self.kinds) + 1 + self.per_row) // self.per_row) + 16
        d = comparison.divergence if comparison is not None else None
        self.divergence = d
        self.div_col = (layout.columns.index(d.index) if d is not None and d.index in layout.columns
                        else None)

    def x_of(self, col: int) -> float:
        return LEFT + col * COL_W + COL_W / 2

    def lane_top(self, lane: int) -> float:
        return self.lanes_top + lane * LANE_H

    def mark_y(self, lane: int) -> float:
        return self.lane_top(lane) + LABEL_H + 12

    def svg(self) -> str:
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
               f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
               f'class="kvmodel-timeline">',
               f"<title>{escape(self.title)}</title>",
               f"<style>{_STYLE}</style>",
               f'<rect x="0" y="0" width="{self.width}" height="{self.height}" fill="#ffffff"/>']
        for n, (text, cls) in enumerate(self.heading):
            out.append(f'<text class={quoteattr(cls)} x="12" y="{22 + 17 * n}">{escape(text)}</text>')
        out += self._lanes() + self._host_time() + self._divergence_band() + self._axis()
        out += self._switches() + self._marks() + self._legend()
        out.append("</svg>")
        return "\n".join(out) + "\n"

    def _lanes(self) -> list[str]:
        out = []
        for n, name in enumerate(self.layout.lanes):
            top = self.lane_top(n)
            out.append(f'<rect class="lane" x="0" y="{top}" width="{self.width}" '
                       f'height="{LANE_H}" fill="{"#fafafa" if n % 2 == 0 else "#f2f4f7"}"/>')
            out.append(f'<text class="lane-title" x="12" y="{top + LABEL_H + 16}">{escape(name)}</text>')
        return out

    def _host_time(self) -> list[str]:
        """Runs of columns holding L0's records, shaded in the L0 lane: the host time KVM added."""
        lanes = self.layout.lanes
        if lanes[-1] != L0_LANE:
            return []
        l0 = len(lanes) - 1
        cols = sorted({m.col for m in self.layout.marks if m.lane == l0})
        return [f'<rect class="host-time" x="{LEFT + first * COL_W}" '
                f'y="{self.lane_top(l0) + LABEL_H - 4}" width="{(last - first + 1) * COL_W}" '
                f'height="{ROW_H}" fill="#dcecf8"/>' for first, last in _runs(cols)]

    def _divergence_band(self) -> list[str]:
        if self.div_col is None:
            return []
        expected = self.comparison.divergence_expected
        stroke, band, _, word = DIVERGENCE[expected]
        cls = "divergence declared" if expected else "divergence undeclared"
        entry = self.divergence.event_index + 1 if self.divergence.index >= 0 else "final"
        top = self.axis_y - 12
        return [f'<rect class="{cls}" data-entry="{entry}" x="{LEFT + self.div_col * COL_W}" '
                f'y="{top}" width="{COL_W}" height="{self.bottom - top}" fill="{band}" '
                f'stroke="{stroke}" stroke-width="1"/>',
                f'<text class="divhead" x="{self.x_of(self.div_col)}" y="{top - 2}" '
                f'fill="{stroke}">{escape(word)}</text>']

    def _axis(self) -> list[str]:
        """Guest-observable entry numbers, and a grid line down every guest column."""
        out = []
        for col, entry in enumerate(self.layout.columns):
            if entry is None:
                continue
            x = self.x_of(col)
            text = "final" if entry == -1 else str(entry + 1)
            out.append(f'<g class="{"col-final" if entry == -1 else "col-guest"}" '
                       f'data-entry="{text}"><line x1="{x}" y1="{self.lanes_top}" x2="{x}" '
                       f'y2="{self.bottom}" stroke="#e4e4e4"/>'
                       f'<text class="axis" x="{x}" y="{self.axis_y}">{text}</text></g>')
        return out

    def _switches(self) -> list[str]:
        """Level switches (nested): a dashed line down the guest's mark row (on to the L0 mark
        for L0's records), the tag under the row, staggered on two lines."""
        out, ends = [], [0.0, 0.0]
        lanes = self.layout.lanes
        for m in sorted((m for m in self.layout.marks if m.switch is not None), key=lambda m: m.col):
            x = self.x_of(m.col)
            top = self.lane_top(m.lane - 1 if lanes[m.lane] == L0_LANE else m.lane) + LABEL_H - 6
            row = 0 if x >= ends[0] else 1
            ends[row] = x + 6 * len(m.switch) + 6
            out.append(f'<g class="switch"><line x1="{x}" y1="{top}" x2="{x}" '
                       f'y2="{max(self.mark_y(m.lane), top + ROW_H - 14 + 10 * row)}" '
                       f'stroke="#daa520" stroke-dasharray="3,3"/><text class="switch-tag" '
                       f'x="{x + 2}" y="{top + ROW_H - 6 + 10 * row}">{escape(m.switch)}</text></g>')
        return out

    def _marks(self) -> list[str]:
        """Every mark; at the divergence, both guest lanes outlined (an empty box where a trace
        had ended)."""
        lanes = self.layout.lanes
        todo = set()
        if self.div_col is not None:
            todo = {lane for lane, name in enumerate(lanes) if name != L0_LANE}
        out = []
        for m in self.layout.marks:
            out.append(_draw_mark(m, self.x_of(m.col), self.mark_y(m.lane), lanes[m.lane]))
            if m.col == self.div_col and m.lane in todo:
                out.append(self._outline(m.lane, empty=False))
                todo.discard(m.lane)
        out += [self._outline(lane, empty=True) for lane in sorted(todo)]
        return out

    def _outline(self, lane: int, empty: bool) -> str:
        stroke, _, dash, _ = DIVERGENCE[self.comparison.divergence_expected]
        x, y = self.x_of(self.div_col), self.mark_y(lane)
        d = self.divergence
        entry = d.event_index + 1 if d.index >= 0 else "final"
        title = "<title>nothing (the trace ended)</title>" if empty else ""
        return (f'<rect class="outline{" empty" if empty else ""}" data-entry="{entry}" '
                f'data-lane={quoteattr(self.layout.lanes[lane])} x="{x - 10}" y="{y - 10}" '
                f'width="20" height="20" rx="3" fill="none" stroke="{stroke}" stroke-width="2.5" '
                f'stroke-dasharray="{dash}">{title}</rect>')

    def _legend(self) -> list[str]:
        items = [(k, COLOURS[k][0], COLOURS[k][1]) for k in self.kinds]
        if self.divergence is not None:
            stroke, _, _, word = DIVERGENCE[self.comparison.divergence_expected]
            items.append(("divergence", stroke, word))
        if self.layout.lanes[-1] == L0_LANE:
            items.append(("host-time", "#dcecf8", "host time (L0)"))
        out = ['<g class="legend">']
        for n, (kind, fill, text) in enumerate(items):
            x, y = 12 + (n % self.per_row) * LEGEND_W, self.legend_y + 20 * (n // self.per_row)
            out.append(f'<g class="legend-item" data-kind="{kind}"><rect x="{x}" y="{y - 9}" width="10" '
                       f'height="10" fill="{fill}"/><text x="{x + 15}" y="{y}">{escape(text)}'
                       f"</text></g>")
        out.append("</g>")
        return out


def _draw_mark(m: Mark, x: float, y: float, lane: str) -> str:
    fill = COLOURS[m.kind][0]
    if m.kind == "arrival":
        shape = (f'<path d="M{x - 6},{y + 5} L{x + 6},{y + 5} L{x},{y - 6} Z" fill="#ffffff" '
                 f'stroke="{fill}" stroke-width="2"/>')
    elif m.kind == "final":
        shape = f'<path d="M{x},{y - 7} L{x + 7},{y} L{x},{y + 7} L{x - 7},{y} Z" fill="{fill}"/>'
    elif m.entry is not None:
        shape = f'<circle cx="{x}" cy="{y}" r="6" fill="{fill}"/>'
    else:
        shape = f'<rect x="{x - 5}" y="{y - 5}" width="10" height="10" fill="{fill}"/>'
    entry = "" if m.entry is None else f' data-entry="{m.entry + 1 if m.entry >= 0 else "final"}"'
    ly = y - 11
    return (f'<g class="mark {m.kind}"{entry} data-lane={quoteattr(lane)}>'
            f"<title>{escape(m.tooltip)}</title>{shape}"
            f'<text class="label" x="{x - 2}" y="{ly}" transform="rotate(-{ANGLE} {x - 2} {ly})">'
            f"{escape(m.label)}</text></g>")


def _runs(cols: list[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    out: list[tuple[int, int]] = []
    for c in cols:
        if out and c == out[-1][1] + 1:
            out[-1] = (out[-1][0], c)
        else:
            out.append((c, c))
    return out
