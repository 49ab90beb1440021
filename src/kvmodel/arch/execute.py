"""Semantics of the supported instruction subset (SDM Vol.2 instruction pages).

Each builder takes a decoded iced instruction and returns `run(cpu)`, which
performs the instruction and returns None, or the software event (INT n,
INT3, INTO, INT1) the instruction raises. Every fault is raised before any
state is changed, so a faulting instruction leaves no trace (SDM 6.5).
"""

from __future__ import annotations

from collections.abc import Callable

import iced_x86 as iced
from iced_x86 import Code, ConditionCode, Mnemonic, OpKind, Register, RegisterExt

from kvmodel.arch import fred, ghcb, task
from kvmodel.arch.apic import WriteResult
from kvmodel.arch.events import Event, EventType, Vec
from kvmodel.arch.faults import Fault
from kvmodel.arch.observe import Arrival, Iret, Output
from kvmodel.arch.operands import (
    BRANCH_KINDS,
    address,
    reader,
    reg_reader,
    reg_writer,
    size_of,
    stack_address,
    writer,
)  # fmt: skip
from kvmodel.arch.paging import MAXPHYADDR
from kvmodel.arch.regs import (
    AC,
    AF,
    ARITH_FLAGS,
    CF,
    CODE_SELECTOR,
    CR0_EM,
    CR0_MP,
    CR0_TS,
    CR0_WP,
    CR4_DE,
    DATA_SELECTOR,
    DF,
    DR6_BD,
    DR7_GD,
    EFER_NXE,
    EFER_SCE,
    EFER_SVME,
    ID,
    IF,
    IOPL,
    NT,
    OF,
    PF,
    RAX,
    RBX,
    RCX,
    RDX,
    RF,
    RFLAGS_FIXED,
    RPL_MASK,
    RSP,
    SF,
    TF,
    USER_CODE_SELECTOR,
    USER_DATA_SELECTOR,
    VIF,
    VIP,
    VM,
    ZF,
    Mode,
    Shadow,
    cpl_of,
)  # fmt: skip
from kvmodel.errors import ModelLimit

Run = Callable[[object], "Event | None"]

PARITY = bytes(PF if bin(b).count("1") % 2 == 0 else 0 for b in range(256))
DEBUG_PORT = 0xE9

# Flags POPF may change at CPL 0 (SDM Vol.2 POPF): not RF, VM, VIF, VIP.
POPF_MASK = CF | PF | AF | ZF | SF | TF | IF | DF | OF | IOPL | NT | AC | ID
IRET_MASK = POPF_MASK | RF | VIF | VIP  # IRET also loads RF (SDM 17.3.1.1)


def require_cpl0(c) -> None:
    """A privileged instruction at CPL > 0 is #GP(0) (SDM 5.9); the check has priority over
    VM exits and SVM intercepts (SDM 25.1.1, APM 15.7.1), so decode.py makes it first."""
    if c.cs & RPL_MASK:
        raise Fault(Vec.GP, 0)


def iopl(rflags: int) -> int:
    return (rflags & IOPL) >> 12


def loadable_flags(c, mask: int) -> int:
    """Of `mask`, the flags POPF or IRET may change at the current CPL (SDM Vol.2 POPF, IRET):
    IOPL, VIF and VIP only at CPL 0, IF only while CPL <= IOPL; the rest are left alone."""
    cpl = c.cs & RPL_MASK
    if cpl == 0:
        return mask
    mask &= ~(IOPL | VIF | VIP)
    if cpl > iopl(c.rflags):
        mask &= ~IF
    return mask


def _require_iopl(c) -> None:
    """CLI and STI with CPL > IOPL are #GP(0) (SDM Vol.2 CLI, STI; CR4.VME/PVI are 0)."""
    if c.cs & RPL_MASK > iopl(c.rflags):
        raise Fault(Vec.GP, 0)


def _szp(res: int, sign: int) -> int:
    return (ZF if res == 0 else 0) | (SF if res & sign else 0) | PARITY[res & 0xFF]


def _add(a: int, b: int, bits: int) -> tuple[int, int]:
    mask = (1 << bits) - 1
    full = a + b
    res = full & mask
    of = ((a ^ res) & (b ^ res)) >> (bits - 1) & 1
    flags = _szp(res, 1 << (bits - 1)) | (CF if full > mask else 0) | (OF if of else 0)
    return res, flags | ((a ^ b ^ res) & AF)


def _sub(a: int, b: int, bits: int) -> tuple[int, int]:
    mask = (1 << bits) - 1
    res = (a - b) & mask
    of = ((a ^ b) & (a ^ res)) >> (bits - 1) & 1
    flags = _szp(res, 1 << (bits - 1)) | (CF if a < b else 0) | (OF if of else 0)
    return res, flags | ((a ^ b ^ res) & AF)


def _logic(res: int, bits: int) -> tuple[int, int]:
    return res, _szp(res, 1 << (bits - 1))  # CF = OF = 0; AF undefined, left 0


_ALU = {
    Mnemonic.ADD: (lambda a, b, n: _add(a, b, n), True),
    Mnemonic.SUB: (lambda a, b, n: _sub(a, b, n), True),
    Mnemonic.CMP: (lambda a, b, n: _sub(a, b, n), False),
    Mnemonic.AND: (lambda a, b, n: _logic(a & b, n), True),
    Mnemonic.OR: (lambda a, b, n: _logic(a | b, n), True),
    Mnemonic.XOR: (lambda a, b, n: _logic(a ^ b, n), True),
    Mnemonic.TEST: (lambda a, b, n: _logic(a & b, n), False),
}


def build_alu(i: iced.Instruction, mode: Mode) -> Run:
    op, stores = _ALU[i.mnemonic]
    bits = 8 * size_of(i, 0)
    get_a, get_b = reader(i, 0, mode), reader(i, 1, mode)
    put = writer(i, 0, mode) if stores else None
    nxt = i.next_ip

    def run(c):
        res, flags = op(get_a(c), get_b(c), bits)
        if put is not None:
            put(c, res)
        c.rflags = (c.rflags & ~ARITH_FLAGS) | flags
        c.rip = nxt

    return run


def build_incdec(i: iced.Instruction, mode: Mode) -> Run:
    """INC/DEC leave CF alone (SDM Vol.2 INC, DEC)."""
    op = _add if i.mnemonic == Mnemonic.INC else _sub
    bits = 8 * size_of(i, 0)
    get, put, nxt = reader(i, 0, mode), writer(i, 0, mode), i.next_ip
    keep = ~(ARITH_FLAGS & ~CF)

    def run(c):
        res, flags = op(get(c), 1, bits)
        put(c, res)
        c.rflags = (c.rflags & keep) | (flags & ~CF)
        c.rip = nxt

    return run


