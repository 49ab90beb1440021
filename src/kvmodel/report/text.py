"""The readable trace: one line per happening, labels instead of raw addresses."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from kvmodel.arch.events import vector_name
from kvmodel.arch.observe import (
    NO_VECTOR,
    Arrival,
    Delivery,
    Halt,
    Iret,
    Observation,
    Output,
    Retire,
    Shutdown,
)  # fmt: skip
from kvmodel.arch.regs import RF, Mode, describe_rflags
from kvmodel.check.oracle import Comparison, Divergence
from kvmodel.guest.asm import Program
from kvmodel.hw.base import ExitRecord
from kvmodel.kvm.migrate import SaveRestoreRecord
from kvmodel.kvm.uapi import EEXIST, EINTR, EINVAL, ENXIO, Busy
from kvmodel.kvm.x86 import InjectRecord, NestedExitRecord
from kvmodel.scenario.runner import RunResult
from kvmodel.scenario.session import VmmStop
from kvmodel.scenario.vmm import VmmRecord

# A long run's text report shows the head and tail of its trace and the first mismatches
# (rich renders some 5,000 lines a second; --json has everything).
TRACE_HEAD, TRACE_TAIL = 2_000, 200
MISMATCHES_SHOWN = 50
_ERRNO = {EINVAL: "-EINVAL", EINTR: "-EINTR", ENXIO: "-ENXIO", EEXIST: "-EEXIST", Busy.errno: "-EBUSY"}


def frame_text(d: Delivery, program: Program, mode: Mode) -> str:
    """The pushed frame, named field by field (SDM 6.14.2 Figure 6-8, 6.12.1 Figure 6-4);
    what the architecture leaves undefined is said so."""
    if len(d.frame) == FRED_FRAME_WORDS:
        return _fred_frame_text(d, program)
    words = list(d.frame)
    masks = list(d.undefined) or [0] * len(words)
    parts = []
    if d.error_code is not None:
        parts.append(f"error={words.pop(0):#x}")
        masks.pop(0)
    if not words:  # through a task gate: the new task's stack holds the error code alone
        return " ".join(parts + ["(task switch: state saved in the TSS)"])
    if mode is Mode.LONG64 and len(words) == 3:
        mode = Mode.REAL16  # a real-mode L2's frame under a 64-bit L1 (hw/vmx/real_l2.py)
    if mode is Mode.LONG64:
        rip, cs, rflags, rsp, ss = words
        named = [f"rip={program.where(rip)}", f"cs={cs:#x}", f"rflags={describe_rflags(rflags)}",
                 f"rsp={rsp:#x}", f"ss={ss:#x}"]
    else:  # with SS:ESP after a privilege change (SDM 6.12.1 Figure 6-4)
        eip, cs, eflags, *outer = words
        named = [f"eip={program.where(eip)}", f"cs={cs:#x}", f"eflags={describe_rflags(eflags)}"]
        named += [f"{name}={value:#x}" for name, value in zip(("esp", "ss"), outer, strict=False)]
    parts += [_undefined_note(text, mask, (1 << mode.value) - 1)
              for text, mask in zip(named, masks, strict=True)]
    return " ".join(parts)


def _undefined_note(text: str, mask: int, word_mask: int) -> str:
    """A frame field with the bits the architecture leaves undefined named (Delivery.undefined)."""
    if not mask:
        return text
    if mask == word_mask:
        return f"{text} (undefined)"
    if mask == RF:
        return f"{text} (RF undefined)"
    return f"{text} (bits {mask:#x} undefined)"


FRED_FRAME_WORDS = 8


def _fred_frame_text(d: Delivery, program: Program) -> str:
    """A FRED frame (arch/fred.py): the words by name, the SS word's event information decoded."""
    error, rip, cs, rflags, rsp, ss, data, _ = d.frame
    undefined = d.undefined or (0,) * FRED_FRAME_WORDS
    info = f"vector={(ss >> 32) & 0xFF:#x} type={(ss >> 48) & 0xF}"
    info += "".join(f" {name}" for bit, name in ((16, "sti"), (17, "int"), (18, "nmi"),
                                                 (58, "nested")) if ss >> bit & 1)
    if ss >> 60:
        info += f" len={ss >> 60}"
    word = (1 << 64) - 1
    rip_text = _undefined_note(f"rip={program.where(rip)}", undefined[1], word)
    cs_text = _undefined_note(f"cs={cs & 0xFFFF:#x} csl={(cs >> 16) & 3}", undefined[2], word)
    rflags_text = _undefined_note(f"rflags={describe_rflags(rflags)}", undefined[3], word)
    return (f"error={error:#x} {rip_text} {cs_text} {rflags_text} rsp={rsp:#x} "
            f"ss={ss & 0xFFFF:#x} [{info}] data={data:#x}")


