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
V_GIF = 1 << 9  # vGIF (APM 15.33): the guest's GIF, when V_GIF_ENABLE
V_INTR_PRIO_SHIFT = 16
V_INTR_PRIO_MASK = 0xF << V_INTR_PRIO_SHIFT
V_NMI_PENDING = 1 << 11  # vNMI (APM 15.21.10): an NMI waits for the CPU to take it
V_NMI_BLOCKING = 1 << 12  # the guest is in an NMI handler (APM name V_NMI_MASK)
V_IGN_TPR = 1 << 20
V_IRQ_INJECTION_BITS = V_IRQ | V_INTR_PRIO_MASK | V_IGN_TPR
V_INTR_MASKING = 1 << 24
V_GIF_ENABLE = 1 << 25
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
    INVLPG = 0x079
    IOIO = 0x07B
    MSR = 0x07C
    SHUTDOWN = 0x07F
    ICEBP = 0x088
    VMRUN = 0x080
    VMMCALL = 0x081
    VMLOAD = 0x082
    VMSAVE = 0x083
    STGI = 0x084
    CLGI = 0x085
    NPF = 0x400
    VMGEXIT = 0x403
    INVALID = -1  # VMRUN refused the VMCB (VMEXIT_INVALID, Linux SVM_EXIT_ERR)


class Intercept(IntEnum):
    """Intercept bits, numbered by their place in the VMCB's intercept words (APM Appendix B,
    Table B-1; Linux INTERCEPT_*): word 0 CR reads/writes, word 1 DR, word 3 events and
    instructions, word 4 the SVM instructions. Word 2 (exceptions) is kept apart."""

    CR8_WRITE = 16 + 8
    DR7_WRITE = 32 + 16 + 7
    INTR = 96
    NMI = 97
    VINTR = 100
    CPUID = 96 + 18
    IRET = 96 + 20
    INTN = 96 + 21
    HLT = 96 + 24
    INVLPG = 96 + 25
    IOIO = 96 + 27
    MSR = 96 + 28
    SHUTDOWN = 96 + 31
    VMRUN = 128
    VMMCALL = 129
    VMLOAD = 130
    VMSAVE = 131
    STGI = 132
    CLGI = 133
    ICEBP = 128 + 8


_EXIT_NAMES = {code.value: code.name for code in ExitCode}


def exit_name(code: int) -> str:
    """The exit code's name for the trace; EXCP_<vector> for an exception intercept."""
    name = _EXIT_NAMES.get(code)  # a table, not ExitCode(code): that costs a microsecond per exit
    return name if name is not None else f"EXCP_{code - ExitCode.EXCP_BASE}"


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
    # The I/O and MSR permission maps (APM 15.10.1, 15.11) that IOIO_PROT and MSR_PROT consult;
    # None: no map, every access is intercepted (L0's own VMCBs, which the model builds).
    iopm_base_pa: int | None = None
    msrpm_base_pa: int | None = None
    sev_es: bool = False  # SEV-ES: guest state lives in the encrypted VMSA (APM 15.35)
    sev_features: int = 0
    ghcb_gpa: int = 0  # the GHCB MSR, saved by VMGEXIT
    # save area (for SEV-ES, stale: the VMSA holds the real state)
    rip: int = 0
    rsp: int = 0
    rflags: int = 0x2
    dr6: int = 0xFFFF0FF0  # the hardware DR6 while the guest runs; KVM keeps the guest's own
    cs_base: int = 0  # the core's CS.base, which never changes in the model; KVM reads it
    # save-area fields VMRUN and #VMEXIT move for an L1's VMCB; the core holds them otherwise
    rax: int = 0
    cr2: int = 0  # loaded by VMRUN, saved by #VMEXIT (APM 15.5.1, 15.6); KVM: synced around a run
    idtr_base: int = 0
    idtr_limit: int = 0
    efer: int = 0
    # read by VMRUN to check them (hw/svm/root.py): the model runs L2 with L1's values
    asid: int = 0
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    dr7: int = 0


