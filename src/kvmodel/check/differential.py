"""The differential check: the bare-metal model beside QEMU running the exported scenario.

QEMU's CPU (TCG here, or real KVM under `--accel kvm`) is a second opinion
written by other people. What is compared, in order: every delivery the
logging stubs saw (vector, RSP after the push, the pushed frame) and every byte
the guest wrote to port 0xE9; how the run stopped; the final registers when
both halted; guest memory. What is not: retired-instruction counts (the
logging stubs run instructions of their own), IRET and HLT records (seeing
them would mean changing the guest's code, and so its addresses).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kvmodel.arch.observe import Delivery, Output, Retire
from kvmodel.arch.regs import GPR32, GPR64, TF, Mode
from kvmodel.errors import ModelLimit
from kvmodel.export.boot import STUB_BASE
from kvmodel.export.image import Image, build_image
from kvmodel.export.qemu import LoggedOutput, QemuFailed, QemuRun, QemuStop, run_image
from kvmodel.export.reproducers import reproducers_for
from kvmodel.export.reproducers import write as write_reproducers
from kvmodel.export.reset import PAGE, ResetState, reset_state
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.runner import RunResult, prepare, run
from kvmodel.scenario.schema import QemuDifference, Scenario

# What the model's stop is called on QEMU's side.
_STOPS = {"halted": QemuStop.HALTED, "shutdown": QemuStop.SHUTDOWN, "budget": QemuStop.TIMEOUT}


class Verdict(Enum):
    AGREE = "agree"
    DISAGREE = "disagree"
    NOT_REALIZABLE = "not realizable"
    QEMU_FAILED = "QEMU failed"  # QEMU crashed or refused the image: nothing to compare


FINAL = 0  # the entry number of the final state, as in [[expect.qemu]]


@dataclass(frozen=True, slots=True)
class Difference:
    entry: int  # 1-based among deliveries and port output; FINAL for stop, registers, memory
    what: str  # "frame word 1", "rax", "memory at counter" ("" for the entry as a whole)
    model: str
    qemu: str
    paired: bool = True  # the entries after it still correspond

    @property
    def where(self) -> str:
        place = "final state" if self.entry == FINAL else f"entry {self.entry}"
        return f"{place}: {self.what}" if self.what else place


@dataclass(frozen=True, slots=True)
class Differential:
    scenario: Scenario
    verdict: Verdict
    reason: str = ""  # why it is not realizable
    difference: Difference | None = None  # the first one not declared
    declared: tuple[tuple[Difference, QemuDifference], ...] = ()  # seen and declared
    unseen: tuple[QemuDifference, ...] = ()  # declared for this accel, not seen
    model: RunResult | None = None
    qemu: QemuRun | None = None


def differential(scenario: Scenario, out: Path, *, accel: str = "tcg",
                 timeout: float = 10.0) -> Differential:
    """Export `scenario` into `out`, run it in QEMU and compare with the bare-metal model."""
    reason = static_limit(scenario)
    if reason is not None:
        return Differential(scenario, Verdict.NOT_REALIZABLE, reason)
    model = run(scenario, vendor=Vendor.BARE, record_instructions=True, expectations=False)
    if model.limit is not None:
        return Differential(scenario, Verdict.NOT_REALIZABLE, f"model limit: {model.limit}",
                            model=model)
    state = reset_state(prepare(scenario)[0])
    reason = _run_limit(state, model)
    if reason is not None:
        return Differential(scenario, Verdict.NOT_REALIZABLE, reason, model=model)
    image = build_image(state, out)
    try:
        qemu = run_image(out, state.mode, len(state.memory), accel=accel, timeout=timeout)
    except QemuFailed as e:
        return Differential(scenario, Verdict.QEMU_FAILED, str(e), model=model)
    if not qemu.x2apic and model.apic_used:
        return Differential(scenario, Verdict.NOT_REALIZABLE,
                            f"the guest uses the x2APIC and {qemu.version}'s CPU has none "
                            "(CPUID.01H:ECX[21] = 0)", model=model, qemu=qemu)
    declared = {d.entry: d for d in scenario.qemu if accel in d.accels}
    accepted = []
    first = None
    for difference in differences(model, qemu, _StubMap(image, state), frozenset(declared)):
        if difference.entry not in declared:
            first = difference
            break
        accepted.append((difference, declared[difference.entry]))
    seen = {d.entry for d, _ in accepted}
    verdict = Verdict.AGREE if first is None else Verdict.DISAGREE
    return Differential(scenario, verdict, "", first, tuple(accepted),
                        tuple(d for e, d in declared.items() if e not in seen), model, qemu)


@dataclass(frozen=True, slots=True)
class Exported:
    """What `kvmodel export` wrote: the image, or why not, and the selftest reproducers."""

    image: Image | None
    not_exported: str | None  # why there is no image
    reproducers: tuple[Path, ...]  # selftest sources and their README (export/reproducers.py)


def export(scenario: Scenario, out: Path) -> Exported:
    """The image and its run script (`kvmodel export`), and the selftests for its findings.

    A scenario that cannot boot as an image (happenings, an L1 hypervisor,
    ...) still gets its reproducers; with neither, it is a model limit.
    """
    written = write_reproducers(reproducers_for(scenario.path), out)
    reason = static_limit(scenario)
    if reason is not None:
        if not written:
            raise ModelLimit(f"{scenario.path} cannot be exported: {reason}")
        return Exported(None, reason, written)
    return Exported(build_image(reset_state(prepare(scenario)[0]), out), None, written)


def static_limit(scenario: Scenario) -> str | None:
    """What keeps the scenario from booting as the model starts it, known before running."""
    if scenario.happenings:
        return ("external events at chosen boundaries (an NMI or interrupt from outside): the "
                "image cannot place them yet")
    if scenario.fred is not None:
        return "FRED: QEMU's CPU model has no FRED"
    if scenario.vmx:
        return "an L1 VMX hypervisor: QEMU's TCG has no VMX"
    if scenario.svm:
        return ("an L1 SVM hypervisor: L2 loads IDTR from the VMCB L1 writes, so L2's deliveries "
                "would go around the logging stubs (not exported yet)")
    if scenario.memory_size > STUB_BASE:
        return f"guest memory above {STUB_BASE:#x}, where the boot stub lives"
    if scenario.mode is Mode.PROTECTED32 and scenario.rflags & TF:
        return "TF set at reset in 32-bit mode: the stub has no way in that leaves the stack alone"
    return None


def _run_limit(state: ResetState, model: RunResult) -> str | None:
    """What the model's run shows the logging copy of the IDT cannot follow."""
    if any(isinstance(o, Retire) and o.text.split()[0] in ("lidt", "sidt") for o in model.trace):
        return "the guest loads or stores IDTR: deliveries go around the logging stubs"
    size = 16 if state.mode is Mode.LONG64 else 8
    start, end = state.idtr_base, state.idtr_base + 256 * size
    if any(start // PAGE <= page <= (end - 1) // PAGE for page in state.not_present):
        return "the IDT is on a page the scenario marks not present: the logging copy is not"
    if bytes(model.memory[start:end]) != state.memory[start:end]:
        return "the guest rewrites its IDT: the logging copy would go stale"
    return None


class _StubMap:
    """Addresses of logging entries (what a frame holds when a trap hit at one) -> handlers."""

    def __init__(self, image: Image, state: ResetState):
        handlers = {g.vector: g.handler for g in state.gates}
        self.entries = {image.symbols[f"kv_vec_{v}"] - state.cs_base: h
                        for v, h in handlers.items()}

    def __call__(self, value: int) -> int:
        return self.entries.get(value, value)


def differences(model: RunResult, qemu: QemuRun, stub: _StubMap,
                declared: frozenset[int] = frozenset()) -> Iterator[Difference]:
    """Every difference, entry by entry, then the stop, the final registers and memory.

    After a difference that breaks the pairing of entries (a delivery missing or
    of another vector), the entries after it are not compared. The frames of
    the `declared` entries are left out of the memory comparison: their
    difference is already accounted for.
    """
    seen = [o for o in model.trace if isinstance(o, Delivery | Output)]
    stopped = _STOPS.get(model.final.stop if model.final else "", QemuStop.TIMEOUT)
    count = len(seen)
    if QemuStop.TIMEOUT in (stopped, qemu.stop):
        count = min(count, len(qemu.events))  # a loop or storm: only its start is comparable
    for index in range(count):
        got = qemu.events[index] if index < len(qemu.events) else None
        difference = _event_difference(index + 1, seen[index], got, stub)
        if difference is not None:
            yield difference
            if not difference.paired:
                return
    if len(qemu.events) > count and stopped is not QemuStop.TIMEOUT:
        yield Difference(count + 1, "", "nothing more", _show_event(qemu.events[count]), False)
        return
    if stopped is not qemu.stop and QemuStop.TIMEOUT not in (stopped, qemu.stop):
        yield Difference(FINAL, "how the run stopped", stopped.value, qemu.stop.value, False)
        return
    if stopped is QemuStop.HALTED and qemu.stop is QemuStop.HALTED:
        yield from _final_differences(model, qemu, stub)
    if stopped is qemu.stop and stopped is not QemuStop.TIMEOUT:
        excused = [seen[e - 1] for e in declared if 0 < e <= len(seen)]
        yield from _memory_difference(model, qemu, [d for d in excused if isinstance(d, Delivery)],
                                      [d for d in seen if isinstance(d, Delivery) and d.undefined])


def _event_difference(index: int, want: Delivery | Output, got, stub: _StubMap) -> Difference | None:
    if got is None:
        return Difference(index, "", _show_event(want), "nothing", False)
    if isinstance(want, Output) or isinstance(got, LoggedOutput):
        if isinstance(want, Output) and isinstance(got, LoggedOutput) and want.value == got.value:
            return None
        return Difference(index, "", _show_event(want), _show_event(got), False)
    if want.vector != got.vector:
        return Difference(index, "vector", f"{want.vector}", f"{got.vector}", False)
    if want.rsp != got.rsp:
        return Difference(index, "RSP after delivery", f"{want.rsp:#x}", f"{got.rsp:#x}")
    for k, word in enumerate(want.frame):
        defined = ~want.undefined[k] if want.undefined else -1  # SDM 6.15: a #DF's CS:RIP
        if stub(got.stack[k]) & defined != word & defined:
            return Difference(index, f"frame word {k}", f"{word:#x}", f"{stub(got.stack[k]):#x}")
    return None


def _show_event(event) -> str:
    if isinstance(event, Output | LoggedOutput):
        return f"output {event.value:#04x}"
    return f"delivery of vector {event.vector}"


def _final_differences(model: RunResult, qemu: QemuRun, stub: _StubMap) -> Iterator[Difference]:
    final = model.final
    long = model.scenario.mode is Mode.LONG64
    names = GPR64 if long else GPR32
    want = dict(final.registers) | {"rip": final.rip, "rflags": final.rflags, "cr2": final.cr2,
                                     "dr6": final.dr6, "dr7": final.dr7}
    qemu_names = {n: n.upper() for n in names} | {
        "rip": "RIP" if long else "EIP", "rflags": "RFL" if long else "EFL", "cr2": "CR2",
        "dr6": "DR6", "dr7": "DR7"}
    mask = (1 << (64 if long else 32)) - 1
    for name, value in want.items():
        got = qemu.registers.get(qemu_names[name])
        if got is None:
            continue
        got = stub(got & mask) if name == "rip" else got & mask
        if got != value:
            yield Difference(FINAL, name, f"{value:#x}", f"{got:#x}")


def _memory_difference(model: RunResult, qemu: QemuRun, excused: list[Delivery],
                       undefined: list[Delivery]) -> Iterator[Difference]:
    """The first differing byte, leaving out the frames of declared differences and the
    bits of frames the architecture leaves undefined."""
    mine, theirs = bytearray(model.memory), bytearray(qemu.memory)
    word = 8 if model.scenario.mode is Mode.LONG64 else 4
    for d in excused:
        size = len(d.frame) * word
        theirs[d.rsp:d.rsp + size] = mine[d.rsp:d.rsp + size]
    for d in undefined:
        for k, mask in enumerate(d.undefined):
            at = d.rsp + k * word
            ours = int.from_bytes(mine[at:at + word], "little")
            other = int.from_bytes(theirs[at:at + word], "little")
            theirs[at:at + word] = (other & ~mask | ours & mask).to_bytes(word, "little")
    if mine == theirs:
        return
    at = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
              min(len(mine), len(theirs)))
    where = model.program.where(at)
    yield Difference(FINAL, f"memory at {where}", mine[at:at + 8].hex(" "), theirs[at:at + 8].hex(" "))


def show(result: Differential) -> list[str]:
    """Lines for the text report of one scenario."""
    head = f"{result.scenario.path}: {result.verdict.value}"
    if result.verdict in (Verdict.NOT_REALIZABLE, Verdict.QEMU_FAILED):
        return [f"{head} ({result.reason})"]
    lines = [head + (f" ({len(result.declared)} declared QEMU differences)" if result.declared
                     else "")]
    if result.difference is not None:
        d = result.difference
        lines += [f"    {d.where}", f"      model: {d.model}", f"      QEMU:  {d.qemu}"]
    lines += [f"    note: the QEMU difference declared at line {d.line} did not show"
              for d in result.unseen]
    return lines