def build_div(i: iced.Instruction, mode: Mode) -> Run:
    """DIV / IDIV: rDX:rAX (AX for a byte) by the operand; quotient to rAX (AL), remainder to
    rDX (AH). A zero divisor or a quotient too wide for the destination is #DE, a fault
    (SDM Vol.2 DIV, IDIV; Table 6-1). The flags are undefined: the model leaves them alone."""
    size = size_of(i, 0)
    bits = 8 * size
    mask = (1 << bits) - 1
    get, nxt = reader(i, 0, mode), i.next_ip
    signed = i.mnemonic == Mnemonic.IDIV

    def run(c):
        divisor = get(c)
        high = c.regs[RAX] >> 8 & 0xFF if size == 1 else c.regs[RDX] & mask
        dividend = high << bits | (c.regs[RAX] & mask)
        if divisor == 0:
            raise Fault(Vec.DE)
        quotient, remainder = divide(dividend, divisor, bits, signed)
        if quotient is None:
            raise Fault(Vec.DE)
        if size == 1:
            c.regs[RAX] = (c.regs[RAX] & ~0xFFFF) | (remainder & 0xFF) << 8 | (quotient & 0xFF)
        elif size == 2:
            c.regs[RAX] = (c.regs[RAX] & ~0xFFFF) | (quotient & 0xFFFF)
            c.regs[RDX] = (c.regs[RDX] & ~0xFFFF) | (remainder & 0xFFFF)
        else:  # a 32-bit result zero-extends in 64-bit mode (SDM Vol.1 3.4.1.1)
            c.regs[RAX], c.regs[RDX] = quotient & mask, remainder & mask
        c.rip = nxt

    return run


def divide(dividend: int, divisor: int, bits: int, signed: bool) -> tuple[int | None, int]:
    """A double-width dividend by a `bits`-wide divisor, as DIV / IDIV compute it: the quotient
    truncated toward zero, the remainder with the dividend's sign; None for the quotient when
    it does not fit in `bits` (#DE). The divisor is not zero."""
    if not signed:
        quotient, remainder = divmod(dividend, divisor)
        return (quotient if quotient >> bits == 0 else None), remainder
    n = _signed(dividend, 2 * bits)
    d = _signed(divisor, bits)
    quotient = abs(n) // abs(d) * (1 if (n < 0) == (d < 0) else -1)
    remainder = n - quotient * d
    if not -(1 << (bits - 1)) <= quotient < 1 << (bits - 1):
        return None, remainder
    return quotient, remainder


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) & 1 else value


def build_mov(i: iced.Instruction, mode: Mode) -> Run:
    dst, src = (i.op_register(n) if i.op_kind(n) == OpKind.REGISTER else None for n in (0, 1))
    if dst is not None and RegisterExt.is_segment_register(dst):
        return _mov_to_sreg(i, mode, dst)
    if src is not None and RegisterExt.is_segment_register(src):
        return _simple(i, writer(i, 0, mode), lambda c: _selector(c, src))
    for reg, to_special in ((dst, True), (src, False)):
        if reg is not None and (RegisterExt.is_cr(reg) or RegisterExt.is_dr(reg)):
            return _mov_special(i, mode, reg, to_special)
    return _simple(i, writer(i, 0, mode), reader(i, 1, mode))


def _simple(i: iced.Instruction, put, get) -> Run:
    nxt = i.next_ip

    def run(c):
        put(c, get(c))
        c.rip = nxt

    return run


def build_lea(i: iced.Instruction, mode: Mode) -> Run:
    return _simple(i, reg_writer(i.op_register(0)), address(i, mode))


def _selector(c, reg: int) -> int:
    """SS and CS as loaded; DS, ES, FS and GS are not tracked: they read as DATA_SELECTOR."""
    return c.ss if reg == Register.SS else (c.cs if reg == Register.CS else DATA_SELECTOR)


def _check_data_selector(c, selector: int, is_ss: bool = True) -> None:
    """The model's flat data segments (SDM 5.4.1, Vol.2 MOV/POP): SS needs RPL = DPL = CPL,
    so DATA_SELECTOR at CPL 0 and USER_DATA_SELECTOR at CPL 3, or a null SS at CPL 0 in
    64-bit mode (SDM 5.4.1.1); DS and friends take a segment with DPL >= CPL and RPL <= DPL."""
    cpl = c.cs & RPL_MASK
    if is_ss:
        if selector == (DATA_SELECTOR if cpl == 0 else USER_DATA_SELECTOR):
            return
        if selector & 0xFFFC == 0 and c.mode is Mode.LONG64 and cpl == 0:
            return
    elif selector & 0xFFFC == USER_DATA_SELECTOR & 0xFFFC or (
            selector & 0xFFFC == DATA_SELECTOR and cpl == 0 and selector & RPL_MASK == 0):
        return
    raise Fault(Vec.GP, selector & 0xFFFC)


def _check_real_segment(c, segment: int) -> None:
    """Real mode loads any segment value (SDM 20.1.1); the model keeps SS and DS at 0, so their
    bases are 0 and stack and data offsets are linear addresses."""
    if segment:
        raise ModelLimit(f"real mode: a data or stack segment {segment:#x} other than 0 is not "
                         "modelled", c.rip)


def _load_ss(c, selector: int) -> None:
    """MOV SS / POP SS: a shadow for one instruction, unless the previous one set it (SDM 6.8.3)."""
    c.ss = selector
    if c.shadow_prev is not Shadow.MOV_SS:
        c.shadow = Shadow.MOV_SS
    c.attn = True


def _mov_to_sreg(i: iced.Instruction, mode: Mode, reg: int) -> Run:
    get, nxt = reader(i, 1, mode), i.next_ip
    is_ss = reg == Register.SS

    def run(c):
        selector = get(c) & 0xFFFF
        if c.mode is Mode.REAL16:
            _check_real_segment(c, selector)
        elif selector & 0xFFFC or is_ss:
            _check_data_selector(c, selector, is_ss)
        if is_ss:
            _load_ss(c, selector)
        c.rip = nxt

    return run


def _mov_special(i: iced.Instruction, mode: Mode, reg: int, to_special: bool) -> Run:
    """MOV to/from CRn and DRn (SDM Vol.2 MOV-Move to/from Control/Debug Registers)."""
    n = RegisterExt.number(reg)
    is_dr = RegisterExt.is_dr(reg)
    gpr = i.op_register(1 if to_special else 0)
    get, put, nxt = reg_reader(gpr), reg_writer(gpr), i.next_ip
    if is_dr and n > 7 or not is_dr and n not in (0, 2, 3, 4, 8):
        raise ModelLimit(f"mov with {'DR' if is_dr else 'CR'}{n} is not modelled")
    access = _dr_access if is_dr else _cr_access

    def run(c):
        if not is_dr:
            require_cpl0(c)
        if to_special:
            access(c, n, get(c))
        else:
            put(c, access(c, n, None))
        c.rip = nxt

    return run


