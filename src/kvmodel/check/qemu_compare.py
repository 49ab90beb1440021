"""What differs between the bare-metal model's run and QEMU's run of the same exported image.

Entries (deliveries and port 0xE9 bytes) are compared in order, then how the
run stopped, the final registers when both halted, and guest memory. Each
difference names its `field` as `[[expect.qemu]]` declares it: "entry" (one
side has no such entry, or another kind), "vector", "rsp", "frame word N",
"stop", a register ("rax", "rip", "rflags", ...), "memory".

Memory left out of the comparison (`left_out`, chosen by check/differential.py):
for an L1 hypervisor, the guest's IDT, whose gates the boot stub points at its
logging entries in place (export/boot.py), and the SVM host save area.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kvmodel.arch.observe import Delivery, Output
from kvmodel.arch.regs import GPR32, GPR64, Mode
from kvmodel.export.image import Image
from kvmodel.export.qemu import LoggedDelivery, LoggedOutput, QemuRun, QemuStop
from kvmodel.export.reset import ResetState
from kvmodel.scenario.runner import RunResult

FINAL = 0  # the entry number of the final state, as in [[expect.qemu]]
RUNNING = (QemuStop.TIMEOUT, QemuStop.LOG_LIMIT)  # QEMU stopped it: a loop or a storm
_STOPS = {"halted": QemuStop.HALTED, "shutdown": QemuStop.SHUTDOWN}


@dataclass(frozen=True, slots=True)
class Difference:
    entry: int  # 1-based among deliveries and port output; FINAL for stop, registers, memory
    field: str  # as [[expect.qemu]] names it
    model: str
    qemu: str
    paired: bool = True  # the entries after it still correspond
    bits: int | None = None  # model XOR QEMU, for a numeric field
    detail: str = ""  # where in memory

    @property
    def where(self) -> str:
        place = "final state" if self.entry == FINAL else f"entry {self.entry}"
        what = self.detail or ("" if self.field == "entry" else self.field)
        return f"{place}: {what}" if what else place


class StubMap:
    """Logging entries -> the guest's handlers: a frame holds a logging entry's address
    when an event was delivered before that entry's first instruction ran."""

    def __init__(self, image: Image, state: ResetState):
        self.entries = {image.symbols[f"kv_vec_{g.vector}"] - state.cs_base: g
                        for g in state.gates}

    def __call__(self, value: int) -> int:
        gate = self.entries.get(value)
        return value if gate is None else gate.handler

    def interrupted(self, logged: LoggedDelivery) -> int | None:
        """The vector whose logging entry this delivery interrupted (its return address, with
        or without an error code below it), or None."""
        for word in logged.stack[:2]:
            if word in self.entries:
                return self.entries[word].vector
        return None


def in_delivery_order(events: tuple, stub: StubMap) -> tuple:
    """QEMU's log with each delivery before the one that interrupted its logging entry.

    A trap pending when a delivery completes (a data breakpoint hit by its push) is
    delivered before the first instruction of the logging entry, so it is logged
    first; the interrupted delivery is logged when its entry runs, if ever. If it never
    is, a record of its vector alone stands in for it.
    """
    out = list(events)
    k = 0
    while k < len(out):
        event = out[k]
        vector = stub.interrupted(event) if isinstance(event, LoggedDelivery) else None
        if vector is not None:
            later = next((j for j in range(k + 1, len(out)) if isinstance(out[j], LoggedDelivery)
                          and out[j].vector == vector), None)
            delayed = out.pop(later) if later is not None else LoggedDelivery(vector, -1, 0, 0, ())
            out.insert(k, delayed)
            k += 1
        k += 1
    return tuple(out)


def differences(model: RunResult, qemu: QemuRun, stub: StubMap) -> Iterator[Difference]:
    """Entries, then the stop, then the final registers; memory is `memory_difference()`.

    After a difference that breaks the pairing of entries, or of the stops, nothing
    after it is compared.
    """
    seen = [o for o in model.trace if isinstance(o, Delivery | Output)]
    logged = in_delivery_order(qemu.events, stub)
    model_running = model.final is None or model.final.stop == "budget"
    count = min(len(seen), len(logged)) if model_running else len(seen)
    for index in range(count):
        got = logged[index] if index < len(logged) else None
        difference = _entry_difference(index + 1, seen[index], got, stub)
        if difference is not None:
            yield difference
            if not difference.paired:
                return
    if len(logged) > count and not model_running:
        yield Difference(count + 1, "entry", "nothing more", _show(logged[count]), False)
        return
    if model_running and qemu.stop in RUNNING:
        return
    stopped = "still running" if model_running else model.final.stop
    if _STOPS.get(stopped) is not qemu.stop:
        yield Difference(FINAL, "stop", stopped, qemu.stop.value, False)
        return
    if qemu.stop is QemuStop.HALTED:
        yield from _final_differences(model, qemu, stub)


