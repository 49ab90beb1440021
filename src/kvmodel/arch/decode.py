"""Decoding with iced-x86 into cached, ready-to-run instructions.

An instruction outside the modelled subset stops the run with ModelLimit
naming it and its address; an undefined opcode is #UD, as on hardware.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import iced_x86 as iced

from kvmodel.arch.events import Vec
from kvmodel.arch.execute import BUILDERS, Run
from kvmodel.arch.faults import Access, Fault
from kvmodel.errors import ModelLimit

if TYPE_CHECKING:
    from kvmodel.arch.cpu import Cpu

MAX_INSN_LEN = 15
_FORMATTER = iced.Formatter(iced.FormatterSyntax.GAS)


class Decoded:
    """A decoded instruction: `execute(cpu)` and its AT&T text for traces."""

    __slots__ = ("execute", "text", "length")

    def __init__(self, execute: Run, text: str, length: int):
        self.execute = execute
        self.text = text
        self.length = length


def decode(cpu: Cpu, rip: int) -> Decoded:
    """Fetch and decode at rip (SDM 6.9 priority 8 and 9: fetch faults, then #UD)."""
    raw = cpu.fetch_bytes(rip, MAX_INSN_LEN)
    decoder = iced.Decoder(cpu.mode.value, raw, ip=rip)
    insn = decoder.decode()
    if insn.is_invalid:
        if decoder.last_error == iced.DecoderError.NO_MORE_BYTES:
            raise cpu.page_fault(rip + len(raw), Access.FETCH)
        raise Fault(Vec.UD)
    text = _FORMATTER.format(insn)
    builder = BUILDERS.get(insn.mnemonic)
    if builder is None:
        raise ModelLimit(f"instruction outside the modelled subset: {text!r}", rip)
    try:
        execute = builder(insn, cpu.mode)
    except ModelLimit as limit:
        raise ModelLimit(f"{limit} ({text!r})", rip) from None
    decoded = Decoded(execute, text, insn.len)
    cpu.icache[rip] = decoded
    cpu.remember_code(rip, insn.len)
    return decoded