def _dr_access(c, n: int, value: int | None) -> int:
    """DR4/DR5 with CR4.DE=1 is #UD, else they alias DR6/DR7 (SDM 17.2.2); then CPL > 0 is
    #GP(0); then DR7.GD makes the access a fault-like #DB with DR6.BD (SDM 17.2.4, 17.3.1.2).
    The order is KVM handle_dr()'s (kvm_require_dr(), the CPL check, then GD), which has to
    match what the CPU does after a MOV-DR exit; QEMU also checks CPL first; Bochs
    crregs.cc raises the GD #DB before the CPL #GP."""
    if n in (4, 5):
        if c.cr4 & CR4_DE:
            raise Fault(Vec.UD)
        n += 2
    require_cpl0(c)
    if c.dr7 & DR7_GD:
        raise Fault(Vec.DB, dr6=DR6_BD)
    if value is None:
        return c.dr[n] if n < 4 else (c.dr6 if n == 6 else c.dr7)
    if n < 4:
        c.dr[n] = value
    elif n == 6:
        c.dr6 = (value & 0xE00F) | 0xFFFF0FF0  # reserved bits read as 1 (SDM 17.2.3)
    else:
        c.dr7 = (value & 0xFFFF2BFF) | 0x400
    c.update_breakpoints()
    return 0


# CR0 and CR4 bits a guest may flip: those the #NM rule, the debug extensions and the
# page walk (CR0.WP, paging.py) read.
CR0_WRITABLE = CR0_TS | CR0_MP | CR0_EM | CR0_WP
CR4_WRITABLE = CR4_DE
# CR4 bits no processor defines (bit 15, bits 31:29, bits 63:33; bit 32 is FRED): setting
# one is #GP(0) before anything else (SDM Vol.3 2.5, Vol.2 MOV CR; KVM kvm_is_valid_cr4()).
# The bits a CPU reserves for features it lacks are not modelled: changing them is a limit.
CR4_RESERVED = 1 << 15 | 0b111 << 29 | ~((1 << 33) - 1)


def _cr_access(c, n: int, value: int | None) -> int:
    if value is None:
        if n == 8 and c.vtpr is not None:
            return c.vtpr  # SVM V_TPR (APM 15.21.4)
        if n == 8:
            return c.apic.tpr >> 4  # CR8 is TPR[7:4] (SDM 10.8.6.1)
        return {0: c.cr0, 2: c.cr2, 3: c.cr3, 4: c.cr4}[n]
    if n == 2:
        c.cr2 = value
    elif n == 3:
        # Reserved bits 63:MAXPHYADDR (SDM Vol.2 MOV CR; 4.5.4): checked in long mode, where
        # paging is always on, also when the model keeps memory flat (no [memory] cr3)
        if (c.paging is not None or c.mode is Mode.LONG64) and value >> MAXPHYADDR:
            raise Fault(Vec.GP, 0)
        c.load_cr3(value)
    elif n == 8 and c.vtpr is not None:
        c.vtpr = value & 0xF
        c.attn = True
    elif n == 8:
        c.apic.tpr = (value & 0xF) << 4
        c.attn = True
    elif n == 0:
        if (value ^ c.cr0) & ~CR0_WRITABLE & 0xFFFFFFFF:
            raise ModelLimit(f"changing CR0 bits other than TS, MP, EM and WP is not modelled "
                             f"({c.cr0:#x} -> {value:#x})", c.rip)
        c.cr0 = value
    else:
        if value & CR4_RESERVED:
            raise Fault(Vec.GP, 0)
        if (value ^ c.cr4) & ~CR4_WRITABLE:
            raise ModelLimit(f"changing CR4 bits other than DE is not modelled "
                             f"({c.cr4:#x} -> {value:#x})", c.rip)
        c.cr4 = value
        c.update_breakpoints()  # CR4.DE decides what DR7 R/W=10b means (SDM 17.2.4)
    return 0


def build_clts(i: iced.Instruction, mode: Mode) -> Run:
    """CLTS clears CR0.TS (SDM Vol.2 CLTS)."""
    nxt = i.next_ip

    def run(c):
        require_cpl0(c)
        c.cr0 &= ~CR0_TS
        c.rip = nxt

    return run


def nm_fault(cr0: int, is_wait: bool) -> bool:
    """Whether an x87 instruction raises #NM (SDM 2.5 Table 2-2, 9.2): any x87 instruction
    with EM or TS set; WAIT/FWAIT only with both MP and TS."""
    if is_wait:
        return bool(cr0 & CR0_MP and cr0 & CR0_TS)
    return bool(cr0 & (CR0_EM | CR0_TS))


def build_x87_nop(i: iced.Instruction, mode: Mode) -> Run:
    """FNOP and FWAIT: nothing to do but the #NM check (the model has no x87 state, so no
    x87 exception is ever pending for FWAIT)."""
    nxt, is_wait = i.next_ip, i.mnemonic == Mnemonic.WAIT

    def run(c):
        if nm_fault(c.cr0, is_wait):
            raise Fault(Vec.NM)
        c.rip = nxt

    return run


# -- stack ---------------------------------------------------------------------

def _stack_size(i: iced.Instruction) -> int:
    size = abs(i.stack_pointer_increment)
    if size == 2 and i.code_size != iced.CodeSize.CODE16:  # real mode's own size is modelled
        raise ModelLimit("16-bit stack operations are not modelled")
    return size


def push(c, size: int, value: int) -> None:
    sp = stack_address(c, (c.regs[RSP] - size) & c.addr_mask, size)
    c.write(sp, size, value)
    c.regs[RSP] = sp


def build_push(i: iced.Instruction, mode: Mode) -> Run:
    size = _stack_size(i)
    if i.op_kind(0) == OpKind.REGISTER and RegisterExt.is_segment_register(i.op_register(0)):
        reg = i.op_register(0)
        get = lambda c: _selector(c, reg)  # noqa: E731
    else:
        get = reader(i, 0, mode)
    nxt = i.next_ip

    def run(c):
        push(c, size, get(c))
        c.rip = nxt

    return run


