"""Guest memory layout: where code, IDT, TSS and stacks live, and the CPU at reset.

    0x00000  page 0 (ordinary memory)
    0x01000  IDT (256 gates: 16 bytes each in long mode, 8 in protected mode; [cpu] idt_base)
    0x03000  TSS: RSP0 (ESP0, SS0 in protected mode) = 0x30000, and the 64-bit IST slots
    0x10000  guest text, then data and bss (linked at 0x10000 - [cpu] cs_base)
    0x30000  top of the initial stack (grows down); 0xF000 in real mode (SS = 0), where the
             IVT's 4-byte entries sit at the IDT's place and the code segment is 0x1000
    0x31000+ top of IST stack k at 0x30000 + k * 0x1000, k = 1..7

Memory is flat and identity-mapped; a page the scenario marks not present
raises #PF on any access.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from kvmodel._util.records import replacer
from kvmodel.arch.apic import Apic
from kvmodel.arch.cpu import Cpu
from kvmodel.arch.deliver import INTERRUPT_GATE, TRAP_GATE
from kvmodel.arch.fred import CR4_FRED, FredMsrs
from kvmodel.arch.regs import BOOT_CR3, CODE_SELECTOR, DATA_SELECTOR, RSP, TSS_RSP0, TSS_SS0, Mode
from kvmodel.arch.task import Tss32, initial_tasks

IDT_BASE = 0x1000
TSS_BASE = 0x3000
CODE_BASE = 0x10000
STACK_TOP = 0x30000
REAL_STACK_TOP = 0xF000  # real mode: SS = 0, so the stack must lie below 64 KiB
IST_STACK_BASE = 0x30000
DEFAULT_MEMORY = 0x40000
PAGE = 0x1000


class GateKind(IntEnum):
    """The two gate types kvmodel writes (SDM 6.14.1); any 4-bit type may be forced."""

    INTERRUPT = INTERRUPT_GATE
    TRAP = TRAP_GATE


@dataclass(frozen=True, slots=True)
class Gate:
    """One IDT entry as the scenario asks for it."""

    handler: int
    kind: int = GateKind.INTERRUPT
    ist: int = 0
    present: bool = True
    selector: int = CODE_SELECTOR
    dpl: int = 0


def encode_gate(gate: Gate, mode: Mode) -> bytes:
    """Gate descriptor bytes (SDM 6.11 Figure 6-2, 6.14.1 Figure 6-7)."""
    attrs = (gate.kind & 0xF) | (gate.dpl << 5) | (0x80 if gate.present else 0)
    low = (gate.handler & 0xFFFF) | (gate.selector << 16) | ((gate.ist & 7) << 32)
    low |= attrs << 40 | ((gate.handler >> 16) & 0xFFFF) << 48
    if mode is Mode.PROTECTED32:
        return low.to_bytes(8, "little")
    return low.to_bytes(8, "little") + ((gate.handler >> 32) & 0xFFFFFFFF).to_bytes(8, "little")


def gate_size(mode: Mode) -> int:
    return {Mode.LONG64: 16, Mode.PROTECTED32: 8, Mode.REAL16: 4}[mode]


def encode_ivt_entry(handler: int, cs_base: int) -> bytes:
    """Real mode: IP then CS (SDM 20.1.4 Figure 20-2); handlers are in the guest's code segment."""
    return ((handler & 0xFFFF) | (cs_base >> 4) << 16).to_bytes(4, "little")


@dataclass(frozen=True, slots=True)
class Machine:
    """Everything the CPU starts with, resolved to numbers."""

    mode: Mode
    image: bytes
    base: int  # where the image is loaded (linear)
    entry: int
    gates: tuple[tuple[int, Gate], ...]
    ist: tuple[tuple[int, int], ...] = ()  # (k, top of stack) overrides
    registers: tuple[tuple[int, int], ...] = ()  # (index into regs, value)
    rflags: int = 0x2
    idt_limit: int | None = None
    idt_base: int = IDT_BASE
    memory_size: int = DEFAULT_MEMORY
    not_present: frozenset[int] = frozenset()  # page numbers
    sti_blocks_nmi: bool = True
    fred: FredMsrs | None = None  # CR4.FRED=1 with these MSRs
    cs_base: int = 0  # the code segment's base: entry and gate offsets are relative to it
    tasks: tuple[tuple[int, int], ...] = ()  # (selector, base): 32-bit TSS descriptors (task.py)


