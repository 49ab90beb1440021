"""The VMM's KVM_SET_GUEST_DEBUG, KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT) and same-vCPU
KVM_GET/SET_NESTED_STATE: what each returns, and that a rejected call changes nothing
(kvm_arch_vcpu_ioctl_set_guest_debug(), kvm_vm_ioctl_enable_cap(), kvm_arch_vcpu_ioctl()
and vmx/svm_set_nested_state() fail before touching the vCPU)."""

import copy
from dataclasses import replace
from pathlib import Path

import pytest

from kvmodel import _faults
from kvmodel.arch.events import Vec
from kvmodel.check.oracle import compare
from kvmodel.errors import ModelLimit
from kvmodel.kvm.svm.svm import SvmParams
from kvmodel.kvm.uapi import EINVAL, GuestDebug, InvalidArgument
from kvmodel.kvm.vcpu import Vendor, create_vcpu, create_vm
from kvmodel.kvm.vm import NotifyFlag
from kvmodel.kvm.vmx.vmx import VmxParams
from kvmodel.scenario.load import load
from kvmodel.scenario.runner import prepare
from kvmodel.scenario.vmm import EnableNotifyCap, NestedStateRoundTrip, SetGuestDebug, VmmRecord

EBUSY = -16
NESTED = Path(__file__).parents[3] / "scenarios" / "nested"
VMM = Path(__file__).parents[3] / "scenarios" / "vmm"


def _events_state(vcpu):
    return (copy.copy(vcpu.exception), copy.copy(vcpu.exception_vmexit), copy.copy(vcpu.interrupt),
            vcpu.nmi_queued, vcpu.nmi_pending, vcpu.nmi_injected, vcpu.requests, vcpu.guest_debug)


# -- KVM_SET_GUEST_DEBUG ---------------------------------------------------------------------

@pytest.mark.parametrize("control", [1 << 3, 1 << 21, 0x80000000 | GuestDebug.INJECT_DB],
                         ids=["bit3", "bit21", "bit31-with-inject"])
def test_unknown_guest_debug_bits_are_einval_and_change_nothing(vcpu, control):
    before = _events_state(vcpu)
    done = SetGuestDebug(control).perform(vcpu)
    assert done.result == EINVAL and "unknown control bits" in done.detail
    assert done.exceptions == () and _events_state(vcpu) == before


@pytest.mark.parametrize("control,vector", [
    (GuestDebug.INJECT_DB, Vec.DB), (GuestDebug.INJECT_BP, Vec.BP),
    (GuestDebug.INJECT_DB | GuestDebug.INJECT_BP, Vec.DB),  # INJECT_DB wins
    (GuestDebug.ENABLE | GuestDebug.INJECT_BP, Vec.BP),
])
def test_inject_queues_a_payloadless_exception(vcpu, control, vector):
    done = SetGuestDebug(int(control)).perform(vcpu)
    assert (done.result, done.exceptions) == (0, (vector,))
    exc = vcpu.exception
    assert (exc.pending, exc.injected, exc.vector, exc.has_payload) == (True, False, vector, False)
    assert vcpu.guest_debug == (int(control) if control & GuestDebug.ENABLE else 0)


def test_inject_over_a_pending_exception_is_ebusy(vcpu):
    vcpu.queue_exception(Vec.GP, 0)
    before = _events_state(vcpu)
    done = SetGuestDebug(int(GuestDebug.INJECT_DB)).perform(vcpu)
    assert done.result == EBUSY and "pending" in done.detail and done.exceptions == ()
    assert _events_state(vcpu) == before


def test_inject_over_an_injected_exception_is_ebusy(vcpu):
    """e907b4e72488: `kvm_is_exception_pending(vcpu) || vcpu->arch.exception.injected`."""
    vcpu.requeue_exception(Vec.PF, 0)
    before = _events_state(vcpu)
    done = SetGuestDebug(int(GuestDebug.INJECT_DB)).perform(vcpu)
    assert done.result == EBUSY and "injected" in done.detail
    assert _events_state(vcpu) == before


