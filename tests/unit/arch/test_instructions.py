"""The instruction subset, one small program per behaviour, checked on final registers.

Values come from the SDM Vol.2 instruction pages; each program ends in HLT.
"""

import pytest

from kvmodel.arch.regs import AF, BOOT_CR3, BOOT_GDT_BASE, BOOT_GDT_LIMIT, CF, OF, PF, SF, ZF
from kvmodel.errors import ModelLimit
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import run


def final(code: str, mode: str = "long64", extra: str = "") -> dict:
    text = f"[guest]\nmode = \"{mode}\"\ncode = '''\nstart:\n{code}\n    hlt\n'''\n{extra}"
    result = run(parse(text, "t.toml"))
    assert result.limit is None, result.limit
    assert result.final.stop == "halted"
    f = result.final
    return dict(f.registers) | {"rflags": f.rflags, "rip": f.rip, "cr2": f.cr2}


ARITH = CF | PF | AF | ZF | SF | OF

CASES_64 = [
    ("mov $-1, %rax", {"rax": 2**64 - 1}),
    ("mov $-1, %rax\n mov $2, %eax", {"rax": 2}),  # 32-bit writes zero-extend
    ("mov $-1, %rax\n mov $2, %ax", {"rax": 0xFFFFFFFFFFFF0002}),
    ("mov $-1, %rax\n mov $2, %al", {"rax": 0xFFFFFFFFFFFFFF02}),
    ("mov $0x1234, %eax\n mov $0x56, %ah", {"rax": 0x5634}),
    ("mov $0x3000, %r9\n movq $-5, 8(%r9)\n mov 8(%r9), %r10", {"r10": 2**64 - 5}),
    ("mov $0x3000, %rbx\n mov $2, %rsi\n movl $7, 0x10(%rbx,%rsi,4)\n mov 0x18(%rbx), %ecx",
     {"rcx": 7}),
    ("mov $3, %ebx\n lea -8(%rsp,%rbx,2), %rax", {"rax": 0x30000 + 6 - 8}),
    ("lea data(%rip), %rax\n mov data(%rip), %rbx\n jmp 1f\ndata: .quad 0x55\n1:",
     {"rbx": 0x55}),
    ("add $-1, %eax", {"rax": 0xFFFFFFFF}),
    ("mov $1, %eax\n sub $2, %eax", {"rax": 0xFFFFFFFF}),
    ("mov $0xF0, %ecx\n and $0x3C, %ecx\n or $1, %ecx\n xor $0xFF, %ecx", {"rcx": 0xCE}),
    ("mov $0, %eax\n dec %eax", {"rax": 0xFFFFFFFF}),
    ("mov $5, %ecx\n xor %eax, %eax\n1: add $2, %eax\n loop 1b", {"rax": 10, "rcx": 0}),
    ("push $-2\n pop %rbx", {"rbx": 2**64 - 2, "rsp": 0x30000}),
    ("call f\n jmp 1f\nf: mov $9, %eax\n ret\n1:", {"rax": 9, "rsp": 0x30000}),
    ("mov $f, %ecx\n call *%rcx\n jmp 1f\nf: mov $3, %eax\n ret\n1:", {"rax": 3}),
    ("push $0\n call f\n jmp 1f\nf: ret $8\n1:", {"rsp": 0x30000}),
    ("mov $1, %eax\n cmp $1, %eax\n je 1f\n mov $7, %eax\n1:", {"rax": 1}),
    ("mov $-1, %eax\n cmp $1, %eax\n jl 1f\n mov $7, %eax\n1:", {"rax": 0xFFFFFFFF}),
    ("mov $-1, %eax\n cmp $1, %eax\n jb 1f\n mov $7, %eax\n1:", {"rax": 7}),
    ("mov $3, %eax\n test $4, %eax\n jnz 1f\n mov $8, %eax\n1:", {"rax": 8}),
    ("pushfq\n pop %rax", {"rax": 0x2}),
    ("mov $0x2d7, %eax\n push %rax\n popfq\n pushfq\n pop %rbx", {"rbx": 0x2d7}),
    ("mov $0x1b, %ecx\n rdmsr", {"rax": 0xFEE00D00, "rdx": 0}),
    ("mov $1, %eax\n cpuid", {"rcx": 1 << 21}),
    ("in $0x60, %al", {"rax": 0xFF}),
    ("mov $0x12345678, %eax\n mov %rax, %cr2\n mov %cr2, %rbx", {"rbx": 0x12345678}),
    ("mov $0x3000, %eax\n mov %rax, %dr3\n mov %dr3, %rbx\n mov %dr6, %rcx",
     {"rbx": 0x3000, "rcx": 0xFFFF0FF0}),
    ("nop\n pause\n nopl 4(%rax)", {"rip": 0x10008}),  # 1 + 2 + 4 bytes, then hlt
]


