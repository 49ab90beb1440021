"""KVM's pending MTF VM exit for L1 (vmx_update_emulated_instruction(), vmx_check_nested_events(),
nested_vmx_vmexit()): made pending when L0 completes an instruction of an L2 that L1 single-steps
with the monitor trap flag, outranking a debug trap, gone with any nested VM exit."""

import pytest
from nested_vmx_vcpu import VMCS12, vcpu_in_l2

from kvmodel import _faults
from kvmodel.arch.events import Vec
from kvmodel.arch.regs import DR6_BD, DR6_BS
from kvmodel.hw.vmx.vmcs import ExitReason, Proc, Vmcs
from kvmodel.kvm.x86 import Request


def in_l2(proc_based: int):
    vcpu = vcpu_in_l2(Vmcs(proc_based=proc_based, host_rip=0x1234))
    vcpu.ops.nested.vmcs01 = Vmcs()
    return vcpu


def test_an_emulated_instruction_makes_the_mtf_exit_pending_with_an_event_request():
    vcpu = in_l2(Proc.MONITOR_TRAP_FLAG)
    vcpu.ops.skip_emulated_instruction()
    assert vcpu.ops.nested.mtf_pending and vcpu.requests & Request.EVENT


def test_no_mtf_exit_without_the_control_or_after_a_faulting_exception():
    vcpu = in_l2(0)
    vcpu.ops.skip_emulated_instruction()
    assert not vcpu.ops.nested.mtf_pending
    vcpu = in_l2(Proc.MONITOR_TRAP_FLAG)
    vcpu.queue_exception(Vec.GP, 0)
    vcpu.ops.skip_emulated_instruction()
    assert not vcpu.ops.nested.mtf_pending


def test_mtf_exit_outranks_a_single_step_trap_and_saves_it_as_pending_debug_exceptions():
    vcpu = in_l2(Proc.MONITOR_TRAP_FLAG)
    vcpu.ops.skip_emulated_instruction()
    vcpu.queue_exception(Vec.DB, payload=DR6_BS)  # kvm_vcpu_do_singlestep()
    assert vcpu.ops.check_nested_events() == 0
    nested = vcpu.ops.nested
    vmcs12 = nested.vmcss[VMCS12]
    assert not nested.guest_mode and vmcs12.exit_reason == ExitReason.MONITOR_TRAP_FLAG
    assert vmcs12.guest_pending_dbg_exceptions == DR6_BS
    assert not vcpu.exception.pending and not nested.mtf_pending


@pytest.mark.parametrize("bug", [False, True])
def test_a_general_detect_db_outranks_a_pending_mtf_exit(bug):
    """vmx_get_pending_dbg_trap() (8d178f460772): a #DB with DR6.BD (handle_dr() and the #DB
    intercept queue it with that payload, RIP at the MOV DR) is fault-like, so it goes to L2
    before the MTF VM exit. Before the fix any payload made it a trap: the MTF exit came
    first and saved BD, a reserved bit (SDM 26.3.1.5), as L2's pending debug exceptions."""
    vcpu = in_l2(Proc.MONITOR_TRAP_FLAG)
    nested = vcpu.ops.nested
    nested.mtf_pending = True  # no scenario has both: see README "general-detect"
    vcpu.queue_exception(Vec.DB, payload=DR6_BD)
    with _faults.switched_on(frozenset({"nested_gd_db_as_trap"} if bug else ())):
        assert vcpu.ops.check_nested_events() == 0
    vmcs12 = nested.vmcss[VMCS12]
    if bug:
        assert not nested.guest_mode and vmcs12.exit_reason == ExitReason.MONITOR_TRAP_FLAG
        assert vmcs12.guest_pending_dbg_exceptions == DR6_BD
    else:
        assert nested.guest_mode and vcpu.exception.pending and vcpu.exception.payload == DR6_BD
        assert vmcs12.guest_pending_dbg_exceptions == 0


def test_any_nested_exit_discards_a_pending_mtf_exit():
    vcpu = in_l2(Proc.MONITOR_TRAP_FLAG)
    nested = vcpu.ops.nested
    nested.mtf_pending = True
    nested.exit_to_l1(ExitReason.CPUID)
    assert not nested.mtf_pending


@pytest.mark.parametrize(("payload", "bug", "saved"), [
    (DR6_BS, False, DR6_BS),  # a single-step trap: pending at the exit (684c0422da71)
    (DR6_BD, False, 0),  # general detect: a fault, dropped (8d178f460772)
    (DR6_BD, True, DR6_BD),  # before 8d178f460772: saved as a trap, a reserved bit
])
def test_init_in_l2_is_l1s_init_signal_exit_with_a_queued_debug_trap_pending(payload, bug, saved):
    """vmx_check_nested_events(): INIT for a vCPU in L2 is the INIT_SIGNAL VM exit (SDM 25.2),
    which saves a #DB trap queued for L2 as pending debug exceptions (27.3.4); the queued #DB
    goes with the exit, as does a pending MTF exit."""
    vcpu = in_l2(Proc.MONITOR_TRAP_FLAG)
    nested = vcpu.ops.nested
    nested.mtf_pending = True
    vcpu.queue_exception(Vec.DB, payload=payload)
    vcpu.apic_pending_init = True
    with _faults.switched_on(frozenset({"nested_gd_db_as_trap"} if bug else ())):
        assert vcpu.ops.check_nested_events() == 0
    vmcs12 = nested.vmcss[VMCS12]
    assert not nested.guest_mode and vmcs12.exit_reason == ExitReason.INIT_SIGNAL
    assert vmcs12.exit_qualification == 0 and vmcs12.exit_intr_info == 0
    assert vmcs12.guest_pending_dbg_exceptions == saved
    assert not vcpu.apic_pending_init and not vcpu.exception.pending and not nested.mtf_pending


def test_init_in_l2_waits_for_vmlaunchs_injection():
    """EBUSY while nested_run_pending: the INIT stays pending for the next check."""
    vcpu = in_l2(0)
    nested = vcpu.ops.nested
    nested.run_pending = True
    vcpu.apic_pending_init = True
    assert vcpu.ops.check_nested_events() < 0
    assert nested.guest_mode and vcpu.apic_pending_init
