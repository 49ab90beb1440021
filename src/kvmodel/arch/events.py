"""Events, vectors and the exception tables of the Intel SDM, as data.

Every row carries its source. Section numbers are those of the 2016 SDM
(order 325384-059US); newer editions move the IDT chapter to ch. 7.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from kvmodel.arch.regs import RF


class External(IntEnum):
    """What arrives on the CPU's pins from outside."""

    NMI = 0
    INTERRUPT = 1  # a fixed interrupt accepted by the local APIC
    HOST_INTERRUPT = 2  # an interrupt for the hypervisor, if there is one; bare metal has none
    NOTIFY_TIMER = 3  # VMX's notify timer runs out (its internal threshold is not architectural)
    HOST_NMI = 4  # an NMI for the hypervisor (perf, watchdog); bare metal has none
    STATE = 5  # no arrival: the CPU is in `Scheduled.state` at this boundary (below)
    EXTINT = 6  # an 8259's interrupt on INTR (LINT0 in virtual-wire mode): the vector it presents


class EventType(IntEnum):
    """Event type; the numbering is VMX's interruption type, also FRED's (SDM Table 24-13)."""

    EXT_INT = 0
    NMI = 2
    HW_EXCEPTION = 3
    SW_INT = 4  # INT n
    PRIV_SW_EXCEPTION = 5  # INT1 / ICEBP
    SW_EXCEPTION = 6  # INT3, INTO

    @property
    def is_software(self) -> bool:
        """INT n, INT3, INTO: delivery pushes the next RIP and clears EXT (SDM 6.13)."""
        return self in (EventType.SW_INT, EventType.SW_EXCEPTION)


class Kind(IntEnum):
    """Where the return address points (SDM 6.5)."""

    FAULT = 0
    TRAP = 1
    ABORT = 2
    INTERRUPT = 3


class DfClass(IntEnum):
    """Class of an event for the double-fault rule (SDM 6.15 Table 6-4)."""

    BENIGN = 0
    CONTRIBUTORY = 1
    PAGE_FAULT = 2
    DOUBLE_FAULT = 3  # the "first" row for an event that is itself #DF


class Vec(IntEnum):
    """Architectural exception vectors (SDM 6.3.1 Table 6-1)."""

    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20
    CP = 21
    VC = 29  # AMD SEV-ES VMM communication exception


@dataclass(frozen=True, slots=True)
class VectorInfo:
    vector: int
    name: str
    kind: Kind
    error_code: bool
    df_class: DfClass
    cite: str


_T61 = "SDM 6.3.1 Table 6-1"
_T64 = "SDM 6.15 Table 6-4"