class Offset(IntEnum):
    """Byte offsets in a VMCB in memory (APM Appendix B, Tables B-1 and B-2)."""

    INTERCEPT_CR = 0x000
    INTERCEPT_DR = 0x004
    INTERCEPT_EXCEPTIONS = 0x008
    INTERCEPT_WORD3 = 0x00C
    INTERCEPT_WORD4 = 0x010
    IOPM_BASE_PA = 0x040
    MSRPM_BASE_PA = 0x048
    ASID = 0x058
    INT_CTL = 0x060
    INT_VECTOR = 0x064
    INT_STATE = 0x068
    EXIT_CODE = 0x070
    EXIT_INFO_1 = 0x078
    EXIT_INFO_2 = 0x080
    EXIT_INT_INFO = 0x088
    EXIT_INT_INFO_ERR = 0x08C
    EVENT_INJ = 0x0A8
    EVENT_INJ_ERR = 0x0AC
    NEXT_RIP = 0x0C8
    CS_BASE = 0x418
    IDTR_LIMIT = 0x484
    IDTR_BASE = 0x488
    EFER = 0x4D0
    CR4 = 0x548
    CR3 = 0x550
    CR0 = 0x558
    DR7 = 0x560
    CR2 = 0x640
    RFLAGS = 0x570
    RIP = 0x578
    RSP = 0x5D8
    RAX = 0x5F8


_WIDTH = {Offset.INT_CTL: 4, Offset.INT_VECTOR: 4, Offset.INT_STATE: 4, Offset.EXIT_INT_INFO: 4,
          Offset.EXIT_INT_INFO_ERR: 4, Offset.EVENT_INJ: 4, Offset.EVENT_INJ_ERR: 4,
          Offset.IDTR_LIMIT: 4, Offset.ASID: 4}  # the rest are 8 bytes wide
# Vmcb attribute <- offset, for what VMRUN reads (besides the intercepts) and #VMEXIT writes.
_VMRUN_READS = {Offset.IOPM_BASE_PA: "iopm_base_pa", Offset.MSRPM_BASE_PA: "msrpm_base_pa",
                Offset.INT_CTL: "int_ctl", Offset.INT_VECTOR: "int_vector",
                Offset.INT_STATE: "int_state", Offset.EVENT_INJ: "event_inj",
                Offset.EVENT_INJ_ERR: "event_inj_err", Offset.NEXT_RIP: "next_rip",
                Offset.CS_BASE: "cs_base", Offset.IDTR_LIMIT: "idtr_limit",
                Offset.IDTR_BASE: "idtr_base", Offset.ASID: "asid", Offset.CR0: "cr0",
                Offset.CR3: "cr3", Offset.CR4: "cr4", Offset.DR7: "dr7",
                Offset.EFER: "efer", Offset.RFLAGS: "rflags", Offset.RIP: "rip",
                Offset.RSP: "rsp", Offset.RAX: "rax", Offset.CR2: "cr2"}
_VMEXIT_WRITES = {Offset.INT_CTL: "int_ctl", Offset.INT_STATE: "int_state",
                  Offset.EXIT_CODE: "exit_code", Offset.EXIT_INFO_1: "exit_info_1",
                  Offset.EXIT_INFO_2: "exit_info_2", Offset.EXIT_INT_INFO: "exit_int_info",
                  Offset.EXIT_INT_INFO_ERR: "exit_int_info_err", Offset.EVENT_INJ: "event_inj",
                  Offset.EVENT_INJ_ERR: "event_inj_err",
                  Offset.NEXT_RIP: "next_rip", Offset.IDTR_LIMIT: "idtr_limit",
                  Offset.IDTR_BASE: "idtr_base", Offset.RFLAGS: "rflags", Offset.RIP: "rip",
                  Offset.RSP: "rsp", Offset.RAX: "rax", Offset.CR2: "cr2"}
VMCB_SIZE = 0x1000


