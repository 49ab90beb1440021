"""Notify VM exits: the capability, the hardware exit, handle_notify, the host-side bound."""

from pathlib import Path

import pytest

from kvmodel import _faults
from kvmodel.arch.cost import DELIVERY_CYCLES
from kvmodel.check.explore import Runner, stats_problem
from kvmodel.check.oracle import compare
from kvmodel.hw.base import ExitRecord
from kvmodel.hw.vmx.cpu import NOTIFY_THRESHOLD
from kvmodel.hw.vmx.vmcs import QUAL_UNBLOCK_NMI, Secondary
from kvmodel.kvm.uapi import InvalidArgument
from kvmodel.kvm.vcpu import Vendor, create_vcpu, create_vm
from kvmodel.kvm.vm import Cap, NotifyFlag
from kvmodel.scenario.load import load, parse
from kvmodel.scenario.runner import prepare, run
from kvmodel.scenario.session import HostTime, VmmStop

NOTIFY = Path(__file__).parents[3] / "scenarios" / "notify"


def notify_exits(result):
    return [o for o in result.trace if isinstance(o, ExitRecord) and o.reason == "NOTIFY"]


# -- KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT) ------------------------------------------

def test_cap_stores_window_and_flags():
    vm = create_vm(Vendor.VMX)
    vm.enable_cap(Cap.X86_NOTIFY_VMEXIT, 1234 << 32 | NotifyFlag.ENABLED | NotifyFlag.USER)
    assert (vm.notify_window, vm.notify_vmexit_flags) == (1234, NotifyFlag.ENABLED | NotifyFlag.USER)


@pytest.mark.parametrize("flags", [0, NotifyFlag.USER], ids=["off", "user-only"])
def test_cap_without_enabled_is_einval_and_changes_nothing(flags):
    """kvm_vm_ioctl_enable_cap(): `if (!((u32)cap->args[0] & KVM_X86_NOTIFY_VMEXIT_ENABLED))
    break;` with r = -EINVAL: off is the default, and USER alone means nothing."""
    vm = create_vm(Vendor.VMX)
    with pytest.raises(InvalidArgument, match="without KVM_X86_NOTIFY_VMEXIT_ENABLED"):
        vm.enable_cap(Cap.X86_NOTIFY_VMEXIT, 99 << 32 | flags)
    assert (vm.notify_window, vm.notify_vmexit_flags) == (0, 0)


def test_v6_precedence_slip_takes_user_only():
    """[PATCH v6 3/3]: `!(u32)cap->args[0] & ENABLED` refuses only flags == 0."""
    vm = create_vm(Vendor.VMX)
    with _faults.switched_on(frozenset({"notify_cap_precedence"})):
        vm.enable_cap(Cap.X86_NOTIFY_VMEXIT, 99 << 32 | NotifyFlag.USER)
        with pytest.raises(InvalidArgument):
            vm.enable_cap(Cap.X86_NOTIFY_VMEXIT, 99 << 32)
    assert (vm.notify_window, vm.notify_vmexit_flags) == (99, NotifyFlag.USER)
    assert not vm.notify_enabled


@pytest.mark.parametrize("why,vendor,arg", [
    ("unknown flags", Vendor.VMX, 1 << 2 | 1),
    ("no Notify VM exit", Vendor.SVM, 1),
])
def test_cap_refused(why, vendor, arg):
    with pytest.raises(InvalidArgument, match=why):
        create_vm(vendor).enable_cap(Cap.X86_NOTIFY_VMEXIT, arg)


def test_cap_refused_once_a_vcpu_exists():
    scenario = load(NOTIFY / "busy_guest_no_notify.toml")
    vm = create_vm(Vendor.VMX)
    create_vcpu(prepare(scenario)[0], Vendor.VMX, vm=vm)
    with pytest.raises(InvalidArgument, match="vCPUs exist"):
        vm.enable_cap(Cap.X86_NOTIFY_VMEXIT, 1)


# -- the guest side ----------------------------------------------------------------------

def test_bare_metal_storm_ends_on_the_budget():
    result = run(load(NOTIFY / "db_storm_on_ist_stack.toml"), vendor=Vendor.BARE)
    assert result.passed and result.final.stop == "budget"
    # the budget (40) spans the 5 instructions and the deliveries after them
    assert len(result.deliveries) == 40 - 5 and result.final.retired == 5


def test_kvm_intercepting_db_needs_no_notify_exit():
    result = run(load(NOTIFY / "db_storm_on_ist_stack.toml"), vendor=Vendor.VMX)
    assert result.passed and not notify_exits(result)
    reasons = {o.reason for o in result.trace if isinstance(o, ExitRecord)}
    assert reasons == {"EXCEPTION_NMI"}
    assert result.host.longest_windowless <= DELIVERY_CYCLES  # every #DB goes to the host