@pytest.mark.parametrize("code,expect", CASES_64, ids=[c[0].split("\n")[0] for c in CASES_64])
def test_long64(code, expect):
    got = final(code)
    for key, value in expect.items():
        assert got[key] == value, f"{key}: {got[key]:#x} != {value:#x}"


def test_flags_after_cmp():
    assert final("mov $1, %eax\n cmp $2, %eax")["rflags"] & ARITH == CF | SF | PF | AF
    assert final("xor %eax, %eax")["rflags"] & ARITH == ZF | PF


def test_inc_keeps_cf():
    assert final("mov $-1, %eax\n add $1, %eax\n inc %ebx")["rflags"] & CF


CASES_32 = [
    ("mov $-1, %eax\n mov $2, %ax", {"eax": 0xFFFF0002}),
    ("push $0x10\n pop %ebx", {"ebx": 0x10, "esp": 0x30000}),
    ("call f\n jmp 1f\nf: mov $4, %eax\n ret\n1:", {"eax": 4, "esp": 0x30000}),
    ("mov $3, %ecx\n1: loop 1b", {"ecx": 0}),
    ("pushf\n pop %eax", {"eax": 0x2}),
    ("mov $0x2000, %ebx\n movl $-3, -4(%ebx)\n mov 0x1ffc, %edx", {"edx": 0xFFFFFFFD}),
]


@pytest.mark.parametrize("code,expect", CASES_32, ids=[c[0].split("\n")[0] for c in CASES_32])
def test_protected32(code, expect):
    got = final(code, mode="protected32")
    for key, value in expect.items():
        assert got[key] == value, f"{key}: {got[key]:#x} != {value:#x}"


def test_out_to_debug_port_is_traced():
    text = "[guest]\ncode = '''\nstart:\n mov $0x41, %al\n out %al, $0xe9\n hlt\n'''\n"
    outputs = [o for o in run(parse(text, "t.toml")).trace if o.kind == "output"]
    assert [(o.port, o.value) for o in outputs] == [(0xE9, 0x41)]


@pytest.mark.parametrize("code", ["cmc", "mov $1, %eax\n cdq", "rep movsb", "sysenter"])
def test_outside_the_subset_stops_with_its_name_and_address(code):
    text = f"[guest]\ncode = '''\nstart:\n nop\n {code}\n hlt\n'''\n"
    result = run(parse(text, "t.toml"))
    assert result.limit is not None
    assert "outside the modelled subset" in result.limit and " at 0x1000" in result.limit


def test_changing_cr0_is_a_model_limit():
    text = "[guest]\ncode = '''\nstart:\n xor %eax, %eax\n mov %rax, %cr0\n'''\n"
    result = run(parse(text, "t.toml"))
    assert result.limit == ("changing CR0 bits other than TS, MP, EM and WP is not modelled "
                            "(0x80000011 -> 0x0) at 0x10002")


def test_model_limit_is_an_error_type():
    assert issubclass(ModelLimit, Exception)


def test_sgdt_stores_the_boot_gdtr_and_cr3_reads_the_boot_root():
    """SGDT m16&64 (SDM Vol.2 SGDT): limit, then the 8-byte base; the model boots with the
    exported stub's GDT and paging root (arch/regs.py), so MOV from CR3 reads its address."""
    got = final("sgdt 0x3000\n mov 0x3000, %ax\n mov 0x3002, %rbx\n mov %cr3, %rcx")
    assert got["rax"] & 0xFFFF == BOOT_GDT_LIMIT
    assert (got["rbx"], got["rcx"]) == (BOOT_GDT_BASE, BOOT_CR3)


def test_sgdt_in_protected_mode_stores_a_32_bit_base():
    got = final("movl $-1, 0x3004\n sgdt 0x3000\n mov 0x3002, %ebx\n mov 0x3006, %ecx",
                mode="protected32")
    assert (got["ebx"], got["ecx"] & 0xFFFF) == (BOOT_GDT_BASE, 0xFFFF)  # 6 bytes written
