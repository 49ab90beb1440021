"""Nested KVM with a real-mode L2 (hw/vmx/real_l2.py): the vCPU takes L2's mode at the entry
(prepare_vmcs02()) and L1's at the exit (load_vmcs12_host_state()), KVM_GET/SET_NESTED_STATE
carry L1's mode, and an exception exit KVM synthesizes reports no error code (80962ec912db)."""

import pytest
from nested_vmx_vcpu import vcpu_in_l2

from kvmodel import _faults
from kvmodel.arch.events import Vec
from kvmodel.arch.regs import Mode
from kvmodel.hw.vmx.vmcs import INTR_INFO_DELIVER_CODE, ExitReason, Secondary, Vmcs

REAL_L2 = dict(guest_cr0=0x30, guest_cs_selector=0x1000, guest_cs_base=0x10000,
               secondary_exec=Secondary.UNRESTRICTED_GUEST, exception_bitmap=1 << Vec.GP,
               host_rip=0x10040)


def in_real_mode_l2():
    vcpu = vcpu_in_l2(Vmcs(**REAL_L2))
    vcpu.ops.nested.guest_mode = False
    vcpu.ops.nested._enter_l2()
    vcpu.ops.nested.run_pending = False
    assert vcpu.cpu.mode is Mode.REAL16 and vcpu.cpu.cs == 0x1000
    return vcpu


def test_the_exit_to_l1_loads_l1s_mode_and_saves_l2s_cs():
    vcpu = in_real_mode_l2()
    vcpu.cpu.load_real_cs(0x2000)
    vcpu.ops.nested.exit_to_l1(ExitReason.HLT)
    assert vcpu.cpu.mode is Mode.LONG64 and vcpu.cpu.cs_base == 0
    vmcs12 = vcpu.ops.nested.vmcs12
    assert (vmcs12.guest_cs_selector, vmcs12.guest_cs_base) == (0x2000, 0x20000)


def test_set_nested_state_on_the_same_vcpu_keeps_l2_in_real_mode():
    vcpu = in_real_mode_l2()
    nested = vcpu.ops.nested
    state = nested.get_state()
    assert state.l1_mode is not None and state.l1_mode.mode is Mode.LONG64
    nested.set_state(state)  # vmx_leave_nested() first, then L2 again
    assert vcpu.cpu.mode is Mode.REAL16 and nested.l1_mode == state.l1_mode
    nested.exit_to_l1(ExitReason.HLT)
    assert vcpu.cpu.mode is Mode.LONG64


@pytest.mark.parametrize("bug", [False, True], ids=["fixed", "bug"])
def test_a_gp_kvm_queues_for_a_real_mode_l2_exits_without_an_error_code(bug):
    vcpu = in_real_mode_l2()
    with _faults.switched_on(frozenset({"nested_exit_error_code_in_real_mode"} if bug else ())):
        vcpu.queue_exception(Vec.GP, 0)
        assert vcpu.exception_vmexit.pending
        assert vcpu.ops.check_nested_events() == 0
    vmcs12 = vcpu.ops.nested.vmcs12
    assert vmcs12.exit_reason == ExitReason.EXCEPTION_NMI
    assert bool(vmcs12.exit_intr_info & INTR_INFO_DELIVER_CODE) is bug
    assert vcpu.cpu.mode is Mode.LONG64
