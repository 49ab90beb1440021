"""Hardware task switches in 32-bit protected mode: IDT task gates and IRET with NT=1.

SDM Vol.3 7.3 "Task Switching" (the steps), 7.2.1 Figure 7-2 (the 32-bit TSS),
7.4 "Task Linking" (back link, NT, busy bit), 6.12.2 "Interrupt Tasks", Vol.2
INT n pseudocode (TASK-GATE) and IRET pseudocode (TASK-RETURN); Bochs
cpu/tasking.cc task_switch() for the order of work.

The model's GDT is part of the model (regs.py): the TSS descriptors it holds are
`cpu.tasks`, selector -> (TSS base, busy). Every descriptor is a present 32-bit
TSS (type 9, or 11 when busy) with limit 0x67, DPL 0; the task running at reset
is TSS_SELECTOR (GDT index 3), busy. 64-bit mode has no task switching: a task
gate in an IA-32e IDT is #GP (SDM 6.14.1; deliver.py _read_gate64()).

What a task may hold is what the rest of the model tracks: CS 0x08 and SS 0x10
(CPL 0, flat), DS/ES/FS/GS 0x10 (the model reads them as 0x10 and saves them
so), no LDT, the CR3 in use, no virtual-8086 mode. Anything else in a TSS it
switches to stops the run with a ModelLimit.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

from kvmodel.arch.events import Vec
from kvmodel.arch.faults import Fault
from kvmodel.arch.regs import (
    CODE_SELECTOR,
    CR0_TS,
    DATA_SELECTOR,
    DR6_BT,
    NT,
    RF,
    RFLAGS_FIXED,
    RSP,
    VM,
)  # fmt: skip
from kvmodel.errors import ModelLimit

if TYPE_CHECKING:
    from kvmodel.arch.cpu import Cpu

TSS_SELECTOR = 0x18  # GDT index 3: the task at reset (export/boot.py loads TR with it)
FIRST_TASK_SELECTOR = 0x38  # the TSSs a scenario's task gates name: GDT index 7, 8, ...
TASK_GATE = 0x5  # the IDT gate type (SDM 6.11 Figure 6-2)
TSS32_LIMIT = 0x67  # the smallest limit of a 32-bit TSS (SDM 7.2.2)
DR7_LOCAL_ENABLES = 0x155  # L0-L3 and LE, cleared by every task switch (SDM 17.2.4)


class Tss32(IntEnum):
    """Offsets in a 32-bit TSS (SDM 7.2.1 Figure 7-2)."""

    PREVIOUS_TASK_LINK = 0x00
    ESP0 = 0x04
    SS0 = 0x08
    CR3 = 0x1C
    EIP = 0x20
    EFLAGS = 0x24
    EAX = 0x28  # then ECX, EDX, EBX, ESP, EBP, ESI, EDI: the general registers in encoding order
    ES = 0x48  # then CS, SS, DS, FS, GS: 4 bytes apart, the selector in the low 2
    CS = 0x4C
    SS = 0x50
    DS = 0x54
    FS = 0x58
    GS = 0x5C
    LDT = 0x60
    T = 0x64  # bit 0: the debug trap flag (SDM 7.2.1, 17.3.1.5)


class Reason(IntEnum):
    """What started the switch: the four sources of SDM 7.3, as KVM's TASK_SWITCH_* name them."""

    CALL = 0
    IRET = 1
    JMP = 2
    GATE = 3  # an interrupt or exception through a task gate (SDM 6.12.2)


GPRS = 8  # EAX..EDI, in the order both the TSS and cpu.regs keep them
SEGMENTS = (Tss32.ES, Tss32.CS, Tss32.SS, Tss32.DS, Tss32.FS, Tss32.GS)


def initial_tasks(tss_base: int) -> dict[int, tuple[int, bool]]:
    """The model's GDT at reset: the running task's TSS, busy (LTR sets the bit, SDM Vol.2 LTR)."""
    return {TSS_SELECTOR: (tss_base, True)}


