"""VM entry refuses events that the SDM (26.2.1.3, 26.3.1.5) and APM (15.20) forbid."""

import pytest

from kvmodel.arch.events import EventType, Vec
from kvmodel.arch.regs import IF
from kvmodel.hw.base import EntryFailed, InvalidGuestState
from kvmodel.hw.svm.cpu import SvmGuest
from kvmodel.hw.svm.vmcb import EVTINJ_VALID, Intercept
from kvmodel.hw.vmx.cpu import VmxGuest
from kvmodel.hw.vmx.vmcs import INTR_INFO_VALID, Interruptibility, Pin, intr_info
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import prepare

GUEST = '''
[guest]
code = """
start:
    hlt
"""
'''


def _vmx():
    cpu, _ = prepare(parse(GUEST, "unit.toml"))
    guest = VmxGuest(cpu)
    guest.vmcs.guest_rflags = 0x2 | IF
    guest.vmcs.guest_rip = cpu.rip
    return guest


@pytest.mark.parametrize("info,length,state,rflags,message", [
    (intr_info(0x30, EventType.EXT_INT, None), 0, 0, 0x2, "RFLAGS.IF=0"),
    (intr_info(0x30, EventType.EXT_INT, None), 0, Interruptibility.STI, 0x202, "shadow"),
    (intr_info(Vec.NMI, EventType.NMI, None), 0, Interruptibility.MOV_SS, 0x202, "MOV SS"),
    (intr_info(Vec.GP, EventType.HW_EXCEPTION, None), 0, 0, 0x202, "deliver-error-code"),
    (intr_info(Vec.UD, EventType.HW_EXCEPTION, 0), 0, 0, 0x202, "deliver-error-code"),
    (intr_info(0x80, EventType.SW_INT, None), 0, 0, 0x202, "instruction length"),
    (intr_info(40, EventType.HW_EXCEPTION, None), 0, 0, 0x202, "> 31"),
    (INTR_INFO_VALID | (1 << 8) | 5, 0, 0, 0x202, "reserved"),
])
def test_vmx_entry_refuses(info, length, state, rflags, message):
    guest = _vmx()
    guest.vmcs.entry_intr_info = info
    guest.vmcs.entry_instruction_len = length
    guest.vmcs.guest_interruptibility = state
    guest.vmcs.guest_rflags = rflags
    with pytest.raises(EntryFailed, match=message):
        guest.run(10)


GUEST_STATE = {"RFLAGS.IF=0", "shadow", "MOV SS"}


@pytest.mark.parametrize("info,state,rflags,message", [
    (intr_info(0x30, EventType.EXT_INT, None), 0, 0x2, "RFLAGS.IF=0"),
    (intr_info(Vec.NMI, EventType.NMI, None), Interruptibility.MOV_SS, 0x202, "MOV SS"),
    (intr_info(Vec.GP, EventType.HW_EXCEPTION, None), 0, 0x202, "deliver-error-code"),
])
def test_vmx_guest_state_checks_fail_as_exit_33_control_checks_as_vmfail(info, state, rflags, message):
    # SDM 26.3.1.4/26.3.1.5 are checks on the guest-state area: a VM exit with reason 33
    # (26.7); 26.2.1.3 checks a control field: VMfailValid.
    guest = _vmx()
    guest.vmcs.entry_intr_info = info
    guest.vmcs.guest_interruptibility = state
    guest.vmcs.guest_rflags = rflags
    with pytest.raises(EntryFailed, match=message) as failed:
        guest.run(10)
    assert isinstance(failed.value, InvalidGuestState) == (message in GUEST_STATE)


def test_vmx_nmi_injection_under_nmi_blocking_needs_virtual_nmis_to_fail():
    # SDM 26.3.1.5: blocking by NMI must be 0 for an injected NMI only if "virtual NMIs" is 1.
    guest = _vmx()
    guest.vmcs.entry_intr_info = intr_info(Vec.NMI, EventType.NMI, None)
    guest.vmcs.guest_interruptibility = Interruptibility.NMI
    guest.vmcs.pin_based = Pin.NMI_EXITING | Pin.VIRTUAL_NMIS
    with pytest.raises(InvalidGuestState, match="virtual-NMI blocking"):
        guest.run(10)
    guest = _vmx()
    guest.vmcs.entry_intr_info = intr_info(Vec.NMI, EventType.NMI, None)
    guest.vmcs.guest_interruptibility = Interruptibility.NMI
    guest.vmcs.pin_based = Pin.NMI_EXITING
    guest.vmcs.proc_based = 1 << 7  # HLT exiting, so the run ends in an exit
    guest.cpu.idtr_limit = 0  # the NMI goes in: its delivery faults into a triple fault
    assert guest.run(10) is None
    assert guest.vmcs.exit_reason == 2  # TRIPLE_FAULT: the injection was accepted


def test_vmx_entry_accepts_and_delivers_an_nmi():
    guest = _vmx()
    guest.vmcs.entry_intr_info = intr_info(Vec.NMI, EventType.NMI, None)
    guest.vmcs.proc_based = 1 << 7  # HLT exiting, so the run ends in an exit
    cpu = guest.cpu
    cpu.idtr_limit = 0  # no IDT: the injected NMI's delivery faults into a triple fault
    assert guest.run(10) is None
    assert guest.vmcs.exit_reason == 2  # TRIPLE_FAULT
    assert not guest.vmcs.entry_intr_info & INTR_INFO_VALID


@pytest.mark.parametrize("word,message", [
    (EVTINJ_VALID | (5 << 8), "reserved"),
    (EVTINJ_VALID | (3 << 8) | Vec.NMI, "vector 2"),
    (EVTINJ_VALID | (3 << 8) | 40, "vector 40"),
])
def test_svm_vmrun_refuses(word, message):
    cpu, _ = prepare(parse(GUEST, "unit.toml"))
    guest = SvmGuest(cpu)
    guest.vmcb.intercepts.add(Intercept.VMRUN)
    guest.vmcb.event_inj = word
    with pytest.raises(EntryFailed, match=message):
        guest.run(10)


def test_svm_vmrun_needs_the_vmrun_intercept():
    cpu, _ = prepare(parse(GUEST, "unit.toml"))
    with pytest.raises(EntryFailed, match="VMRUN intercept"):
        SvmGuest(cpu).run(10)  # APM 15.5.1: VMEXIT_INVALID