def build_pop(i: iced.Instruction, mode: Mode) -> Run:
    size = _stack_size(i)
    nxt = i.next_ip
    if i.op_kind(0) == OpKind.REGISTER and i.op_register(0) == Register.SS:
        def pop_ss(c):
            selector = c.read(stack_address(c, c.regs[RSP], size), size) & 0xFFFF
            if c.mode is Mode.REAL16:
                _check_real_segment(c, selector)
            else:
                _check_data_selector(c, selector)
            c.regs[RSP] = (c.regs[RSP] + size) & c.addr_mask
            _load_ss(c, selector)
            c.rip = nxt
        return pop_ss
    if i.op_kind(0) != OpKind.REGISTER:
        raise ModelLimit("pop to memory is not modelled")
    put = writer(i, 0, mode)

    def run(c):
        value = c.read(stack_address(c, c.regs[RSP], size), size)
        c.regs[RSP] = (c.regs[RSP] + size) & c.addr_mask
        put(c, value)
        c.rip = nxt

    return run


def build_pushf(i: iced.Instruction, mode: Mode) -> Run:
    """The image has RF and VM cleared (SDM Vol.2 PUSHF)."""
    size, nxt = _stack_size(i), i.next_ip

    def run(c):
        push(c, size, c.rflags & ~(RF | VM))
        c.rip = nxt

    return run


def build_popf(i: iced.Instruction, mode: Mode) -> Run:
    size, nxt = _stack_size(i), i.next_ip

    def run(c):
        image = c.read(stack_address(c, c.regs[RSP], size), size)
        c.regs[RSP] = (c.regs[RSP] + size) & c.addr_mask
        mask = loadable_flags(c, POPF_MASK)
        c.rflags = (c.rflags & ~mask) | (image & mask) | RFLAGS_FIXED
        c.attn = True  # IF or TF may have changed
        c.rip = nxt

    return run


# -- control flow ----------------------------------------------------------------

def _target(i: iced.Instruction, mode: Mode):
    if i.op_kind(0) in BRANCH_KINDS:
        target = i.near_branch_target
        return lambda c: target
    if i.op_kind(0) == OpKind.REGISTER or i.op_kind(0) == OpKind.MEMORY:
        return reader(i, 0, mode)
    raise ModelLimit("far branches are not modelled")


def build_jmp(i: iced.Instruction, mode: Mode) -> Run:
    get = _target(i, mode)

    def run(c):
        c.rip = get(c)

    return run


def build_call(i: iced.Instruction, mode: Mode) -> Run:
    get, size, nxt = _target(i, mode), _stack_size(i), i.next_ip

    def run(c):
        target = get(c)
        push(c, size, nxt)
        c.rip = target

    return run


def build_ret(i: iced.Instruction, mode: Mode) -> Run:
    if i.mnemonic != Mnemonic.RET:
        raise ModelLimit("far return is not modelled")
    size = {Mode.LONG64: 8, Mode.PROTECTED32: 4, Mode.REAL16: 2}[mode]
    extra = i.immediate(0) if i.op_count else 0

    def run(c):
        target = c.read(stack_address(c, c.regs[RSP], size), size)
        c.regs[RSP] = (c.regs[RSP] + size + extra) & c.addr_mask
        c.rip = target

    return run


_CONDITIONS = {
    ConditionCode.O: lambda f: f & OF,
    ConditionCode.NO: lambda f: not f & OF,
    ConditionCode.B: lambda f: f & CF,
    ConditionCode.AE: lambda f: not f & CF,
    ConditionCode.E: lambda f: f & ZF,
    ConditionCode.NE: lambda f: not f & ZF,
    ConditionCode.BE: lambda f: f & (CF | ZF),
    ConditionCode.A: lambda f: not f & (CF | ZF),
    ConditionCode.S: lambda f: f & SF,
    ConditionCode.NS: lambda f: not f & SF,
    ConditionCode.P: lambda f: f & PF,
    ConditionCode.NP: lambda f: not f & PF,
    ConditionCode.L: lambda f: bool(f & SF) != bool(f & OF),
    ConditionCode.GE: lambda f: bool(f & SF) == bool(f & OF),
    ConditionCode.LE: lambda f: f & ZF or bool(f & SF) != bool(f & OF),
    ConditionCode.G: lambda f: not f & ZF and bool(f & SF) == bool(f & OF),
}


def build_jcc(i: iced.Instruction, mode: Mode) -> Run:
    taken, target, nxt = _CONDITIONS[i.condition_code], i.near_branch_target, i.next_ip

    def run(c):
        c.rip = target if taken(c.rflags) else nxt

    return run


_LOOP_COUNTER_MASK = {
    Code.LOOP_REL8_64_RCX: (1 << 64) - 1,
    Code.LOOP_REL8_64_ECX: 0xFFFFFFFF,
    Code.LOOP_REL8_32_ECX: 0xFFFFFFFF,
}


def build_loop(i: iced.Instruction, mode: Mode) -> Run:
    """LOOP: decrement the count register, branch if not zero; flags unchanged."""
    if i.code not in _LOOP_COUNTER_MASK:
        raise ModelLimit("LOOP with a 16-bit counter is not modelled")
    mask, target, nxt = _LOOP_COUNTER_MASK[i.code], i.near_branch_target, i.next_ip

    def run(c):
        count = (c.regs[RCX] - 1) & mask
        c.regs[RCX] = count  # a 32-bit count register zero-extends like any 32-bit write
        c.rip = target if count else nxt

    return run


# -- flags, halting, software events -----------------------------------------------

def build_cli(i: iced.Instruction, mode: Mode) -> Run:
    nxt = i.next_ip

    def run(c):
        _require_iopl(c)
        c.rflags &= ~IF
        c.rip = nxt

    return run


def build_sti(i: iced.Instruction, mode: Mode) -> Run:
    """STI with IF=0 blocks interrupts until after the next instruction (SDM Vol.2 STI)."""
    nxt = i.next_ip

    def run(c):
        _require_iopl(c)
        if not c.rflags & IF:
            c.rflags |= IF
            c.shadow = Shadow.STI
        c.attn = True
        c.rip = nxt

    return run


def build_hlt(i: iced.Instruction, mode: Mode) -> Run:
    """The saved RIP of an event that wakes HLT is the next instruction (SDM Vol.2 HLT)."""
    nxt = i.next_ip

    def run(c):
        require_cpl0(c)
        c.halted = True
        c.rip = nxt

    return run


def _vmx(c):
    """The VMX instructions are #UD outside VMX-capable operation (SDM 30.3)."""
    if c.vmx is None:
        raise Fault(Vec.UD)
    require_cpl0(c)
    return c.vmx


def build_vmx_region(i: iced.Instruction, mode: Mode) -> Run:
    """VMXON, VMCLEAR, VMPTRLD m64: the operand holds the physical address of a region."""
    nxt = i.next_ip
    ea = address(i, mode)
    op = {Mnemonic.VMXON: "vmxon", Mnemonic.VMCLEAR: "vmclear", Mnemonic.VMPTRLD: "vmptrld"}[i.mnemonic]

    def run(c):
        region = c.read(ea(c), 8)
        getattr(_vmx(c), op)(c, region)
        c.rip = nxt

    return run


