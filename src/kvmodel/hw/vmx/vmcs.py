"""The VMCS fields kvmodel uses, as plain data (SDM Vol.3 ch. 24; encodings in Appendix B).

Interruption-information fields share one format (SDM Tables 24-13, 24-15,
24-16): vector in bits 7:0, type in 10:8 (arch EventType numbering),
error code valid/deliver in bit 11, NMI unblocking due to IRET in bit 12
(exit information only), valid in bit 31.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from kvmodel.arch.events import EventType

INTR_INFO_VALID = 1 << 31
INTR_INFO_DELIVER_CODE = 1 << 11
INTR_INFO_UNBLOCK_NMI = 1 << 12
INTR_INFO_NESTED = 1 << 13  # FRED: an exception nested in FRED delivery (Bochs vmx; not #DF)
INTR_INFO_RESERVED = 0x7FFFF000  # entry format (SDM 26.2.1.3); bit 13 allowed with FRED
QUAL_UNBLOCK_NMI = 1 << 12  # EPT violation and Notify qualification bit 12 (SDM Table 27-7)
NOTIFY_VM_CONTEXT_INVALID = 1 << 0  # Notify exit qualification bit 0 (KVM vmx.h)


class ExitReason(IntEnum):
    """Basic exit reasons (SDM Appendix C)."""

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT_SIGNAL = 3
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    CPUID = 10
    HLT = 12
    INVLPG = 14
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMXON = 27
    CR_ACCESS = 28
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    INVALID_GUEST_STATE = 33  # a VM-entry failure (with FAILED_VMENTRY)
    MONITOR_TRAP_FLAG = 37
    EPT_VIOLATION = 48
    NOTIFY = 75  # the SDM's "instruction timeout"


# GUEST_CR0 until L1 writes it: the model's CR0 in long and protected mode (PG, ET, PE),
# so an L1 that never writes the field runs L2 in its own mode.
L1_MODE_CR0 = 0x80000011

FAILED_VMENTRY = 1 << 31  # exit reason bit 31: VM entry failed (SDM 26.7)

# ExitReason(n) by a dict lookup: Enum.__call__ costs most of a microsecond, twice per exit.
EXIT_REASONS = {reason.value: reason for reason in ExitReason}


class Pin(IntEnum):
    """Pin-based VM-execution controls (SDM Table 24-5)."""

    EXT_INTR_EXITING = 1 << 0
    NMI_EXITING = 1 << 3
    VIRTUAL_NMIS = 1 << 5


class Proc(IntEnum):
    """Primary processor-based VM-execution controls (SDM Table 24-6)."""

    INTR_WINDOW_EXITING = 1 << 2
    HLT_EXITING = 1 << 7
    INVLPG_EXITING = 1 << 9
    CR8_LOAD_EXITING = 1 << 19
    NMI_WINDOW_EXITING = 1 << 22
    UNCOND_IO_EXITING = 1 << 24
    USE_IO_BITMAPS = 1 << 25
    MONITOR_TRAP_FLAG = 1 << 27
    USE_MSR_BITMAPS = 1 << 28


class Secondary(IntEnum):
    """Secondary processor-based VM-execution controls (SDM Table 24-7)."""

    UNRESTRICTED_GUEST = 1 << 7  # CR0.PE and PG may be 0 in the guest (SDM 26.3.1.1)
    NOTIFY_VM_EXITING = 1 << 31


class Interruptibility(IntEnum):
    """Guest interruptibility state (SDM Table 24-3)."""

    STI = 1 << 0
    MOV_SS = 1 << 1
    NMI = 1 << 3


class Activity(IntEnum):
    ACTIVE = 0
    HLT = 1


@dataclass(slots=True)
class Vmcs:
    """One VMCS: controls, guest state, VM-entry and VM-exit information."""

    pin_based: int = 0
    proc_based: int = 0
    secondary_exec: int = 0
    exception_bitmap: int = 0
    notify_window: int = 0  # NOTIFY_WINDOW (0x4024), in cycles (arch/cost.py)
    # physical addresses of the 4 KiB I/O bitmaps A and B and of the MSR bitmap (SDM 24.6.4, 24.6.9)
    io_bitmap_a: int = 0
    io_bitmap_b: int = 0
    msr_bitmap: int = 0
    # VM-entry event injection (SDM 24.8.3)
    entry_intr_info: int = 0
    entry_exception_error_code: int = 0
    entry_instruction_len: int = 0
    injected_event_data: int = 0  # FRED: the event data a FRED guest's frame gets (0x2052)
    # guest state (SDM 24.4); GPRs, CR2 and DR6 stay in the CPU as on hardware. Guest CR0
    # decides only real mode (PE=0, hw/vmx/real_l2.py); with PE=1 L2 runs in L1's mode.
    guest_cr0: int = L1_MODE_CR0
    guest_cs_selector: int = 0  # CS, read for a real-mode guest only
    guest_cs_base: int = 0
    guest_rip: int = 0
    guest_rsp: int = 0
    guest_rflags: int = 0x2
    guest_interruptibility: int = 0
    guest_activity_state: int = Activity.ACTIVE
    guest_pending_dbg_exceptions: int = 0
    # VM-exit information (SDM 24.9)
    exit_reason: int = 0
    exit_qualification: int = 0
    exit_intr_info: int = 0
    exit_intr_error_code: int = 0
    idt_vectoring_info: int = 0
    idt_vectoring_error_code: int = 0
    exit_instruction_len: int = 0
    original_event_data: int = 0  # FRED: the vectored event's data (0x2404)
    guest_physical_address: int = 0
    # host state (SDM 24.5): where a VM exit returns an L1 running on the model (hw/vmx/root.py)
    host_rip: int = 0
    host_rsp: int = 0
    guest_idtr_base: int = 0
    guest_idtr_limit: int = 0xFFFF


def intr_info(vector: int, type_: EventType, error_code: int | None, nested: bool = False) -> int:
    """Encode a valid interruption-information word."""
    info = INTR_INFO_VALID | (int(type_) << 8) | vector | (INTR_INFO_NESTED if nested else 0)
    return info | INTR_INFO_DELIVER_CODE if error_code is not None else info


def info_vector(info: int) -> int:
    return info & 0xFF


def info_type(info: int) -> int:
    return (info >> 8) & 7


def describe_info(info: int, error_code: int = 0) -> str:
    """'NMI type 2' style text of an interruption-information word, '-' when not valid."""
    if not info & INTR_INFO_VALID:
        return "-"
    type_ = info_type(info)
    name = EventType(type_).name.lower() if type_ in EventType._value2member_map_ else str(type_)
    text = f"vector {info_vector(info)} {name}" + (" nested" if info & INTR_INFO_NESTED else "")
    return text + f" error {error_code:#x}" if info & INTR_INFO_DELIVER_CODE else text