def arrival_text(obs: Arrival) -> str:
    fate = obs.fate.name.lower()
    if obs.event == "notify_timer":
        invalid = ", VM context invalid" if obs.vector else ""
        return f"the notify timer runs out{invalid}: {fate}"
    if obs.event == "host_interrupt":
        return f"host interrupt arrives: {fate}"
    if obs.event == "host_nmi":
        return f"host NMI arrives: {fate}"
    if obs.event == "interrupt":
        return f"interrupt {obs.vector:#x} arrives: {fate}"
    if obs.event == "extint":
        return f"8259 INTR with vector {obs.vector:#x} arrives: {fate}"
    if obs.event == "ipi":
        return f"IPI {obs.vector:#x} arrives: {fate}"
    if obs.event == "init":
        return f"INIT arrives: {'wait-for-SIPI' if fate == 'pending' else fate}"
    if obs.event == "sipi":
        return f"SIPI {obs.vector:#x} arrives: " + {"pending": "started",
                                                    "dropped": "ignored"}.get(fate, fate)
    source = {"self_nmi": " (self-IPI)", "nmi_ipi": " (IPI)"}.get(obs.event, "")
    return f"NMI arrives{source}: {fate}"


def line_for(obs: Observation, program: Program, mode: Mode) -> tuple[int, str, str]:
    """(retired count, where, what) for one trace entry."""
    if isinstance(obs, Delivery):
        ec = f", error code {obs.error_code:#x}" if obs.error_code is not None else ""
        what = (f"[bold]{vector_name(obs.vector)}[/] delivered ({obs.type.name.lower()}{ec}) "
                f"-> {escape(program.where(obs.handler))}  "
                f"[dim]frame @{obs.rsp:#x}: {escape(frame_text(obs, program, mode))}[/]")
        return obs.retired, program.where(obs.return_rip), what
    if isinstance(obs, Arrival):
        return obs.retired, program.where(obs.rip), arrival_text(obs)
    if isinstance(obs, Iret):
        unblock = " (NMI unblocked)" if obs.nmi_unblocked else ""
        return obs.retired, program.where(obs.rip), f"IRET -> {escape(program.where(obs.to_rip))}{unblock}"
    if isinstance(obs, Halt):
        return obs.retired, program.where(obs.rip), "HLT: halted"
    if isinstance(obs, Shutdown) and obs.first == NO_VECTOR:
        return obs.retired, program.where(obs.rip), "[bold red]triple fault[/] set from outside: shutdown"
    if isinstance(obs, Shutdown):
        return (obs.retired, program.where(obs.rip),
                f"[bold red]triple fault[/]: {vector_name(obs.second)} while delivering "
                f"{vector_name(obs.first)}: shutdown")
    if isinstance(obs, Output):
        return obs.retired, "", f"port {obs.port:#x} <- {obs.value:#04x} {chr(obs.value)!r}"
    if isinstance(obs, ExitRecord):
        return (obs.retired, program.where(obs.rip),
                f"[cyan]VM exit {escape(str(obs.reason))}[/] [dim]{escape(obs.detail)}[/]")
    if isinstance(obs, InjectRecord):
        again = "re-inject" if obs.reinjected else "inject"
        return obs.retired, "", f"[cyan]KVM {again}s {obs.what} {vector_name(obs.vector)}[/]"
    if isinstance(obs, SaveRestoreRecord):
        return (obs.retired, "", "[magenta]save/restore[/]: KVM_GET_VCPU_EVENTS -> fresh vCPU -> "
                f"KVM_SET_VCPU_EVENTS [dim]{escape(str(obs.events))}[/]")
    if isinstance(obs, NestedExitRecord):
        return (obs.retired, program.where(obs.rip),
                f"[cyan]nested VM exit {escape(str(obs.reason))}[/] to L1 "
                f"(L0 fills {escape(str(obs.control))})")
    if isinstance(obs, VmmStop):
        return (obs.retired, "", f"[magenta]KVM_RUN returns {obs.reason}[/] flags {obs.flags:#x}: "
                f"the VMM stops the VM ({escape(obs.why)})")
    if isinstance(obs, VmmRecord):
        result = "0" if obs.result == 0 else f"{obs.result} ({_ERRNO.get(obs.result, '?')})"
        return (obs.retired, "", f"[magenta]VMM {escape(obs.call)}[/] returns {result} "
                f"[dim]{escape(obs.detail)}[/]")
    assert isinstance(obs, Retire)
    return obs.retired, program.where(obs.rip), f"[dim]{escape(obs.text)}[/]"


