"""Priority among simultaneous exceptions and interrupts, as a table.

SDM 6.9 Table 6-2, highest first. The processor services the highest class
pending at an instruction boundary; lower-priority exceptions are discarded
(they recur when the instruction runs again) and lower-priority interrupts
stay pending. Classes 1-3 are not modelled by kvmodel (no RESET, #MC, task
switches, SMI or INIT); `Source` names how each modelled class shows up.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Source(IntEnum):
    """A modelled priority class, in the order the CPU checks them."""

    DEBUG_TRAP = 4  # single-step, data breakpoint of the previous instruction
    NMI = 5
    INTR = 6  # maskable interrupt from the local APIC
    CODE_BREAKPOINT = 7  # instruction breakpoint on the next instruction
    FETCH_FAULT = 8  # #PF fetching the next instruction
    DECODE_FAULT = 9  # #UD decoding it
    EXECUTE_FAULT = 10  # faults while executing it (#GP, data #PF, ...)


@dataclass(frozen=True, slots=True)
class PriorityClass:
    rank: int
    name: str
    members: str
    source: Source | None  # None: not modelled
    cite: str = "SDM 6.9 Table 6-2"


PRIORITY: tuple[PriorityClass, ...] = (
    PriorityClass(1, "hardware reset and machine checks", "RESET, #MC", None),
    PriorityClass(2, "trap on task switch", "T flag in TSS", None),
    PriorityClass(3, "external hardware interventions", "FLUSH, STOPCLK, SMI, INIT", None),
    PriorityClass(4, "traps on the previous instruction",
                  "breakpoints, debug trap exceptions (TF, data/I-O breakpoint)",
                  Source.DEBUG_TRAP),
    PriorityClass(5, "nonmaskable interrupts", "NMI", Source.NMI),
    PriorityClass(6, "maskable hardware interrupts", "INTR", Source.INTR),
    PriorityClass(7, "code breakpoint fault", "instruction breakpoint #DB",
                  Source.CODE_BREAKPOINT),
    PriorityClass(8, "faults from fetching next instruction", "code-segment limit, code #PF",
                  Source.FETCH_FAULT),
    PriorityClass(9, "faults from decoding the next instruction",
                  "length > 15 bytes, invalid opcode, coprocessor not available",
                  Source.DECODE_FAULT),
    PriorityClass(10, "faults on executing an instruction",
                  "#OF, #BR, #TS, #NP, #SS, #GP, data #PF, #AC, #MF, #XM, #VE",
                  Source.EXECUTE_FAULT),
)  # fmt: skip

MODELLED: tuple[Source, ...] = tuple(c.source for c in PRIORITY if c.source is not None)