def build_vmwrite(i: iced.Instruction, mode: Mode) -> Run:
    """VMWRITE r64 (field), r/m64 (value) in Intel order; AT&T writes the value first."""
    nxt = i.next_ip
    field, value = reader(i, 0, mode), reader(i, 1, mode)

    def run(c):
        _vmx(c).vmwrite(c, field(c), value(c))
        c.rip = nxt

    return run


def build_vmread(i: iced.Instruction, mode: Mode) -> Run:
    """VMREAD r/m64 (destination), r64 (field); nothing is written when it fails."""
    nxt = i.next_ip
    dest, field = writer(i, 0, mode), reader(i, 1, mode)

    def run(c):
        value = _vmx(c).vmread(c, field(c))
        if value is not None:
            dest(c, value)
        c.rip = nxt

    return run


def build_vmentry(i: iced.Instruction, mode: Mode) -> Run:
    """VMLAUNCH / VMRESUME: the guest runs until a VM exit brings the CPU back to HOST_RIP."""
    nxt = i.next_ip
    launch = i.mnemonic == Mnemonic.VMLAUNCH

    def run(c):
        _vmx(c).vmentry(c, launch, nxt)

    return run


def _svm_enabled(c) -> None:
    """The SVM instructions are #UD with EFER.SVME clear (APM 15.4), then #GP(0) at CPL > 0.

    Under a host, the CPU checks its own EFER, which an SVM guest always has SVME in:
    only an intercept can give the guest the #UD its own EFER calls for."""
    if not (c.efer & EFER_SVME or (c.host is not None and c.host.efer_svme)):
        raise Fault(Vec.UD)
    require_cpl0(c)


def build_vmrun(i: iced.Instruction, mode: Mode) -> Run:
    """VMRUN rAX: the guest runs until a #VMEXIT brings the CPU back after the VMRUN."""
    nxt = i.next_ip

    def run(c):
        _svm_enabled(c)
        if c.svm is None:
            raise ModelLimit("VMRUN without an SVM hardware model", c.rip)
        c.svm.vmrun(c, c.regs[RAX] & c.addr_mask, nxt)

    return run


def build_vmload_vmsave(i: iced.Instruction, mode: Mode) -> Run:
    """VMLOAD / VMSAVE move FS, GS, TR, LDTR and the SYSCALL MSRs, none of which the model has."""
    nxt = i.next_ip

    def run(c):
        _svm_enabled(c)
        if c.regs[RAX] & 0xFFF:
            raise Fault(Vec.GP, 0)  # rAX must be 4K-aligned (APM Vol.3 VMLOAD)
        c.rip = nxt

    return run


def build_gif(i: iced.Instruction, mode: Mode) -> Run:
    """STGI / CLGI set or clear GIF (APM 15.17); a guest with vGIF flips its V_GIF instead."""
    nxt = i.next_ip
    value = i.mnemonic == Mnemonic.STGI

    def run(c):
        _svm_enabled(c)
        c.gif = value
        c.attn = True
        c.rip = nxt

    return run


def build_vmgexit(i: iced.Instruction, mode: Mode) -> Run:
    """VMGEXIT (REP VMMCALL): a GHCB request, answered as the GHCB specification says."""
    nxt = i.next_ip

    def run(c):
        ghcb.vmgexit(c)
        c.rip = nxt

    return run


def build_vmcall(i: iced.Instruction, mode: Mode) -> Run:
    """VMCALL: #UD outside VMX operation, and always on a CPU without VMX (an AMD CPU, whose
    hypercall is VMMCALL); in VMX non-root operation it exits before it runs (SDM 25.1.2);
    in VMX root operation it fails (SDM Vol.2 VMCALL, default treatment of SMIs and SMM)."""
    nxt = i.next_ip

    def run(c):
        _vmx(c).vmcall(c)
        c.rip = nxt

    return run


def _check_syscall(c, name: str) -> None:
    """SYSCALL/SYSRET are #UD without EFER.SCE (SDM Vol.2 SYSCALL, SYSRET; the model runs them
    in 64-bit mode only). Single-step after them follows TF as they leave it, not as it was
    (the OS masks TF with IA32_FMASK; QEMU c52ab08aee6f "Fix eflags.TF/#DB handling of
    syscall/sysret insns"): the model does not, so TF there is a model limit."""
    if not c.efer & EFER_SCE:
        raise Fault(Vec.UD)
    if c.rflags & TF:
        raise ModelLimit(f"{name} with TF=1 (single-step after it) is not modelled", c.rip)


def build_syscall(i: iced.Instruction, mode: Mode) -> Run:
    """SYSCALL (SDM Vol.2): RCX = next RIP, R11 = RFLAGS, RFLAGS &= ~IA32_FMASK (RF too), CS and
    SS from IA32_STAR[47:32] at CPL 0, RIP = IA32_LSTAR. No stack switch."""
    nxt = i.next_ip

    def run(c):
        _check_syscall(c, "SYSCALL")
        selector = (c.star >> 32) & 0xFFFC
        if selector != CODE_SELECTOR:
            raise ModelLimit(f"SYSCALL to CS {selector:#x} (the model's GDT has 0x8)", c.rip)
        c.regs[RCX], c.regs[11] = nxt, c.rflags
        c.rflags = (c.rflags & ~c.fmask & ~RF) | RFLAGS_FIXED
        c.cs, c.ss = CODE_SELECTOR, DATA_SELECTOR
        c.rip = c.lstar
        c.attn = True

    return run


def build_vmmcall(i: iced.Instruction, mode: Mode) -> Run:
    """VMMCALL: a guest's call to its VMM, which only an intercept makes (APM 15.18: "If VMMCALL
    instruction is not intercepted, the instruction raises a #UD exception"); #UD too with
    EFER.SVME clear, and on a CPU without SVM (an Intel CPU, whose hypercall is VMCALL)."""

    def run(c):
        raise Fault(Vec.UD)

    return run


def build_sysret(i: iced.Instruction, mode: Mode) -> Run:
    """SYSRETQ (SDM Vol.2 SYSRET): #GP(0) at CPL > 0 or with a non-canonical RCX; RIP = RCX,
    RFLAGS = R11 (RF and VM clear, bit 1 set), CS = IA32_STAR[63:48] + 16 and SS = + 8, RPL 3."""
    if i.code != Code.SYSRETQ:
        raise ModelLimit("SYSRET to 32-bit compatibility mode is not modelled")

    def run(c):
        _check_syscall(c, "SYSRET")
        require_cpl0(c)
        if c.regs[RCX] >> 47 not in (0, (1 << 17) - 1):
            raise Fault(Vec.GP, 0)
        if c.regs[11] & TF:
            raise ModelLimit("SYSRET to TF=1 (single-step after it) is not modelled", c.rip)
        if c.vmx is not None or c.has_svm:
            raise ModelLimit("CPL 3 with an L1 hypervisor is not modelled", c.rip)
        base = (c.star >> 48) & 0xFFFC
        if (base + 16) | 3 != USER_CODE_SELECTOR:
            raise ModelLimit(f"SYSRET to CS {(base + 16) | 3:#x} (the model's user CS is 0x33)", c.rip)
        c.rflags = (c.regs[11] & 0x3C7FD7) | RFLAGS_FIXED
        c.cs, c.ss = USER_CODE_SELECTOR, USER_DATA_SELECTOR
        c.rip = c.regs[RCX]
        c.attn = True

    return run