def test_before_e907b4e72488_inject_replaced_the_injected_exception(vcpu):
    vcpu.requeue_exception(Vec.PF, 0)
    with _faults.switched_on(frozenset({"guest_debug_inject_over_injected"})):
        assert SetGuestDebug(int(GuestDebug.INJECT_DB)).perform(vcpu).result == 0
    assert (vcpu.exception.vector, vcpu.exception.pending) == (Vec.DB, True)  # the #PF is gone


def test_inject_over_a_reinjected_nmi_is_taken(vcpu):
    """The candidate finding of scenarios/vmm/guest_debug_inject_db_drops_nmi_in_delivery."""
    vcpu.nmi_injected = True
    assert SetGuestDebug(int(GuestDebug.INJECT_DB)).perform(vcpu).result == 0


def test_guest_debug_off_and_enable_alone_change_no_event(vcpu):
    before = _events_state(vcpu)
    assert SetGuestDebug(0).perform(vcpu).result == 0
    assert SetGuestDebug(int(GuestDebug.ENABLE)).perform(vcpu).result == 0
    assert _events_state(vcpu)[:-1] == before[:-1] and vcpu.guest_debug == GuestDebug.ENABLE


@pytest.mark.parametrize("flag", [GuestDebug.SINGLESTEP, GuestDebug.USE_HW_BP,
                                  GuestDebug.USE_SW_BP, GuestDebug.BLOCKIRQ])
def test_host_side_debugging_is_a_model_limit(vcpu, flag):
    with pytest.raises(ModelLimit, match="not modelled"):
        SetGuestDebug(int(GuestDebug.ENABLE | flag)).perform(vcpu)
    assert vcpu.guest_debug == 0 and not vcpu.exception.pending


# -- KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT) ------------------------------------------------

@pytest.mark.parametrize("flags,result", [
    (0, EINVAL), (NotifyFlag.ENABLED, 0), (NotifyFlag.USER, EINVAL),
    (NotifyFlag.ENABLED | NotifyFlag.USER, 0), (1 << 2, EINVAL), (NotifyFlag.ENABLED | 1 << 31, EINVAL),
])
def test_notify_cap_every_flags_value_before_vcpus(flags, result):
    vm = create_vm(Vendor.VMX)
    done = EnableNotifyCap(int(flags), 7).perform_on_vm(vm)
    assert done.result == result and done.contract == ""
    expected = (7, int(flags)) if result == 0 else (0, 0)
    assert (vm.notify_window, vm.notify_vmexit_flags) == expected


def test_notify_cap_on_svm_and_after_vcpus_is_einval(vcpu):
    done = EnableNotifyCap(int(NotifyFlag.ENABLED), 7).perform(vcpu)
    assert done.result == EINVAL and done.contract == ""
    assert (vcpu.kvm.notify_window, vcpu.kvm.notify_vmexit_flags) == (0, 0)


def test_notify_cap_precedence_slip_breaks_the_documented_abi():
    vm = create_vm(Vendor.VMX)
    with _faults.switched_on(frozenset({"notify_cap_precedence"})):
        done = EnableNotifyCap(int(NotifyFlag.USER), 7).perform_on_vm(vm)
    assert done.result == 0 and "documented uAPI says -22" in done.contract


# -- KVM_GET/SET_NESTED_STATE on the same vCPU ----------------------------------------------

def _vcpu_in_l2(vendor: Vendor):
    scenario = load(NESTED / f"{vendor.value}_l1_cpuid_exit.toml")
    cpu, _ = prepare(scenario)
    vcpu = create_vcpu(cpu, vendor, svm=SvmParams(nested=True), vmx=VmxParams(nested=True))
    for n in range(1, 30):
        vcpu.stop_at_exit = n
        vcpu.run(100_000)
        if vcpu.ops.nested.guest_mode:
            return vcpu
    raise AssertionError("L2 never ran")


