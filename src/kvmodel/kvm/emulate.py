"""KVM's instruction emulator, reached through the forced emulation prefix.

With kvm.force_emulation_prefix set, handle_ud() takes a #UD on
"ud2; .ascii \"kvm\"" (KVM_FEP, used by kvm-unit-tests and the selftests), moves RIP
past the prefix and emulates the instruction behind it: x86_emulate_instruction()
with EMULTYPE_TRAP_UD_FORCED (arch/x86/kvm/x86.c) over arch/x86/kvm/emulate.c.
The instruction's semantics are arch/'s; what is KVM's own, and modelled here, is
the event state around them:

- the code breakpoint check before emulation (kvm_vcpu_check_code_breakpoint():
  hardware checked the prefix's RIP, not the instruction's), suppressed by RF and,
  for an Intel-compatible guest, by MOV/POP SS blocking (kvm_is_code_breakpoint_inhibited());
- the interrupt shadow the emulator asks for (ctxt->interruptibility: em_mov_sreg() and
  em_pop_sreg() for SS, em_sti()) applied by toggle_interruptibility();
- RF cleared and, with TF set when emulation began, a single-step #DB queued as a trap
  (kvm_vcpu_do_singlestep(), DR6.BS);
- HLT through emulator_halt(), i.e. kvm_emulate_halt_noskip().

emulate.c handles IRET (em_iret()) and INT n / INT3 / INTO (emulate_int()) only in
real mode; elsewhere they are X86EMUL_UNHANDLEABLE, so KVM gives up
(handle_emulation_failure(): #UD queued, KVM_EXIT_INTERNAL_ERROR at CPL 0). The
model stops there with a named limit instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import iced_x86 as iced
from iced_x86 import Mnemonic, OpKind, Register

from kvmodel import _faults
from kvmodel.arch.cpu import FORCED_EMULATION_PREFIX
from kvmodel.arch.decode import MAX_INSN_LEN, Decoded, Exiting, decode
from kvmodel.arch.events import EventType, Vec, has_error_code
from kvmodel.arch.faults import Fault
from kvmodel.arch.observe import Halt
from kvmodel.arch.regs import DR6_BS, IF, RF, RSP, TF
from kvmodel.errors import ModelLimit
from kvmodel.kvm.uapi import GuestDebug, ShadowBits
from kvmodel.kvm.x86 import MpState, Request, fix_hypercall

if TYPE_CHECKING:
    from kvmodel.kvm.x86 import Vcpu

# What emulate.c leaves to real mode (em_iret(), emulate_int()): X86EMUL_UNHANDLEABLE elsewhere
_REAL_MODE_ONLY = (Mnemonic.IRET, Mnemonic.IRETD, Mnemonic.IRETQ, Mnemonic.INT, Mnemonic.INT3,
                   Mnemonic.INTO, Mnemonic.INT1)
# The VMX and SVM instructions and VMGEXIT: the model's KVM does not emulate them here
_NOT_EMULATED = frozenset(e for e in Exiting if e >= Exiting.VMCLEAR) | {Exiting.VMGEXIT}
DR7_ENABLE_BITS = 0xFF  # DR7_BP_EN_MASK: L0-L3 and G0-G3


def reads_forced_prefix(vcpu: Vcpu, rip: int) -> bool:
    """handle_ud()'s kvm_read_guest_virt() of five bytes at the linear RIP and memcmp()."""
    cpu = vcpu.cpu
    return cpu.fetch_bytes(cpu.linear(rip), len(FORCED_EMULATION_PREFIX)) == FORCED_EMULATION_PREFIX


def handle_ud(vcpu: Vcpu, foreign: Exiting) -> None:
    """handle_ud(): emulate behind the forced emulation prefix, else #UD goes back to the
    guest (`foreign` is the other vendor's hypercall, which KVM rewrites: fix_hypercall())."""
    rip = vcpu.ops.rip_read()
    if vcpu.kvm.force_emulation_prefix and reads_forced_prefix(vcpu, rip):
        if vcpu.ops.guest_mode:
            raise ModelLimit("forced emulation of an L2 instruction by L0 is not modelled", rip)
        if vcpu.kvm.fep_clear_rflags_rf:
            # KVM_FEP_CLEAR_RFLAGS_RF: the #UD was a fault, saved with RF=1 (SDM 27.3.3),
            # which would hide a code breakpoint on the emulated instruction
            vcpu.ops.set_rflags(vcpu.ops.get_rflags() & ~RF)
        vcpu.ops.rip_write((rip + len(FORCED_EMULATION_PREFIX)) & vcpu.cpu.addr_mask)
        emulate_forced(vcpu)
        return
    if fix_hypercall(vcpu, rip, foreign):
        return  # the guest runs the native hypercall at the same RIP
    vcpu.queue_exception(Vec.UD)  # UD2 and the like do not emulate: #UD goes back