def build_nop(i: iced.Instruction, mode: Mode) -> Run:
    nxt = i.next_ip

    def run(c):
        c.rip = nxt

    return run


def _software_event(vector: int, type_: EventType, i: iced.Instruction) -> Run:
    """INT n, INT3, INTO, INT1 trap: the frame holds the next RIP (SDM Vol.2 INT n)."""
    rip, nxt = i.ip, i.next_ip
    event = Event(vector, type_, nxt, insn_rip=rip)

    def run(c):
        return event

    return run


def build_int(i: iced.Instruction, mode: Mode) -> Run:
    return _software_event(i.immediate(0), EventType.SW_INT, i)


def build_int3(i: iced.Instruction, mode: Mode) -> Run:
    return _software_event(Vec.BP, EventType.SW_EXCEPTION, i)


def build_int1(i: iced.Instruction, mode: Mode) -> Run:
    return _software_event(Vec.DB, EventType.PRIV_SW_EXCEPTION, i)


def build_into(i: iced.Instruction, mode: Mode) -> Run:
    """INTO raises #OF only when OF=1 (it is #UD in 64-bit mode, left to the decoder)."""
    trap = _software_event(Vec.OF, EventType.SW_EXCEPTION, i)
    nxt = i.next_ip

    def run(c):
        if c.rflags & OF:
            return trap(c)
        c.rip = nxt
        return None

    return run


def build_ud2(i: iced.Instruction, mode: Mode) -> Run:
    def run(c):
        raise Fault(Vec.UD)

    return run


def build_iret(i: iced.Instruction, mode: Mode) -> Run:
    """IRET to CPL 0 or 3 (SDM Vol.2 IRET; 6.14.3 for IRETQ).

    NMI blocking ends before any check, so it ends even if IRET faults (SDM 6.7.1).
    In 64-bit mode IRET always pops SS:RSP; in 32-bit mode only when it returns to an
    outer privilege level. DS, ES, FS and GS are not nulled on the way out (the model
    does not track them; see _selector()).
    """
    if mode is Mode.REAL16:
        return _build_iret_real(i)
    if i.mnemonic == Mnemonic.IRET:
        raise ModelLimit("16-bit IRET is not modelled")
    size = 8 if i.mnemonic == Mnemonic.IRETQ else 4
    rip_here = i.ip

    def run(c):
        was_blocked = c.nmi_blocked
        c.nmi_blocked = False
        c.iret_unblocked_nmi = was_blocked
        if c.rflags & NT:  # before any stack read: a task return pops nothing
            if c.mode is Mode.LONG64:
                raise Fault(Vec.GP, 0)  # no task return in IA-32e mode (SDM Vol.2 IRET)
            task.task_return(c, i.next_ip)  # back to the previous task (SDM Vol.2 IRET)
            c.trace.append(Iret(rip_here, c.rip, c.retired + 1, was_blocked))
            return
        sp = c.regs[RSP]
        if c.mode is Mode.LONG64:
            stack_address(c, sp, 5 * size)  # the whole frame: RIP, CS, RFLAGS, RSP, SS
        new_rip, cs, flags = (c.read(sp + size * k, size) for k in range(3))
        cs &= 0xFFFF
        if c.mode is Mode.PROTECTED32 and flags & VM and cpl_of(c.cs) == 0:
            raise ModelLimit("IRET to virtual-8086 mode is not modelled", rip_here)
        new_cpl = _iret_code_segment(c, cs)
        outer = new_cpl > cpl_of(c.cs)
        if outer and (c.vmx is not None or c.has_svm):
            # hw/ and kvm/ switch RIP, RSP and RFLAGS between L1 and L2, not CS and SS
            raise ModelLimit("CPL 3 with an L1 hypervisor is not modelled", rip_here)
        if c.mode is Mode.LONG64 or outer:
            new_rsp, ss = c.read(sp + 3 * size, size), c.read(sp + 4 * size, size) & 0xFFFF
            _check_return_ss(c, ss, new_cpl)
        else:
            new_rsp, ss = (sp + 3 * size) & c.addr_mask, c.ss
        mask = loadable_flags(c, IRET_MASK if size == 8 else IRET_MASK & 0xFFFFFFFF)
        c.rflags = (c.rflags & ~mask) | (flags & mask) | RFLAGS_FIXED
        c.cs, c.ss, c.regs[RSP] = cs, ss, new_rsp
        c.rip = new_rip
        c.attn = True
        c.iret_unblocked_nmi = False
        c.trace.append(Iret(rip_here, new_rip, c.retired + 1, was_blocked))

    return run


def _build_iret_real(i: iced.Instruction) -> Run:
    """IRET in real-address mode (SDM Vol.2 IRET, REAL-ADDRESS-MODE): pop IP, CS and FLAGS, 16
    bits each; at CPL 0 every FLAGS bit loads (IOPL and NT too). NMI blocking ends as in any
    mode (SDM 6.7.1). IRETD (32-bit operands) in real mode is not modelled."""
    if i.mnemonic != Mnemonic.IRET:
        raise ModelLimit("IRETD in real mode is not modelled")
    rip_here = i.ip
    word = 2

    def run(c):
        was_blocked = c.nmi_blocked
        c.nmi_blocked = False
        c.iret_unblocked_nmi = was_blocked
        sp = c.regs[RSP] & 0xFFFF
        stack = c.ss << 4
        new_ip, cs, flags = (c.read(stack + ((sp + word * k) & 0xFFFF), word) for k in range(3))
        c.rflags = (c.rflags & ~0xFFFF) | (flags & POPF_MASK & 0xFFFF) | RFLAGS_FIXED
        c.regs[RSP] = (c.regs[RSP] & ~0xFFFF) | ((sp + 3 * word) & 0xFFFF)
        c.load_real_cs(cs)
        c.rip = new_ip
        c.attn = True
        c.iret_unblocked_nmi = False
        c.trace.append(Iret(rip_here, new_ip, c.retired + 1, was_blocked))

    return run


