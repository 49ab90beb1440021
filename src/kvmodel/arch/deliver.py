"""Event delivery through the IDT in IA-32e and 32-bit protected mode, and through the
interrupt vector table in real-address mode (SDM 20.1.4).

SDM 6.12 (gates), 6.14 (64-bit delivery and frame), 6.15 (exception
classes and the double-fault rules), 6.7.1 (NMI blocking), 17.3.1 (RF, TF).

A delivery either completes (frame pushed, handler entered) or raises a
second exception; `deliver` then applies SDM Table 6-5 until one delivery
completes or the processor shuts down. A fault during delivery returns to
the instruction that raised a software event, else to the event's return
address (SDM 26.5.1.1 states the same for injected events).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from kvmodel.arch import fred, task
from kvmodel.arch.events import (
    DfOutcome,
    Event,
    EventType,
    Vec,
    df_class,
    double_fault_outcome,
    has_error_code,
    saved_ip_undefined,
    undefined_frame_bits,
)  # fmt: skip
from kvmodel.arch.faults import Fault
from kvmodel.arch.observe import Delivery, Shutdown
from kvmodel.arch.regs import (
    AC,
    CODE_SELECTOR,
    DATA_SELECTOR,
    DR6_B0_B3,
    DR7_GD,
    IF,
    NT,
    REAL_OFFSET_MASK,
    RF,
    RPL_MASK,
    RSP,
    TF,
    TSS_RSP0,
    TSS_SS0,
    USER_CODE_SELECTOR,
    Mode,
    Shadow,
    canonical,
    cpl_of,
    real_base,
)  # fmt: skip
from kvmodel.errors import ModelLimit

if TYPE_CHECKING:
    from kvmodel.arch.cpu import Cpu

INTERRUPT_GATE = 0xE  # 32-bit gate in protected mode, 64-bit gate in IA-32e mode
TRAP_GATE = 0xF
GATES_16BIT = (0x6, 0x7)
TSS_IST1 = 0x24  # 64-bit TSS: IST slot k at 0x24 + 8*(k-1) (SDM 7.7 Figure 7-11)


def deliver(cpu: Cpu, event: Event, *, screened: bool = False, injected: bool = False) -> None:
    """Deliver `event`, escalating nested faults by SDM 6.15 Table 6-5.

    `screened`: the host already saw the event. `injected`: VM entry injects
    it; it is never intercepted itself (SDM 26.5.1.2) and leaves DR6/DR7
    alone (SDM 26.5.1.1). Nested faults are always shown to the host, with
    `cpu.vectoring` naming the event whose delivery they interrupted.
    """
    host = cpu.host
    if host is not None and not (screened or injected):
        host.event(cpu, event)
    if event.vector == Vec.DB and event.type is EventType.HW_EXCEPTION and not injected:
        # DR6 records the #DB as it is raised, before its delivery can fault or exit; an
        # intercepted #DB never gets here (SDM 17.2.3, 27.1).
        cpu.dr6 = (cpu.dr6 & ~DR6_B0_B3) | event.dr6  # B0-B3 rewritten, the rest sticky
        cpu.dr7 &= ~DR7_GD
    while True:
        cpu.vectoring = event
        if not event.type.is_software:
            _drop_held_debug_traps(cpu)
        try:
            cpu.charge_delivery()  # a Notify VM exit may end the guest's turn here
            _deliver_once(cpu, event, injected)
            cpu.vectoring = None
            return
        except Fault as fault:
            cpu.db_hits = 0  # the aborted delivery's pushes do not count
            resume = event.insn_rip if event.insn_rip is not None else event.rip
            nested = Event(fault.vector, EventType.HW_EXCEPTION, resume, error_code=fault.error_code,
                           push_rf=True, nested=True, fault_address=fault.cr2)
            if host is not None:
                host.event(cpu, nested)  # may exit with `event` as the vectoring event
            if fault.cr2 is not None:
                cpu.cr2 = fault.cr2  # CR2 is written when #PF is detected, even if it becomes #DF
            outcome = double_fault_outcome(df_class(event.vector, event.type),
                                           df_class(fault.vector, EventType.HW_EXCEPTION))
            if outcome is DfOutcome.SHUTDOWN:
                _shutdown(cpu, event, fault.vector)
                return
            if outcome is DfOutcome.DOUBLE_FAULT:
                # The #DF frame's CS, RIP and RF are undefined (SDM 6.15; undefined_frame_bits()).
                # The model pushes RF=1 as Bochs does (exception.cc: the fault set RF before it
                # turned into #DF); the delivery record marks it undefined.
                event = Event(Vec.DF, EventType.HW_EXCEPTION, resume, error_code=0, push_rf=True)
                if host is not None:
                    cpu.vectoring = None  # a #DF is not "during delivery" (SDM 27.2.3)
                    host.event(cpu, event)
            else:
                event = nested
            injected = False


def _drop_held_debug_traps(cpu: Cpu) -> None:
    """A delivery other than INT n/INT3/INTO loses the debug traps MOV SS held back.

    The one statement of the rule (hw/vmx's injection relies on it too). Pending
    debug traps reach a delivery only under MOV SS blocking: at any other boundary
    they are delivered first (pending_source()); an event VM entry injects without
    that blocking has cleared them already (SDM 26.6.3, hw/vmx/cpu.py _inject()).
    Only INT n, INT3 and INTO then carry them into the handler, where they are
    delivered before its first instruction; a fault of the instruction after
    MOV SS and INT1 (ICEBP) lose them, and DR6 never records them. Sources: SDM
    26.6.3 (the same rule for an event VM entry injects: pending debug exceptions
    survive only a software interrupt or software exception under MOV SS
    blocking); kvm-unit-tests x86/debug.c ("MOV SS + watchpoint + ICEBP": one
    #DB; "Single-Step + ICEBP #DB w/ MOVSS blocking": DR6 = 0xffff0ff0, no BS);
    Linux selftests x86/mov_ss_trap.c (hardware: "Any fault: drop the pending
    #DB trap", "ICEBP: ... do not deliver the watchpoint trap"); Bochs
    exception.cc interrupt() discards debug_trap on every delivery (wrongly for
    INT n/INT3/INTO). A code breakpoint #DB on the instruction after MOV SS
    losing them too follows from "a hardware exception" but is UNVERIFIED: none
    of these sources tries it.
    """
    cpu.pending_dbg = 0


def _shutdown(cpu: Cpu, event: Event, second: int) -> None:
    """Triple fault (SDM 6.15 Interrupt 8): shutdown is final in this model."""
    cpu.vectoring = None
    cpu.shutdown = True
    cpu.halted = False
    cpu.attn = True
    cpu.trace.append(Shutdown(event.rip, cpu.retired, event.vector, second))


def ext_bit(cpu: Cpu, event: Event) -> int:
    """EXT (bit 0) of the error codes the faults of this delivery push.

    Intel (SDM 6.13): set for an event external to the program, "such as an interrupt or an
    earlier exception": every event but INT n, INT3 and INTO. AMD (APM Vol.2 8.4.1: set when
    "the exception source is external to the processor"): set for NMI and INTR only; a fault
    while delivering an exception leaves it clear, as AMD hardware shows in the KVM selftest
    nested_exceptions_test.c (GP_ERROR_CODE_AMD: the #GP of an injected #SS's delivery
    through an empty IDT is #SS * 8 + IDT, no EXT). NMI/INTR on AMD: UNVERIFIED."""
    if cpu.amd_ext:
        return 1 if event.type in (EventType.NMI, EventType.EXT_INT) else 0
    return 0 if event.type.is_software else 1


def _deliver_once(cpu: Cpu, event: Event, injected: bool) -> None:
    if event.type is EventType.NMI:
        cpu.nmi_blocked = True  # blocking starts with delivery, even if it faults (SDM 27.1)
    if fred.enabled(cpu):
        _deliver_fred(cpu, event)
        return
    if cpu.mode is Mode.REAL16:
        _deliver_real(cpu, event)
        return
    ext = ext_bit(cpu, event)
    idt_error = event.vector * 8 + 2 + ext
    gate = (_read_gate64 if cpu.mode is Mode.LONG64 else _read_gate32)(cpu, event.vector, idt_error)
    cpl = cpl_of(cpu.cs)
    # INT n, INT3 and INTO through a gate of lower privilege than the caller: #GP with the
    # gate's IDT error code, EXT clear; INT1 and hardware events skip the check (SDM 6.12.1.1).
    if event.type.is_software and gate.dpl < cpl:
        raise Fault(Vec.GP, event.vector * 8 + 2)
    if not gate.present:
        raise Fault(Vec.NP, idt_error)
    if gate.type == task.TASK_GATE:
        _deliver_through_task_gate(cpu, event, gate.selector, ext)
        return
    target_cpl = _target_privilege(cpu, gate.selector, cpl, ext)

    pushed_flags = cpu.rflags | RF if event.push_rf else cpu.rflags
    error_code = event.error_code if has_error_code(event.vector, event.type) else None
    if cpu.mode is Mode.LONG64:
        rsp, ss, frame = _push_frame64(cpu, event, gate.ist, target_cpl < cpl, pushed_flags, error_code)
    else:
        rsp, ss, frame = _push_frame32(cpu, event, target_cpl < cpl, pushed_flags, error_code, ext)

    # Success: only now does the processor state change (SDM 6.12.1.2).
    cpu.regs[RSP] = rsp
    cpu.rip = gate.offset
    cpu.cs = (gate.selector & ~RPL_MASK) | target_cpl  # CS.RPL becomes the new CPL (SDM 6.12.1)
    cpu.ss = ss
    cleared = TF | NT | RF | (IF if gate.type == INTERRUPT_GATE else 0)
    cpu.rflags &= ~cleared
    _delivered(cpu, event)
    cpu.trace.append(Delivery(event.vector, event.type, error_code, event.rip, cpu.retired,
                              gate.offset, rsp, frame,
                              undefined_frame_bits(event.vector, event.type, len(frame), cpu.addr_mask),
                              saved_ip_undefined(event.vector, event.type)))


def _deliver_through_task_gate(cpu: Cpu, event: Event, selector: int, ext: int) -> None:
    """A task gate (32-bit IDT only): the event's handler is a task (SDM 6.12.2, task.py).

    The old task keeps the event's return address and EFLAGS (RF as its frame would
    push it) in its TSS; the error code, if any, is the one word on the new task's
    stack; the new EFLAGS come from the TSS with NT set (TF, IF are not cleared)."""
    task.gate_target(cpu, selector, ext)
    error_code = event.error_code if has_error_code(event.vector, event.type) else None
    task.switch(cpu, selector & 0xFFF8, task.Reason.GATE, event.rip,
                task.saved_eflags(cpu.rflags, event.push_rf), error_code)
    # A data breakpoint hit by the TSS accesses traps as a delivery's pushes do (UNVERIFIED:
    # the SDM does not say whether they match DR0-DR3).
    _delivered(cpu, event)
    frame = () if error_code is None else (error_code,)
    cpu.trace.append(Delivery(event.vector, event.type, error_code, event.rip, cpu.retired,
                              cpu.rip, cpu.regs[RSP], frame, (),
                              saved_ip_undefined(event.vector, event.type)))


def _target_privilege(cpu: Cpu, selector: int, cpl: int, ext: int) -> int:
    """The handler's CPL, the DPL of the gate's code segment, checked as the INT n pseudocode
    (SDM Vol.2) does: a null selector is #GP(EXT); a segment that is not code, or whose DPL
    is above CPL, is #GP(selector + EXT)."""
    if selector & 0xFFFC == 0:
        raise Fault(Vec.GP, ext)
    if selector & 0xFFFC == CODE_SELECTOR:
        return 0
    if selector & 0xFFFC == USER_CODE_SELECTOR & 0xFFFC and cpl == 3:
        raise ModelLimit("an interrupt handler at CPL 3 (a gate to the user code segment) "
                         "is not modelled", cpu.rip)
    raise Fault(Vec.GP, (selector & 0xFFFC) | ext)  # not a code segment, or DPL > CPL


def _deliver_fred(cpu: Cpu, event: Event) -> None:
    """FRED delivery (fred.py): one 64-byte frame, RFLAGS = 2, pending debug traps dropped."""
    if cpl_of(cpu.cs):
        raise ModelLimit("FRED delivery from CPL 3 is not modelled", cpu.rip)
    pushed_flags = cpu.rflags | RF if event.push_rf else cpu.rflags
    error_code = event.error_code if has_error_code(event.vector, event.type) else None
    handler, rsp, frame = fred.deliver_once(cpu, event, pushed_flags, error_code)
    cpu.regs[RSP] = rsp
    cpu.rip = handler
    cpu.rflags = fred.RFLAGS_AFTER_DELIVERY
    cpu.db_hits = 0
    cpu.pending_dbg = 0  # Bochs fred.cc: the new context starts with no debug trap
    _delivered(cpu, event)
    cpu.trace.append(fred.delivery_record(cpu, event, handler, rsp, frame))


IVT_ENTRY = 4  # real mode: a 16-bit offset, then a 16-bit segment (SDM 20.1.4 Figure 20-2)
REAL_FRAME_WORD = 2


def _deliver_real(cpu: Cpu, event: Event) -> None:
    """Real-address-mode delivery (SDM 20.1.4; Vol.2 INT n REAL-ADDRESS-MODE): the IVT entry
    at IDTR.base + 4 * vector gives CS:IP; FLAGS, CS and IP are pushed as 16-bit words and
    IF, TF and AC cleared. No exception pushes an error code in real mode, and there is no
    privilege check: INT n reaches any vector.

    An entry beyond IDTR.limit is #GP (Table 6-5 then escalates as in protected mode); the
    model has no SS limit, so a frame that wraps SP is a ModelLimit rather than #SS."""
    entry = event.vector * IVT_ENTRY
    if entry + IVT_ENTRY - 1 > cpu.idtr_limit:
        raise Fault(Vec.GP, 0)
    ivt = cpu.read(cpu.idtr_base + entry, IVT_ENTRY)
    handler_ip, handler_cs = ivt & 0xFFFF, ivt >> 16
    sp = cpu.regs[RSP] & REAL_OFFSET_MASK
    if sp and sp < 3 * REAL_FRAME_WORD:
        raise ModelLimit(f"real mode: a frame that wraps SP ({sp:#x}) is not modelled", cpu.rip)
    new_sp = (sp - 3 * REAL_FRAME_WORD) & REAL_OFFSET_MASK
    stack = real_base(cpu.ss)
    words = (cpu.rflags & 0xFFFF, cpu.cs, event.rip & REAL_OFFSET_MASK)
    for n in range(len(words)):
        cpu.check_write(stack + ((sp - REAL_FRAME_WORD * (n + 1)) & REAL_OFFSET_MASK), REAL_FRAME_WORD)
    for n, word in enumerate(words):
        cpu.write(stack + ((sp - REAL_FRAME_WORD * (n + 1)) & REAL_OFFSET_MASK), REAL_FRAME_WORD, word)

    cpu.regs[RSP] = (cpu.regs[RSP] & ~REAL_OFFSET_MASK) | new_sp
    cpu.load_real_cs(handler_cs)
    cpu.rip = handler_ip
    # SDM 20.1.4 clears IF, TF and AC; RF too, as protected-mode delivery does (the FLAGS image
    # has no RF bit to carry it; UNVERIFIED: the real-mode pseudocode does not name RF).
    cpu.rflags &= ~(IF | TF | AC | RF)
    _delivered(cpu, event)
    frame = tuple(reversed(words))  # IP, CS, FLAGS from the lowest address
    undefined_ip = saved_ip_undefined(event.vector, event.type)
    # #DF's saved CS:IP is undefined (SDM 6.15): its first two words
    undefined = (REAL_OFFSET_MASK, 0xFFFF, 0) if undefined_ip else ()
    cpu.trace.append(Delivery(event.vector, event.type, None, event.rip, cpu.retired, handler_ip,
                              new_sp, frame, undefined, undefined_ip))


class _Gate(NamedTuple):
    offset: int
    type: int
    ist: int
    selector: int
    dpl: int
    present: bool


def _read_gate64(cpu: Cpu, vector: int, idt_error: int) -> _Gate:
    """16-byte IA-32e gate (SDM 6.14.1 Figure 6-7): offset, type, IST, selector, DPL, P."""
    if vector * 16 + 15 > cpu.idtr_limit:
        raise Fault(Vec.GP, idt_error)
    addr = cpu.idtr_base + vector * 16
    low = cpu.read(addr, 8)
    high = cpu.read(addr + 8, 8)
    gate_type = (low >> 40) & 0x1F  # bit 4 (S) must be 0 for a gate
    if gate_type not in (INTERRUPT_GATE, TRAP_GATE):
        raise Fault(Vec.GP, idt_error)
    offset = (low & 0xFFFF) | ((low >> 32) & 0xFFFF0000) | ((high & 0xFFFFFFFF) << 32)
    return _Gate(offset, gate_type, (low >> 32) & 7, (low >> 16) & 0xFFFF, (low >> 45) & 3,
                 bool((low >> 47) & 1))


def _read_gate32(cpu: Cpu, vector: int, idt_error: int) -> _Gate:
    """8-byte protected-mode gate (SDM 6.11 Figure 6-2): offset, type, selector, DPL, P."""
    if vector * 8 + 7 > cpu.idtr_limit:
        raise Fault(Vec.GP, idt_error)
    gate = cpu.read(cpu.idtr_base + vector * 8, 8)
    gate_type = (gate >> 40) & 0x1F  # bit 4 (S) must be 0 for a gate
    if gate_type in GATES_16BIT:
        raise ModelLimit(f"16-bit gate for vector {vector} is not modelled", cpu.rip)
    if gate_type not in (INTERRUPT_GATE, TRAP_GATE, task.TASK_GATE):
        raise Fault(Vec.GP, idt_error)
    offset = (gate & 0xFFFF) | ((gate >> 32) & 0xFFFF0000)
    return _Gate(offset, gate_type, 0, (gate >> 16) & 0xFFFF, (gate >> 45) & 3,
                 bool((gate >> 47) & 1))


def _push_frame64(cpu: Cpu, event: Event, ist: int, inner: bool, rflags: int,
                  error_code: int | None) -> tuple[int, int, tuple[int, ...]]:
    """Align to 16 and push SS, RSP, RFLAGS, CS, RIP[, error code] (SDM 6.14.2, 6.14.5).

    `inner`: the handler is more privileged; the stack is the TSS's RSP0 (or the IST
    slot) and SS becomes a null selector with RPL 0 (SDM 6.14.4). Returns RSP, SS, frame."""
    old_rsp = cpu.regs[RSP]
    if ist:
        top = cpu.read(cpu.tr_base + TSS_IST1 + 8 * (ist - 1), 8)
    elif inner:
        top = cpu.read(cpu.tr_base + TSS_RSP0, 8)
    else:
        top = old_rsp
    top &= ~0xF
    words = [cpu.ss, old_rsp, rflags, cpu.cs, event.rip]
    if error_code is not None:
        words.append(error_code)
    rsp, frame = _push(cpu, top, words, 8)
    return rsp, 0 if inner else cpu.ss, frame


def _push_frame32(cpu: Cpu, event: Event, inner: bool, eflags: int, error_code: int | None,
                  ext: int) -> tuple[int, int, tuple[int, ...]]:
    """EFLAGS, CS, EIP[, error code] (SDM 6.12.1 Figure 6-4); to a more privileged handler,
    first SS and ESP, on the stack SS0:ESP0 of the TSS names (SDM 6.12.1). Returns ESP, SS, frame."""
    words = [eflags, cpu.cs, event.rip]
    if error_code is not None:
        words.append(error_code)
    if not inner:
        rsp, frame = _push(cpu, cpu.regs[RSP], words, 4)
        return rsp, cpu.ss, frame
    esp0 = cpu.read(cpu.tr_base + TSS_RSP0, 4)
    ss0 = cpu.read(cpu.tr_base + TSS_SS0, 2)
    if ss0 != DATA_SELECTOR:  # SS0 must be a writable data segment with DPL and RPL 0
        raise Fault(Vec.TS, (ss0 & 0xFFFC) | ext)
    rsp, frame = _push(cpu, esp0, [cpu.ss, cpu.regs[RSP], *words], 4)
    return rsp, ss0, frame


def _push(cpu: Cpu, top: int, words: list[int], size: int) -> tuple[int, tuple[int, ...]]:
    """Write the frame below `top`; every slot is checked before any is written."""
    rsp = (top - size * len(words)) & cpu.addr_mask
    if cpu.mode is Mode.LONG64 and not canonical(rsp, size * len(words)):
        # SDM 6.14: #SS with its own error code rules, perhaps through the TSS or IST
        raise ModelLimit("an event frame pushed at a non-canonical stack address is not "
                         "modelled", cpu.rip)
    for i in range(len(words)):
        cpu.check_write(top - size * (i + 1), size)
    for i, word in enumerate(words):
        cpu.write(top - size * (i + 1), size, word)
    return rsp, tuple(reversed(words))


def _delivered(cpu: Cpu, event: Event) -> None:
    """What every completed delivery leaves: no shadow, no HLT, the software-event instruction
    retired with it, and a data breakpoint its pushes hit held as a trap before the handler."""
    cpu.shadow = Shadow.NONE
    cpu.halted = False
    if event.insn_rip is not None:
        cpu.retired += 1
    if cpu.db_hits:
        cpu.pending_dbg |= cpu.db_hits
        cpu.db_hits = 0
    cpu.attn = True
    cpu.delivered += 1
