"""The VMM's register calls (KVM_GET/SET_REGS, _SREGS, _DEBUGREGS), KVM_CAP_EXCEPTION_PAYLOAD and
its quirk, the orders VMMs save and restore in, and crafted event states with their bare-metal
counterparts: each call's validation (the errno, and that nothing changed)."""

import copy
from dataclasses import replace

import pytest

from kvmodel import _faults
from kvmodel.arch.events import EventType, Vec
from kvmodel.arch.regs import DR6_BS, IF, Shadow
from kvmodel.errors import ModelLimit, ScenarioError
from kvmodel.kvm.uapi import EINVAL, InvalidArgument, KvmDebugregs, VcpuEventsFlag
from kvmodel.kvm.x86 import MpState
from kvmodel.scenario.load import parse
from kvmodel.scenario.vmm import (
    CHOICES,
    GET_PUT_QEMU,
    GET_PUT_QEMU_OLD,
    GET_PUT_REGISTERS_FIRST,
    KVM_SET_DEBUGREGS,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    EnableExceptionPayload,
    RegistersRoundTrip,
    SetVcpuEvents,
    StateRoundTrip,
    action,
)

GUEST = '''
[guest]
code = """
start:
    nop
    hlt
"""
'''


def _state(vcpu):
    """Everything these calls could change."""
    vcpu.ops.sync_guest_state_to_core()
    cpu = vcpu.cpu
    return (copy.copy(vcpu.exception), copy.copy(vcpu.exception_vmexit), copy.copy(vcpu.interrupt),
            vcpu.nmi_queued, vcpu.nmi_pending, vcpu.nmi_injected, vcpu.ops.get_nmi_mask(),
            vcpu.ops.get_interrupt_shadow(), tuple(cpu.regs), vcpu.ops.rip_read(),
            vcpu.ops.get_rflags(), cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4, cpu.efer, cpu.idtr_base,
            cpu.idtr_limit, tuple(cpu.dr), cpu.dr6, cpu.dr7, vcpu.exception_payload_enabled)


def _pending_single_step(vcpu):
    """A #DB KVM queued after emulating a single-stepped instruction (kvm_vcpu_do_singlestep())."""
    vcpu.queue_exception(Vec.DB, payload=DR6_BS)


# -- KVM_SET_DEBUGREGS / KVM_SET_SREGS / KVM_SET_REGS validation --------------------------------

@pytest.mark.parametrize("changes,why", [
    ((("flags", 1),), "flags"),
    ((("dr6", 1 << 32 | 0xFFFF0FF0),), "bits above 31"),
    ((("dr7", 1 << 40 | 0x400),), "bits above 31"),
], ids=["flags", "dr6", "dr7"])
def test_rejected_set_debugregs_is_einval_and_changes_nothing(vcpu, changes, why):
    _pending_single_step(vcpu)
    before = _state(vcpu)
    done = RegistersRoundTrip(KVM_SET_DEBUGREGS, changes).perform(vcpu)
    assert done.result == EINVAL and why in done.detail and (done.nmis, done.states) == (0, ())
    assert _state(vcpu) == before


def test_rejected_set_sregs_is_einval_and_changes_nothing(vcpu):
    sregs = vcpu.get_sregs()
    before = _state(vcpu)
    with pytest.raises(InvalidArgument, match="long mode"):  # LME+PG without CR4.PAE
        vcpu.set_sregs(replace(sregs, cr4=sregs.cr4 & ~0x20))
    with pytest.raises(InvalidArgument, match="LMA"):
        vcpu.set_sregs(replace(sregs, cr0=sregs.cr0 & ~(1 << 31)))
    assert _state(vcpu) == before


def test_rejected_set_regs_is_einval_and_changes_nothing(vcpu):
    regs = vcpu.get_regs()
    before = _state(vcpu)
    with pytest.raises(InvalidArgument):
        vcpu.set_regs(replace(regs, gprs=regs.gprs[:3]))
    assert _state(vcpu) == before


