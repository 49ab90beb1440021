"""KVM's pending MTF VM exit for L1 (vmx_update_emulated_instruction(), vmx_check_nested_events(),
nested_vmx_vmexit()): made pending when L0 completes an instruction of an L2 that L1 single-steps
with the monitor trap flag, outranking a debug trap, gone with any nested VM exit."""

from nested_vmx_vcpu import VMCS12, vcpu_in_l2

from kvmodel.arch.events import Vec
from kvmodel.arch.regs import DR6_BS
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


def test_any_nested_exit_discards_a_pending_mtf_exit():
    vcpu = in_l2(Proc.MONITOR_TRAP_FLAG)
    nested = vcpu.ops.nested
    nested.mtf_pending = True
    nested.exit_to_l1(ExitReason.CPUID)
    assert not nested.mtf_pending
