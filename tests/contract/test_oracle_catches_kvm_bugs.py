"""The comparison with bare metal fails when KVM's model is broken on purpose.

Each test switches off one piece of KVM and checks that a shipped scenario
then reports a divergence: the scenarios and the oracle can fail.
"""

import pytest

from kvmodel.check.oracle import compare
from kvmodel.kvm.svm.svm import Svm
from kvmodel.kvm.vcpu import Vendor
from kvmodel.kvm.vmx.vmx import Vmx
from kvmodel.kvm.x86 import Vcpu
from kvmodel.scenario.load import load


def _forget_exit_vectoring_info(monkeypatch):
    """complete_interrupts that clears the queues and never re-queues EXITINTINFO / IDT-vectoring."""
    monkeypatch.setattr(Vmx, "_complete", lambda self, *event: self.vcpu.clear_event_queues())
    monkeypatch.setattr(Svm, "complete_interrupts", lambda self: self.vcpu.clear_event_queues())


@pytest.mark.parametrize("vendor", [Vendor.SVM, Vendor.VMX], ids=lambda v: v.value)
@pytest.mark.parametrize("scenario", [
    "host_fault_idt_during_nmi",
    "host_fault_idt_during_interrupt",
    "host_fault_stack_during_nmi",
])
def test_no_reinjection_is_a_divergence(monkeypatch, vendor, scenario):
    """An NMI or an acknowledged interrupt has no instruction to regenerate it: it is lost.

    (A dropped #PF or INT3 comes back when the instruction runs again, which
    the guest cannot tell apart; that is why KVM once got away with it.)
    """
    _forget_exit_vectoring_info(monkeypatch)
    c = compare(load(f"scenarios/virt/{scenario}.toml"), vendor)
    assert not c.passed
    assert c.divergence is not None and c.divergence.index == 0
    assert c.divergence.bare.kind == "delivery"
    assert c.divergence.virt is None or c.divergence.virt != c.divergence.bare


@pytest.mark.parametrize("vendor", [Vendor.SVM, Vendor.VMX], ids=lambda v: v.value)
def test_process_nmi_without_limit_is_a_divergence(monkeypatch, vendor):
    """Keeping every NMI (no clamp) delivers the one bare metal loses."""
    def keep_all(self):
        self.nmi_pending += self.nmi_queued
        self.nmi_queued = 0
        if self.nmi_pending:
            self.requests |= 1
    monkeypatch.setattr(Vcpu, "process_nmi", keep_all)
    c = compare(load("scenarios/arch/nmi_latched_until_iret.toml"), vendor)
    assert c.divergence is not None and not c.passed


def test_ept_violation_without_nmi_reblock_is_a_divergence(monkeypatch):
    """handle_ept_violation() must block NMIs again when the exit came from an IRET."""
    def map_only(self):
        cpu = self.guest.cpu
        cpu.set_host_unmapped(cpu.host_unmapped - {self.vmcs.guest_physical_address >> 12})
    monkeypatch.setattr(Vmx, "_handle_ept_violation", map_only)
    c = compare(load("scenarios/virt/iret_host_fault_keeps_nmi_blocked.toml"), Vendor.VMX)
    assert c.divergence is not None and not c.passed
    assert c.divergence.virt.kind == "delivery" and c.divergence.virt.vector == 2