def test_protected_guest_state_is_einval(vcpu, monkeypatch):
    monkeypatch.setattr(type(vcpu.ops), "guest_state_protected", property(lambda self: True))
    before = _state(vcpu)
    for call in (KVM_SET_REGS, KVM_SET_SREGS, KVM_SET_DEBUGREGS):
        assert RegistersRoundTrip(call).perform(vcpu).result == EINVAL
    assert StateRoundTrip(GET_PUT_QEMU).perform(vcpu).result == EINVAL
    assert _state(vcpu) == before


@pytest.mark.parametrize("call", [KVM_SET_REGS, KVM_SET_SREGS, KVM_SET_DEBUGREGS])
def test_register_round_trip_changes_nothing(vcpu, call):
    vcpu.queue_interrupt(0x41, soft=False)
    vcpu.interrupt.injected = True
    before = _state(vcpu)
    done = RegistersRoundTrip(call).perform(vcpu)
    assert (done.result, done.nmis, done.states) == (0, 0, ())
    assert _state(vcpu) == before


def test_accepted_crafted_debug_register_is_a_model_limit(vcpu):
    with pytest.raises(ModelLimit, match="register writes"):
        RegistersRoundTrip(KVM_SET_DEBUGREGS, (("dr7", 0x401),)).perform(vcpu)


def test_set_regs_drops_a_pending_exception_but_keeps_an_injected_one(vcpu):
    _pending_single_step(vcpu)
    vcpu.set_regs(vcpu.get_regs())
    assert not vcpu.exception.pending  # __set_regs(): the trap is gone
    vcpu.exception = replace(vcpu.exception, injected=True)
    vcpu.set_regs(vcpu.get_regs())
    assert vcpu.exception.injected


# -- KVM_CAP_EXCEPTION_PAYLOAD and the payload quirk ---------------------------------------------

def test_payload_capability_toggles_get_and_set(vcpu):
    assert EnableExceptionPayload(False).perform(vcpu).result == 0
    assert not vcpu.get_vcpu_events().flags & VcpuEventsFlag.VALID_PAYLOAD
    done = SetVcpuEvents((("flags", int(VcpuEventsFlag.VALID_PAYLOAD)),)).perform(vcpu)
    assert done.result == EINVAL
    assert EnableExceptionPayload(True).perform(vcpu).result == 0
    assert vcpu.get_vcpu_events().flags & VcpuEventsFlag.VALID_PAYLOAD


@pytest.mark.parametrize("read", ["get_vcpu_events", "get_sregs", "get_debugregs"])
def test_without_the_capability_every_read_delivers_the_payload(vcpu, read):
    vcpu.enable_exception_payload(False)
    _pending_single_step(vcpu)
    getattr(vcpu, read)()
    assert vcpu.cpu.dr6 & DR6_BS and not vcpu.exception.has_payload
    assert vcpu.exception.pending  # still to be injected


def test_with_the_capability_reads_leave_the_payload_queued(vcpu):
    _pending_single_step(vcpu)
    events = vcpu.get_vcpu_events()
    vcpu.get_sregs()
    assert vcpu.get_debugregs().dr6 & DR6_BS == 0
    assert (events.exception_pending, events.exception_has_payload, events.exception_payload) == (
        1, 1, DR6_BS)


@pytest.mark.parametrize("read", ["get_sregs", "get_debugregs"])
def test_before_the_fix_only_get_vcpu_events_delivered_it(vcpu, read):
    vcpu.enable_exception_payload(False)
    _pending_single_step(vcpu)
    with _faults.switched_on(frozenset({"payload_quirk_events_only"})):
        getattr(vcpu, read)()
        assert not vcpu.cpu.dr6 & DR6_BS and vcpu.exception.has_payload
        vcpu.get_vcpu_events()
    assert vcpu.cpu.dr6 & DR6_BS


# -- the orders VMMs save and restore in -----------------------------------------------------------

