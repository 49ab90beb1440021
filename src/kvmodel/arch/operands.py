"""Operand access compiled once per decoded instruction into small closures.

Registers live in `cpu.regs` as full-width integers; 32-bit writes zero the
upper half in 64-bit mode, 8- and 16-bit writes merge (SDM Vol.1 3.4.1.1).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import iced_x86 as iced
from iced_x86 import OpKind, Register, RegisterExt

from kvmodel.arch.events import Vec
from kvmodel.arch.faults import Fault
from kvmodel.arch.regs import Mode, canonical
from kvmodel.errors import ModelLimit

Read = Callable[[object], int]
Write = Callable[[object, int], None]

_HIGH8 = {Register.AH: 0, Register.CH: 1, Register.DH: 2, Register.BH: 3}
IMMEDIATE_SIZE = {  # bytes after sign extension
    OpKind.IMMEDIATE8: 1, OpKind.IMMEDIATE16: 2, OpKind.IMMEDIATE32: 4, OpKind.IMMEDIATE64: 8,
    OpKind.IMMEDIATE8TO16: 2, OpKind.IMMEDIATE8TO32: 4, OpKind.IMMEDIATE8TO64: 8,
    OpKind.IMMEDIATE32TO64: 8,
}  # fmt: skip
BRANCH_KINDS = frozenset({OpKind.NEAR_BRANCH16, OpKind.NEAR_BRANCH32, OpKind.NEAR_BRANCH64})


def gpr(reg: int) -> tuple[int, int, bool]:
    """(index in cpu.regs, size in bytes, is AH/CH/DH/BH) of a general register."""
    if reg in _HIGH8:
        return _HIGH8[reg], 1, True
    full = RegisterExt.full_register(reg)
    return RegisterExt.number(full), RegisterExt.size(reg), False


def size_of(i: iced.Instruction, n: int) -> int:
    """Operand size in bytes of operand n."""
    kind = i.op_kind(n)
    if kind == OpKind.REGISTER:
        return RegisterExt.size(i.op_register(n))
    if kind == OpKind.MEMORY:
        return iced.MemorySizeExt.size(i.memory_size)
    if kind in IMMEDIATE_SIZE:
        return IMMEDIATE_SIZE[kind]
    raise ModelLimit(f"operand kind {kind} has no size")


def reg_reader(reg: int) -> Read:
    idx, size, high = gpr(reg)
    if high:
        return lambda c: (c.regs[idx] >> 8) & 0xFF
    if size == 8:
        return lambda c: c.regs[idx]
    mask = (1 << (8 * size)) - 1
    return lambda c: c.regs[idx] & mask


def reg_writer(reg: int) -> Write:
    idx, size, high = gpr(reg)
    if high:
        def write_high8(c, v):
            c.regs[idx] = (c.regs[idx] & ~0xFF00) | ((v & 0xFF) << 8)
        return write_high8
    if size >= 4:  # a 32-bit write zero-extends (SDM Vol.1 3.4.1.1)
        mask = (1 << (8 * size)) - 1

        def write_full(c, v):
            c.regs[idx] = v & mask
        return write_full
    mask = (1 << (8 * size)) - 1

    def write_merge(c, v):
        c.regs[idx] = (c.regs[idx] & ~mask) | (v & mask)
    return write_merge


def address(i: iced.Instruction, mode: Mode) -> Callable[[object], int]:
    """Effective address of the memory operand: base + index*scale + disp (SDM Vol.1 3.7.5)."""
    if i.is_ip_rel_memory_operand:
        target = i.ip_rel_memory_address
        return lambda c: target
    return _address(i.memory_base, i.memory_index, i.memory_index_scale, i.memory_displacement,
                    mode)


@lru_cache(maxsize=4096)
def _address(base: int, index: int, scale: int, disp: int, mode: Mode) -> Callable[[object], int]:
    """One function per addressing form: decoding new code (a guest running through memory
    it never ran) builds the same few forms at every address, and iced's register
    queries cost more than the rest of a decode."""
    wide = next((r for r in (base, index) if r != Register.NONE), None)
    asize = RegisterExt.size(wide) if wide is not None else mode.value // 8
    mask = (1 << (8 * asize)) - 1
    disp &= mask
    b = RegisterExt.number(RegisterExt.full_register(base)) if base != Register.NONE else None
    x = RegisterExt.number(RegisterExt.full_register(index)) if index != Register.NONE else None
    if b is None and x is None:
        return lambda c: disp
    if x is None:
        return lambda c: (c.regs[b] + disp) & mask
    if b is None:
        return lambda c: (c.regs[x] * scale + disp) & mask
    return lambda c: (c.regs[b] + c.regs[x] * scale + disp) & mask


def stack_address(c, addr: int, size: int) -> int:
    """`addr` for an access through SS: non-canonical in 64-bit mode, #SS(0) rather than the
    #GP(0) of other references (SDM Vol.2 MOV, PUSH, POP, RET, IRET "64-Bit Mode
    Exceptions"). A non-canonical address always lies beyond the guest's memory."""
    if addr + size > c.mem_size and c.mode is Mode.LONG64 and not canonical(addr, size):
        raise Fault(Vec.SS, 0)
    return addr


def _through_stack_segment(i: iced.Instruction, mode: Mode, ea: Callable[[object], int],
                           size: int) -> Callable[[object], int]:
    """A 64-bit memory operand through SS: an RSP or RBP base, or an SS override."""
    if mode is not Mode.LONG64 or i.memory_segment != Register.SS:
        return ea
    return lambda c: stack_address(c, ea(c), size)


def reader(i: iced.Instruction, n: int, mode: Mode) -> Read:
    """Value of operand n: register, immediate or memory."""
    kind = i.op_kind(n)
    if kind == OpKind.REGISTER:
        reg = i.op_register(n)
        if not RegisterExt.is_gpr(reg):
            raise ModelLimit(f"operand register {reg} is not modelled here")
        return reg_reader(reg)
    if kind in IMMEDIATE_SIZE:
        value = i.immediate(n) & ((1 << (8 * size_of(i, n))) - 1)
        return lambda c: value
    if kind == OpKind.MEMORY:
        ea = address(i, mode)
        size = iced.MemorySizeExt.size(i.memory_size)
        ea = _through_stack_segment(i, mode, ea, size)
        return lambda c: c.read(ea(c), size)
    raise ModelLimit(f"operand kind {kind} is not modelled")


def writer(i: iced.Instruction, n: int, mode: Mode) -> Write:
    """Store to operand n (register or memory)."""
    kind = i.op_kind(n)
    if kind == OpKind.REGISTER:
        return reg_writer(i.op_register(n))
    if kind == OpKind.MEMORY:
        ea = address(i, mode)
        size = iced.MemorySizeExt.size(i.memory_size)
        ea = _through_stack_segment(i, mode, ea, size)
        return lambda c, v: c.write(ea(c), size, v)
    raise ModelLimit(f"operand kind {kind} cannot be written")
