"""FRED: event delivery and return with CR4.FRED=1 in IA-32e mode, at CPL 0.

From the FRED specification as Bochs (fred.cc) and Linux (fred.h, fred.rst,
struct fred_cs / fred_ss) implement it; the specification itself was not
readable (reference x86-arch.md section 6). Every event pushes one 64-byte
frame on a 64-byte-aligned stack: error code, RIP, CS with the stack level,
RFLAGS, RSP, SS with the event information, event data, a reserved word.
The handler starts at IA32_FRED_CONFIG's entry point + 256 (events at
CPL 0) with RFLAGS = 2. ERETS returns and ends NMI blocking only when the
frame says the event was an NMI.

Not modelled: ring 3 (ERETU, the CPL 3 entry point), shadow stacks,
SYSCALL/SYSENTER events, the STI-blocking bit on return beyond IF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmodel.arch.events import Event, EventType, Vec, saved_ip_undefined, undefined_frame_bits
from kvmodel.arch.faults import Fault
from kvmodel.arch.observe import Delivery, Iret
from kvmodel.arch.regs import DR6_BS, IF, RSP, TF, Shadow
from kvmodel.errors import ModelLimit

if TYPE_CHECKING:
    from kvmodel.arch.cpu import Cpu

CR4_FRED = 1 << 32
KERNEL_ENTRY = 256  # events that arrive at CPL 0 enter at CONFIG + 256
FRAME_SIZE = 64
WORD_MASK = (1 << 64) - 1  # every frame slot is 8 bytes
RFLAGS_AFTER_DELIVERY = 0x2  # every flag cleared, IF and TF too

# The SS word (frame +40)
SS_STI = 1 << 16  # the event arrived in an STI shadow
SS_SWINT = 1 << 17  # INT n (or SYSCALL/SYSENTER): a TF trap is owed after ERET
SS_NMI = 1 << 18  # the event was an NMI: ERETS ends NMI blocking
SS_64BIT = 1 << 57
SS_NESTED = 1 << 58  # an exception during FRED delivery (never #DF)
CS_LEVEL_SHIFT = 16  # the CS word (frame +16): bits 17:16, the stack level before the event
_CS_AUX = 0x7 << 16  # CS word bits ERETS ignores in its selector check
_RFLAGS_MUST_BE_ZERO = (1 << 3) | (1 << 5) | (1 << 15) | (1 << 17) | ~((1 << 22) - 1)


@dataclass(frozen=True, slots=True)
class FredMsrs:
    """IA32_FRED_CONFIG (0x1D4), IA32_FRED_STKLVLS (0x1D0), IA32_FRED_RSP1-3 (0x1CD-0x1CF)."""

    config: int
    stklvls: int
    rsp: tuple[int, int, int, int]  # RSP0 is for events from ring 3

    @property
    def entry(self) -> int:
        return self.config & ~0xFFF

    @property
    def redzone(self) -> int:
        return ((self.config >> 6) & 7) * 64

    @property
    def interrupt_level(self) -> int:
        return (self.config >> 9) & 3


def enabled(cpu: Cpu) -> bool:
    return bool(cpu.cr4 & CR4_FRED)


def _stack_level(msrs: FredMsrs, event: Event) -> int:
    """Bochs fred.cc: interrupts use CONFIG[10:9]; NMI and exceptions STKLVLS; INT n 0."""
    if event.type is EventType.EXT_INT:
        return msrs.interrupt_level
    if event.type is EventType.SW_INT or event.vector >= 32:
        return 0
    return (msrs.stklvls >> (2 * event.vector)) & 3


def event_data(cpu: Cpu, event: Event) -> int:
    """#PF: the faulting address; #DB: its DR6 condition bits; others 0."""
    if event.data is not None:
        return event.data  # given by VM entry (the injected-event data field)
    if event.type is EventType.HW_EXCEPTION and event.vector == Vec.PF:
        return cpu.cr2
    if event.type is EventType.HW_EXCEPTION and event.vector == Vec.DB:
        return event.dr6
    return 0