def test_storm_kvm_cannot_see_ends_in_notify_exits_during_db_delivery():
    result = run(load(NOTIFY / "db_storm_notify_exits.toml"), vendor=Vendor.VMX)
    exits = notify_exits(result)
    assert result.passed and len(exits) == result.stats[0].notify_window_exits >= 3
    assert all("idt_vectoring vector 1 hw_exception" in e.detail for e in exits)
    assert result.host.longest_windowless <= result.host.notify_limit
    assert result.host.notify_limit == 0 + NOTIFY_THRESHOLD + DELIVERY_CYCLES


def test_busy_guest_with_a_zero_window_never_exits():
    result = run(load(NOTIFY / "busy_guest_no_notify.toml"), vendor=Vendor.VMX)
    assert result.passed and result.stats[0].notify_window_exits == 0


def test_notify_inside_iret_reports_nmi_unblocking_and_kvm_reblocks():
    scenario = load(NOTIFY / "nmi_iret_interrupted.toml")
    cpu, _ = prepare(scenario)
    vm = create_vm(Vendor.VMX)
    vm.enable_cap(Cap.X86_NOTIFY_VMEXIT, NotifyFlag.ENABLED)
    vcpu = create_vcpu(cpu, Vendor.VMX, vm=vm)
    vmcs = vcpu.ops.vmcs
    vcpu.stop_at_exit = 3  # the NMI, the NMI that waits, then the notify exit
    vcpu.run(1000)
    assert vmcs.exit_reason == 75 and vmcs.exit_qualification == QUAL_UNBLOCK_NMI
    assert vcpu.ops.get_nmi_mask()  # handle_notify() put virtual-NMI blocking back
    assert compare(scenario, Vendor.VMX).passed


@pytest.mark.parametrize("name,flags,why", [
    ("context_invalid.toml", 1, "the VM context is invalid"),
    ("storm_stops_vmm.toml", 0, "notify-vmexit=internal-error"),
])
def test_kvm_exit_notify_stops_the_vmm(name, flags, why):
    result = run(load(NOTIFY / name), vendor=Vendor.VMX)
    stops = [o for o in result.trace if isinstance(o, VmmStop)]
    assert result.final.stop == "vmm" and result.hypervisor_error is None
    assert [(s.reason, s.flags, s.why) for s in stops] == [("KVM_EXIT_NOTIFY", flags, why)]
    assert result.stats[0].notify_window_exits == 1


def test_svm_has_no_notify_and_the_vmm_goes_on_without_it():
    result = run(load(NOTIFY / "context_invalid.toml"), vendor=Vendor.SVM)
    assert result.final.stop == "halted" and result.host.notify_limit is None


# -- the host side -----------------------------------------------------------------------

def test_without_the_control_the_guest_starves_the_host():
    scenario = load(NOTIFY / "db_storm_notify_exits.toml")
    cpu, _ = prepare(scenario)
    vm = create_vm(Vendor.VMX)
    vm.enable_cap(Cap.X86_NOTIFY_VMEXIT, NotifyFlag.ENABLED)
    vcpu = create_vcpu(cpu, Vendor.VMX, vm=vm)
    vcpu.ops.vmcs.exception_bitmap &= ~(1 << 1)  # the scenario's intercept_db = false
    vcpu.ops.vmcs.secondary_exec &= ~Secondary.NOTIFY_VM_EXITING  # as if vmcs02 lacked it
    vcpu.run(40)
    limit = NOTIFY_THRESHOLD + DELIVERY_CYCLES
    assert vcpu.ops.guest.longest_windowless > limit
    assert HostTime(vcpu.ops.guest.longest_windowless, limit).starved


def test_starvation_and_notify_stats_are_findings():
    scenario = load(NOTIFY / "db_storm_notify_exits.toml")
    runner = Runner(scenario, Vendor.VMX)
    virt = run(scenario, vendor=Vendor.VMX)
    assert runner.judge((), runner.bare(()), virt) is None
    starved = type(virt)(*[HostTime(10_000, 110) if f == "host" else getattr(virt, f)
                           for f in virt.__dataclass_fields__])
    assert runner.judge((), runner.bare(()), starved).kind == "starvation"
    virt.stats[0].notify_window_exits += 1
    assert "notify_window_exits" in stats_problem(virt)


def test_expected_stats_are_judged_per_vendor():
    text = (NOTIFY / "busy_guest_no_notify.toml").read_text().replace(
        "notify_window_exits = 0", "notify_window_exits = 2")
    scenario = parse(text, "busy.toml")
    vmx, svm = run(scenario, vendor=Vendor.VMX), run(scenario, vendor=Vendor.SVM)
    assert [m.message for m in vmx.mismatches] == [
        "KVM stat notify_window_exits on vmx: expected 2, got 0"]
    assert not svm.mismatches
