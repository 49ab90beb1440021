"""The VMM actor's calls: what each returns, and that a rejected call changes nothing
(kvm_vcpu_ioctl_x86_set_vcpu_events() returns -EINVAL before touching the vCPU)."""

import copy
from pathlib import Path

import pytest

from kvmodel import _faults
from kvmodel.arch.events import Vec
from kvmodel.arch.regs import IF
from kvmodel.check.explore import Bounds, choices_for, explore, with_vmm_calls
from kvmodel.errors import ModelLimit, ScenarioError
from kvmodel.kvm.uapi import EEXIST, EINTR, EINVAL, ENXIO, VcpuEventsFlag
from kvmodel.kvm.vcpu import Vendor
from kvmodel.kvm.vm import IrqChip
from kvmodel.kvm.x86 import QueuedInterrupt, Request
from kvmodel.scenario.load import load, parse
from kvmodel.scenario.runner import Resolver, prepare, run, vmm_host
from kvmodel.scenario.vmm import (
    CHOICE_NAMES,
    PROTOCOL_BREAKING,
    ImmediateExit,
    InterruptWindow,
    KvmInterrupt,
    KvmNmi,
    Pic,
    SetVcpuEvents,
)

GUEST = '''
[guest]
code = """
start:
    nop
    hlt
"""
'''  # the same guest as the `vcpu` fixture's (tests/unit/conftest.py)


def _state(vcpu):
    """What KVM_SET_VCPU_EVENTS could change."""
    return (copy.copy(vcpu.exception), copy.copy(vcpu.exception_vmexit), copy.copy(vcpu.interrupt),
            vcpu.nmi_queued, vcpu.nmi_pending, vcpu.nmi_injected, vcpu.ops.get_nmi_mask(),
            vcpu.ops.get_interrupt_shadow(), vcpu.requests, vcpu.exception_from_userspace)


REJECTED = [
    ((("flags", 0x80),), "unknown kvm_vcpu_events flags"),
    ((("exception_injected", 1), ("exception_nr", 2)), "exception vector 2"),
    ((("exception_injected", 1), ("exception_nr", 32)), "exception vector 32"),
    ((("exception_pending", 1), ("exception_nr", 255)), "exception vector 255"),
]


@pytest.mark.parametrize("changes,why", REJECTED, ids=[w for _, w in REJECTED])
def test_rejected_set_vcpu_events_is_einval_and_changes_nothing(vcpu, changes, why):
    vcpu.inject_nmi()
    vcpu.queue_interrupt(0x41, soft=False)
    vcpu.get_vcpu_events()  # process_nmi(), which the call's own GET repeats
    before = _state(vcpu)
    done = SetVcpuEvents(changes).perform(vcpu)
    assert done.result == EINVAL and why in done.detail and done.nmis == 0
    assert _state(vcpu) == before


def test_payload_flag_without_the_capability_is_einval(vcpu):
    vcpu.exception_payload_enabled = False
    before = _state(vcpu)
    done = SetVcpuEvents((("flags", int(VcpuEventsFlag.VALID_PAYLOAD)),)).perform(vcpu)
    assert done.result == EINVAL and "KVM_CAP_EXCEPTION_PAYLOAD" in done.detail
    assert _state(vcpu) == before


def test_kvm_nmi_queues_and_requests(vcpu):
    done = KvmNmi().perform(vcpu)
    assert (done.result, done.nmis) == (0, 1)
    assert vcpu.nmi_queued == 1 and vcpu.requests & Request.NMI


def test_same_vcpu_round_trip_keeps_two_pending_nmis(vcpu):
    vcpu.inject_nmi()
    vcpu.inject_nmi()
    assert SetVcpuEvents().perform(vcpu).result == 0
    assert vcpu.get_vcpu_events().nmi_pending == 2


def test_before_ab2ee212a57b_get_reported_one_nmi(vcpu):
    vcpu.inject_nmi()
    vcpu.inject_nmi()
    with _faults.switched_on(frozenset({"get_vcpu_events_nmi_pending_bool"})):
        assert vcpu.get_vcpu_events().nmi_pending == 1


def test_crafted_nmi_pending_goes_through_process_nmi(vcpu):
    done = SetVcpuEvents((("nmi_pending", 3),)).perform(vcpu)
    assert (done.result, done.nmis) == (0, 3)  # bare metal gets three, and drops one
    assert vcpu.nmi_queued == 3 and vcpu.requests & Request.NMI
    assert vcpu.get_vcpu_events().nmi_pending == 2  # process_nmi(): one to inject, one held


def test_crafted_nmi_pending_unclamped_before_the_fix(vcpu):
    with _faults.switched_on(frozenset({"set_vcpu_events_nmi_unclamped"})):
        SetVcpuEvents((("nmi_pending", 3),)).perform(vcpu)
    assert vcpu.nmi_pending == 3 and not vcpu.requests & Request.NMI


