"""Canonical 64-bit linear addresses (SDM Vol.1 3.3.7.1): bits 63:47 all equal."""

import pytest

from kvmodel.arch.events import Vec
from kvmodel.arch.observe import Delivery
from kvmodel.arch.regs import canonical
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import run


@pytest.mark.parametrize(("addr", "size", "expected"), [
    (0, 1, True),
    (0x7FFF_FFFF_FFFF, 1, True),            # the top of the lower half
    (0x7FFF_FFFF_FFF8, 8, True),
    (0x7FFF_FFFF_FFF9, 8, False),           # its last byte is past the lower half
    (0x8000_0000_0000, 1, False),
    (0xAAAA_AAAA_AAAA_AAAA, 8, False),      # kvm-unit-tests' NONCANONICAL
    (0xFFFF_7FFF_FFFF_FFFF, 1, False),
    (0xFFFF_8000_0000_0000, 1, True),       # the bottom of the upper half
    (0xFFFF_FFFF_FFFF_FFF8, 8, True),
    (0xFFFF_FFFF_FFFF_FFFC, 8, True),       # wraps to 0: both ends canonical
])
def test_canonical(addr: int, size: int, expected: bool) -> None:
    assert canonical(addr, size) is expected


def _run(code: str, extra: str = ""):
    return run(parse(f"[guest]\ncode = '''\nstart:\n{code}\n'''\n{extra}", "t.toml"))


def test_a_write_through_rsp_is_ss_and_through_rax_gp():
    result = _run("""\
    movabs $0xaaaaaaaaaaaaaaaa, %rax
    mov %rax, %rbx
    movq $1, 8(%rax)
    hlt
gp:
    movq $1, (%rsp, %rbx)
    hlt
ss:
    hlt""", '[idt]\n"#GP" = "gp"\n"#SS" = "ss"\n')
    assert result.limit is None, result.limit
    assert [(d.vector, d.error_code) for d in result.trace if isinstance(d, Delivery)] == [
        (Vec.GP, 0), (Vec.SS, 0)]


def test_a_fetch_from_a_non_canonical_address_is_a_model_limit():
    result = _run("""\
    movabs $0xaaaaaaaaaaaaaaaa, %rax
    jmp *%rax""")
    assert "non-canonical" in result.limit