def print_result(console: Console, result: RunResult, heading: str = "",
                 excused: bool = False) -> None:
    """The trace and verdict; `excused`: mismatches follow from a declared divergence."""
    s = result.scenario
    cite = f"  [dim]({escape(s.cite)})[/]" if s.cite else ""
    console.print(f"[bold]{escape(s.path)}[/]: {escape(s.title)}{heading}{cite}")
    program = result.program
    lines = []
    for n in _shown(len(result.trace), TRACE_HEAD, TRACE_TAIL):
        if n is None:
            lines.append(f"  [dim]... {len(result.trace) - TRACE_HEAD - TRACE_TAIL:,} trace entries "
                         "not shown (--json has them all) ...[/]")
            continue
        retired, where, what = line_for(result.trace[n], program, s.mode)
        cpu = f"cpu{result.cpu_of[n]} " if result.cpu_of else ""
        lines.append(f"  {cpu}{retired:>7}  {escape(where):<22} {what}")
    _print_lines(console, lines)
    if result.limit is not None:
        console.print(f"  [bold red]MODEL LIMIT[/] {escape(result.limit)}")
        return
    if result.hypervisor_error is not None:
        _print_hypervisor_error(console, result)
        return
    if result.host_bug is not None:
        console.print(f"  [bold red]HOST BUG[/] {escape(result.host_bug)}: the host kernel oopses, "
                      "no final state")
        return
    final = result.final
    if final is None:  # KVM gave up (failed entry, internal error): print_comparison says so
        return
    regs = " ".join(f"{n}={v:#x}" for n, v in final.registers if v)
    console.print(f"  [dim]stop: {final.stop} after {final.retired} retired; rip="
                  f"{escape(program.where(final.rip))} rflags={describe_rflags(final.rflags)} "
                  f"{regs}[/]", highlight=False)
    if result.passed:
        console.print("  [bold green]PASS[/] every expectation holds")
    label = "[yellow]after the known divergence[/]" if excused else "[bold red]FAIL[/]"
    mismatches = result.mismatches
    _print_lines(console, [f"  {label} {escape(s.path)}:{m.line}: {escape(m.message)}"
                           for m in mismatches[:MISMATCHES_SHOWN]])
    if len(mismatches) > MISMATCHES_SHOWN:
        console.print(f"  {label} and {len(mismatches) - MISMATCHES_SHOWN:,} more mismatches "
                      "(--json has them all)")


def _shown(count: int, head: int, tail: int) -> Iterator[int | None]:
    """The indices a long list shows: its head and its tail, None where the rest is left out."""
    if count <= head + tail:
        yield from range(count)
        return
    yield from range(head)
    yield None
    yield from range(count - tail, count)


def _print_lines(console: Console, lines: list[str]) -> None:
    """Markup lines in one print: rich's cost is per call and per line wrapped, and a run
    can have 100,000 trace entries or mismatches. Long lines are not wrapped (`soft_wrap`):
    a terminal wraps them, and a file gets them whole."""
    if lines:
        console.print("\n".join(lines), highlight=False, soft_wrap=True)


