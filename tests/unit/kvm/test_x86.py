"""x86.py against what KVM's x86.c does: process_nmi(), #DF merging, payloads, vcpu events."""

import pytest

from kvmodel.arch.events import Vec
from kvmodel.kvm.uapi import InvalidArgument, KvmVcpuEvents, VcpuEventsFlag
from kvmodel.kvm.x86 import DR6_ACTIVE_LOW, Request


@pytest.mark.parametrize("masked,injected,arrived,kept", [
    (False, False, 3, 2),   # one to inject now, one to hold
    (True, False, 3, 1),    # one already in service: only one more
    (False, True, 3, 1),    # one being injected: only one more
    (False, False, 1, 1),
])
def test_process_nmi_limit(vcpu, masked, injected, arrived, kept):
    vcpu.ops.set_nmi_mask(masked)
    vcpu.nmi_injected = injected
    for _ in range(arrived):
        vcpu.inject_nmi()
    vcpu.process_nmi()
    assert vcpu.nmi_pending == kept and vcpu.nmi_queued == 0
    assert vcpu.requests & Request.EVENT


@pytest.mark.parametrize("first,second,result", [
    (Vec.GP, Vec.NP, Vec.DF),     # contributory + contributory
    (Vec.PF, Vec.GP, Vec.DF),     # page fault + contributory
    (Vec.PF, Vec.PF, Vec.DF),
    (Vec.DB, Vec.GP, Vec.GP),     # benign first: the new one replaces it
    (Vec.GP, Vec.PF, Vec.PF),     # contributory + page fault: serial
])
def test_queue_exception_merges_by_table_6_5(vcpu, first, second, result):
    vcpu.queue_exception(first, 0 if first in (Vec.GP, Vec.PF) else None)
    vcpu.queue_exception(second, 0 if second in (Vec.GP, Vec.NP, Vec.PF) else None)
    assert vcpu.exception.pending and vcpu.exception.vector == result
    assert not vcpu.requests & Request.TRIPLE_FAULT


def test_fault_on_top_of_df_is_a_triple_fault(vcpu):
    vcpu.queue_exception(Vec.DF, 0)
    vcpu.queue_exception(Vec.GP, 0)
    assert vcpu.requests & Request.TRIPLE_FAULT
    assert vcpu.triple_fault_cause == (Vec.DF, Vec.GP)


def test_db_payload_rewrites_b0_b3_and_keeps_bs(vcpu):
    vcpu.cpu.dr6 = DR6_ACTIVE_LOW | 0x4000 | 0x1   # BS and B0 from an earlier #DB
    vcpu.queue_exception(Vec.DB, payload=0x2)       # B1
    vcpu.deliver_exception_payload()
    assert vcpu.cpu.dr6 == DR6_ACTIVE_LOW | 0x4000 | 0x2
    assert not vcpu.exception.has_payload


def test_pf_payload_is_cr2(vcpu):
    vcpu.queue_exception(Vec.PF, 2, payload=0x1234)
    vcpu.deliver_exception_payload()
    assert vcpu.cpu.cr2 == 0x1234


def _busy_state(vcpu):
    vcpu.ops.set_nmi_mask(True)
    vcpu.inject_nmi()
    vcpu.queue_interrupt(0x41, soft=False)
    vcpu.queue_exception(Vec.PF, 6, payload=0xBEEF000)
    vcpu.ops.set_interrupt_shadow(0)


def test_get_set_round_trip_changes_nothing(vcpu, new_vcpu):
    _busy_state(vcpu)
    saved = vcpu.get_vcpu_events()
    fresh = new_vcpu()
    fresh.set_vcpu_events(KvmVcpuEvents.unpack(saved.pack()))
    assert fresh.get_vcpu_events() == saved
    assert saved.nmi_pending == 1 and saved.nmi_masked == 1
    assert saved.exception_pending == 1 and saved.exception_payload == 0xBEEF000
    assert saved.interrupt_injected == 1 and saved.interrupt_nr == 0x41


def test_soft_exceptions_and_soft_interrupts_are_hidden(vcpu):
    vcpu.requeue_exception(Vec.BP, None)
    vcpu.queue_interrupt(0x80, soft=True)
    events = vcpu.get_vcpu_events()
    assert events.exception_injected == 0 and events.exception_pending == 0
    assert events.interrupt_injected == 0


@pytest.mark.parametrize("change,match", [
    ({"flags": 0x40}, "flags"),
    ({"exception_injected": 1, "exception_nr": 32}, "vector 32"),
    ({"exception_injected": 1, "exception_nr": 2}, "vector 2"),
])
def test_set_rejects_what_kvm_rejects(vcpu, change, match):
    events = KvmVcpuEvents(**{"flags": VcpuEventsFlag.VALID_PAYLOAD, **change})
    with pytest.raises(InvalidArgument, match=match):
        vcpu.set_vcpu_events(events)


def test_warn_on_is_recorded_once_and_the_run_goes_on(vcpu):
    vcpu.exception.injected = True
    vcpu.exception.pending = True
    vcpu.exception.vector = Vec.GP
    vcpu.check_and_inject_events()
    vcpu.check_and_inject_events()
    assert vcpu.warnings == ["kvm_check_and_inject_events: exception both injected and pending"]
