"""CPL 3, DR7.GD, I/O breakpoints, DIV/IDIV, CR0.TS: the SDM rules row by row, on CPUs built directly."""

import pytest

from kvmodel.arch.cpu import Cpu
from kvmodel.arch.deliver import deliver
from kvmodel.arch.events import Event, EventType, Vec
from kvmodel.arch.execute import divide, nm_fault
from kvmodel.arch.observe import Delivery
from kvmodel.arch.regs import (
    CODE_SELECTOR,
    CR0_EM,
    CR0_MP,
    CR0_TS,
    DATA_SELECTOR,
    RSP,
    USER_CODE_SELECTOR,
    USER_DATA_SELECTOR,
    Mode,
)  # fmt: skip
from kvmodel.guest.layout import STACK_TOP, Gate, Machine, build_cpu, encode_gate
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import run

HANDLER = 0x10100
USER_RSP = 0x20000
VECTOR = 0x80


def user_cpu(mode: Mode, gate_dpl: int, vector: int = VECTOR) -> Cpu:
    """A CPU at CPL 3 with one gate (to CODE_SELECTOR) of the given DPL."""
    machine = Machine(mode=mode, image=b"\x90", base=0x10000, entry=0x10000,
                      gates=((vector, Gate(HANDLER, dpl=gate_dpl)),
                             (Vec.GP, Gate(HANDLER + 0x10))))
    cpu = build_cpu(machine)
    cpu.cs, cpu.ss, cpu.regs[RSP] = USER_CODE_SELECTOR, USER_DATA_SELECTOR, USER_RSP
    return cpu


def last_delivery(cpu: Cpu) -> Delivery:
    return [o for o in cpu.trace if isinstance(o, Delivery)][-1]


# SDM 6.12.1.1: the gate's DPL is checked for INT n, INT3 and INTO only; INT1 (ICEBP),
# hardware exceptions, NMIs and interrupts ignore it. (event type, gate DPL, CPL) -> #GP?
DPL_ROWS = [
    (t, dpl, cpl, t in (EventType.SW_INT, EventType.SW_EXCEPTION) and dpl < cpl)
    for t in (EventType.SW_INT, EventType.SW_EXCEPTION, EventType.PRIV_SW_EXCEPTION,
              EventType.HW_EXCEPTION, EventType.NMI, EventType.EXT_INT)
    for dpl in range(4) for cpl in (0, 3)
]


@pytest.mark.parametrize("mode", [Mode.LONG64, Mode.PROTECTED32])
@pytest.mark.parametrize("type_,dpl,cpl,gp", DPL_ROWS)
def test_gate_dpl_check(mode, type_, dpl, cpl, gp):
    cpu = user_cpu(mode, dpl)
    if cpl == 0:
        cpu.cs, cpu.ss = CODE_SELECTOR, DATA_SELECTOR
    software = type_ in (EventType.SW_INT, EventType.SW_EXCEPTION, EventType.PRIV_SW_EXCEPTION)
    deliver(cpu, Event(VECTOR, type_, 0x10002, insn_rip=0x10000 if software else None))
    d = last_delivery(cpu)
    if gp:
        assert (d.vector, d.error_code) == (Vec.GP, VECTOR * 8 + 2)  # EXT clear (SDM 6.13)
    else:
        assert d.vector == VECTOR and d.handler == HANDLER
    assert cpu.cs == CODE_SELECTOR  # the handler runs at CPL 0


@pytest.mark.parametrize("mode", [Mode.LONG64, Mode.PROTECTED32])
def test_privilege_change_switches_to_the_tss_stack_and_pushes_ss_rsp(mode):
    cpu = user_cpu(mode, 3)
    deliver(cpu, Event(VECTOR, EventType.SW_INT, 0x10002, insn_rip=0x10000))
    d = last_delivery(cpu)
    # 64-bit: SS, RSP always (SDM 6.14.2); 32-bit: SS, ESP on a privilege change (6.12.1)
    assert d.frame == (0x10002, USER_CODE_SELECTOR, 0x2, USER_RSP, USER_DATA_SELECTOR)
    assert d.rsp == STACK_TOP - len(d.frame) * (8 if mode is Mode.LONG64 else 4)
    # 64-bit: SS is a null selector with RPL 0 (6.14.4); 32-bit: SS0 from the TSS
    assert cpu.ss == (0 if mode is Mode.LONG64 else DATA_SELECTOR)