def _crafted(vendor: Vendor, state, what: str):
    if what == "run_pending_without_guest_mode":
        return replace(state, guest_mode=False, run_pending=True)
    if vendor is Vendor.VMX:
        return {"vmxon_not_a_page": replace(state, vmxon_region=state.vmxon_region | 8),
                "vmcs12_is_vmxon": replace(state, current=state.vmxon_region),
                "guest_mode_without_vmcs12": replace(state, current=None)}[what]
    return {"vmcb12_not_a_page": replace(state, vmcb12_gpa=state.vmcb12_gpa | 8),
            "vmrun_not_intercepted": replace(state, ctl=replace(state.ctl, intercepts=set())),
            }[what]


@pytest.mark.parametrize("vendor,what", [
    (Vendor.VMX, "run_pending_without_guest_mode"), (Vendor.VMX, "vmxon_not_a_page"),
    (Vendor.VMX, "vmcs12_is_vmxon"), (Vendor.VMX, "guest_mode_without_vmcs12"),
    (Vendor.SVM, "run_pending_without_guest_mode"), (Vendor.SVM, "vmcb12_not_a_page"),
    (Vendor.SVM, "vmrun_not_intercepted"),
], ids=lambda x: getattr(x, "value", x))
def test_nested_state_that_does_not_fit_is_einval_and_changes_nothing(vendor, what):
    vcpu = _vcpu_in_l2(vendor)
    state = vcpu.ops.get_nested_state()
    before = (repr(state), vcpu.ops.vmcb if vendor is Vendor.SVM else vcpu.ops.guest.vmcs,
              vcpu.cpu.idtr_base, vcpu.ops.rip_read())
    with pytest.raises(InvalidArgument, match="KVM_SET_NESTED_STATE"):
        vcpu.ops.set_nested_state(_crafted(vendor, state, what))
    after = (repr(vcpu.ops.get_nested_state()),
             vcpu.ops.vmcb if vendor is Vendor.SVM else vcpu.ops.guest.vmcs,
             vcpu.cpu.idtr_base, vcpu.ops.rip_read())
    assert after[0] == before[0] and after[1] is before[1] and after[2:] == before[2:]


def test_svm_nested_state_with_svme_clear_needs_gif_only():
    vcpu = _vcpu_in_l2(Vendor.SVM)
    state = vcpu.ops.get_nested_state()
    vcpu.cpu.efer &= ~(1 << 12)  # EFER.SVME
    with pytest.raises(InvalidArgument, match="EFER.SVME"):
        vcpu.ops.set_nested_state(state)


@pytest.mark.parametrize("events_first", [False, True], ids=["qemu-order", "events-first"])
def test_vmx_same_vcpu_round_trip_in_l2_changes_nothing(events_first):
    vcpu = _vcpu_in_l2(Vendor.VMX)
    state, rip = repr(vcpu.ops.get_nested_state()), vcpu.ops.rip_read()
    assert NestedStateRoundTrip(events_first).perform(vcpu).result == 0
    assert vcpu.ops.nested.guest_mode and vcpu.ops.rip_read() == rip
    assert repr(vcpu.ops.get_nested_state()) == state


def test_round_trip_without_nested_state_is_skipped(vcpu):
    done = NestedStateRoundTrip().perform(vcpu)
    assert done.result == 0 and "no nested state" in done.detail


def test_vmx_same_vcpu_round_trip_in_l2_is_invisible_to_l1_and_l2():
    """Both orders while L2 runs (scenarios/vmm/nested_state_round_trip_vmx_l2): vmx_set_nested_state()
    leaves L2 first, so vmcs01 stays L1's and vmcs02 is rebuilt from vmcs12."""
    comparison = compare(load(VMM / "nested_state_round_trip_vmx_l2.toml"), Vendor.VMX)
    assert comparison.passed and comparison.divergence is None
    calls = [o for o in comparison.virt.trace if isinstance(o, VmmRecord)]
    assert [(c.call, c.result) for c in calls] == [
        ("KVM_SET_NESTED_STATE", 0), ("KVM_SET_NESTED_STATE events_first=0x1", 0)]
