"""A code segment with a base (protected mode, SDM 3.4.3): RIP is the offset, memory is linear."""

import pytest

from kvmodel.errors import ScenarioError
from kvmodel.guest.layout import CODE_BASE
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import run

BASE = 0x8000


def scenario(code: str, extra: str = "", base: int = BASE, mode: str = "protected32") -> str:
    return (f"[cpu]\ncs_base = {base:#x}\n\n[guest]\nmode = \"{mode}\"\n"
            f"code = '''\nstart:\n{code}\n'''\n{extra}")


def outcome(code: str, extra: str = ""):
    result = run(parse(scenario(code, extra), "t.toml"))
    assert result.limit is None, result.limit
    return result


def test_labels_are_offsets_and_data_is_linear():
    result = outcome("""\
    call sub
    mov counter + CS_BASE, %ebx
    hlt
sub:
    incl counter + CS_BASE
    mov (%esp), %edx         # the return address: an offset
    ret
counter:
    .long 0""", '[expect.memory]\n"counter" = 1\n[expect.final]\nrip = "sub"\n')
    assert result.passed, result.mismatches
    regs = dict(result.final.registers)
    assert regs["ebx"] == 1
    assert regs["edx"] == result.program.symbol("start") + 5  # after the 5-byte CALL


def test_fetch_fault_reports_the_linear_address():
    result = outcome("""\
    jmp far_page
pf_handler:
    mov %cr2, %eax
    mov 4(%esp), %ecx        # the faulting EIP, above the error code
    hlt
    .balign 0x1000
far_page:
    hlt""", '[idt]\n"#PF" = "pf_handler"\n[memory]\nnot_present = ["far_page"]\n')
    regs = dict(result.final.registers)
    far = result.program.symbol("far_page")
    assert (regs["eax"], regs["ecx"]) == (far + BASE, far)


@pytest.mark.parametrize(("dr0", "hits"), [("after + CS_BASE", 1), ("after", 0)])
def test_code_breakpoints_match_linear_addresses(dr0, hits):
    result = outcome(f"""\
    mov ${dr0}, %eax
    mov %eax, %dr0
    mov $0x2, %eax
    mov %eax, %dr7
after:
    nop
    hlt
db_handler:
    inc %edx
    orl $0x10000, 8(%esp)
    iret""", '[idt]\n"#DB" = "db_handler"\n')
    assert dict(result.final.registers)["edx"] == hits


def test_writes_to_decoded_code_are_seen_through_the_base():
    result = outcome("""\
    mov $2, %ecx
again:
    inc %eax                 # patched into a NOP after its first run
    movb $0x90, again + CS_BASE
    dec %ecx
    jnz again
    hlt""")
    assert dict(result.final.registers)["eax"] == 1


def test_cs_base_needs_protected_mode():
    with pytest.raises(ScenarioError, match=r"cs_base needs protected32 mode") as info:
        parse(scenario("    hlt", mode="long64"), "t.toml")
    assert info.value.line == 2


def test_cs_base_is_below_the_load_address():
    with pytest.raises(ScenarioError, match=r"cs_base must be an integer in \[0x0, 0x10000\]"):
        parse(scenario("    hlt", base=CODE_BASE + 0x1000), "t.toml")