@pytest.mark.parametrize("order", [GET_PUT_QEMU, GET_PUT_QEMU_OLD, GET_PUT_REGISTERS_FIRST])
@pytest.mark.parametrize("cap", [True, False], ids=["payload_cap", "no_payload_cap"])
def test_state_round_trip_keeps_a_pending_single_step(vcpu, order, cap):
    vcpu.enable_exception_payload(cap)
    _pending_single_step(vcpu)
    done = StateRoundTrip(order).perform(vcpu)
    assert (done.result, done.nmis, done.states) == (0, 0, ())
    exc = vcpu.exception
    assert exc.vector == Vec.DB and (exc.pending or exc.injected)
    if not cap:  # reported as injected, its payload delivered for the save
        assert exc.injected and vcpu.cpu.dr6 & DR6_BS


def test_registers_first_without_the_fix_loses_dr6(vcpu):
    vcpu.enable_exception_payload(False)
    _pending_single_step(vcpu)
    with _faults.switched_on(frozenset({"payload_quirk_events_only"})):
        StateRoundTrip(GET_PUT_REGISTERS_FIRST).perform(vcpu)
    assert vcpu.exception.injected and not vcpu.cpu.dr6 & DR6_BS


# -- KVM_SET_VCPU_EVENTS: SMM state, crafted states and their counterparts ------------------------

def test_smm_state_is_einval_after_the_events_are_written(vcpu):
    """kvm_vcpu_ioctl_x86_set_vcpu_events() without CONFIG_KVM_SMM refuses SMM state only after it
    wrote the exception, interrupt and NMI state: a rejected call that changes something."""
    events = vcpu.get_vcpu_events()
    events.nmi_masked, events.smi_smm = 1, 1
    with pytest.raises(InvalidArgument, match="SMM"):
        vcpu.set_vcpu_events(events)
    assert vcpu.ops.get_nmi_mask()
    done = action("KVM_SET_VCPU_EVENTS", CHOICES["reject_smm"][1]).perform(vcpu)
    assert done.result == EINVAL and done.nmis == 0


def _one_state(vcpu, changes):
    done = SetVcpuEvents(changes).perform(vcpu)
    assert done.result == 0 and len(done.states) == 1
    return done.states[0]


def test_nmi_masked_is_an_nmi_handler_without_its_iret(vcpu):
    assert _one_state(vcpu, (("nmi_masked", 1),)).nmi_blocked is True
    assert vcpu.ops.get_nmi_mask()


def test_sti_shadow_needs_if(vcpu):
    vcpu.ops.set_rflags(vcpu.ops.get_rflags() | IF)
    assert _one_state(vcpu, (("interrupt_shadow", 2),)).shadow is Shadow.STI


def test_sti_shadow_with_if_clear_is_a_model_limit(vcpu):
    with pytest.raises(ModelLimit, match="IF=0"):
        SetVcpuEvents((("interrupt_shadow", 2),)).perform(vcpu)


def test_pending_page_fault_writes_cr2_and_sets_rf(vcpu):
    state = _one_state(vcpu, (("exception_pending", 1), ("exception_nr", Vec.PF),
                              ("exception_has_error_code", 1), ("exception_error_code", 2),
                              ("exception_has_payload", 1), ("exception_payload", 0x5000)))
    assert state.cr2 == 0x5000
    assert (state.event.vector, state.event.type, state.event.error_code, state.event.push_rf) == (
        Vec.PF, EventType.HW_EXCEPTION, 2, True)


def test_injected_exception_keeps_cr2_and_rf(vcpu):
    state = _one_state(vcpu, (("exception_injected", 1), ("exception_nr", Vec.GP),
                              ("exception_has_error_code", 1)))
    assert state.cr2 is None and state.event.error_code == 0 and not state.event.push_rf


def test_pending_without_the_capability_is_no_event(vcpu):
    """Without KVM_VCPUEVENT_VALID_PAYLOAD KVM forces exception.pending to 0: nothing to deliver."""
    vcpu.enable_exception_payload(False)
    done = SetVcpuEvents((("exception_pending", 1), ("exception_nr", Vec.UD))).perform(vcpu)
    assert (done.result, done.states) == (0, ()) and not vcpu.exception.pending


