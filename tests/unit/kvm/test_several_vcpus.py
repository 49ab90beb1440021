"""KVM with several vCPUs ([cpus] under --vendor svm|vmx): IPIs through the in-kernel APIC and
kvm_vcpu_kick(), INIT and SIPI (kvm/lapic.py), and the explorer's bare-metal criterion."""

import pytest

from kvmodel.check.explore import Bounds, explore
from kvmodel.check.interleave import explore_interleavings, outcome
from kvmodel.check.pages import PageImage
from kvmodel.kvm.vcpu import Vendor
from kvmodel.kvm.x86 import MpState, Vcpu
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import PreparedMachine, run_machine

VENDORS = pytest.mark.parametrize("vendor", [Vendor.SVM, Vendor.VMX], ids=lambda v: v.value)


def _at_reset(scenario):
    """The scenario's memory at reset, which outcome() keys memory against."""
    return PageImage(PreparedMachine(scenario).memory)

# CPU 1 spins with interrupts on; CPU 0's IPI must reach it in guest mode: the kick makes it exit.
RUNNING_TARGET = """
[cpus]
count = 2
entry = ["start", "ap_start"]

[guest]
code = '''
start:
    mov $0x830, %ecx
    mov $1, %edx
    mov $0x40, %eax
    wrmsr
    hlt
ap_start:
    sti
spin:
    pause
    jmp spin
handler:
    incq count
    hlt
.data
.balign 64
count: .quad 0
'''

[idt]
0x40 = "handler"

[expect.memory]
count = 1
"""


@VENDORS
def test_an_ipi_kicks_a_vcpu_in_guest_mode(vendor):
    s = parse(RUNNING_TARGET)
    virt = run_machine(s, vendor=vendor)
    assert virt.passed, virt.mismatches or virt.limit or virt.hypervisor_error
    cpu1 = [o.kind for o, c in zip(virt.trace, virt.cpu_of, strict=True) if c == 1]
    # the IPI arrives, the kick's host interrupt exits the guest, KVM injects the vector
    assert cpu1.index("arrival") < cpu1.index("vmexit") < cpu1.index("inject") < cpu1.index("delivery")
    bare = explore_interleavings(s, 2).outcomes
    assert outcome(virt, _at_reset(s)) in bare


@VENDORS
def test_without_the_kick_the_explorer_reports_it(vendor, monkeypatch):
    """kvm_vcpu_kick() left out: the spinning vCPU never sees the IPI (no exit brings KVM back)."""
    monkeypatch.setattr(Vcpu, "kick", lambda self: None)
    s = parse("max_steps = 3000\n" + RUNNING_TARGET)
    result = explore(s, vendor, Bounds(max_switches=1))
    assert result.findings
    assert {f.kind for f in result.findings} & {"liveness", "interleaving", "divergence"}


SIPI_ONLY = """
[cpus]
count = 2
entry = ["start"]

[guest]
code = '''
start:
    mov $0x830, %ecx
    mov $1, %edx
    mov $0x4611, %eax       # SIPI, vector 0x11, with no INIT before it
    wrmsr
    hlt
.balign 4096
ap_page:
    incq count
    hlt
.data
.balign 64
count: .quad 0
'''
"""


@VENDORS
def test_a_sipi_before_any_init_is_dropped_by_kvm(vendor):
    """kvm_apic_accept_events() starts only a vCPU in KVM_MP_STATE_INIT_RECEIVED; an AP starts
    UNINITIALIZED (as QEMU creates it). Bare metal's AP waits for a SIPI from reset (SDM 8.4.1)."""
    s = parse(SIPI_ONLY)
    virt = run_machine(s, vendor=vendor)
    bare = run_machine(s)
    count = dict(bare.program.symbols)["count"]
    assert int.from_bytes(bare.memory[count:count + 8], "little") == 1
    assert int.from_bytes(virt.memory[count:count + 8], "little") == 0
    assert virt.smp.finals[1].halted is False


@VENDORS
def test_init_then_sipi_start_the_ap_under_kvm(vendor, monkeypatch):
    states = []
    accept = Vcpu.run

    def run_and_note(self, max_steps):
        states.append(self.mp_state)
        return accept(self, max_steps)

    monkeypatch.setattr(Vcpu, "run", run_and_note)
    s = parse(SIPI_ONLY.replace("    mov $0x4611, %eax       # SIPI, vector 0x11, with no INIT "
                                "before it\n    wrmsr\n",
                                "    mov $0x4500, %eax\n    wrmsr\n    mov $0x4611, %eax\n"
                                "    wrmsr\n"))
    virt = run_machine(s, vendor=vendor)
    assert MpState.UNINITIALIZED in states
    count = dict(virt.program.symbols)["count"]
    assert int.from_bytes(virt.memory[count:count + 8], "little") == 1
    assert outcome(virt, _at_reset(s)) == outcome(run_machine(s), _at_reset(s))