# SDM Table 6-1 (name, class, error code) merged with Table 6-4 (double-fault class).
VECTORS: tuple[VectorInfo, ...] = (
    VectorInfo(0, "#DE", Kind.FAULT, False, DfClass.CONTRIBUTORY, f"{_T61}; {_T64}"),
    VectorInfo(1, "#DB", Kind.TRAP, False, DfClass.BENIGN, f"{_T61} (fault or trap, SDM 17.2.4)"),
    VectorInfo(2, "NMI", Kind.INTERRUPT, False, DfClass.BENIGN, _T61),
    VectorInfo(3, "#BP", Kind.TRAP, False, DfClass.BENIGN, _T61),
    VectorInfo(4, "#OF", Kind.TRAP, False, DfClass.BENIGN, _T61),
    VectorInfo(5, "#BR", Kind.FAULT, False, DfClass.BENIGN, _T61),
    VectorInfo(6, "#UD", Kind.FAULT, False, DfClass.BENIGN, _T61),
    VectorInfo(7, "#NM", Kind.FAULT, False, DfClass.BENIGN, _T61),
    VectorInfo(8, "#DF", Kind.ABORT, True, DfClass.DOUBLE_FAULT, "SDM 6.15 Interrupt 8"),
    VectorInfo(9, "CSO", Kind.FAULT, False, DfClass.BENIGN, _T61),
    VectorInfo(10, "#TS", Kind.FAULT, True, DfClass.CONTRIBUTORY, f"{_T61}; {_T64}"),
    VectorInfo(11, "#NP", Kind.FAULT, True, DfClass.CONTRIBUTORY, f"{_T61}; {_T64}"),
    VectorInfo(12, "#SS", Kind.FAULT, True, DfClass.CONTRIBUTORY, f"{_T61}; {_T64}"),
    VectorInfo(13, "#GP", Kind.FAULT, True, DfClass.CONTRIBUTORY, f"{_T61}; {_T64}"),
    VectorInfo(14, "#PF", Kind.FAULT, True, DfClass.PAGE_FAULT, f"{_T61}; {_T64}"),
    VectorInfo(15, "reserved", Kind.FAULT, False, DfClass.BENIGN, "SDM 26.5.1 footnote"),
    VectorInfo(16, "#MF", Kind.FAULT, False, DfClass.BENIGN, _T61),
    VectorInfo(17, "#AC", Kind.FAULT, True, DfClass.BENIGN, _T61),
    VectorInfo(18, "#MC", Kind.ABORT, False, DfClass.BENIGN, _T61),
    VectorInfo(19, "#XM", Kind.FAULT, False, DfClass.BENIGN, _T61),
    VectorInfo(20, "#VE", Kind.FAULT, False, DfClass.PAGE_FAULT, f"{_T61}; {_T64}"),
    VectorInfo(21, "#CP", Kind.FAULT, True, DfClass.CONTRIBUTORY, "SDM (CET) Table 6-1"),
    # AMD's; its double-fault class is in none of the sources read: benign, as SDM Table 6-4
    # makes every vector it does not list (UNVERIFIED).
    VectorInfo(29, "#VC", Kind.FAULT, True, DfClass.BENIGN, "APM Vol.2 15.35.5"),
)

_BY_VECTOR = {v.vector: v for v in VECTORS}


def vector_name(vector: int) -> str:
    """Short name of a vector: "#PF", "NMI", or "vector 0x30"."""
    info = _BY_VECTOR.get(vector)
    if info is not None and info.name != "reserved":
        return info.name
    return f"vector {vector:#x}"


def parse_vector(text: str) -> int | None:
    """Inverse of vector_name for the architectural names ("#PF", "PF", "NMI")."""
    key = text.strip().upper().lstrip("#")
    for info in VECTORS:
        if info.name.upper().lstrip("#") == key:
            return info.vector
    return None


def has_error_code(vector: int, type_: EventType) -> bool:
    """Only hardware exceptions push an error code (SDM 6.13); INT n to 13 does not."""
    if type_ is not EventType.HW_EXCEPTION:
        return False
    info = _BY_VECTOR.get(vector)
    return info is not None and info.error_code


def df_class(vector: int, type_: EventType) -> DfClass:
    """Double-fault class; interrupts and INT n are benign (SDM 6.15 Table 6-4)."""
    if type_ is not EventType.HW_EXCEPTION:
        return DfClass.BENIGN
    info = _BY_VECTOR.get(vector)
    return info.df_class if info is not None else DfClass.BENIGN


def saved_ip_undefined(vector: int, type_: EventType) -> bool:
    """The frame's saved CS:RIP is undefined: a #DF (SDM 6.15 Interrupt 8, "Saved Instruction
    Pointer: The saved contents of CS and EIP registers are undefined"). INT 8 is not one."""
    return vector == Vec.DF and type_ is EventType.HW_EXCEPTION


def delivers_error_code(vector: int, type_: EventType, cr0: int) -> bool:
    """has_error_code() in protected mode; in real mode (CR0.PE=0) no exception pushes one
    (SDM 20.1.4), and a VMX exit's error-code-valid bit "is always 0 if the VM exit occurred
    while the logical processor was in real-address mode" (SDM, quoted by upstream 80962ec912db
    "KVM: nVMX: Do not report error code when synthesizing VM-Exit from Real Mode"). SVM's
    EXITINFO1 follows the same rule here, UNVERIFIED (AMD's paged real mode reports a #PF's)."""
    return bool(cr0 & 1) and has_error_code(vector, type_)


