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

from kvmodel.arch import fred, ghcb
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
    writer,
)  # fmt: skip
from kvmodel.arch.regs import (
    AC,
    AF,
    ARITH_FLAGS,
    CF,
    CODE_SELECTOR,
    DATA_SELECTOR,
    DF,
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
    RSP,
    SF,
    TF,
    VIF,
    VIP,
    VM,
    ZF,
    Mode,
    Shadow,
)  # fmt: skip
from kvmodel.errors import ModelLimit

Run = Callable[[object], "Event | None"]

PARITY = bytes(PF if bin(b).count("1") % 2 == 0 else 0 for b in range(256))
DEBUG_PORT = 0xE9

# Flags POPF may change at CPL 0 (SDM Vol.2 POPF): not RF, VM, VIF, VIP.
POPF_MASK = CF | PF | AF | ZF | SF | TF | IF | DF | OF | IOPL | NT | AC | ID
IRET_MASK = POPF_MASK | RF | VIF | VIP  # IRET also loads RF (SDM 17.3.1.1)


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
    return c.ss if reg == Register.SS else (CODE_SELECTOR if reg == Register.CS else DATA_SELECTOR)


def _check_data_selector(c, selector: int) -> None:
    """Flat data segments only; a null SS is legal at CPL 0 in 64-bit mode (SDM 5.4.1.1)."""
    if selector & 0xFFFC == DATA_SELECTOR:
        return
    if selector & 0xFFFC == 0 and c.mode is Mode.LONG64:
        return
    raise Fault(Vec.GP, selector & 0xFFFC)


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
        if selector & 0xFFFC or is_ss:
            _check_data_selector(c, selector)
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
    if is_dr and n in (4, 5):
        n += 2  # DR4/DR5 alias DR6/DR7 while CR4.DE = 0 (SDM 17.2.2)
    if is_dr and n > 7 or not is_dr and n not in (0, 2, 3, 4, 8):
        raise ModelLimit(f"mov with {'DR' if is_dr else 'CR'}{n} is not modelled")
    access = _dr_access if is_dr else _cr_access

    def run(c):
        if to_special:
            access(c, n, get(c))
        else:
            put(c, access(c, n, None))
        c.rip = nxt

    return run


def _dr_access(c, n: int, value: int | None) -> int:
    if c.dr7 & (1 << 13):
        raise ModelLimit("DR7.GD general-detect #DB is not modelled", c.rip)
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


def _cr_access(c, n: int, value: int | None) -> int:
    if value is None:
        if n == 8:
            return c.apic.tpr >> 4  # CR8 is TPR[7:4] (SDM 10.8.6.1)
        return {0: c.cr0, 2: c.cr2, 3: c.cr3, 4: c.cr4}[n]
    if n == 2:
        c.cr2 = value
    elif n == 3:
        c.cr3 = value
    elif n == 8:
        c.apic.tpr = (value & 0xF) << 4
        c.attn = True
    elif value != (c.cr0 if n == 0 else c.cr4):
        raise ModelLimit(f"changing CR{n} is not modelled", c.rip)
    return 0


# -- stack ---------------------------------------------------------------------

def _stack_size(i: iced.Instruction) -> int:
    size = abs(i.stack_pointer_increment)
    if size == 2:
        raise ModelLimit("16-bit stack operations are not modelled")
    return size


def push(c, size: int, value: int) -> None:
    sp = (c.regs[RSP] - size) & c.addr_mask
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
            selector = c.read(c.regs[RSP], size) & 0xFFFF
            _check_data_selector(c, selector)
            c.regs[RSP] = (c.regs[RSP] + size) & c.addr_mask
            _load_ss(c, selector)
            c.rip = nxt
        return pop_ss
    if i.op_kind(0) != OpKind.REGISTER:
        raise ModelLimit("pop to memory is not modelled")
    put = writer(i, 0, mode)

    def run(c):
        value = c.read(c.regs[RSP], size)
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
        image = c.read(c.regs[RSP], size)
        c.regs[RSP] = (c.regs[RSP] + size) & c.addr_mask
        c.rflags = (c.rflags & ~POPF_MASK) | (image & POPF_MASK) | RFLAGS_FIXED
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
    size = 8 if mode is Mode.LONG64 else 4
    extra = i.immediate(0) if i.op_count else 0

    def run(c):
        target = c.read(c.regs[RSP], size)
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
        c.rflags &= ~IF
        c.rip = nxt

    return run


def build_sti(i: iced.Instruction, mode: Mode) -> Run:
    """STI with IF=0 blocks interrupts until after the next instruction (SDM Vol.2 STI)."""
    nxt = i.next_ip

    def run(c):
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
        c.halted = True
        c.rip = nxt

    return run


