"""Every nested VM exit to L1 leaves nothing of L2's behind (nested_vmx_vmexit()): the events
queued or re-injected for L2 (d953540430c5 "KVM: nVMX: Unconditionally purge queued/injected
events on nested "exit"") and a pending MTF VM exit (593a5c2e3c12 "KVM: nVMX: Unconditionally
clear mtf_pending on nested VM-Exit"), also for the exits that do not fill vmcs12: a late
VM-Fail of vmcs02 and a forced exit (vmx_leave_nested() from KVM_SET_NESTED_STATE).

The forced exit is reached against the bare-metal oracle by a VMM that rolls the vCPU back to a
snapshot of L1 (scenarios/nested/vmx_rollback_*, tests/unit/scenario/test_vmm_rollback.py). The
other paths need an event for L2 queued at a moment only a crafted uAPI call creates (upstream:
"this is likely a nop", "should never happen for VM-Fail"), so these tests craft it."""

from dataclasses import replace

import pytest
from nested_vmx_vcpu import VMCS12, vcpu_in_l2

from kvmodel import _faults
from kvmodel.arch.events import EventType, Vec
from kvmodel.hw.vmx.root import VmxError
from kvmodel.hw.vmx.vmcs import ExitReason, Proc, Vmcs, intr_info

L1_RIP, VMLAUNCH_LEN = 0x10100, 3
ZF = 1 << 6


def in_l2(proc_based: int = 0, exception_bitmap: int = 0):
    vcpu = vcpu_in_l2(Vmcs(proc_based=proc_based, exception_bitmap=exception_bitmap,
                           host_rip=0x1234))
    nested = vcpu.ops.nested
    nested.launched.add(VMCS12)
    vmcs01 = vcpu.ops.vmcs
    vmcs01.guest_rip, vmcs01.exit_instruction_len = L1_RIP, VMLAUNCH_LEN  # L1 at its VMLAUNCH
    nested.vmcs01 = vmcs01
    vcpu.ops.guest.vmcs = Vmcs(pin_based=vmcs01.pin_based, guest_rip=0x20000)  # vmcs02
    return vcpu


def _pending_mtf_over_a_reinjected_nmi_then_an_exception_exit(vcpu):
    """L0 completed an instruction of L2 (MTF pending), an NMI for L2 is to be re-injected and
    an exception L1 intercepts is queued: the exception's exit goes to L1 while the re-injection
    blocks events, so the MTF exit is neither taken nor cleared by vmx_check_nested_events()."""
    vcpu.ops.skip_emulated_instruction()
    vcpu.nmi_injected = True
    vcpu.queue_exception(Vec.GP, 0)
    assert vcpu.exception_vmexit.pending
    assert vcpu.ops.check_nested_events() == 0
    nested = vcpu.ops.nested
    assert not nested.guest_mode and nested.vmcs12.exit_reason == ExitReason.EXCEPTION_NMI


@pytest.mark.parametrize("bug", [False, True], ids=["fixed", "bug"])
def test_an_exception_exit_while_an_event_is_reinjected_discards_the_pending_mtf(bug):
    vcpu = in_l2(Proc.MONITOR_TRAP_FLAG, exception_bitmap=1 << Vec.GP)
    with _faults.switched_on(frozenset({"nested_mtf_pending_survives_exit"} if bug else ())):
        _pending_mtf_over_a_reinjected_nmi_then_an_exception_exit(vcpu)
        nested = vcpu.ops.nested
        assert nested.mtf_pending is bug
        # L1 clears MTF and resumes L2 (nested_vmx_run() and the first entry done)
        nested.vmcs12.proc_based = 0
        nested.guest_mode, nested.run_pending = True, False
        assert vcpu.ops.check_nested_events() == 0
        # with the bug, L1 gets an MTF exit it never asked for, before L2 ran an instruction
        assert nested.guest_mode is not bug
        if bug:
            assert nested.vmcs12.exit_reason == ExitReason.MONITOR_TRAP_FLAG


@pytest.mark.parametrize("bug", [False, True], ids=["fixed", "bug"])
def test_a_forced_exit_purges_what_was_queued_for_l2(bug):
    """KVM_SET_NESTED_STATE with L1's state on a vCPU in L2 (vmx_set_nested_state() calls
    vmx_leave_nested() first): L2's NMI that was to be re-injected must not reach L1."""
    vcpu = in_l2(Proc.MONITOR_TRAP_FLAG)
    state = vcpu.ops.get_nested_state()
    vcpu.nmi_injected = True
    vcpu.ops.nested.mtf_pending = True
    names = {"nested_exit_keeps_queued_events", "nested_mtf_pending_survives_exit"} if bug else set()
    with _faults.switched_on(frozenset(names)):
        vcpu.ops.set_nested_state(replace(state, guest_mode=False, run_pending=False))
    assert not vcpu.ops.nested.guest_mode
    assert vcpu.nmi_injected is bug
    assert vcpu.ops.nested.mtf_pending is bug


@pytest.mark.parametrize("bug", [False, True], ids=["fixed", "bug"])
def test_a_late_vmfail_of_vmcs02_is_l1s_vmfail_and_purges_what_was_queued_for_l2(bug):
    """The hardware refuses vmcs02 (here an error code with bits 31:16 set, which KVM wrote into
    it before eba9799b5a6e "KVM: VMX: Drop bits 31:16 when shoving exception error code into
    VMCS", from a KVM_SET_VCPU_EVENTS of a 32-bit error code): L1 goes on
    after its VMLAUNCH with VMfailValid(7), vmcs12 untouched; an exception the VMM queued for
    L2 while VMLAUNCH's entry was pending is not L1's."""
    vcpu = in_l2()
    nested = vcpu.ops.nested
    nested.run_pending = True
    vcpu.queue_exception(Vec.UD)  # held back by nested_run_pending (-EBUSY)
    vmcs02 = vcpu.ops.vmcs
    vmcs02.entry_intr_info = intr_info(Vec.GP, EventType.HW_EXCEPTION, 0)
    vmcs02.entry_exception_error_code = 0x10000  # refused with VMfail (SDM 26.2.1.3)
    with _faults.switched_on(frozenset({"nested_exit_keeps_queued_events"} if bug else ())):
        assert vcpu.ops.run(100, immediate_exit=False) is None
        assert vcpu.ops.handle_exit() is None
    vmcs01 = vcpu.ops.vmcs
    assert vmcs01 is nested.vmcs01 and not nested.guest_mode and not nested.run_pending
    assert vmcs01.guest_rip == L1_RIP + VMLAUNCH_LEN and vmcs01.guest_rflags & ZF
    assert nested.errors[VMCS12] == VmxError.ENTRY_INVALID_CONTROL
    assert nested.vmcss[VMCS12].exit_reason == 0  # vmcs12 is not touched
    assert vcpu.exception.pending is bug  # with the bug, L2's #UD is injected into L1 next