def read_field(mem: bytearray, vmcb_pa: int, offset: Offset) -> int:
    at = vmcb_pa + offset
    return int.from_bytes(mem[at:at + _WIDTH.get(offset, 8)], "little")


def write_field(mem: bytearray, vmcb_pa: int, offset: Offset, value: int) -> None:
    width = _WIDTH.get(offset, 8)
    at = vmcb_pa + offset
    mem[at:at + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")


def read_vmcb(mem: bytearray, vmcb_pa: int) -> Vmcb:
    """The VMCB fields VMRUN uses, as a processor reads them from memory (APM 15.5.1)."""
    vmcb = Vmcb()
    words = [read_field(mem, vmcb_pa, offset) & 0xFFFFFFFF for offset in (
        Offset.INTERCEPT_CR, Offset.INTERCEPT_DR, Offset.INTERCEPT_EXCEPTIONS,
        Offset.INTERCEPT_WORD3, Offset.INTERCEPT_WORD4)]
    vmcb.intercepts = {bit for bit in Intercept if words[bit // 32] >> (bit % 32) & 1}
    vmcb.exception_intercepts = words[2]
    for offset, name in _VMRUN_READS.items():
        setattr(vmcb, name, read_field(mem, vmcb_pa, offset))
    return vmcb


def write_exit(mem: bytearray, vmcb_pa: int, vmcb: Vmcb) -> None:
    """#VMEXIT's writes to the VMCB in memory: guest state and the exit fields (APM 15.6)."""
    for offset, name in _VMEXIT_WRITES.items():
        write_field(mem, vmcb_pa, offset, getattr(vmcb, name))


# MSRPM (APM 15.11): two bits per MSR, read then write, for three ranges of 8K MSRs.
_MSRPM_RANGES = ((0x00000000, 0x000), (0xC0000000, 0x800), (0xC0010000, 0x1000))
IOIO_TYPE_IN = 1 << 0  # EXITINFO1 of an IOIO intercept (APM 15.10.2)
IOIO_SIZE_SHIFT = 4  # SZ8, SZ16, SZ32 in bits 6:4
IOIO_SIZE_MASK = 0x7 << IOIO_SIZE_SHIFT
IOIO_A64 = 1 << 9  # address size


def msr_intercepted(mem: bytearray, msrpm_base_pa: int | None, msr: int, write: bool) -> bool:
    """MSR_PROT: is this RDMSR/WRMSR intercepted (APM 15.11)? Its bit in the MSR permission map,
    and always for an MSR outside the map's ranges. One source for the CPU and for nested KVM
    (nested_svm_exit_handled_msr())."""
    if msrpm_base_pa is None:
        return True
    for first, offset in _MSRPM_RANGES:
        if first <= msr < first + 0x2000:
            bit = 2 * (msr - first) + (1 if write else 0)
            return _bit(mem, msrpm_base_pa + offset, bit)
    return True


def io_intercepted(mem: bytearray, iopm_base_pa: int | None, port: int, size: int) -> bool:
    """IOIO_PROT: is an IN/OUT of `size` bytes at `port` intercepted (APM 15.10.1)? One bit per
    port in the I/O permission map, every byte accessed checked (the map has room past FFFFh).
    One source for the CPU and for nested KVM (nested_svm_intercept_ioio())."""
    if iopm_base_pa is None:
        return True
    return any(_bit(mem, iopm_base_pa, each) for each in range(port, port + size))


def ioio_info(port: int, size: int, is_in: bool) -> int:
    """EXITINFO1 of an IN/OUT intercept (APM 15.10.2): port, size, direction, 64-bit address
    size (the model runs 64-bit code; UNVERIFIED for other modes, which the model's nested
    guests never use). String and REP forms are not modelled."""
    return port << 16 | IOIO_A64 | (size << IOIO_SIZE_SHIFT) | (IOIO_TYPE_IN if is_in else 0)


def _bit(mem: bytearray, base: int, n: int) -> bool:
    at = base + n // 8
    return at >= len(mem) or bool(mem[at] >> (n % 8) & 1)  # no memory there: KVM intercepts
