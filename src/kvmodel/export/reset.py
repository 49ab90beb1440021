"""The model's CPU at reset, as the numbers a boot stub must reproduce."""

from __future__ import annotations

from dataclasses import dataclass

from kvmodel.arch.cpu import Cpu
from kvmodel.arch.regs import Mode
from kvmodel.guest.layout import gate_size

PAGE = 0x1000


@dataclass(frozen=True, slots=True)
class Gate:
    """One present IDT entry: where its handler is (an offset in the code segment)."""

    vector: int
    handler: int


@dataclass(frozen=True, slots=True)
class ResetState:
    """Everything the model's CPU starts with that the guest can observe."""

    mode: Mode
    memory: bytes  # guest memory from address 0: code, data, IDT, TSS, stacks
    rip: int
    regs: tuple[int, ...]
    rflags: int
    cs_base: int
    idtr_base: int
    idtr_limit: int
    tr_base: int
    dr: tuple[int, int, int, int]
    dr6: int
    dr7: int
    cr0: int
    cr4: int
    efer: int
    not_present: frozenset[int]  # page numbers
    gates: tuple[Gate, ...]
    # An L1 hypervisor's L2 loads IDTR from the VMCB: the logging entries go into the guest's own
    # IDT, not a copy of it (boot.py), so that L2's deliveries are logged too.
    idt_in_place: bool = False

    @property
    def word(self) -> int:
        return self.mode.value // 8


def reset_state(cpu: Cpu) -> ResetState:
    """Read `cpu` as built (before it runs)."""
    return ResetState(
        mode=cpu.mode, memory=bytes(cpu.mem), rip=cpu.rip, regs=tuple(cpu.regs),
        rflags=cpu.rflags, cs_base=cpu.cs_base, idtr_base=cpu.idtr_base,
        idtr_limit=cpu.idtr_limit, tr_base=cpu.tr_base, dr=tuple(cpu.dr), dr6=cpu.dr6,
        dr7=cpu.dr7, cr0=cpu.cr0, cr4=cpu.cr4, efer=cpu.efer,
        not_present=frozenset(cpu.not_present), gates=_present_gates(cpu),
        idt_in_place=cpu.svm is not None)


def _present_gates(cpu: Cpu) -> tuple[Gate, ...]:
    """Handlers of the present gates in the IDT as it sits in memory (SDM 6.11, 6.14.1)."""
    size = gate_size(cpu.mode)
    gates = []
    for vector in range(min(256, (cpu.idtr_limit + 1) // size)):
        at = cpu.idtr_base + vector * size
        if at + size > len(cpu.mem):
            break
        low = int.from_bytes(cpu.mem[at:at + 8], "little")
        if not (low >> 47) & 1:
            continue
        offset = (low & 0xFFFF) | ((low >> 32) & 0xFFFF0000)
        if size == 16:
            offset |= int.from_bytes(cpu.mem[at + 8:at + 12], "little") << 32
        gates.append(Gate(vector, offset))
    return tuple(gates)
