"""The VMCB fields kvmodel uses, as plain data (APM Vol.2 15.5, Appendix B).

EVENTINJ and EXITINTINFO share one format (APM 15.20, 15.7.2): vector in
bits 7:0, type in 10:8 (0 INTR, 2 NMI, 3 exception, 4 software interrupt),
EV (error code valid) in bit 11, V (valid) in bit 31; the error code is a
separate 32-bit word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from kvmodel.arch.events import EventType

EVTINJ_VALID = 1 << 31
EVTINJ_VALID_ERR = 1 << 11
V_TPR_MASK = 0xF
V_IRQ = 1 << 8
V_INTR_PRIO_SHIFT = 16
V_INTR_PRIO_MASK = 0xF << V_INTR_PRIO_SHIFT
V_NMI_PENDING = 1 << 11  # vNMI (APM 15.21.10): an NMI waits for the CPU to take it
V_NMI_BLOCKING = 1 << 12  # the guest is in an NMI handler (APM name V_NMI_MASK)
V_IGN_TPR = 1 << 20
V_INTR_MASKING = 1 << 24
V_NMI_ENABLE = 1 << 26
INTERRUPT_SHADOW = 1 << 0  # int_state bit 0
GUEST_INTERRUPT_MASK = 1 << 1  # int_state bit 1: RFLAGS.IF, for guests whose state is encrypted
SEV_FEATURE_DEBUG_SWAP = 1 << 5  # sev_features: DR0-3/DR7 swapped by hardware
NPF_WRITE = 1 << 1  # #NPF exit_info_1 error-code bits (APM 15.25.6)
NPF_FETCH = 1 << 4
NPF_GUEST_FINAL = 1 << 32  # the fault was on the final guest-physical address


class EventInjType(IntEnum):
    INTR = 0
    NMI = 2
    EXEPT = 3
    SOFT = 4


class ExitCode(IntEnum):
    """#VMEXIT codes (APM Appendix C)."""

    WRITE_CR8 = 0x018
    WRITE_DR7 = 0x037
    EXCP_BASE = 0x040  # + vector
    INTR = 0x060
    NMI = 0x061
    VINTR = 0x064
    CPUID = 0x072
    IRET = 0x074
    SWINT = 0x075
    HLT = 0x078
    IOIO = 0x07B
    MSR = 0x07C
    SHUTDOWN = 0x07F
    ICEBP = 0x088
    NPF = 0x400
    VMGEXIT = 0x403


class Intercept(IntEnum):
    """Instruction and event intercepts (APM 15.9-15.13), as set members."""

    INTR = 0
    NMI = 1
    VINTR = 4
    CR8_WRITE = 8
    IRET = 20
    INTN = 21
    CPUID = 22
    HLT = 24
    IOIO = 27
    MSR = 28
    SHUTDOWN = 31
    ICEBP = 40
    DR7_WRITE = 0x100 + 23  # the CR/DR word at 0x004, bit 23 (numbered apart from 0x00C/0x010)


def event_inj_type(type_: EventType) -> EventInjType:
    """How SVM reports an arch event type: INT3/INTO are exceptions (APM 15.20)."""
    if type_ is EventType.EXT_INT:
        return EventInjType.INTR
    if type_ is EventType.NMI:
        return EventInjType.NMI
    if type_ is EventType.SW_INT:
        return EventInjType.SOFT
    return EventInjType.EXEPT  # INT1 too: UNVERIFIED (reference x86-arch 8.2)


def encode(vector: int, type_: EventInjType, error_code: int | None) -> int:
    word = EVTINJ_VALID | (int(type_) << 8) | vector
    return word | EVTINJ_VALID_ERR if error_code is not None else word


def describe(word: int, error_code: int = 0) -> str:
    if not word & EVTINJ_VALID:
        return "-"
    text = f"vector {word & 0xFF} {EventInjType((word >> 8) & 7).name.lower()}"
    return text + f" error {error_code:#x}" if word & EVTINJ_VALID_ERR else text


@dataclass(slots=True)
class Vmcb:
    """Control area and the part of the save area event handling touches."""

    intercepts: set[Intercept] = field(default_factory=set)
    exception_intercepts: int = 0
    int_ctl: int = 0
    int_vector: int = 0
    int_state: int = 0
    exit_code: int = 0
    exit_info_1: int = 0
    exit_info_2: int = 0
    exit_int_info: int = 0
    exit_int_info_err: int = 0
    event_inj: int = 0
    event_inj_err: int = 0
    next_rip: int = 0
    sev_es: bool = False  # SEV-ES: guest state lives in the encrypted VMSA (APM 15.35)
    sev_features: int = 0
    ghcb_gpa: int = 0  # the GHCB MSR, saved by VMGEXIT
    # save area (for SEV-ES, stale: the VMSA holds the real state)
    rip: int = 0
    rsp: int = 0
    rflags: int = 0x2
    dr6: int = 0xFFFF0FF0  # the hardware DR6 while the guest runs; KVM keeps the guest's own