def test_32bit_bad_ss0_is_ts_with_its_selector_and_ext():
    cpu = user_cpu(Mode.PROTECTED32, 3)
    for vector in (Vec.TS, Vec.DF):
        at = cpu.idtr_base + vector * 8
        cpu.mem[at:at + 8] = encode_gate(Gate(HANDLER + 0x20), Mode.PROTECTED32)
    cpu.mem[cpu.tr_base + 8] = 0x33  # SS0: the user code segment
    deliver(cpu, Event(VECTOR, EventType.EXT_INT, 0x10000))
    # SDM 6.12.1: SS0 is checked before any push: #TS. Its own delivery, from CPL 3 too,
    # needs SS0 again: #TS, #DF (Table 6-5: contributory twice), then shutdown.
    assert cpu.shutdown and not [o for o in cpu.trace if isinstance(o, Delivery)]
    assert (cpu.trace[-1].first, cpu.trace[-1].second) == (Vec.DF, Vec.TS)


def test_user_page_fault_sets_us_but_delivery_accesses_do_not():
    cpu = user_cpu(Mode.LONG64, 3)
    assert cpu.page_fault(0x5000, 0).error_code == 4
    cpu.vectoring = Event(VECTOR, EventType.SW_INT, 0)
    assert cpu.page_fault(0x5000, 0).error_code == 0  # implicit supervisor access (SDM 4.6)


# SDM 2.5 Table 2-2: (EM, MP, TS) -> (x87 instruction #NM?, WAIT/FWAIT #NM?)
TABLE_2_2 = {
    (0, 0, 0): (False, False), (0, 0, 1): (True, False), (0, 1, 0): (False, False),
    (0, 1, 1): (True, True), (1, 0, 0): (True, False), (1, 0, 1): (True, False),
    (1, 1, 0): (True, False), (1, 1, 1): (True, True),
}  # fmt: skip


@pytest.mark.parametrize("em,mp,ts", sorted(TABLE_2_2))
def test_nm_table_row(em, mp, ts):
    cr0 = (CR0_EM if em else 0) | (CR0_MP if mp else 0) | (CR0_TS if ts else 0)
    assert (nm_fault(cr0, is_wait=False), nm_fault(cr0, is_wait=True)) == TABLE_2_2[em, mp, ts]


# SDM Vol.2 DIV, IDIV: (dividend, divisor, width, signed) -> (quotient or None for #DE, remainder)
DIVIDE_ROWS = [
    (100, 7, 8, False, 14, 2),
    (0xFFFF, 0xFF, 8, False, None, 0),  # 257: too wide for AL
    (0x1_0000_0000, 1, 32, False, None, 0),  # 2^32 does not fit in 32 bits
    ((1 << 64) - 7, 2, 32, True, -3, -1),  # -7 / 2: toward zero, remainder takes the dividend's sign
    (7, 0xFE, 8, True, -3, 1),  # 7 / -2
    ((1 << 64) - (1 << 31), 0xFFFFFFFF, 32, True, None, 0),  # -2^31 / -1 = 2^31: too wide
    ((1 << 16) - 128, 0xFF, 8, True, None, 0),  # -128 / -1 in 8 bits
    ((1 << 16) - 128, 1, 8, True, -128, 0),  # the most negative quotient fits
]


@pytest.mark.parametrize("dividend,divisor,bits,signed,quotient,remainder", DIVIDE_ROWS)
def test_divide_row(dividend, divisor, bits, signed, quotient, remainder):
    q, r = divide(dividend, divisor, bits, signed)
    assert q == quotient
    if q is not None:
        assert r == remainder


def final_of(code: str, extra: str = ""):
    result = run(parse(f"[guest]\ncode = '''\nstart:\n{code}\n'''\n{extra}", "t.toml"))
    return result


def test_general_detect_is_a_fault_with_bd_and_rf_not_pushed():
    result = final_of("""\
    mov $0x2400, %rax
    mov %rax, %dr7
mov_dr:
    mov %dr0, %rbx
    hlt
db:
    mov %dr7, %rcx
    mov %dr6, %rdx
    iretq""", '[idt]\n"#DB" = "db"\n')
    assert result.limit is None, result.limit
    d = [o for o in result.trace if isinstance(o, Delivery)][0]
    assert d.vector == Vec.DB and d.return_rip == result.program.symbol("mov_dr")
    assert not d.frame[2] & (1 << 16)  # RF as it was (KVM inject_pending_event(); Bochs)
    regs = dict(result.final.registers)
    assert regs["rcx"] == 0x400 and regs["rdx"] == 0xFFFF2FF0  # GD cleared, BD set