# CPU 1's L1 enters VMX root operation, tells CPU 0 and halts; CPU 0 then sends INIT and SIPI.
INIT_IN_VMX_ROOT = """
[cpu]
vmx = true

[cpus]
count = 2
entry = ["start", "ap_start"]

[guest]
code = '''
    .include "vmx.s"
start:
    sti
    hlt                     # until CPU 1 is in VMX root operation
    cli
    mov $0x830, %ecx
    mov $1, %edx
    mov $0x4500, %eax       # INIT
    wrmsr
    mov $0x4601, %eax       # SIPI, vector 1
    wrmsr
    hlt
wake_handler:
    mov $0x80b, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    iretq
ap_start:
    VMX_START vmxon_region, vmcs_region, vmx_scratch
    mov $0x1234, %rbx
    mov $0x830, %ecx
    xor %edx, %edx
    mov $0x31, %eax
    wrmsr
    hlt
    .balign 16
vmx_scratch:
    .skip 16
    .balign 4096
vmxon_region:
    .skip 4096
vmcs_region:
    .skip 4096
'''

[idt]
0x31 = "wake_handler"
"""


def test_init_is_latched_and_sipi_dropped_in_vmx_root_operation_under_kvm():
    """vmx_apic_init_signal_blocked(): after L1's VMXON the INIT stays pending, the vCPU is not
    reset nor woken by it, and the SIPI is dropped (SDM 24.8: INIT is blocked in VMX root
    operation)."""
    virt = run_machine(parse(INIT_IN_VMX_ROOT), vendor=Vendor.VMX)
    assert virt.limit is None and virt.hypervisor_error is None
    assert virt.final.stop == "halted"
    cpu1 = virt.smp.finals[1]
    assert dict(cpu1.registers)["rbx"] == 0x1234 and cpu1.halted  # no INIT reset
    arrivals = [o for o, c in zip(virt.trace, virt.cpu_of, strict=True)
                if c == 1 and o.kind == "arrival"]
    assert [a.event for a in arrivals] == ["init", "sipi"]


def test_init_is_latched_and_sipi_dropped_in_vmx_root_operation_on_bare_metal():
    """SDM 24.8: INIT is blocked in VMX root operation; a SIPI finds no CPU waiting for one."""
    bare = run_machine(parse(INIT_IN_VMX_ROOT))
    assert bare.limit is None and bare.final.stop == "halted"
    cpu1 = bare.smp.finals[1]
    assert dict(cpu1.registers)["rbx"] == 0x1234 and cpu1.halted
    image = _at_reset(parse(INIT_IN_VMX_ROOT))
    assert outcome(bare, image) == outcome(run_machine(parse(INIT_IN_VMX_ROOT), vendor=Vendor.VMX),
                                           image)


# CPU 0 sends INIT while CPU 1's L1 is in VMX root operation, then lets it VMLAUNCH: the latched
# INIT exits L2 at its first boundary.
INIT_BEFORE_VMLAUNCH = """
[cpu]
vmx = true

[cpus]
count = 2
entry = ["start", "ap_start"]

[guest]
code = '''
    .include "vmx.s"
start:
    sti
    hlt                     # until CPU 1 is in VMX root operation
    cli
    mov $0x830, %ecx
    mov $1, %edx
    mov $0x4500, %eax       # INIT
    wrmsr
    movq $1, go
    hlt
wake_handler:
    mov $0x80b, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    iretq
ap_start:
    VMX_START vmxon_region, vmcs_region, vmx_scratch
    mov $0x830, %ecx
    xor %edx, %edx
    mov $0x31, %eax
    wrmsr
1:  pause
    cmpq $0, go
    je 1b
    L2_SETUP l2_start, l2_stack, l1_exit
    vmlaunch
    hlt
l1_exit:
    VMREAD_ VMCS_EXIT_REASON, %rbx
    VMREAD_ VMCS_GUEST_RIP, %rsi
    mov %rbx, exit_reason
    mov %rsi, guest_rip
    hlt
l2_start:
    nop
    hlt
    .balign 16
vmx_scratch:
    .skip 16
    .skip 256
l2_stack:
    .balign 4096
vmxon_region:
    .skip 4096
vmcs_region:
    .skip 4096
.data
.balign 64
go: .quad 0
.balign 64
exit_reason: .quad 0
.balign 64
guest_rip: .quad 0
'''

[idt]
0x31 = "wake_handler"
"""


@pytest.mark.parametrize("vendor", [Vendor.BARE, Vendor.VMX], ids=lambda v: v.value)
def test_an_init_latched_in_vmx_root_operation_exits_l2_at_its_first_boundary(vendor):
    """SDM 24.8, 25.2: the INIT held in root operation is no longer blocked in L2 and exits it
    before its first instruction. Under KVM: vmx_check_nested_events() once VMLAUNCH's entry
    is done (EBUSY while nested_run_pending)."""
    result = run_machine(parse(INIT_BEFORE_VMLAUNCH), vendor=vendor)
    assert result.limit is None and result.hypervisor_error is None
    symbols = dict(result.program.symbols)

    def word(name):
        return int.from_bytes(result.memory[symbols[name]:symbols[name] + 8], "little")
    assert word("exit_reason") == 3  # INIT_SIGNAL
    assert word("guest_rip") == symbols["l2_start"]