def _entry_difference(index: int, want: Delivery | Output, got, stub: StubMap) -> Difference | None:
    if got is None:
        return Difference(index, "entry", _show(want), "nothing", False)
    if isinstance(want, Output) or isinstance(got, LoggedOutput):
        if isinstance(want, Output) and isinstance(got, LoggedOutput) and want.value == got.value:
            return None
        return Difference(index, "entry", _show(want), _show(got), False)
    if want.vector != got.vector:
        return Difference(index, "vector", f"{want.vector}", f"{got.vector}", False)
    if not got.stack:
        return None  # never logged (see in_delivery_order()): its vector is all there is
    if want.rsp != got.rsp:
        return Difference(index, "rsp", f"{want.rsp:#x}", f"{got.rsp:#x}",
                          bits=want.rsp ^ got.rsp, detail="RSP after delivery")
    for k, word in enumerate(want.frame):
        defined = ~want.undefined[k] if want.undefined else -1  # SDM 6.15: a #DF's CS:RIP
        theirs = stub(got.stack[k])
        if theirs & defined != word & defined:
            return Difference(index, f"frame word {k}", f"{word:#x}", f"{theirs:#x}",
                              bits=(word ^ theirs) & defined)
    return None


def _show(event) -> str:
    if isinstance(event, Output | LoggedOutput):
        return f"output {event.value:#04x}"
    return f"delivery of vector {event.vector}"


def _final_differences(model: RunResult, qemu: QemuRun, stub: StubMap) -> Iterator[Difference]:
    final = model.final
    long = model.scenario.mode is Mode.LONG64
    want = dict(final.registers) | {"rip": final.rip, "rflags": final.rflags, "cr2": final.cr2,
                                     "dr6": final.dr6, "dr7": final.dr7}
    qemu_names = {n: n.upper() for n in (GPR64 if long else GPR32)} | {
        "rip": "RIP" if long else "EIP", "rflags": "RFL" if long else "EFL", "cr2": "CR2",
        "dr6": "DR6", "dr7": "DR7"}
    width = (1 << model.scenario.mode.value) - 1
    for name, value in want.items():
        got = qemu.registers.get(qemu_names[name])
        if got is None:
            continue
        got = stub(got & width) if name == "rip" else got & width
        if got != value:
            yield Difference(FINAL, name, f"{value:#x}", f"{got:#x}", bits=value ^ got)


def memory_difference(model: RunResult, qemu: QemuRun, excused: list[Delivery],
                      left_out: tuple[range, ...] = ()) -> Difference | None:
    """The first differing byte of guest memory, leaving out the frames of `excused`
    deliveries (their difference is declared), the bits the architecture leaves
    undefined in a frame, and the `left_out` ranges."""
    mine, theirs = bytearray(model.memory), bytearray(qemu.memory)
    for skipped in left_out:
        theirs[skipped.start:skipped.stop] = mine[skipped.start:skipped.stop]
    word = model.scenario.mode.value // 8
    for d in excused:
        size = len(d.frame) * word
        theirs[d.rsp:d.rsp + size] = mine[d.rsp:d.rsp + size]
    for d in model.trace:
        if isinstance(d, Delivery) and d.undefined:
            for k, mask in enumerate(d.undefined):
                at = d.rsp + k * word
                ours = int.from_bytes(mine[at:at + word], "little")
                other = int.from_bytes(theirs[at:at + word], "little")
                theirs[at:at + word] = (other & ~mask | ours & mask).to_bytes(word, "little")
    if mine == theirs:
        return None
    at = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
              min(len(mine), len(theirs)))
    return Difference(FINAL, "memory", mine[at:at + 8].hex(" "), theirs[at:at + 8].hex(" "),
                      detail=f"memory at {model.program.where(at)}")