def _print_hypervisor_error(console: Console, result: RunResult) -> None:
    """KVM_RUN returned an error exit (failed entry, internal error): what it returned, and the
    VM exit KVM was handling (or had handled, for a failed entry) when it gave up."""
    console.print(f"  [bold red]HYPERVISOR ERROR[/] {escape(result.hypervisor_error)}")
    last = next((o for o in reversed(result.trace) if isinstance(o, ExitRecord)), None)
    if last is not None:
        console.print(f"    after VM exit {last.reason} at {escape(result.program.where(last.rip))}, "
                      f"{last.retired} retired ({escape(last.detail)})", highlight=False)
    console.print("    the VMM cannot resume the guest: no final state")


def print_comparison(console: Console, comparison: Comparison) -> None:
    """The virtualized run, then its verdict against bare metal."""
    bare, virt = comparison.bare, comparison.virt
    if virt is None:
        print_result(console, bare)
        console.print(f"  [bold yellow]NOT APPLICABLE[/] {escape(comparison.not_applicable)}")
        return
    print_result(console, virt, heading=f" [bold cyan]under KVM on {virt.vendor.value.upper()}[/]",
                 excused=comparison.divergence_expected)
    stats = "; ".join(
        f"vCPU {n}: " + ", ".join(f"{k}={v}" for k, v in _stats(st).items() if v)
        for n, st in enumerate(virt.stats))
    console.print(f"  [dim]KVM stats: {escape(stats)}[/]")
    for warning in virt.warnings:
        console.print(f"  [bold red]KVM WARN[/] {escape(warning)}")
    d = comparison.divergence
    if bare.limit is not None:
        console.print(f"  [bold red]MODEL LIMIT[/] on bare metal: {escape(bare.limit)}: "
                      "nothing to compare with")
    elif virt.limit is not None:
        console.print("  [bold red]NOT COMPARED[/] the run under KVM stopped at the model limit above")
    elif d is None and virt.hypervisor_error is not None:
        console.print(f"  [bold red]FAIL[/] KVM gave up where bare metal went on (stop: "
                      f"{bare.final.stop}); up to then the guest-observable trace matches")
    elif d is None:
        console.print(f"  [bold green]SAME AS BARE METAL[/] the guest-observable trace and final "
                      f"state match ({len(virt.trace)} trace entries)")
    else:
        _print_divergence(console, comparison, d)
    for problem in comparison.problems:
        console.print(f"  [bold red]FAIL[/] {escape(virt.scenario.path)}: {escape(problem)}")


def _print_divergence(console: Console, comparison: Comparison, d: Divergence) -> None:
    bare, virt = comparison.bare, comparison.virt
    label = "[bold yellow]KNOWN DIVERGENCE[/]" if comparison.divergence_expected else (
        "[bold red]DIVERGENCE[/]")
    console.print(f"  {label} at guest-observable entry {d.event_index + 1 if d.index >= 0 else 'final'}:")
    console.print(f"    bare metal: {escape(_show(d.bare, bare))}")
    console.print(f"    under KVM:  {escape(_show(d.virt, virt))}")
    context = [o for o in virt.trace[max(0, d.virt_trace_index - 6):d.virt_trace_index]
               if isinstance(o, (ExitRecord, InjectRecord, SaveRestoreRecord, VmmStop,
                                 NestedExitRecord, VmmRecord))]
    if context:
        console.print("    hypervisor just before:")
        for obs in context:
            retired, where, what = line_for(obs, virt.program, virt.scenario.mode)
            console.print(f"      {retired:>7}  {escape(where):<22} {what}", highlight=False)
    if comparison.known is not None and comparison.divergence_expected:
        console.print(f"    [dim]declared at line {comparison.known.line}: "
                      f"{escape(comparison.known.why)}[/]")


def _stats(stats) -> dict:
    return {name: getattr(stats, name) for name in stats.__slots__}


def _show(entry, result: RunResult) -> str:
    if entry is None:
        return "nothing (the trace ended)"
    if isinstance(entry, str):
        return entry
    _, where, what = line_for(entry, result.program, result.scenario.mode)
    return f"{where}: {Text.from_markup(what).plain}"  # as text: the caller escapes it