def test_crafted_state_without_counterpart_is_a_model_limit(vcpu):
    with pytest.raises(ModelLimit, match="instruction length"):  # no INT 0x80 at RIP
        SetVcpuEvents((("interrupt_injected", 1), ("interrupt_nr", 0x80),
                       ("interrupt_soft", 1))).perform(vcpu)


def test_immediate_exit_is_eintr_and_runs_nothing(vcpu):
    retired, exits = vcpu.cpu.retired, vcpu.stats.exits
    assert ImmediateExit().perform(vcpu).result == EINTR
    assert (vcpu.cpu.retired, vcpu.stats.exits) == (retired, exits)


# -- the scenario syntax and the explorer's choice points -----------------------------------

def test_vmm_script_is_parsed():
    s = parse(GUEST + '[[vmm]]\ncall = "KVM_SET_VCPU_EVENTS"\nexit = 2\nnmi_pending = 3\n'
              '[[vmm]]\ncall = "KVM_NMI"\nat = "start"\n', "unit.toml")
    assert [(v.call, v.exit, v.at, v.args) for v in s.vmm] == [
        ("KVM_SET_VCPU_EVENTS", 2, None, (("nmi_pending", 3),)), ("KVM_NMI", None, "start", ())]


@pytest.mark.parametrize("text,message", [
    ('call = "KVM_NMIX"\nexit = 1', "is not one of"),
    ('call = "KVM_NMI"', "exactly one of exit"),
    ('call = "KVM_NMI"\nexit = 1\nnmi_pending = 1', 'unknown key "nmi_pending"'),
    ('call = "KVM_NMI"\nexit = 0', "exit must be an integer"),
])
def test_bad_vmm_steps_are_scenario_errors(text, message):
    with pytest.raises(ScenarioError, match=message):
        parse(GUEST + "[[vmm]]\n" + text + "\n", "unit.toml")


def test_explore_vmm_names_are_checked():
    with pytest.raises(ScenarioError, match="vmm = "):
        parse(GUEST + '[explore]\nvmm = ["nmi", "teleport"]\n', "unit.toml")


def _choices(text: str, bounds: Bounds):
    s = parse(GUEST + text, "unit.toml")
    _, program = prepare(s)
    return choices_for(s, Resolver(s, program), bounds, 2)


def test_vmm_choice_points_are_opt_in():
    assert list(with_vmm_calls(_choices("", Bounds()), (), 3)) == []
    offered = _choices('[explore]\nvmm = ["nmi", "events_same_vcpu"]\n', Bounds())
    assert len(list(with_vmm_calls(offered, (), 3))) == 6 + 21  # one or two of 3 exits x 2 calls
    asked = _choices("", Bounds(max_vmm=1))
    # every call that keeps to the protocol, once
    assert len(list(with_vmm_calls(asked, (), 1))) == len(CHOICE_NAMES) - len(PROTOCOL_BREAKING)


# -- KVM_INTERRUPT and the interrupt window (kvm_vcpu_ioctl_interrupt()) ---------------------

def _irq_state(vcpu):
    """What KVM_INTERRUPT could change."""
    return (copy.copy(vcpu.interrupt), vcpu.pending_external_vector, vcpu.requests,
            copy.copy(vcpu.exception), vcpu.nmi_pending, vcpu.nmi_injected)


def _with_irqchip(vcpu, chip: IrqChip):
    vcpu.kvm.irqchip = chip
    vcpu.requests = 0  # so that a KVM_REQ_EVENT raised by the call shows
    return vcpu


@pytest.mark.parametrize("chip", list(IrqChip), ids=lambda c: c.value)
@pytest.mark.parametrize("vector", [0x100, 0x1_0000, 0xFFFF_FFFF])
def test_kvm_interrupt_vector_256_and_above_is_einval_and_changes_nothing(vcpu, chip, vector):
    _with_irqchip(vcpu, chip)
    before = _irq_state(vcpu)
    done = KvmInterrupt(vector).perform(vcpu)
    assert (done.result, done.extints) == (EINVAL, ())
    assert "KVM_NR_INTERRUPTS" in done.detail
    assert _irq_state(vcpu) == before


def test_kvm_interrupt_with_the_8259_in_the_kernel_is_enxio_and_changes_nothing(vcpu):
    _with_irqchip(vcpu, IrqChip.KERNEL)
    before = _irq_state(vcpu)
    done = KvmInterrupt(0x30).perform(vcpu)
    assert (done.result, done.extints) == (ENXIO, ())
    assert _irq_state(vcpu) == before
    # The protocol call knows it too: the VMM's 8259 is KVM's, nothing is raised on bare metal.
    pic = Pic()
    assert InterruptWindow(0x30).perform(vcpu, pic).result == ENXIO and pic.pending == []