def _iret_code_segment(c, cs: int) -> int:
    """The return CS's checks (SDM Vol.2 IRET, PROTECTED-MODE-RETURN): null is #GP(0); an RPL
    below CPL, or a selector that is not one of the model's code segments with DPL = RPL, is
    #GP(selector). Returns the new CPL."""
    if cs & 0xFFFC == 0:
        raise Fault(Vec.GP, 0)
    rpl = cs & RPL_MASK
    if rpl < cpl_of(c.cs) or cs not in (CODE_SELECTOR, USER_CODE_SELECTOR):
        raise Fault(Vec.GP, cs & 0xFFFC)
    return rpl


def _check_return_ss(c, ss: int, new_cpl: int) -> None:
    """The popped SS (SDM Vol.2 IRET, RETURN-TO-OUTER-PRIVILEGE-LEVEL; 6.14.3): a writable data
    segment with RPL = DPL = the new CPL; a null SS is #GP(0), except in 64-bit mode
    returning to CPL 0 (SDM 5.4.1.1)."""
    if ss & 0xFFFC == 0:
        if c.mode is Mode.LONG64 and new_cpl == 0:
            return
        raise Fault(Vec.GP, 0)
    if ss != (DATA_SELECTOR if new_cpl == 0 else USER_DATA_SELECTOR):
        raise Fault(Vec.GP, ss & 0xFFFC)


# -- system instructions -------------------------------------------------------------

def build_lidt(i: iced.Instruction, mode: Mode) -> Run:
    """LIDT m16&64 in 64-bit mode, m16&32 otherwise (SDM Vol.2 LGDT/LIDT)."""
    ea, nxt = address(i, mode), i.next_ip
    base_size = 8 if mode is Mode.LONG64 else 4

    def run(c):
        require_cpl0(c)
        addr = ea(c)
        limit = c.read(addr, 2)
        base = c.read(addr + 2, base_size)
        c.idtr_limit, c.idtr_base = limit, base
        c.rip = nxt

    return run


def build_invlpg(i: iced.Instruction, mode: Mode) -> Run:
    """INVLPG m: drop the TLB entry for the page holding m's linear address (SDM Vol.2 INVLPG,
    4.10.4.1); privileged (decode.py checks CPL first). It never faults on the address."""
    ea, nxt = address(i, mode), i.next_ip

    def run(c):
        require_cpl0(c)
        c.invlpg(ea(c) & c.addr_mask)
        c.rip = nxt

    return run


def build_sgdt(i: iced.Instruction, mode: Mode) -> Run:
    """SGDT m: the 16-bit limit, then the base, 8 bytes in 64-bit mode and 4 otherwise (SDM
    Vol.2 SGDT, 32-bit operand size). Any CPL may run it: the model's CR4 has no UMIP."""
    ea, nxt = address(i, mode), i.next_ip
    base_size = 8 if mode is Mode.LONG64 else 4

    def run(c):
        addr = ea(c)
        c.write(addr, 2, c.gdtr_limit)
        c.write(addr + 2, base_size, c.gdtr_base)
        c.rip = nxt

    return run


IA32_APIC_BASE = 0x1B
APIC_BASE_VALUE = 0xFEE00000 | (1 << 11) | (1 << 10) | (1 << 8)  # EN, EXTD (x2APIC), BSP
IA32_EFER = 0xC0000080
VM_HSAVE_PA = 0xC0010117
# No CPUID leaf 80000008H: MAXPHYADDR is 36 (paging.py; KVM's cpuid_query_maxphyaddr() agrees).
IA32_STAR, IA32_LSTAR, IA32_FMASK = 0xC0000081, 0xC0000082, 0xC0000084
_SYSCALL_MSRS = {IA32_STAR: "star", IA32_LSTAR: "lstar", IA32_FMASK: "fmask"}


def _read_msr(c, msr: int) -> int:
    if 0x800 <= msr <= 0x8FF:
        value = c.apic.read_msr(msr)
        if value is not None:
            return value
    elif msr == IA32_APIC_BASE:
        return APIC_BASE_VALUE
    elif msr == IA32_EFER:
        return c.efer
    elif msr == ghcb.MSR_AMD64_SEV_ES_GHCB:
        return c.ghcb_msr
    elif msr == VM_HSAVE_PA and c.has_svm:
        return c.vm_hsave_pa
    elif msr in _SYSCALL_MSRS and c.mode is Mode.LONG64:
        return getattr(c, _SYSCALL_MSRS[msr])
    raise Fault(Vec.GP, 0)


def _write_msr(c, msr: int, value: int) -> None:
    if 0x800 <= msr <= 0x8FF:
        result = c.apic.write_msr(msr, value)
        if result is WriteResult.IPI and c.machine is not None and c.machine.send_ipi(c, value):
            result = WriteResult.DONE  # the machine carried it (arch/machine.py)
        if result in (WriteResult.GP, WriteResult.IPI):
            raise Fault(Vec.GP, 0)  # one CPU: only self-IPIs (apic.py)
        if result is WriteResult.SELF_NMI:
            c.trace.append(Arrival("self_nmi", Vec.NMI, c.retired + 1, c.rip, c.nmi_from_apic()))
        c.attn = True
    elif msr == ghcb.MSR_AMD64_SEV_ES_GHCB:
        c.ghcb_msr = value
    elif msr == VM_HSAVE_PA and c.has_svm:
        # Bits 11:0 and those above MAXPHYADDR are reserved: #GP (APM 15.30.4, as QEMU's
        # d09c79010ffd reads it; KVM's svm_set_msr() with page_address_valid() agrees).
        if value & 0xFFF or value >> MAXPHYADDR:
            raise Fault(Vec.GP, 0)
        c.vm_hsave_pa = value
    elif msr in _SYSCALL_MSRS and c.mode is Mode.LONG64:
        setattr(c, _SYSCALL_MSRS[msr], value & (0xFFFFFFFF if msr == IA32_FMASK else (1 << 64) - 1))
    elif msr == IA32_EFER and value ^ c.efer in (EFER_NXE, EFER_SCE) and c.mode is Mode.LONG64:
        c.efer = value  # NXE (the I/D bit of #PF error codes, SDM 4.7) or SCE (SYSCALL/SYSRET)
    elif msr == IA32_EFER and value ^ c.efer == EFER_SVME:
        if not c.has_svm:
            raise Fault(Vec.GP, 0)  # SVME is reserved on a CPU without SVM
        c.efer = value  # the SVM instructions come and go with EFER.SVME (APM 15.4)
    elif msr in (IA32_APIC_BASE, IA32_EFER):
        if value != _read_msr(c, msr):
            raise ModelLimit(f"changing MSR {msr:#x} is not modelled", c.rip)
    else:
        raise Fault(Vec.GP, 0)


