"""A VMX L2 in real mode under unrestricted guest (hw/vmx/real_l2.py): the guest-CR0 entry
checks (SDM 26.3.1.1), the core's mode for L2 and L1's back at the exit, the model limits."""

import pytest

from kvmodel.arch.regs import REAL_ADDR_MASK, Mode
from kvmodel.errors import ModelLimit
from kvmodel.hw.base import InvalidGuestState
from kvmodel.hw.vmx.cpu import check_guest_cr0
from kvmodel.hw.vmx.real_l2 import enters_real_mode, load_real_mode, restore_host_mode, save_real_mode
from kvmodel.hw.vmx.vmcs import L1_MODE_CR0, Secondary, Vmcs
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import prepare

GUEST = '''
[guest]
code = """
start:
    hlt
"""
'''
UG = Secondary.UNRESTRICTED_GUEST
REAL_CR0 = 0x30  # NE, ET


@pytest.mark.parametrize("cr0,secondary,message", [
    (REAL_CR0, 0, "unrestricted guest"),
    (REAL_CR0 | 1 << 31, UG, "PG set with PE clear"),
    (REAL_CR0 | 1 << 31, 0, "PG set with PE clear"),
])
def test_guest_cr0_checks_fail(cr0, secondary, message):
    with pytest.raises(InvalidGuestState, match=message):
        check_guest_cr0(Vmcs(secondary_exec=secondary), cr0)


@pytest.mark.parametrize("cr0,secondary", [(REAL_CR0, UG), (L1_MODE_CR0, 0), (L1_MODE_CR0, UG)])
def test_guest_cr0_checks_pass(cr0, secondary):
    check_guest_cr0(Vmcs(secondary_exec=secondary), cr0)


def test_an_l1_that_never_writes_guest_cr0_runs_l2_in_its_own_mode():
    assert not enters_real_mode(Vmcs())
    assert enters_real_mode(Vmcs(guest_cr0=REAL_CR0))


def test_real_mode_for_l2_and_l1s_mode_back():
    cpu, _ = prepare(parse(GUEST, "unit.toml"))
    before = (cpu.mode, cpu.addr_mask, cpu.cr0, cpu.cr4, cpu.efer, cpu.cs, cpu.cs_base, cpu.ss)
    vmcs = Vmcs(guest_cr0=REAL_CR0, guest_cs_selector=0x1000, guest_cs_base=0x10000)
    host = load_real_mode(cpu, vmcs, cpu.rip)
    assert (cpu.mode, cpu.addr_mask, cpu.cr0) == (Mode.REAL16, REAL_ADDR_MASK, REAL_CR0)
    assert (cpu.cs, cpu.cs_base, cpu.ss, cpu.cr4) == (0x1000, 0x10000, 0, 0)
    assert not cpu.efer & 1 << 10  # LMA: "IA-32e mode guest" is 0
    cpu.load_real_cs(0x2000)  # an IVT delivery or IRET moved CS
    save_real_mode(cpu, vmcs)
    assert (vmcs.guest_cs_selector, vmcs.guest_cs_base) == (0x2000, 0x20000)
    restore_host_mode(cpu, host)
    assert (cpu.mode, cpu.addr_mask, cpu.cr0, cpu.cr4, cpu.efer, cpu.cs, cpu.cs_base, cpu.ss) == before
    assert not cpu.icache


def test_a_cs_base_other_than_selector_times_16_is_a_model_limit():
    cpu, _ = prepare(parse(GUEST, "unit.toml"))
    vmcs = Vmcs(guest_cr0=REAL_CR0, guest_cs_selector=0x1000, guest_cs_base=0x20000)
    with pytest.raises(ModelLimit, match="not its selector"):
        load_real_mode(cpu, vmcs, cpu.rip)
    assert cpu.mode is Mode.LONG64  # nothing changed