def test_split_irqchip_holds_one_vector_then_eexist_changes_nothing(vcpu):
    _with_irqchip(vcpu, IrqChip.SPLIT)
    done = KvmInterrupt(0x30).perform(vcpu)
    assert (done.result, done.extints) == (0, (0x30,))
    assert vcpu.pending_external_vector == 0x30 and vcpu.requests & Request.EVENT
    assert not vcpu.interrupt.injected  # the ExtINT is acknowledged only at injection
    before = _irq_state(vcpu)
    done = KvmInterrupt(0x31).perform(vcpu)
    assert (done.result, done.extints) == (EEXIST, ())
    assert _irq_state(vcpu) == before
    assert vcpu.has_injectable_intr() and not vcpu.accept_dm_intr()
    assert vcpu.get_interrupt() == 0x30 and vcpu.pending_external_vector is None


def test_userspace_irqchip_queues_the_vector_as_an_interrupt_to_inject(vcpu):
    _with_irqchip(vcpu, IrqChip.USERSPACE)
    done = KvmInterrupt(0x30).perform(vcpu)
    assert (done.result, done.extints) == (0, (0x30,))
    assert vcpu.interrupt == QueuedInterrupt(injected=True, soft=False, nr=0x30)
    assert vcpu.requests & Request.EVENT
    # kvm_cpu_has_extint() is interrupt.injected: no room for another until it is delivered
    assert vcpu.has_injectable_intr() and not vcpu.accept_dm_intr()


def test_ready_for_interrupt_injection_needs_no_event_in_flight(vcpu):
    """fa7a549d321a: a pending exception or an event to re-inject closes the window."""
    _with_irqchip(vcpu, IrqChip.USERSPACE)
    vcpu.ops.set_rflags(vcpu.ops.get_rflags() | IF)
    vcpu.post_kvm_run_save()
    assert vcpu.kvm_run.ready_for_interrupt_injection and vcpu.kvm_run.if_flag
    vcpu.queue_exception(Vec.UD)
    vcpu.post_kvm_run_save()
    assert not vcpu.kvm_run.ready_for_interrupt_injection
    with _faults.switched_on(frozenset({"interrupt_window_with_event_in_flight"})):
        vcpu.post_kvm_run_save()  # before the fix: IF=1 and no shadow was enough
    assert vcpu.kvm_run.ready_for_interrupt_injection


def test_ready_for_interrupt_injection_is_always_set_with_the_8259_in_the_kernel(vcpu):
    _with_irqchip(vcpu, IrqChip.KERNEL)
    vcpu.ops.set_rflags(vcpu.ops.get_rflags() & ~IF)
    vcpu.post_kvm_run_save()
    assert vcpu.kvm_run.ready_for_interrupt_injection and not vcpu.kvm_run.if_flag


def test_the_vmms_8259_waits_for_the_window(vcpu):
    """QEMU's kvm_arch_pre_run(): KVM_INTERRUPT only when ready and IF=1, else ask for a window."""
    _with_irqchip(vcpu, IrqChip.USERSPACE)
    pic = Pic()
    vcpu.ops.set_rflags(vcpu.ops.get_rflags() & ~IF)
    vcpu.post_kvm_run_save()
    done = InterruptWindow(0x30).perform(vcpu, pic)
    assert (done.result, done.extints) == (0, (0x30,))
    assert pic.pre_run(vcpu) is None and vcpu.kvm_run.request_interrupt_window
    assert not vcpu.interrupt.injected
    vcpu.ops.set_rflags(vcpu.ops.get_rflags() | IF)
    vcpu.post_kvm_run_save()
    injected = pic.pre_run(vcpu)
    assert injected is not None and injected.result == 0
    assert vcpu.interrupt.nr == 0x30 and vcpu.interrupt.injected
    assert not vcpu.kvm_run.request_interrupt_window and pic.pending == []


def test_kvm_interrupt_and_interrupt_window_steps_are_parsed():
    s = parse(GUEST + '[kvm]\nirqchip = "split"\n[[vmm]]\ncall = "KVM_INTERRUPT"\nexit = 1\n'
              'vector = 0x100\n[[vmm]]\ncall = "interrupt_window"\nexit = 2\nvector = 0x30\n',
              "unit.toml")
    assert [(v.call, v.exit, v.args) for v in s.vmm] == [
        ("KVM_INTERRUPT", 1, (("vector", 0x100),)), ("interrupt_window", 2, (("vector", 0x30),))]
    assert dict(s.kvm_params)["irqchip"] == "split"