def gate_target(cpu: Cpu, selector: int, ext: int) -> int:
    """The TSS base a task gate's selector names, checked as INT n's TASK-GATE does (SDM
    Vol.2 INT n): TI set, outside the GDT, not a TSS, or busy is #GP(selector + EXT)."""
    entry = cpu.tasks.get(selector & 0xFFF8) if not selector & 4 else None
    if entry is None or entry[1]:
        raise Fault(Vec.GP, (selector & 0xFFFC) | ext)
    return entry[0]


def switch(cpu: Cpu, selector: int, reason: Reason, return_eip: int, saved_flags: int,
           error_code: int | None = None) -> None:
    """Switch from the task in TR to the TSS `selector` names (SDM 7.3 steps 5-13).

    `return_eip` and `saved_flags` are the EIP and EFLAGS saved in the old TSS (the
    event's return address and EFLAGS with RF as the event pushes it; after IRET, the
    next instruction and NT cleared). `error_code`: pushed on the new task's stack
    (SDM 6.12.2). Faults before the commit point leave the old task as it was; a fault
    after it (loading the new state, pushing the error code) would be the new task's,
    which the model does not deliver (a ModelLimit).
    """
    if cpu.host is not None:
        # VMX: a task switch is an unconditional VM exit (SDM 25.1.2, exit reason 9); SVM:
        # KVM sets the TASK_SWITCH intercept (exit 0x7d). KVM then emulates the switch
        # (kvm_task_switch(), emulator_task_switch()), which the model does not yet.
        raise ModelLimit("a task switch under KVM (the task-switch VM exit and KVM's "
                         "emulator_task_switch()) is not modelled", cpu.rip)
    new_base = cpu.tasks[selector][0]
    image = _read_tss(cpu, new_base)  # a fault reading it is the old task's (step 5)
    _check_loadable(cpu, image)
    old_base = cpu.tasks[cpu.tr][0]
    cpu.check_write(old_base + Tss32.EIP, Tss32.LDT - Tss32.EIP)
    nested = reason in (Reason.CALL, Reason.GATE)
    if nested:
        cpu.check_write(new_base + Tss32.PREVIOUS_TASK_LINK, 2)
    # Commit point (SDM 7.3 step 8; Bochs tasking.cc "Commit point").
    if reason in (Reason.IRET, Reason.JMP):
        cpu.tasks[cpu.tr] = (old_base, False)  # step 7: the old task is no longer busy
    _save(cpu, old_base, return_eip, saved_flags)
    if nested:
        cpu.write(new_base + Tss32.PREVIOUS_TASK_LINK, 2, cpu.tr)  # the back link (SDM 7.4)
        image[Tss32.EFLAGS] |= NT
    cpu.tasks[selector] = (new_base, True)  # IRET finds it busy already (step 10)
    cpu.tr = selector
    cpu.cr0 |= CR0_TS  # step 11: x87/SSE state is the old task's until saved (SDM 2.5)
    _load(cpu, image)
    if error_code is not None:
        _push_error_code(cpu, error_code)


def task_return(cpu: Cpu, next_eip: int) -> None:
    """IRET with NT=1 in protected mode: back to the task the back link names (SDM Vol.2
    IRET TASK-RETURN). The link must name a busy TSS in the GDT, else #TS(link)."""
    current = cpu.tasks.get(cpu.tr)
    if current is None:  # a CPU the model built without its GDT (a migration's copy)
        raise ModelLimit("IRET with NT=1 on a CPU without the model's TSS descriptors",
                         cpu.rip)
    base = current[0]
    link = cpu.read(base + Tss32.PREVIOUS_TASK_LINK, 2)
    entry = cpu.tasks.get(link & 0xFFF8) if not link & 4 else None
    if entry is None or not entry[1]:
        raise Fault(Vec.TS, link & 0xFFFC)
    switch(cpu, link & 0xFFF8, Reason.IRET, next_eip, cpu.rflags & ~NT)