def code_breakpoint(vcpu: Vcpu, rip: int) -> int:
    """kvm_vcpu_check_code_breakpoint() for the guest's own DR7: the DR6 B0-B3 bits of the
    enabled execute breakpoints (R/W and LEN both 00b, kvm_vcpu_check_hw_bp()) at the
    instruction's linear address, unless inhibited."""
    cpu = vcpu.cpu
    if vcpu.guest_debug & GuestDebug.USE_HW_BP:
        raise ModelLimit("forced emulation with KVM_GUESTDBG_USE_HW_BP is not modelled", rip)
    if not cpu.dr7 & DR7_ENABLE_BITS or code_breakpoint_inhibited(vcpu):
        return 0
    linear = cpu.linear(rip)
    bits = 0
    for n in range(4):
        enabled = (cpu.dr7 >> (2 * n)) & 3
        rw_len = (cpu.dr7 >> (16 + 4 * n)) & 0xF
        if enabled and rw_len == 0 and cpu.dr[n] == linear:
            bits |= 1 << n
    return bits


def code_breakpoint_inhibited(vcpu: Vcpu) -> bool:
    """kvm_is_code_breakpoint_inhibited(): RF, or MOV/POP SS blocking on an Intel-compatible
    guest (the model's guest CPUID is Intel's: SDM Vol.2 MOV, POP "the breakpoint will be
    suppressed as if EFLAGS.RF were 1"); baf67ca8e545 added the second."""
    if vcpu.ops.get_rflags() & RF:
        return True
    if _faults.on("emulator_code_db_in_mov_ss_shadow"):
        return False  # before baf67ca8e545: RF alone
    return bool(vcpu.ops.get_interrupt_shadow() & ShadowBits.MOV_SS)


def x86_decode(vcpu: Vcpu, rip: int) -> iced.Instruction:
    """The emulator's own decoding of the instruction at `rip` (x86_decode_insn())."""
    cpu = vcpu.cpu
    raw = cpu.fetch_bytes(cpu.linear(rip), MAX_INSN_LEN)
    return iced.Decoder(cpu.mode.value, raw, ip=rip).decode()


def is_soft_int_instruction(vcpu: Vcpu, rip: int, vector: int) -> bool:
    """is_soft_int_instruction() (4da3768e1820, "KVM: SVM: Don't skip unrelated instruction
    if INT3/INTO is replaced"): the instruction now at `rip` raises `vector` as a software
    interrupt: INT3 (#BP), INTO (#OF) or INT n with n == vector. Another vCPU may have
    written other bytes there since the CPU executed it (text_poke)."""
    i = x86_decode(vcpu, rip)
    if i.mnemonic == Mnemonic.INT3:
        return vector == Vec.BP
    if i.mnemonic == Mnemonic.INTO:
        return vector == Vec.OF
    return i.mnemonic == Mnemonic.INT and i.immediate8 == vector


def interruptibility(i: iced.Instruction) -> int:
    """ctxt->interruptibility: MOV SS (em_mov_sreg()), POP SS (em_pop_sreg(), since
    "KVM: x86/emulator: Fix handing of POP SS to correctly set interruptibility"), and
    STI, which em_sti() sets whatever IF was."""
    if i.mnemonic == Mnemonic.STI:
        return ShadowBits.STI
    loads_ss = i.op_count > 0 and i.op0_kind == OpKind.REGISTER and i.op0_register == Register.SS
    if i.mnemonic == Mnemonic.MOV and loads_ss:
        return ShadowBits.MOV_SS
    if i.mnemonic == Mnemonic.POP and loads_ss:
        return 0 if _faults.on("emulator_pop_ss_no_shadow") else ShadowBits.MOV_SS
    return 0


def toggle_interruptibility(vcpu: Vcpu, mask: int) -> None:
    """toggle_interruptibility(): a shadow the previous instruction left is not renewed
    (sti; sti and mov ss; mov ss block for the first only, SDM 6.8.3); any shadow ends."""
    ops = vcpu.ops
    shadow = ops.get_interrupt_shadow()
    if shadow & mask:
        mask = 0
    if shadow or mask:
        ops.set_interrupt_shadow(mask)
        if not mask:
            vcpu.requests |= Request.EVENT