def build_cpu(machine: Machine, *, record_instructions: bool = False) -> Cpu:
    """A CPU at the guest's entry point with memory, IDT and TSS set up."""
    mode = machine.mode
    mem = bytearray(machine.memory_size)
    mem[machine.base:machine.base + len(machine.image)] = machine.image
    for vector, gate in machine.gates:
        at = machine.idt_base + vector * gate_size(mode)
        mem[at:at + gate_size(mode)] = (encode_ivt_entry(gate.handler, machine.cs_base)
                                        if mode is Mode.REAL16 else encode_gate(gate, mode))
    # The stack a delivery from CPL 3 switches to (SDM 6.12.1, 6.14.4): the initial one.
    if mode is Mode.LONG64:
        mem[TSS_BASE + TSS_RSP0:TSS_BASE + TSS_RSP0 + 8] = STACK_TOP.to_bytes(8, "little")
    else:
        mem[TSS_BASE + TSS_RSP0:TSS_BASE + TSS_RSP0 + 4] = STACK_TOP.to_bytes(4, "little")
        mem[TSS_BASE + TSS_SS0:TSS_BASE + TSS_SS0 + 2] = DATA_SELECTOR.to_bytes(2, "little")
    if mode is Mode.PROTECTED32:  # a task switch back to it loads CR3 from here (SDM 7.3)
        mem[TSS_BASE + Tss32.CR3:TSS_BASE + Tss32.CR3 + 4] = BOOT_CR3.to_bytes(4, "little")
    if mode is Mode.LONG64:
        tops = {k: IST_STACK_BASE + k * PAGE for k in range(1, 8)} | dict(machine.ist)
        for k, top in tops.items():
            mem[TSS_BASE + 0x24 + 8 * (k - 1):TSS_BASE + 0x2C + 8 * (k - 1)] = top.to_bytes(8, "little")
    cpu = Cpu(mode, mem, not_present=machine.not_present,
              sti_blocks_nmi=machine.sti_blocks_nmi, record_instructions=record_instructions)
    cpu.idtr_base = machine.idt_base
    cpu.idtr_limit = machine.idt_limit if machine.idt_limit is not None else (
        256 * gate_size(mode) - 1)
    cpu.tr_base = TSS_BASE
    if mode is Mode.PROTECTED32:
        cpu.tasks = initial_tasks(TSS_BASE) | {sel: (base, False) for sel, base in machine.tasks}
    cpu.cs_base = machine.cs_base
    cpu.rip = machine.entry
    cpu.regs[RSP] = STACK_TOP
    if mode is Mode.REAL16:
        cpu.cs, cpu.ss, cpu.regs[RSP] = machine.cs_base >> 4, 0, REAL_STACK_TOP
    for index, value in machine.registers:
        cpu.regs[index] = value
    cpu.rflags = machine.rflags | 0x2
    if machine.fred is not None:
        cpu.cr4 |= CR4_FRED
        cpu.fred = machine.fred
    return cpu


# -- copies of a CPU at reset ---------------------------------------------------------

_UNSET = object()
# How each kind of mutable part is copied; a CPU as built holds plain values in its containers.
_COPY: dict[type, Callable] = {list: list.copy, dict: dict.copy, set: set.copy,
                               bytearray: bytearray.copy, Apic: replacer(Apic)}
_IMMUTABLE = (int, str, bytes, tuple, frozenset, FredMsrs, type(None))


def copier(cpu: Cpu) -> Callable[..., Cpu] | None:
    """A function making fresh copies of `cpu` as built, before it runs (cheaper than building).

    The copy's memory is a new bytearray, or `memory` (a spare of the same
    size, overwritten): fresh pages cost a page fault each, a tenth of the
    copy itself when the explorer keeps many runs alive.
    None when some part of it is neither plain data nor the APIC (an L1's VMX
    root keeps a reference to its CPU): such a CPU is built afresh each time.
    """
    mutable, plain = [], {}
    for name in Cpu.__slots__:
        value = getattr(cpu, name, _UNSET)
        if value is _UNSET or name == "mem":
            continue
        if type(value) in _COPY:
            mutable.append((name, value, _COPY[type(value)]))
        elif isinstance(value, _IMMUTABLE):
            plain[name] = value
        else:
            return None
    image = cpu.mem

    def copy(memory: bytearray | None = None) -> Cpu:
        fresh = Cpu.__new__(Cpu)
        for name, value in plain.items():
            setattr(fresh, name, value)
        for name, value, copy_value in mutable:
            setattr(fresh, name, copy_value(value))
        if memory is None:
            memory = image.copy()
        else:
            memory[:] = image
        fresh.mem = memory
        return fresh

    return copy