def _read_tss(cpu: Cpu, base: int) -> dict[int, int]:
    """The dynamic fields of a 32-bit TSS, and CR3, LDT and the T flag (SDM 7.2.1)."""
    image = {field: cpu.read(base + field, 4) for field in (Tss32.CR3, Tss32.EIP, Tss32.EFLAGS)}
    for n in range(GPRS):
        image[Tss32.EAX + 4 * n] = cpu.read(base + Tss32.EAX + 4 * n, 4)
    for field in (*SEGMENTS, Tss32.LDT, Tss32.T):
        image[field] = cpu.read(base + field, 2)
    return image


def _check_loadable(cpu: Cpu, image: dict[int, int]) -> None:
    """Refuse, before anything changes, a task state the model cannot hold (module doc)."""
    def limit(what: str) -> ModelLimit:
        return ModelLimit(f"a task switch to a TSS with {what} is not modelled", cpu.rip)

    if image[Tss32.CS] != CODE_SELECTOR or image[Tss32.SS] != DATA_SELECTOR:
        raise limit(f"CS {image[Tss32.CS]:#x} and SS {image[Tss32.SS]:#x} (only CPL 0's 0x8 "
                    "and 0x10)")
    data = {image[f] for f in (Tss32.DS, Tss32.ES, Tss32.FS, Tss32.GS)}
    if data != {DATA_SELECTOR}:
        raise limit("DS, ES, FS or GS other than 0x10 (the model does not track them)")
    if image[Tss32.LDT] & 0xFFFC:
        raise limit("an LDT")
    if image[Tss32.CR3] != cpu.cr3:
        raise limit(f"another CR3 ({image[Tss32.CR3]:#x})")
    if image[Tss32.EFLAGS] & VM:
        raise limit("EFLAGS.VM set (virtual-8086 mode)")


def _save(cpu: Cpu, base: int, eip: int, eflags: int) -> None:
    """Step 9: the old task's EIP, EFLAGS, general registers and selectors; nothing else
    (not CR3, LDT, SS0:ESP0, the link)."""
    cpu.write(base + Tss32.EIP, 4, eip)
    cpu.write(base + Tss32.EFLAGS, 4, eflags)
    for n in range(GPRS):
        cpu.write(base + Tss32.EAX + 4 * n, 4, cpu.regs[n])
    selectors = {Tss32.CS: cpu.cs, Tss32.SS: cpu.ss}
    for field in SEGMENTS:
        cpu.write(base + field, 2, selectors.get(field, DATA_SELECTOR))  # DS etc. read as 0x10


def _load(cpu: Cpu, image: dict[int, int]) -> None:
    """Step 12: the new task's EIP, EFLAGS, registers and selectors; DR7's local enables
    cleared (SDM 17.2.4); the T flag makes a #DB trap with DR6.BT before the task's first
    instruction (SDM 17.3.1.5)."""
    cpu.rip = image[Tss32.EIP]
    cpu.rflags = image[Tss32.EFLAGS] | RFLAGS_FIXED
    for n in range(GPRS):
        cpu.regs[n] = image[Tss32.EAX + 4 * n]
    cpu.cs, cpu.ss = image[Tss32.CS], image[Tss32.SS]
    if cpu.dr7 & DR7_LOCAL_ENABLES:
        cpu.dr7 &= ~DR7_LOCAL_ENABLES
        cpu.update_breakpoints()
    if image[Tss32.T] & 1:
        cpu.pending_dbg |= DR6_BT
    cpu.attn = True


def _push_error_code(cpu: Cpu, error_code: int) -> None:
    """The error code goes on the new task's stack, after the switch (SDM 6.12.2)."""
    esp = (cpu.regs[RSP] - 4) & cpu.addr_mask
    try:
        cpu.check_write(esp, 4)
    except Fault:
        raise ModelLimit("a fault pushing the error code on the new task's stack (a fault in "
                         "the new task's context) is not modelled", cpu.rip) from None
    cpu.write(esp, 4, error_code)
    cpu.regs[RSP] = esp


def saved_eflags(rflags: int, push_rf: bool) -> int:
    """The EFLAGS image an event saves in the old TSS: RF as its frame would push it."""
    return rflags | RF if push_rf else rflags
