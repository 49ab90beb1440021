"""ALU flags against their definitions in the SDM (Vol.1 3.4.3.1, Appendix A), by Hypothesis.

The model computes flags with bit tricks; these tests restate each flag in
plain arithmetic (signed overflow, unsigned borrow, parity) and compare.
"""

from hypothesis import given
from hypothesis import strategies as st

from kvmodel.arch.execute import _add, _logic, _sub
from kvmodel.arch.regs import AF, CF, OF, PF, SF, ZF

BITS = st.sampled_from([8, 16, 32, 64])


def operands(bits):
    word = st.integers(0, (1 << bits) - 1)
    return st.tuples(st.just(bits), word, word)


def signed(value, bits):
    return value - (1 << bits) if value >> (bits - 1) else value


def common(res, bits):
    flags = 0
    if res == 0:
        flags |= ZF
    if res >> (bits - 1):
        flags |= SF
    if bin(res & 0xFF).count("1") % 2 == 0:
        flags |= PF
    return flags


@given(BITS.flatmap(operands))
def test_add(case):
    bits, a, b = case
    res, flags = _add(a, b, bits)
    assert res == (a + b) % (1 << bits)
    expected = common(res, bits)
    if a + b >= 1 << bits:
        expected |= CF
    if not -(1 << (bits - 1)) <= signed(a, bits) + signed(b, bits) < 1 << (bits - 1):
        expected |= OF
    if (a & 0xF) + (b & 0xF) > 0xF:
        expected |= AF
    assert flags == expected


@given(BITS.flatmap(operands))
def test_sub_and_cmp(case):
    bits, a, b = case
    res, flags = _sub(a, b, bits)
    assert res == (a - b) % (1 << bits)
    expected = common(res, bits)
    if a < b:
        expected |= CF
    if not -(1 << (bits - 1)) <= signed(a, bits) - signed(b, bits) < 1 << (bits - 1):
        expected |= OF
    if (a & 0xF) < (b & 0xF):
        expected |= AF
    assert flags == expected


@given(BITS.flatmap(operands))
def test_logic_clears_cf_and_of(case):
    bits, a, b = case
    res, flags = _logic(a & b, bits)
    assert flags == common(res, bits)
    assert not flags & (CF | OF)