def undefined_frame_bits(vector: int, type_: EventType, words: int, word_mask: int) -> tuple[int, ...]:
    """Per frame word (lowest address first), the bits the architecture leaves undefined.

    Empty when every bit is defined. A #DF frame starts (error code, RIP, CS,
    RFLAGS) in every layout (64-bit, 32-bit, FRED): its RIP and CS words are
    undefined (SDM 6.15), and so is RF. SDM 17.3.1.1 pushes RF=1 for fault-class
    exceptions and EFLAGS.RF otherwise; #DF is an abort, and whether the fault it
    grew from had set EFLAGS.RF is not defined (Bochs pushes 1, classing #DF as a
    fault; KVM's exception_type() makes it an abort and injects the guest's RF);
    RF only qualifies a return address that is undefined anyway. FRED: the FRED
    specification was not read; the SDM's rule is applied as is (UNVERIFIED).
    """
    if not saved_ip_undefined(vector, type_):
        return ()
    return (0, word_mask, word_mask, RF) + (0,) * (words - 4)


class DfOutcome(IntEnum):
    SERIAL = 0  # deliver the second exception; the first is dropped
    DOUBLE_FAULT = 1
    SHUTDOWN = 2  # triple fault


@dataclass(frozen=True, slots=True)
class DfRule:
    first: DfClass
    second: DfClass
    outcome: DfOutcome
    cite: str = "SDM 6.15 Table 6-5"


_B, _C, _P, _D = DfClass.BENIGN, DfClass.CONTRIBUTORY, DfClass.PAGE_FAULT, DfClass.DOUBLE_FAULT
_S, _DF, _SD = DfOutcome.SERIAL, DfOutcome.DOUBLE_FAULT, DfOutcome.SHUTDOWN

# SDM 6.15 Table 6-5 "Conditions for Generating a Double Fault", plus the
# "Interrupt 8" rule that a contributory or page fault during #DF delivery
# shuts the processor down.
DOUBLE_FAULT_RULES: tuple[DfRule, ...] = (
    DfRule(_B, _B, _S), DfRule(_B, _C, _S), DfRule(_B, _P, _S),
    DfRule(_C, _B, _S), DfRule(_C, _C, _DF), DfRule(_C, _P, _S),
    DfRule(_P, _B, _S), DfRule(_P, _C, _DF), DfRule(_P, _P, _DF),
    DfRule(_D, _B, _S), DfRule(_D, _C, _SD, "SDM 6.15 Interrupt 8"),
    DfRule(_D, _P, _SD, "SDM 6.15 Interrupt 8"),
)  # fmt: skip

_DF_TABLE = {(r.first, r.second): r.outcome for r in DOUBLE_FAULT_RULES}


def double_fault_outcome(first: DfClass, second: DfClass) -> DfOutcome:
    """What a second exception detected while delivering the first becomes."""
    return _DF_TABLE[first, second]


@dataclass(frozen=True, slots=True)
class Event:
    """An event about to be delivered through the IDT.

    `rip` is the return address the frame will hold. `insn_rip` is the
    address of the instruction that raised a software event (INT n, INT3,
    INTO, INT1), where a fault during its delivery returns (SDM 26.5.1.1 says
    the same for injected events). `push_rf` is the RF value the frame gets
    for faults (SDM 17.3.1.1).
    """

    vector: int
    type: EventType
    rip: int
    error_code: int | None = None
    insn_rip: int | None = None
    push_rf: bool = False
    dr6: int = 0  # DR6 condition bits a #DB reports (B0-B3, BD, BS)
    nested: bool = False  # raised while delivering another event (FRED's SS bit 58)
    data: int | None = None  # FRED event data given by VM entry; None: what the event implies
    fault_address: int | None = None  # a #PF's linear address, CR2 once it is delivered

    @property
    def name(self) -> str:
        return vector_name(self.vector)
