"""struct kvm_arch, the VM-wide part events depend on, and KVM_ENABLE_CAP on it.

KVM_CAP_X86_NOTIFY_VMEXIT (Documentation/virt/kvm/api.rst; x86.c
kvm_vm_ioctl_enable_cap()): args[0] bits 63:32 are the notify window, bits
31:0 the flags. It is refused (-EINVAL) for unknown flag bits, where the CPU
has no Notify VM exit (SVM), without KVM_X86_NOTIFY_VMEXIT_ENABLED (so
"USER alone" and "0, off" are refused too: off is the default), and once a
vCPU exists. KVM has no default window: 0 is allowed, since the CPU adds an
internal threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

from kvmodel import _faults
from kvmodel.kvm.uapi import InvalidArgument


class IrqChip(Enum):
    """kvm->arch.irqchip_mode: where the interrupt controllers are (irq.h).

    KERNEL: KVM_CREATE_IRQCHIP, the 8259s, IOAPIC and local APICs in KVM (the in-kernel
    8259 is not modelled: its output is never raised). SPLIT: KVM_CAP_SPLIT_IRQCHIP,
    the local APICs in KVM and the 8259s in userspace, whose ExtINT vectors come in
    through KVM_INTERRUPT. USERSPACE: no in-kernel irqchip at all; KVM_INTERRUPT
    queues the vector for injection as is."""

    KERNEL = "kernel"
    SPLIT = "split"
    USERSPACE = "userspace"


class Cap(IntEnum):
    """KVM_ENABLE_CAP numbers (include/uapi/linux/kvm.h)."""

    X86_NOTIFY_VMEXIT = 219


class NotifyFlag(IntEnum):
    """KVM_X86_NOTIFY_VMEXIT_*: the low half of args[0]. An IntEnum whose | & are int's own
    (IntFlag's build a flag object, microseconds each, on every vCPU creation)."""

    ENABLED = 1 << 0
    USER = 1 << 1  # exit to userspace with KVM_EXIT_NOTIFY on every notify exit


NOTIFY_VALID_BITS = NotifyFlag.ENABLED | NotifyFlag.USER


@dataclass(slots=True)
class Vm:
    """One VM: what every vCPU of it shares."""

    has_notify_vmexit: bool = False  # kvm_caps.has_notify_vmexit: VMX with the control
    notify_window: int = 0
    notify_vmexit_flags: int = 0  # NotifyFlag bits
    created_vcpus: int = 0
    irqchip: IrqChip = IrqChip.KERNEL
    force_emulation_prefix: bool = False  # kvm.force_emulation_prefix (handle_ud())
    fep_clear_rflags_rf: bool = False  # its KVM_FEP_CLEAR_RFLAGS_RF bit (force_emulation_prefix=3)

    @property
    def lapic_in_kernel(self) -> bool:
        """lapic_in_kernel() / irqchip_in_kernel(): KERNEL or SPLIT."""
        return self.irqchip is not IrqChip.USERSPACE

    @property
    def pic_in_kernel(self) -> bool:
        """pic_in_kernel() (irqchip_full())."""
        return self.irqchip is IrqChip.KERNEL

    def enable_cap(self, cap: Cap, arg0: int) -> None:
        """KVM_ENABLE_CAP on the VM; InvalidArgument where the ioctl gives -EINVAL."""
        if cap is not Cap.X86_NOTIFY_VMEXIT:
            raise InvalidArgument(f"capability {cap} is not modelled")
        flags = arg0 & 0xFFFFFFFF
        if flags & ~NOTIFY_VALID_BITS:
            raise InvalidArgument(f"KVM_CAP_X86_NOTIFY_VMEXIT: unknown flags {flags:#x}")
        if not self.has_notify_vmexit:
            raise InvalidArgument("KVM_CAP_X86_NOTIFY_VMEXIT: this CPU has no Notify VM exit")
        if not _asks_to_enable(flags):
            raise InvalidArgument(f"KVM_CAP_X86_NOTIFY_VMEXIT: flags {flags:#x} without "
                                  "KVM_X86_NOTIFY_VMEXIT_ENABLED")
        if self.created_vcpus:
            raise InvalidArgument("KVM_CAP_X86_NOTIFY_VMEXIT: vCPUs exist already")
        self.notify_vmexit_flags = flags
        self.notify_window = arg0 >> 32

    @property
    def notify_enabled(self) -> bool:
        return bool(self.notify_vmexit_flags & NotifyFlag.ENABLED)


def _asks_to_enable(flags: int) -> bool:
    """The ENABLED test of kvm_vm_ioctl_enable_cap()."""
    if _faults.on("notify_cap_precedence"):
        # "[PATCH v6 3/3] KVM: VMX: Enable Notify VM exit": `!(u32)cap->args[0] & ENABLED`
        # tests !flags, so only flags == 0 is refused and USER alone is taken.
        return not (int(not flags) & NotifyFlag.ENABLED)
    return bool(flags & NotifyFlag.ENABLED)
