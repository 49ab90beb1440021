"""A minimal local APIC in x2APIC mode (SDM Vol.3 ch. 10).

Models IRR/ISR/TPR, priority by vector class (SDM 10.8.3.1), EOI and
self-IPI through x2APIC MSRs (SDM 10.12). The APIC starts enabled in x2APIC
mode (DEVIATION from the reset state, so guest programs stay short). An ICR
write for another CPU is decoded here (`Ipi`) and carried by the machine
(arch/machine.py); with one CPU it is #GP as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class X2ApicMsr(IntEnum):
    """x2APIC MSR addresses (SDM 10.12.1.2 Table 10-6)."""

    ID = 0x802
    VERSION = 0x803
    TPR = 0x808
    PPR = 0x80A
    EOI = 0x80B
    SVR = 0x80F
    ISR0 = 0x810  # ISR0..ISR7: 0x810-0x817
    IRR0 = 0x820  # IRR0..IRR7: 0x820-0x827
    ICR = 0x830
    SELF_IPI = 0x83F


class IcrDeliveryMode(IntEnum):
    """ICR bits 10:8 (SDM 10.6.1)."""

    FIXED = 0
    NMI = 4
    INIT = 5
    STARTUP = 6  # SIPI


class Shorthand(IntEnum):
    """ICR bits 19:18, the destination shorthand (SDM 10.6.1)."""

    NONE = 0
    SELF = 1
    ALL_INCLUDING_SELF = 2
    ALL_EXCLUDING_SELF = 3


APIC_VERSION = 0x50014  # version 0x14, 6 LVT entries (illustrative value)
ICR_SHORTHAND_SELF = Shorthand.SELF
BROADCAST_ID = 0xFFFF_FFFF  # x2APIC destination meaning every APIC (SDM 10.12.9)


@dataclass(frozen=True, slots=True)
class Ipi:
    """An x2APIC ICR write decoded (SDM 10.6.1, 10.12.9: one 64-bit MSR, the
    destination x2APIC ID in bits 63:32)."""

    vector: int
    mode: IcrDeliveryMode
    shorthand: Shorthand
    destination: int

    @classmethod
    def from_icr(cls, value: int) -> Ipi | None:
        """None for a delivery mode the model does not carry (lowest priority, SMI, ...)."""
        mode = (value >> 8) & 7
        if mode not in IcrDeliveryMode._value2member_map_:
            return None
        return cls(value & 0xFF, IcrDeliveryMode(mode), Shorthand((value >> 18) & 3), value >> 32)

    def targets(self, sender: int, ids: range) -> list[int]:
        """The APIC IDs this IPI goes to, of the CPUs `ids` (SDM 10.6.1 Table 10-3)."""
        if self.shorthand is Shorthand.SELF:
            return [sender]
        if self.shorthand is Shorthand.ALL_INCLUDING_SELF:
            return list(ids)
        if self.shorthand is Shorthand.ALL_EXCLUDING_SELF:
            return [i for i in ids if i != sender]
        if self.destination == BROADCAST_ID:
            return list(ids)
        return [self.destination] if self.destination in ids else []  # no such APIC: lost


class WriteResult(IntEnum):
    DONE = 0
    GP = 1  # reserved value or read-only register: #GP(0)
    SELF_NMI = 2  # the ICR sent an NMI to this CPU
    IPI = 3  # the ICR names another CPU: the machine carries it (arch/machine.py)


@dataclass(slots=True)
class Apic:
    """IRR, ISR and TPR as 256-bit integers and a byte."""

    irr: int = 0
    isr: int = 0
    tpr: int = 0
    used: bool = False  # the guest read or wrote an x2APIC MSR (a CPU without x2APIC cannot run it)
    id: int = 0  # x2APIC ID; CPU n of a machine has ID n

    def ppr(self) -> int:
        """Processor priority: the higher of TPR and the in-service class (SDM 10.8.3.1)."""
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        return self.tpr if (self.tpr >> 4) >= (isrv >> 4) else isrv & 0xF0

    def pending_vector(self) -> int | None:
        """Highest requested vector if its class is above the PPR class, else None."""
        if not self.irr:
            return None
        vector = self.irr.bit_length() - 1
        if (vector >> 4) > (self.ppr() >> 4):
            return vector
        return None

    def request(self, vector: int) -> None:
        self.irr |= 1 << vector

    def acknowledge(self) -> int:
        """INTA: move the highest requested vector from IRR to ISR (SDM 10.8.4)."""
        vector = self.irr.bit_length() - 1
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector
        return vector

    def eoi(self) -> None:
        """EOI clears the highest in-service bit (SDM 10.8.5)."""
        if self.isr:
            self.isr &= ~(1 << (self.isr.bit_length() - 1))

    def read_msr(self, msr: int) -> int | None:
        """Value of an x2APIC MSR, or None if it cannot be read (then #GP)."""
        self.used = True
        if X2ApicMsr.ISR0 <= msr <= X2ApicMsr.ISR0 + 7:
            return (self.isr >> (32 * (msr - X2ApicMsr.ISR0))) & 0xFFFFFFFF
        if X2ApicMsr.IRR0 <= msr <= X2ApicMsr.IRR0 + 7:
            return (self.irr >> (32 * (msr - X2ApicMsr.IRR0))) & 0xFFFFFFFF
        return {
            X2ApicMsr.ID: self.id,
            X2ApicMsr.VERSION: APIC_VERSION,
            X2ApicMsr.TPR: self.tpr,
            X2ApicMsr.PPR: self.ppr(),
            X2ApicMsr.SVR: 0x1FF,
        }.get(msr)

    def write_msr(self, msr: int, value: int) -> WriteResult:
        """Write an x2APIC MSR (SDM 10.12.1.2)."""
        self.used = True
        if msr == X2ApicMsr.TPR and value <= 0xFF:
            self.tpr = value
        elif msr == X2ApicMsr.EOI and value == 0:
            self.eoi()
        elif msr == X2ApicMsr.SELF_IPI and value <= 0xFF:
            self.request(value)
        elif msr == X2ApicMsr.ICR:
            return self._write_icr(value)
        elif not (msr == X2ApicMsr.SVR and value & 0x100):  # disabling is not modelled
            return WriteResult.GP
        return WriteResult.DONE

    def _write_icr(self, value: int) -> WriteResult:
        destination = value >> 32
        shorthand = (value >> 18) & 3
        if not (shorthand == ICR_SHORTHAND_SELF or (shorthand == 0 and destination == self.id)):
            return WriteResult.IPI  # for other CPUs: #GP unless there is a machine
        mode = (value >> 8) & 7
        if mode == IcrDeliveryMode.NMI:
            return WriteResult.SELF_NMI
        if mode != IcrDeliveryMode.FIXED:
            return WriteResult.GP
        self.request(value & 0xFF)
        return WriteResult.DONE
