"""Canonical 64-bit linear addresses (SDM Vol.1 3.3.7.1): bits 63:47 all equal."""

import pytest

from kvmodel.arch.regs import canonical


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
