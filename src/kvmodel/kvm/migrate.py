"""Save/restore of a vCPU as a VMM does it: the register ioctls plus KVM_GET/SET_VCPU_EVENTS.

Only what the uAPI carries reaches the new vCPU; everything else (the
VMCS/VMCB, vendor bookkeeping such as SVM's awaiting_iret_completion or
its NMI single-step, VMX pending debug exceptions) starts fresh, as after
a live migration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from kvmodel.arch.apic import Apic
from kvmodel.arch.cpu import Cpu
from kvmodel.kvm.uapi import KvmVcpuEvents
from kvmodel.kvm.x86 import Vcpu


@dataclass(frozen=True, slots=True)
class SaveRestoreRecord:
    """The 64-byte struct kvm_vcpu_events that crossed over, for the trace."""

    kind: ClassVar[str] = "save_restore"
    retired: int
    events: str  # hex of the packed struct


def save_restore(vcpu: Vcpu, create_vcpu: Callable[[Cpu], Vcpu]) -> Vcpu:
    """KVM_GET_* on `vcpu`, then KVM_CREATE_VCPU (`create_vcpu`) and KVM_SET_* on a fresh one."""
    nested = vcpu.ops.get_nested_state()  # KVM_GET_NESTED_STATE (VMX)
    events = vcpu.get_vcpu_events().pack()
    vcpu.ops.sync_guest_state_to_core()  # KVM_GET_REGS: RIP, RFLAGS as KVM reports them
    new = create_vcpu(copy_registers(vcpu.cpu))
    if nested is not None:
        new.ops.set_nested_state(nested)  # before the events, as QEMU orders them
    new.mp_state = vcpu.mp_state  # KVM_GET/SET_MP_STATE
    new.set_vcpu_events(KvmVcpuEvents.unpack(events))
    new.cpu.trace.append(SaveRestoreRecord(vcpu.cpu.retired, events.hex()))
    return new


def copy_registers(old: Cpu) -> Cpu:
    """KVM_GET/SET_REGS, _SREGS, _DEBUGREGS and _LAPIC: architectural registers, same memory."""
    cpu = Cpu(old.mode, old.mem, not_present=old.not_present, sti_blocks_nmi=old.sti_blocks_nmi,
              record_instructions=old.record_instructions)
    cpu.regs = list(old.regs)
    cpu.rip, cpu.rflags, cpu.cs, cpu.ss = old.rip, old.rflags, old.cs, old.ss
    cpu.cs_base = old.cs_base
    cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4, cpu.efer = old.cr0, old.cr2, old.cr3, old.cr4, old.efer
    cpu.idtr_base, cpu.idtr_limit, cpu.tr_base = old.idtr_base, old.idtr_limit, old.tr_base
    cpu.tr, cpu.tasks = old.tr, dict(old.tasks)  # the model's TSS descriptors (arch/task.py)
    cpu.dr, cpu.dr6, cpu.dr7 = list(old.dr), old.dr6, old.dr7
    cpu.ghcb_msr = old.ghcb_msr
    cpu.vm_hsave_pa = old.vm_hsave_pa  # KVM_GET/SET_MSRS
    cpu.star, cpu.lstar, cpu.fmask = old.star, old.lstar, old.fmask  # KVM_GET/SET_MSRS
    cpu.fred, cpu.csl = old.fred, old.csl  # KVM_GET/SET_MSRS: the FRED MSRs and stack level
    cpu.apic = Apic(old.apic.irr, old.apic.isr, old.apic.tpr)
    cpu.retired, cpu.deliveries = old.retired, old.deliveries  # the observer's counts
    cpu.delivered = old.delivered
    cpu.waits = old.waits
    cpu.trace = old.trace
    cpu.schedule(old.scheduled)  # what is still to arrive from outside
    cpu.set_host_unmapped(old.host_unmapped)  # the host's memory map belongs to the VM
    if old.paging is not None:  # the guest's tables are in memory; a new vCPU's TLB is empty
        cpu.enable_paging(old.cr3)
        missing = old.paging.shadow_missing  # the shadow belongs to the VM, like EPT/NPT
        cpu.paging.shadow_missing = None if missing is None else set(missing)
    cpu.update_breakpoints()
    return cpu