def _vmx(c):
    """The VMX instructions are #UD outside VMX-capable operation (SDM 30.3)."""
    if c.vmx is None:
        raise Fault(Vec.UD)
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
    """The SVM instructions are #UD with EFER.SVME clear (APM 15.4); the model runs at CPL 0.

    Under a host, the CPU checks its own EFER, which an SVM guest always has SVME in:
    only an intercept can give the guest the #UD its own EFER calls for."""
    if not (c.efer & EFER_SVME or (c.host is not None and c.host.efer_svme)):
        raise Fault(Vec.UD)


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
    """IRET at CPL 0 to CPL 0 (SDM Vol.2 IRET; 6.14.3 for IRETQ).

    NMI blocking ends before any check, so it ends even if IRET faults (SDM 6.7.1).
    """
    if i.mnemonic == Mnemonic.IRET:
        raise ModelLimit("16-bit IRET is not modelled")
    size = 8 if i.mnemonic == Mnemonic.IRETQ else 4
    pops_stack = mode is Mode.LONG64  # 64-bit mode IRET always pops SS:RSP
    rip_here = i.ip

    def run(c):
        was_blocked = c.nmi_blocked
        c.nmi_blocked = False
        c.iret_unblocked_nmi = was_blocked
        sp = c.regs[RSP]
        words = [c.read(sp + size * k, size) for k in range(5 if pops_stack else 3)]
        new_rip, cs, flags = words[0], words[1] & 0xFFFF, words[2]
        if cs & 3:
            raise ModelLimit("IRET to CPL > 0 is not modelled", rip_here)
        if cs & 0xFFFC != CODE_SELECTOR:
            raise Fault(Vec.GP, cs & 0xFFFC)
        if c.rflags & NT:
            if c.mode is Mode.LONG64:
                raise Fault(Vec.GP, 0)  # no task return in IA-32e mode (SDM Vol.2 IRET)
            raise ModelLimit("IRET with NT=1 (task return) is not modelled", rip_here)
        if c.mode is Mode.PROTECTED32 and flags & VM:
            raise ModelLimit("IRET to virtual-8086 mode is not modelled", rip_here)
        if pops_stack:
            ss = words[4] & 0xFFFF
            _check_data_selector(c, ss)
            c.ss = ss
            c.regs[RSP] = words[3]
        else:
            c.regs[RSP] = (sp + 3 * size) & c.addr_mask
        mask = IRET_MASK if size == 8 else IRET_MASK & 0xFFFFFFFF
        c.rflags = (c.rflags & ~mask) | (flags & mask) | RFLAGS_FIXED
        c.rip = new_rip
        c.attn = True
        c.iret_unblocked_nmi = False
        c.trace.append(Iret(rip_here, new_rip, c.retired + 1, was_blocked))

    return run


# -- system instructions -------------------------------------------------------------

def build_lidt(i: iced.Instruction, mode: Mode) -> Run:
    """LIDT m16&64 in 64-bit mode, m16&32 otherwise (SDM Vol.2 LGDT/LIDT)."""
    ea, nxt = address(i, mode), i.next_ip
    base_size = 8 if mode is Mode.LONG64 else 4

    def run(c):
        addr = ea(c)
        limit = c.read(addr, 2)
        base = c.read(addr + 2, base_size)
        c.idtr_limit, c.idtr_base = limit, base
        c.rip = nxt

    return run


IA32_APIC_BASE = 0x1B
APIC_BASE_VALUE = 0xFEE00000 | (1 << 11) | (1 << 10) | (1 << 8)  # EN, EXTD (x2APIC), BSP
IA32_EFER = 0xC0000080


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
        value = _read_msr(c, c.regs[RCX] & 0xFFFFFFFF)
        c.regs[RAX] = value & 0xFFFFFFFF
        c.regs[RDX] = value >> 32
        c.rip = nxt

    return run


def build_wrmsr(i: iced.Instruction, mode: Mode) -> Run:
    nxt = i.next_ip

    def run(c):
        value = (c.regs[RDX] & 0xFFFFFFFF) << 32 | (c.regs[RAX] & 0xFFFFFFFF)
        _write_msr(c, c.regs[RCX] & 0xFFFFFFFF, value)
        c.rip = nxt

    return run


def _port(i: iced.Instruction, n: int):
    if i.op_kind(n) == OpKind.REGISTER:
        return lambda c: c.regs[RDX] & 0xFFFF
    port = i.immediate(n)
    return lambda c: port


def build_out(i: iced.Instruction, mode: Mode) -> Run:
    """OUT: a byte to port 0xE9 is recorded as output; other ports ignore writes."""
    port, get, nxt = _port(i, 0), reg_reader(i.op_register(1)), i.next_ip

    def run(c):
        p = port(c)
        if p == DEBUG_PORT:
            c.trace.append(Output(p, get(c) & 0xFF, c.retired + 1))
        c.rip = nxt

    return run


def build_in(i: iced.Instruction, mode: Mode) -> Run:
    """IN: no device answers, so the bus floats to all ones."""
    put, nxt = reg_writer(i.op_register(0)), i.next_ip

    def run(c):
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
    Mnemonic.VMGEXIT: build_vmgexit,
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
    Mnemonic.IN: build_in, Mnemonic.OUT: build_out, Mnemonic.CPUID: build_cpuid,
}  # fmt: skip