def ss_word(cpu: Cpu, event: Event) -> int:
    """SS + event information (frame +40): selector, STI, INT n, NMI, vector, type, 64-bit, nested, length."""
    word = cpu.ss | (event.vector << 32) | (int(event.type) << 48) | SS_64BIT
    in_shadow = cpu.shadow if event.insn_rip is None and not event.push_rf else cpu.shadow_prev
    if in_shadow is Shadow.STI:
        word |= SS_STI
    if event.type is EventType.SW_INT:
        word |= SS_SWINT
    if event.type is EventType.NMI:
        word |= SS_NMI
    if event.nested:
        word |= SS_NESTED
    if event.insn_rip is not None:
        word |= (event.rip - event.insn_rip) << 60
    return word


def deliver_once(cpu: Cpu, event: Event, rflags: int, error_code: int | None) -> tuple[int, int, tuple]:
    """Push the frame; returns (handler, new RSP, frame). Nothing changes if a write faults."""
    msrs = cpu.fred
    level = max(_stack_level(msrs, event), cpu.csl)
    top = msrs.rsp[level] if level > cpu.csl else (cpu.regs[RSP] - msrs.redzone) & ~0x3F
    frame = (error_code or 0, event.rip, cpu.cs | (cpu.csl << CS_LEVEL_SHIFT), rflags,
             cpu.regs[RSP], ss_word(cpu, event), event_data(cpu, event), 0)
    base = (top - FRAME_SIZE) & cpu.addr_mask
    for i in range(len(frame)):
        cpu.check_write(base + 8 * i, 8)
    for i, word in enumerate(frame):
        cpu.write(base + 8 * i, 8, word)
    cpu.csl = level
    return msrs.entry + KERNEL_ENTRY, base, frame


def build_erets(rip_here: int):
    """ERETS: return to CPL 0 from a FRED frame (Bochs fred.cc ERETS)."""

    def run(c):
        if not enabled(c):
            raise Fault(Vec.UD)
        sp = c.regs[RSP]
        _, new_rip, cs, flags, new_rsp, ss = (c.read(sp + 8 * k, 8) for k in range(6))
        if cs & ~_CS_AUX != c.cs or (ss & 0xFFFFFFFF) & ~_CS_AUX != c.ss:
            raise Fault(Vec.GP, 0)
        if not flags & 2 or flags & _RFLAGS_MUST_BE_ZERO:
            raise Fault(Vec.GP, 0)
        c.csl = min(c.csl, (cs >> CS_LEVEL_SHIFT) & 3)
        c.rip, c.rflags, c.regs[RSP] = new_rip, flags, new_rsp
        if ss & SS_STI and flags & IF:
            c.shadow = Shadow.STI  # the STI shadow the event interrupted goes on
        if ss & SS_SWINT and flags & TF:
            c.pending_dbg |= DR6_BS  # the single-step trap INT n owed (FRED spec; Bochs)
        unblock = bool(ss & SS_NMI) and c.nmi_blocked
        if ss & SS_NMI:
            c.nmi_blocked = False
        c.attn = True
        c.trace.append(Iret(rip_here, new_rip, c.retired + 1, unblock))

    return run


def build_eretu(rip_here: int):
    def run(c):
        if not enabled(c):
            raise Fault(Vec.UD)
        raise ModelLimit("ERETU (return to ring 3) is not modelled", rip_here)

    return run


def delivery_record(cpu: Cpu, event: Event, handler: int, rsp: int, frame: tuple) -> Delivery:
    return Delivery(event.vector, event.type, frame[0] if event.error_code is not None else None,
                    event.rip, cpu.retired, handler, rsp, frame,
                    undefined_frame_bits(event.vector, event.type, len(frame), WORD_MASK),
                    saved_ip_undefined(event.vector, event.type))