def test_injected_nmi_and_external_interrupt(vcpu):
    assert _one_state(vcpu, (("nmi_injected", 1),)).event.type is EventType.NMI
    vcpu.set_vcpu_events(replace(vcpu.get_vcpu_events(), nmi_injected=0))
    vcpu.ops.set_rflags(vcpu.ops.get_rflags() | IF)
    event = _one_state(vcpu, (("interrupt_injected", 1), ("interrupt_nr", 0x30))).event
    assert (event.vector, event.type) == (0x30, EventType.EXT_INT)


@pytest.mark.parametrize("changes,message", [
    ((("exception_injected", 1), ("exception_nr", Vec.GP)), "without an error code"),
    ((("exception_injected", 1), ("exception_nr", Vec.UD), ("exception_has_error_code", 1)),
     "with an error code"),
    ((("exception_injected", 1), ("exception_nr", Vec.BP)), "instruction length"),
    ((("exception_injected", 1), ("exception_nr", Vec.DB)), "#DB"),
    ((("interrupt_injected", 1), ("interrupt_nr", 0x30)), "IF=0"),
    ((("exception_injected", 1), ("exception_nr", Vec.UD), ("nmi_injected", 1)), "more than one"),
    ((("exception_injected", 0), ("nmi_masked", 0), ("nmi_injected", 0)), None),
], ids=["gp_no_code", "ud_code", "bp", "db", "irq_if0", "two_events", "nothing"])
def test_crafted_states_without_a_counterpart_are_model_limits(vcpu, changes, message):
    if message is None:
        assert SetVcpuEvents(changes).perform(vcpu).states == ()
        return
    with pytest.raises(ModelLimit, match=message):
        SetVcpuEvents(changes).perform(vcpu)


def test_removing_an_injected_event_is_a_model_limit(vcpu):
    vcpu.nmi_injected = True
    with pytest.raises(ModelLimit, match="nmi_injected"):
        SetVcpuEvents((("nmi_injected", 0),)).perform(vcpu)


# -- the scenario syntax ---------------------------------------------------------------------------

def test_register_calls_are_parsed():
    s = parse(GUEST + '[[vmm]]\ncall = "KVM_SET_DEBUGREGS"\nexit = 1\nflags = 1\n'
              '[[vmm]]\ncall = "KVM_ENABLE_CAP_EXCEPTION_PAYLOAD"\nexit = 1\nenable = false\n'
              '[[vmm]]\ncall = "get_put_registers_first"\nexit = 2\n', "unit.toml")
    assert [(v.call, v.args) for v in s.vmm] == [
        ("KVM_SET_DEBUGREGS", (("flags", 1),)), ("KVM_ENABLE_CAP_EXCEPTION_PAYLOAD", (("enable", 0),)),
        ("get_put_registers_first", ())]
    assert isinstance(action("KVM_SET_DEBUGREGS", (("flags", 1),)), RegistersRoundTrip)
    assert action("KVM_ENABLE_CAP_EXCEPTION_PAYLOAD", (("enable", 0),)) == EnableExceptionPayload(False)


@pytest.mark.parametrize("text", [
    'call = "KVM_SET_REGS"\nexit = 1\nflags = 1',
    'call = "KVM_SET_DEBUGREGS"\nexit = 1\nnmi_pending = 1',
    'call = "get_put_qemu"\nexit = 1\nenable = 1',
])
def test_arguments_belong_to_their_call(text):
    with pytest.raises(ScenarioError, match="unknown key"):
        parse(GUEST + "[[vmm]]\n" + text + "\n", "unit.toml")


def test_debugregs_struct_defaults():
    assert KvmDebugregs((0, 0, 0, 0), 0, 0).flags == 0


def test_crafted_event_for_a_halted_vcpu_is_a_model_limit(vcpu):
    vcpu.mp_state = MpState.HALTED
    with pytest.raises(ModelLimit, match="KVM_SET_MP_STATE"):
        SetVcpuEvents((("exception_injected", 1), ("exception_nr", Vec.UD))).perform(vcpu)