def emulate_forced(vcpu: Vcpu) -> None:
    """x86_emulate_instruction(EMULTYPE_TRAP_UD_FORCED) at RIP, which is past the prefix."""
    ops, cpu = vcpu.ops, vcpu.cpu
    rip = ops.rip_read()
    if vcpu.guest_debug & GuestDebug.SINGLESTEP:
        raise ModelLimit("forced emulation with KVM_GUESTDBG_SINGLESTEP is not modelled", rip)
    bits = code_breakpoint(vcpu, rip)
    if bits:  # fault-like: RIP stays at the instruction (5623f751bd9c)
        vcpu.queue_exception(Vec.DB, payload=bits)
        return
    try:
        insn = cpu.icache.get(rip) or decode(cpu, rip)
    except Fault:
        vcpu.queue_exception(Vec.UD)  # x86_decode_emulated_instruction() failed: TRAP_UD
        return
    instr = x86_decode(vcpu, rip)
    if instr.mnemonic in _REAL_MODE_ONLY:
        raise ModelLimit(f"forced emulation of {insn.text!r} outside real mode: KVM's emulator "
                         "cannot (em_iret(), emulate_int() X86EMUL_UNHANDLEABLE; "
                         "handle_emulation_failure())", rip)
    if insn.exiting in _NOT_EMULATED:
        raise ModelLimit(f"forced emulation of {insn.text!r} is not modelled", rip)
    rflags = ops.get_rflags()
    after = _execute(vcpu, insn, rip, rflags)
    if after is None:
        return
    next_rip, new_rflags = after
    toggle_interruptibility(vcpu, interruptibility(instr))
    ops.rip_write(next_rip)
    vcpu.retire(rip, insn)
    if insn.exiting is Exiting.HLT:
        _halt(vcpu, rip)
    if rflags & TF:
        vcpu.queue_exception(Vec.DB, payload=DR6_BS)  # kvm_vcpu_do_singlestep(): a trap
    ops.set_rflags(new_rflags & ~RF)  # x86_emulate_insn() clears RF once the insn completes
    if insn.exiting in (Exiting.WRMSR, Exiting.CR8_WRITE) or (new_rflags & ~rflags & IF):
        vcpu.requests |= Request.EVENT  # the APIC, or IF set: look for an interrupt


def _execute(vcpu: Vcpu, insn: Decoded, rip: int, rflags: int) -> tuple[int, int] | None:
    """The instruction's semantics on the core, its shadow and halt state left alone (KVM
    applies them its own way); a fault is queued for the guest. (next RIP, RFLAGS)."""
    cpu = vcpu.cpu
    vcpu.ops.sync_guest_state_to_core()  # RSP lives in the VMCS / VMCB
    kept = cpu.shadow, cpu.shadow_prev, cpu.halted
    cpu.rip, cpu.rflags = rip, rflags
    rsp = cpu.regs[RSP]
    try:
        event = insn.semantics(cpu)
    except Fault as fault:
        cpu.rip = rip
        # a #PF carries CR2 and a general-detect #DB DR6.BD as payload (check_dr7_gd(),
        # emulate_db(): fault-like, RIP at the MOV DR, 5623f751bd9c)
        payload = fault.cr2 if fault.vector == Vec.PF else (
            fault.dr6 if fault.vector == Vec.DB else None)
        vcpu.queue_exception(fault.vector, fault.error_code if has_error_code(
            fault.vector, EventType.HW_EXCEPTION) else None, payload=payload)
        return None
    finally:
        cpu.shadow, cpu.shadow_prev, cpu.halted = kept
    assert event is None  # soft interrupts stopped above
    if cpu.regs[RSP] != rsp:
        vcpu.ops.rsp_write(cpu.regs[RSP])  # kvm_rsp_write() at writeback
    next_rip, cpu.rip = cpu.rip, rip
    return next_rip, cpu.rflags


def _halt(vcpu: Vcpu, rip: int) -> None:
    """emulator_halt() -> kvm_emulate_halt_noskip(): the vCPU halts (lapic in kernel)."""
    vcpu.stats.halt_exits += 1
    vcpu.cpu.trace.append(Halt(rip, vcpu.cpu.retired))
    vcpu.mp_state = MpState.HALTED