def build_rdmsr(i: iced.Instruction, mode: Mode) -> Run:
    nxt = i.next_ip

    def run(c):
        require_cpl0(c)
        value = _read_msr(c, c.regs[RCX] & 0xFFFFFFFF)
        c.regs[RAX] = value & 0xFFFFFFFF
        c.regs[RDX] = value >> 32
        c.rip = nxt

    return run


def build_wrmsr(i: iced.Instruction, mode: Mode) -> Run:
    nxt = i.next_ip

    def run(c):
        require_cpl0(c)
        value = (c.regs[RDX] & 0xFFFFFFFF) << 32 | (c.regs[RAX] & 0xFFFFFFFF)
        _write_msr(c, c.regs[RCX] & 0xFFFFFFFF, value)
        c.rip = nxt

    return run


def _port(i: iced.Instruction, n: int):
    if i.op_kind(n) == OpKind.REGISTER:
        return lambda c: c.regs[RDX] & 0xFFFF
    port = i.immediate(n)
    return lambda c: port


def check_io_privilege(c) -> None:
    """IN/OUT with CPL > IOPL consult the TSS's I/O permission bitmap (SDM 18.5.2), which the
    model does not have."""
    if c.cs & RPL_MASK > iopl(c.rflags):
        raise ModelLimit("IN/OUT with CPL > IOPL (the I/O permission bitmap) is not modelled",
                         c.rip)


def build_out(i: iced.Instruction, mode: Mode) -> Run:
    """OUT: a byte to port 0xE9 is recorded as output; other ports ignore writes."""
    port, get, nxt = _port(i, 0), reg_reader(i.op_register(1)), i.next_ip
    size = size_of(i, 1)

    def run(c):
        check_io_privilege(c)
        p = port(c)
        if p == DEBUG_PORT:
            c.trace.append(Output(p, get(c) & 0xFF, c.retired + 1))
        if c.io_bps:
            c.io_access(p, size)
        c.rip = nxt

    return run


def build_in(i: iced.Instruction, mode: Mode) -> Run:
    """IN: no device answers, so the bus floats to all ones."""
    put, nxt = reg_writer(i.op_register(0)), i.next_ip
    port, size = _port(i, 1), size_of(i, 0)

    def run(c):
        check_io_privilege(c)
        if c.io_bps:
            c.io_access(port(c), size)
        put(c, -1)
        c.rip = nxt

    return run


_CPUID = {
    0: (1, 0x65646F6D, 0x20203638, 0x78766B6C),  # "kvmodel x86  " vendor string
    1: (0x000806F0, 0, 1 << 21, (1 << 2) | (1 << 5) | (1 << 6) | (1 << 9)),  # x2APIC, DE, MSR
}


def build_cpuid(i: iced.Instruction, mode: Mode) -> Run:
    nxt = i.next_ip

    def run(c):
        eax, ebx, ecx, edx = _CPUID.get(c.regs[RAX] & 0xFFFFFFFF, (0, 0, 0, 0))
        c.regs[RAX], c.regs[RBX], c.regs[RCX], c.regs[RDX] = eax, ebx, ecx, edx
        c.rip = nxt

    return run


BUILDERS: dict[int, Callable[[iced.Instruction, Mode], Run]] = {
    **{m: build_alu for m in _ALU},
    Mnemonic.INC: build_incdec, Mnemonic.DEC: build_incdec,
    Mnemonic.MOV: build_mov, Mnemonic.LEA: build_lea,
    Mnemonic.PUSH: build_push, Mnemonic.POP: build_pop,
    Mnemonic.PUSHF: build_pushf, Mnemonic.PUSHFD: build_pushf, Mnemonic.PUSHFQ: build_pushf,
    Mnemonic.POPF: build_popf, Mnemonic.POPFD: build_popf, Mnemonic.POPFQ: build_popf,
    Mnemonic.JMP: build_jmp, Mnemonic.CALL: build_call, Mnemonic.RET: build_ret,
    Mnemonic.RETF: build_ret, Mnemonic.LOOP: build_loop,
    **{m: build_jcc for m in (
        Mnemonic.JO, Mnemonic.JNO, Mnemonic.JB, Mnemonic.JAE, Mnemonic.JE, Mnemonic.JNE,
        Mnemonic.JBE, Mnemonic.JA, Mnemonic.JS, Mnemonic.JNS, Mnemonic.JP, Mnemonic.JNP,
        Mnemonic.JL, Mnemonic.JGE, Mnemonic.JLE, Mnemonic.JG)},
    Mnemonic.CLI: build_cli, Mnemonic.STI: build_sti, Mnemonic.HLT: build_hlt,
    Mnemonic.VMGEXIT: build_vmgexit, Mnemonic.VMCALL: build_vmcall, Mnemonic.VMMCALL: build_vmmcall,
    Mnemonic.VMRUN: build_vmrun, Mnemonic.VMLOAD: build_vmload_vmsave,
    Mnemonic.VMSAVE: build_vmload_vmsave, Mnemonic.STGI: build_gif, Mnemonic.CLGI: build_gif,
    Mnemonic.VMXON: build_vmx_region, Mnemonic.VMCLEAR: build_vmx_region,
    Mnemonic.VMPTRLD: build_vmx_region, Mnemonic.VMWRITE: build_vmwrite,
    Mnemonic.VMREAD: build_vmread, Mnemonic.VMLAUNCH: build_vmentry, Mnemonic.VMRESUME: build_vmentry,
    Mnemonic.ERETS: lambda i, mode: fred.build_erets(i.ip),
    Mnemonic.ERETU: lambda i, mode: fred.build_eretu(i.ip),
    Mnemonic.NOP: build_nop, Mnemonic.PAUSE: build_nop,
    Mnemonic.INT: build_int, Mnemonic.INT3: build_int3, Mnemonic.INT1: build_int1,
    Mnemonic.INTO: build_into, Mnemonic.UD2: build_ud2,
    Mnemonic.IRET: build_iret, Mnemonic.IRETD: build_iret, Mnemonic.IRETQ: build_iret,
    Mnemonic.LIDT: build_lidt, Mnemonic.RDMSR: build_rdmsr, Mnemonic.WRMSR: build_wrmsr,
    Mnemonic.SGDT: build_sgdt, Mnemonic.INVLPG: build_invlpg,
    Mnemonic.IN: build_in, Mnemonic.OUT: build_out, Mnemonic.CPUID: build_cpuid,
    Mnemonic.DIV: build_div, Mnemonic.IDIV: build_div, Mnemonic.CLTS: build_clts,
    Mnemonic.FNOP: build_x87_nop, Mnemonic.WAIT: build_x87_nop,
    Mnemonic.SYSCALL: build_syscall, Mnemonic.SYSRETQ: build_sysret, Mnemonic.SYSRET: build_sysret,
}  # fmt: skip