def test_dr4_is_ud_with_cr4_de_and_an_alias_without():
    result = final_of("""\
    mov %dr4, %rax
    mov %cr4, %rbx
    or $8, %rbx
    mov %rbx, %cr4
dr4:
    mov %dr4, %rax
    hlt
ud:
    hlt""", '[idt]\n"#UD" = "ud"\n')
    assert result.limit is None, result.limit
    d = [o for o in result.trace if isinstance(o, Delivery)][0]
    assert d.vector == Vec.UD and d.return_rip == result.program.symbol("dr4")
    assert dict(result.final.registers)["rax"] == 0xFFFF0FF0  # DR4 read DR6 first


def test_io_breakpoint_without_cr4_de_is_a_model_limit():
    result = final_of("""\
    mov $0x00200408, %eax
    mov %rax, %dr7
    hlt""")
    assert result.limit is not None and "R/W=10b with CR4.DE=0" in result.limit


def test_changing_other_cr4_bits_is_a_named_model_limit():
    result = final_of("""\
    mov %cr4, %rax
    or $0x80, %rax
    mov %rax, %cr4""")
    assert result.limit is not None and result.limit.startswith("changing CR4 bits other than DE")


@pytest.mark.parametrize("bit", [15, 29, 31, 33, 63])
def test_a_reserved_cr4_bit_is_gp0_before_the_model_limit(bit):
    # SDM Vol.2 MOV CR: #GP(0) for a 1 in a reserved CR4 bit (kvm-unit-tests idt_test.c test_gp())
    result = final_of(f"""\
    mov %cr4, %rax
    mov ${1 << bit:#x}, %rbx
    or %rbx, %rax
    mov %rax, %cr4
    hlt
gp:
    hlt""", '[idt]\n"#GP" = "gp"\n')
    assert result.limit is None, result.limit
    d = [o for o in result.trace if isinstance(o, Delivery)][0]
    assert d.vector == Vec.GP and d.error_code == 0


def test_in_out_above_iopl_is_a_model_limit():
    result = final_of("""\
    pushq $0x2b
    pushq $0x20000
    pushq $0x2
    pushq $0x33
    pushq $user
    iretq
user:
    out %al, $0x80""")
    assert result.limit is not None and "I/O permission bitmap" in result.limit


def test_iret_to_cpl3_loads_user_segments_and_popf_keeps_iopl():
    result = final_of("""\
    pushq $0x2b
    pushq $0x20000
    pushq $0x202
    pushq $0x33
    pushq $user
    iretq
user:
    pushq $0x3002               # try to set IOPL 3, clear IF
    popfq
    pushfq
    pop %rbx
    mov %cs, %rcx
    mov %ss, %rdx
    int $0x81
out:
    hlt""", '[idt]\n0x81 = { handler = "out", dpl = 3 }\n')
    assert result.limit is None, result.limit
    regs = dict(result.final.registers)
    assert regs["rbx"] & 0x3200 == 0x200  # IOPL unchanged (0), IF unchanged as CPL > IOPL
    assert (regs["rcx"], regs["rdx"]) == (USER_CODE_SELECTOR, USER_DATA_SELECTOR)


def test_gate_encoding_carries_dpl():
    raw = encode_gate(Gate(HANDLER, dpl=3), Mode.LONG64)
    assert (raw[5] >> 5) & 3 == 3


def test_cpl3_with_an_l1_hypervisor_is_a_model_limit():
    text = """[cpu]\nvmx = true\n\n[guest]\ncode = '''\nstart:
    pushq $0x2b
    pushq $0x20000
    pushq $0x2
    pushq $0x33
    pushq $start
    iretq\n'''\n"""
    result = run(parse(text, "t.toml"))
    assert result.limit is not None and result.limit.startswith("CPL 3 with an L1 hypervisor")


def test_syscall_without_efer_sce_is_ud_and_sysret_at_cpl3_is_gp():
    result = final_of("""\
    syscall
    hlt
ud:
    mov $0xc0000080, %ecx
    rdmsr
    or $1, %eax
    wrmsr
    pushq $0x2b
    pushq $0x20000
    pushq $0x2
    pushq $0x33
    pushq $user
    iretq
user:
    sysretq
gp:
    hlt""", '[idt]\n"#UD" = "ud"\n"#GP" = "gp"\n')
    assert result.limit is None, result.limit
    d = [o for o in result.trace if isinstance(o, Delivery)]
    assert [(x.vector, x.error_code) for x in d] == [(Vec.UD, None), (Vec.GP, 0)]


def test_syscall_with_tf_is_a_named_model_limit():
    result = final_of("""\
    mov $0xc0000080, %ecx
    rdmsr
    or $1, %eax
    wrmsr
    pushfq
    orq $0x100, (%rsp)
    popfq
    syscall""")
    assert result.limit is not None and result.limit.startswith("SYSCALL with TF=1")