@pytest.mark.parametrize("text,message", [
    ('[[vmm]]\ncall = "KVM_INTERRUPT"\nexit = 1\n', "KVM_INTERRUPT needs vector"),
    ('[[vmm]]\ncall = "KVM_NMI"\nexit = 1\nvector = 3\n', 'unknown key "vector"'),
    ('[kvm]\nirqchip = "pic"\n', "is not one of"),
    ('[kvm]\nirqchip = "userspace"\n[[happen]]\nevent = "interrupt"\nvector = 0x30\nafter = 1\n',
     "needs a local APIC"),
    ('[kvm]\nirqchip = "userspace"\n[explore]\ninterrupts = [0x30]\n', "need a local APIC"),
])
def test_bad_interrupt_steps_are_scenario_errors(text, message):
    with pytest.raises(ScenarioError, match=message):
        parse(GUEST + text, "unit.toml")


GIF_CLEAR = Path(__file__).parents[3] / "scenarios" / "vmm" / "kvm_interrupt_with_gif_clear.toml"


def test_bug_on_is_a_finding_of_its_own_kind():
    """Before f17c31c48e5c, svm_inject_irq() BUG()s on an interrupt injected with GIF=0: the host
    dies, the run ends without a final state, and that is a `bug` finding, never excused by
    the declared divergence the fixed KVM shows there."""
    scenario = load(GIF_CLEAR)
    found = explore(scenario, Vendor.SVM, bugs=frozenset({"svm_bug_on_irq_with_gif_clear"}),
                    stop_at_first=True).findings
    assert [f.kind for f in found] == ["bug"] and "BUG_ON(!gif_set(svm))" in found[0].message
    fixed = explore(scenario, Vendor.SVM)
    assert fixed.findings == [] and fixed.known


@pytest.mark.parametrize("field,value", [("nmi_pending", 0x100), ("exception_error_code", 1 << 32),
                                         ("exception_payload", 1 << 64)])
def test_an_event_field_wider_than_its_c_type_is_refused_with_its_line(field, value):
    """struct kvm_vcpu_events holds nmi.pending in a __u8: 0x100 cannot even be passed (found by
    the fuzz campaign as a struct.error, exit 4)."""
    text = GUEST + f'[[vmm]]\ncall = "KVM_SET_VCPU_EVENTS"\nexit = 1\n{field} = {value}\n'
    with pytest.raises(ScenarioError, match=rf"unit.toml:\d+: {field} must be an integer"):
        parse(text, "unit.toml")


def test_an_interrupt_window_vector_is_what_an_8259_presents():
    """One byte on INTA: 0x100 is a scenario error, never a VMM that retries it forever (found
    by the fuzz campaign as a hang)."""
    text = GUEST + ('[kvm]\nirqchip = "userspace"\n[[vmm]]\ncall = "interrupt_window"\nexit = 1\n'
                    'vector = 0x100\n')
    with pytest.raises(ScenarioError, match=r"unit.toml:\d+: vector must be an integer in \[0x0, 0xff\]"):
        parse(text, "unit.toml")


def test_a_refused_kvm_interrupt_loses_the_vector_as_qemu_does(vcpu):
    """kvm_arch_pre_run(): the vector came off QEMU's 8259 already; a failed ioctl loses it."""
    _with_irqchip(vcpu, IrqChip.KERNEL)  # -ENXIO for every KVM_INTERRUPT
    vcpu.ops.set_rflags(vcpu.ops.get_rflags() | IF)
    vcpu.post_kvm_run_save()
    pic = Pic(pending=[0x30])
    done = pic.pre_run(vcpu)
    assert done is not None and done.result == ENXIO and "lost" in done.detail
    assert pic.pending == [] and not vcpu.kvm_run.request_interrupt_window



def test_bare_metal_mirrors_the_script_of_the_hypervisor_a_vmx_l1_runs_on():
    """A campaign hang: bare metal took the VMM script of a VMX L1 from a run under SVM,
    where that L1 cannot run, and KVM_RUN returned without progress forever. It takes it
    from VMX, and a run whose KVM_RUNs make no progress ends with the budget."""
    path = Path(__file__).parents[3] / "scenarios/vmm/nested_state_round_trip_vmx_l2.toml"
    extra = '\n[[happen]]\nevent = "interrupt"\nvector = 0x30\nat = "start"\n' * 50
    scenario = parse(path.read_text() + extra, str(path), path.parent)
    assert vmm_host(scenario) is Vendor.VMX
    bare = run(scenario, vendor=Vendor.BARE, expectations=False)
    vmx = run(scenario, vendor=Vendor.VMX, expectations=False)
    assert bare.limit is None and bare.final.halted and vmx.final.halted
    assert (bare.final.rip, bare.final.retired) == (vmx.final.rip, vmx.final.retired)
