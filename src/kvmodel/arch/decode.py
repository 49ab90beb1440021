"""Decoding with iced-x86 into cached, ready-to-run instructions.

An instruction outside the modelled subset stops the run with ModelLimit
naming it and its address; an undefined opcode is #UD, as on hardware.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

import iced_x86 as iced

from kvmodel.arch.events import Vec
from kvmodel.arch.execute import BUILDERS, Run, check_io_privilege, require_cpl0
from kvmodel.arch.faults import Fault
from kvmodel.arch.operands import address
from kvmodel.arch.regs import Mode
from kvmodel.errors import ModelLimit

if TYPE_CHECKING:
    from collections.abc import Callable

    from kvmodel.arch.cpu import Cpu

MAX_INSN_LEN = 15
_FORMATTER = iced.Formatter(iced.FormatterSyntax.GAS)


class Exiting(IntEnum):
    """Instructions a host may intercept before they execute (SDM 25.1.3, APM 15.9)."""

    NONE = 0
    HLT = 1
    CPUID = 2
    IO = 3
    RDMSR = 4
    WRMSR = 5
    CR8_WRITE = 6
    IRET = 7
    INT_N = 8
    VMGEXIT = 9
    DR7_WRITE = 10
    VMCLEAR = 11  # the VMX instructions exit unconditionally in VMX non-root (SDM 25.1.2)
    VMLAUNCH = 12
    VMPTRLD = 13
    VMREAD = 14
    VMRESUME = 15
    VMWRITE = 16
    VMXON = 17
    VMRUN = 18  # the SVM instructions, each with its own intercept (APM 15.5, 15.17)
    VMLOAD = 19
    VMSAVE = 20
    STGI = 21
    CLGI = 22
    VMCALL = 23  # exits unconditionally in VMX non-root operation (SDM 25.1.2)
    VMMCALL = 24  # SVM's hypercall, with its own intercept (APM 15.9)
    INVLPG = 25  # INVLPG exiting (SDM 25.1.3) / the INVLPG intercept (APM 15.9)


class Decoded:
    """A decoded instruction: `execute(cpu)` and its AT&T text for traces.

    `semantics` is what the instruction does; `execute` is the same, behind
    the host's intercept check when a host may intercept it (`exiting`).
    """

    __slots__ = ("execute", "semantics", "text", "length", "exiting", "io", "privileged", "operand")

    def __init__(self, semantics: Run, text: str, length: int, exiting: Exiting,
                 io: IoAccess | None = None, privileged: bool = False,
                 operand: Callable[[Cpu], int] | None = None):
        self.semantics = semantics
        self.execute = semantics
        self.text = text
        self.length = length
        self.exiting = exiting
        self.io = io
        self.privileged = privileged  # #GP(0) at CPL > 0, before any intercept
        # INVLPG's linear address, for the exit qualification / EXITINFO1 (SDM 27.2.1, APM 15.33)
        self.operand = operand


class IoAccess(NamedTuple):
    """What an IN or OUT accesses, for the I/O intercepts (SDM Table 27-5, APM 15.10.2)."""

    size: int  # bytes
    is_in: bool
    port: int | None  # the immediate port; None: the port is in DX


_IO_SIZE = {iced.Register.AL: 1, iced.Register.AX: 2, iced.Register.EAX: 4}


def _io_access(insn: iced.Instruction) -> IoAccess:
    is_in = insn.mnemonic == iced.Mnemonic.IN
    data, port = (0, 1) if is_in else (1, 0)  # IN AL, port; OUT port, AL
    immediate = insn.op_kind(port) == iced.OpKind.IMMEDIATE8
    return IoAccess(_IO_SIZE[insn.op_register(data)], is_in, insn.immediate(port) if immediate else None)


_EXITING = {
    iced.Mnemonic.HLT: Exiting.HLT,
    iced.Mnemonic.CPUID: Exiting.CPUID,
    iced.Mnemonic.IN: Exiting.IO,
    iced.Mnemonic.OUT: Exiting.IO,
    iced.Mnemonic.RDMSR: Exiting.RDMSR,
    iced.Mnemonic.WRMSR: Exiting.WRMSR,
    iced.Mnemonic.IRET: Exiting.IRET,  # 16-bit: real mode's
    iced.Mnemonic.IRETD: Exiting.IRET,
    iced.Mnemonic.IRETQ: Exiting.IRET,
    iced.Mnemonic.INT: Exiting.INT_N,
    iced.Mnemonic.VMGEXIT: Exiting.VMGEXIT,
    iced.Mnemonic.VMCLEAR: Exiting.VMCLEAR,
    iced.Mnemonic.VMLAUNCH: Exiting.VMLAUNCH,
    iced.Mnemonic.VMPTRLD: Exiting.VMPTRLD,
    iced.Mnemonic.VMREAD: Exiting.VMREAD,
    iced.Mnemonic.VMRESUME: Exiting.VMRESUME,
    iced.Mnemonic.VMWRITE: Exiting.VMWRITE,
    iced.Mnemonic.VMXON: Exiting.VMXON,
    iced.Mnemonic.VMRUN: Exiting.VMRUN,
    iced.Mnemonic.VMLOAD: Exiting.VMLOAD,
    iced.Mnemonic.VMSAVE: Exiting.VMSAVE,
    iced.Mnemonic.STGI: Exiting.STGI,
    iced.Mnemonic.CLGI: Exiting.CLGI,
    iced.Mnemonic.VMCALL: Exiting.VMCALL,
    iced.Mnemonic.VMMCALL: Exiting.VMMCALL,
    iced.Mnemonic.INVLPG: Exiting.INVLPG,
}


# Instructions an intercept may catch that are #GP(0) at CPL > 0 first (SDM 25.1.1: faults
# based on privilege level have priority over VM exits; APM 15.7.1 likewise for intercepts).
_PRIVILEGED = frozenset({
    iced.Mnemonic.HLT, iced.Mnemonic.RDMSR, iced.Mnemonic.WRMSR, iced.Mnemonic.VMCLEAR,
    iced.Mnemonic.VMLAUNCH, iced.Mnemonic.VMPTRLD, iced.Mnemonic.VMREAD, iced.Mnemonic.VMRESUME,
    iced.Mnemonic.VMWRITE, iced.Mnemonic.VMXON, iced.Mnemonic.INVLPG,
})


def _privileged(insn: iced.Instruction) -> bool:
    if insn.mnemonic == iced.Mnemonic.MOV and insn.op0_register == iced.Register.CR8:
        return True
    return insn.mnemonic in _PRIVILEGED


def _exiting(insn: iced.Instruction) -> Exiting:
    if insn.mnemonic == iced.Mnemonic.MOV and insn.op0_register == iced.Register.CR8:
        return Exiting.CR8_WRITE
    if insn.mnemonic == iced.Mnemonic.MOV and insn.op0_register == iced.Register.DR7:
        return Exiting.DR7_WRITE
    return _EXITING.get(insn.mnemonic, Exiting.NONE)


def _behind_intercept(decoded: Decoded) -> Run:
    semantics = decoded.semantics

    privileged, io = decoded.privileged, decoded.exiting is Exiting.IO

    def execute(c):
        if privileged:
            require_cpl0(c)
        elif io:
            check_io_privilege(c)
        c.host.instruction(c, decoded)
        return semantics(c)

    return execute


# Decoded instructions shared by every CPU: a decoding depends only on the bytes, the
# address, the mode, and whether a host may intercept it.
_SHARED: dict[tuple[bytes, int, Mode, bool], Decoded] = {}


def decode(cpu: Cpu, rip: int) -> Decoded:
    """Fetch and decode at rip (SDM 6.9 priority 8 and 9: fetch faults, then #UD)."""
    raw = cpu.fetch_bytes(cpu.linear(rip), MAX_INSN_LEN)
    key = (raw, rip, cpu.mode, cpu.host is not None)  # Mode is an IntEnum: hashed as its value
    shared = _SHARED.get(key)
    if shared is not None:
        if cpu.paging is None:  # with guest paging every fetch walks (Cpu.enable_paging())
            cpu.icache[rip] = shared
            cpu.remember_code(rip, shared.length)
        return shared
    decoded = _decode(cpu, rip, raw)
    _SHARED[key] = decoded
    return decoded


def _decode(cpu: Cpu, rip: int, raw: bytes) -> Decoded:
    decoder = iced.Decoder(cpu.mode.value, raw, ip=rip)
    insn = decoder.decode()
    if insn.is_invalid:
        if decoder.last_error == iced.DecoderError.NO_MORE_BYTES:
            raise cpu.fetch_fault(cpu.linear(rip) + len(raw))
        raise Fault(Vec.UD)
    text = _FORMATTER.format(insn)
    builder = BUILDERS.get(insn.mnemonic)
    if builder is None:
        raise ModelLimit(f"instruction outside the modelled subset: {text!r}", rip)
    try:
        execute = builder(insn, cpu.mode)
    except ModelLimit as limit:
        raise ModelLimit(f"{limit} ({text!r})", rip) from None
    exiting = _exiting(insn)
    decoded = Decoded(execute, text, insn.len, exiting,
                      _io_access(insn) if exiting is Exiting.IO else None, _privileged(insn),
                      address(insn, cpu.mode) if exiting is Exiting.INVLPG else None)
    if cpu.host is not None and decoded.exiting:
        decoded.execute = _behind_intercept(decoded)
    if cpu.paging is None:
        cpu.icache[rip] = decoded
        cpu.remember_code(rip, insn.len)
    return decoded
