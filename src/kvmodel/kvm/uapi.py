"""The KVM uAPI pieces for events: struct kvm_vcpu_events and KVM_RUN exit reasons.

Layout from include/uapi/asm/kvm.h (arch/x86): 64 bytes, little-endian,
naturally aligned; `exception.pending` lives in what was padding, and
`exception_has_payload`/`exception_payload` follow the reserved bytes
(Documentation/virt/kvm/api.rst, KVM_GET_VCPU_EVENTS).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, fields
from enum import IntEnum, IntFlag
from operator import attrgetter

from kvmodel.errors import KvmodelError

# exception(4B + u32) interrupt(4B) nmi(4B) sipi_vector flags smi(4B) triple_fault
# reserved[26] exception_has_payload exception_payload
_LAYOUT = struct.Struct("<4BI4B4BII4BB26xBQ")
SIZE = 64
assert _LAYOUT.size == SIZE


class VcpuEventsFlag(IntFlag):
    VALID_NMI_PENDING = 0x01
    VALID_SIPI_VECTOR = 0x02
    VALID_SHADOW = 0x04
    VALID_SMM = 0x08
    VALID_PAYLOAD = 0x10
    VALID_TRIPLE_FAULT = 0x20


class ShadowBits(IntEnum):
    """interrupt.shadow: KVM_X86_SHADOW_INT_MOV_SS / KVM_X86_SHADOW_INT_STI.

    Bits, but an IntEnum: int's own operators, as VMX tests them at every skipped instruction."""

    MOV_SS = 0x01
    STI = 0x02


class KvmExit(IntEnum):
    """kvm_run->exit_reason values used here (include/uapi/linux/kvm.h)."""

    IO = 2
    HLT = 5
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17
    NOTIFY = 37


KVM_NOTIFY_CONTEXT_INVALID = 1 << 0  # kvm_run->notify.flags


EINVAL = -22  # what an ioctl returns, as the kernel returns it (negative errno)
EINTR = -4
ENXIO = -6
EEXIST = -17
KVM_NR_INTERRUPTS = 256  # KVM_INTERRUPT's vector bound (arch/x86/include/asm/kvm_host.h)


@dataclass(slots=True)
class KvmRun:
    """The struct kvm_run fields the interrupt-window protocol uses (api.rst, "kvm_run").

    `request_interrupt_window` is userspace's to write before KVM_RUN; the others
    KVM writes as KVM_RUN returns (post_kvm_run_save())."""

    request_interrupt_window: bool = False
    ready_for_interrupt_injection: bool = False
    if_flag: bool = False


class InvalidArgument(KvmodelError):
    """The ioctl would fail with -EINVAL."""

    errno = EINVAL


class Busy(KvmodelError):
    """The ioctl would fail with -EBUSY."""

    errno = -16


class GuestDebug(IntFlag):
    """struct kvm_guest_debug control bits: KVM_GUESTDBG_ENABLE and _SINGLESTEP
    (include/uapi/linux/kvm.h), the rest x86's (arch/x86/include/uapi/asm/kvm.h)."""

    ENABLE = 0x00000001
    SINGLESTEP = 0x00000002
    USE_SW_BP = 0x00010000
    USE_HW_BP = 0x00020000
    INJECT_DB = 0x00040000
    INJECT_BP = 0x00080000
    BLOCKIRQ = 0x00100000


# KVM_GUESTDBG_VALID_MASK (arch/x86/include/asm/kvm_host.h): everything above
GUESTDBG_VALID_MASK = int(GuestDebug.ENABLE | GuestDebug.SINGLESTEP | GuestDebug.USE_SW_BP
                          | GuestDebug.USE_HW_BP | GuestDebug.INJECT_DB | GuestDebug.INJECT_BP
                          | GuestDebug.BLOCKIRQ)


@dataclass(slots=True)
class KvmVcpuEvents:
    """struct kvm_vcpu_events, field by field in header order."""

    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    nmi_pad: int = 0
    sipi_vector: int = 0
    flags: int = 0
    smi_smm: int = 0
    smi_pending: int = 0
    smi_smm_inside_nmi: int = 0
    smi_latched_init: int = 0
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0

    def pack(self) -> bytes:
        return _LAYOUT.pack(*_FIELD_VALUES(self))

    @classmethod
    def unpack(cls, buf: bytes) -> KvmVcpuEvents:
        if len(buf) != SIZE:
            raise InvalidArgument(f"struct kvm_vcpu_events is {SIZE} bytes, got {len(buf)}")
        return cls(*_LAYOUT.unpack(buf))


# The fields in header order; dataclasses.astuple() would deep-copy each one (16 us a pack).
_FIELD_VALUES = attrgetter(*(f.name for f in fields(KvmVcpuEvents)))


def _field_bits(layout: struct.Struct) -> tuple[int, ...]:
    """Each field's width in bits, in order, from a struct format (padding left out)."""
    bits = {"B": 8, "I": 32, "Q": 64}
    return tuple(bits[kind] for count, kind in re.findall(r"(\d*)([A-Za-z])", layout.format)
                 if kind != "x" for _ in range(int(count or 1)))


# What each struct kvm_vcpu_events field holds: a value beyond it cannot be passed at all.
EVENT_FIELD_BITS = dict(zip((f.name for f in fields(KvmVcpuEvents)), _field_bits(_LAYOUT),
                            strict=True))


# -- KVM_GET/SET_REGS, KVM_GET/SET_SREGS, KVM_GET/SET_DEBUGREGS ----------------------------
# The parts of struct kvm_regs / kvm_sregs / kvm_debugregs (include/uapi/asm/kvm.h) the model
# holds; a VMM passes back what it read, so they need no byte layout here.


@dataclass(frozen=True, slots=True)
class KvmRegs:
    """struct kvm_regs: the general registers in the mode's order, RIP, RFLAGS."""

    gprs: tuple[int, ...]
    rip: int
    rflags: int


@dataclass(frozen=True, slots=True)
class KvmSregs:
    """struct kvm_sregs, the fields events touch. `interrupt_bitmap` holds the vector of an
    injected hard interrupt (__get_sregs(): interrupt.injected && !soft), or None."""

    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    idt_base: int
    idt_limit: int
    interrupt_bitmap: int | None = None


@dataclass(frozen=True, slots=True)
class KvmDebugregs:
    """struct kvm_debugregs: db[4], dr6, dr7, flags (must be 0), reserved."""

    db: tuple[int, int, int, int]
    dr6: int
    dr7: int
    flags: int = 0
