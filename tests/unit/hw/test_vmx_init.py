"""INIT in VMX non-root operation (SDM 24.8, 25.2): a VM exit with reason 3 at the next boundary,
above debug traps, which it saves as pending debug exceptions (SDM 6.9 Table 6-2, 27.3.4)."""

import pytest

from kvmodel.arch.regs import DR6_BS
from kvmodel.hw.vmx.cpu import VmxGuest
from kvmodel.hw.vmx.vmcs import Activity, ExitReason
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import prepare

GUEST = '''
[guest]
code = """
start:
    nop
    hlt
"""
'''


def _guest(pending_dbg: int = 0, activity: int = Activity.ACTIVE) -> VmxGuest:
    cpu, _ = prepare(parse(GUEST, "unit.toml"))
    guest = VmxGuest(cpu)
    guest.vmcs.guest_rflags = 0x2
    guest.vmcs.guest_rip = cpu.rip
    guest.vmcs.guest_pending_dbg_exceptions = pending_dbg
    guest.vmcs.guest_activity_state = activity
    return guest


@pytest.mark.parametrize("pending_dbg", [0, DR6_BS])
def test_init_exits_at_the_next_boundary_keeping_pending_debug_traps(pending_dbg):
    guest = _guest(pending_dbg)
    start = guest.cpu.rip
    guest.init_signal()
    assert guest.run(10) is None  # a VM exit
    vmcs = guest.vmcs
    assert vmcs.exit_reason == ExitReason.INIT_SIGNAL and vmcs.exit_qualification == 0
    assert vmcs.guest_rip == start and guest.cpu.retired == 0
    assert vmcs.guest_pending_dbg_exceptions == pending_dbg  # the single-step trap not taken
    assert vmcs.guest_activity_state == Activity.ACTIVE


def test_init_wakes_a_halted_guest_with_activity_state_hlt():
    guest = _guest(activity=Activity.HLT)
    assert not guest.wakes(guest.cpu)
    guest.init_signal()
    assert guest.wakes(guest.cpu)
    assert guest.run(10) is None
    assert guest.vmcs.exit_reason == ExitReason.INIT_SIGNAL
    assert guest.vmcs.guest_activity_state == Activity.HLT

