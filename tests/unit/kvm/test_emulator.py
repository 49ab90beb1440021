"""KVM's emulator behind the forced emulation prefix (kvm/emulate.py): the shadow it asks
for (ctxt->interruptibility, toggle_interruptibility()), the code breakpoint check before
emulating (kvm_vcpu_check_code_breakpoint(), kvm_is_code_breakpoint_inhibited()) and the
single-step trap after (kvm_vcpu_do_singlestep()), row by row."""

import pytest

from kvmodel import _faults
from kvmodel.arch.decode import Exiting
from kvmodel.arch.events import Vec
from kvmodel.arch.regs import DR6_BS, IF, RF, TF
from kvmodel.errors import ModelLimit
from kvmodel.kvm import emulate
from kvmodel.kvm.uapi import ShadowBits
from kvmodel.kvm.vcpu import Vendor, create_vcpu
from kvmodel.kvm.x86 import MpState, Request
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import prepare

FEP = '''
.macro KVM_FEP
    ud2
    .ascii "kvm"
.endm
'''


def forced(vendor, body: str, mode: str = "long64", fep: bool = True):
    """A vCPU standing at label `fep` (a KVM_FEP), as after its #UD exit."""
    text = f'[guest]\nmode = "{mode}"\ncode = \'\'\'{FEP}start:\n{body}\n\'\'\'\n'
    cpu, program = prepare(parse(text, "unit.toml"))
    vcpu = create_vcpu(cpu, vendor)
    vcpu.kvm.force_emulation_prefix = fep
    vcpu.ops.rip_write(program.symbol("fep"))
    return vcpu, program


def read_back(vendor, shadow: int) -> int:
    """svm_get_interrupt_shadow(): SVM has one shadow bit and reports it as both kinds."""
    if vendor is Vendor.SVM and shadow:
        return ShadowBits.STI | ShadowBits.MOV_SS
    return shadow


def handle_ud(vcpu, bugs=()):
    with _faults.switched_on(frozenset(bugs)):
        emulate.handle_ud(vcpu, Exiting.VMMCALL)


STI = "fep: KVM_FEP\n sti\nnext: nop"
MOV_SS = "fep: KVM_FEP\n mov %ax, %ss\nnext: nop"
POP_SS = "fep: KVM_FEP\n pop %ss\nnext: nop"


@pytest.mark.parametrize(("body", "mode", "before", "bugs", "after"), [
    (STI, "long64", 0, (), ShadowBits.STI),
    (STI, "long64", ShadowBits.STI, (), 0),  # sti; sti: only the first blocks
    (MOV_SS, "long64", 0, (), ShadowBits.MOV_SS),
    (MOV_SS, "long64", ShadowBits.MOV_SS, (), 0),  # mov ss; mov ss likewise (SDM 6.8.3)
    (POP_SS, "protected32", 0, (), ShadowBits.MOV_SS),
    (POP_SS, "protected32", 0, ("emulator_pop_ss_no_shadow",), 0),  # before 6aa5c47c351b
    ("fep: KVM_FEP\n nop\nnext: nop", "long64", ShadowBits.STI, (), 0),  # any shadow ends
])
def test_emulated_instruction_sets_the_shadow_toggle_interruptibility_says(
        vendor, body, mode, before, bugs, after):
    vcpu, program = forced(vendor, body, mode)
    cpu = vcpu.cpu
    if "pop" in body:
        cpu.regs[4] -= 4
        cpu.write(cpu.regs[4], 4, cpu.ss)
        vcpu.ops.rsp_write(cpu.regs[4])
    else:
        cpu.regs[0] = cpu.ss
    vcpu.ops.set_interrupt_shadow(before)
    vcpu.requests = 0
    handle_ud(vcpu, bugs)
    assert not vcpu.exception.pending
    assert vcpu.ops.rip_read() == program.symbol("next")
    assert vcpu.ops.get_interrupt_shadow() == read_back(vendor, after)
    if body is not STI:  # STI also asks for one as IF goes 0 -> 1 (next test)
        assert bool(vcpu.requests & Request.EVENT) == (bool(before) and not after)


def test_emulated_sti_sets_if_and_asks_for_an_interrupt_window(vendor):
    vcpu, _ = forced(vendor, STI)
    vcpu.requests = 0
    handle_ud(vcpu)
    assert vcpu.ops.get_rflags() & IF
    assert vcpu.requests & Request.EVENT  # x86_emulate_instruction(): IF went 0 -> 1


def breakpoint_at(vcpu, program, dr7: int = 0x1) -> None:
    vcpu.cpu.dr[0] = program.symbol("insn")
    vcpu.cpu.dr7 = 0x400 | dr7
    vcpu.cpu.update_breakpoints()


BP = "fep: KVM_FEP\ninsn: inc %ecx\nnext: nop"


@pytest.mark.parametrize(("rflags", "shadow", "bugs", "db"), [
    (0, 0, (), True),
    (RF, 0, (), False),  # RF=1: the handler's return over the breakpoint
    (0, ShadowBits.MOV_SS, (), False),  # Intel: suppressed after MOV SS (baf67ca8e545)
    (0, ShadowBits.MOV_SS, ("emulator_code_db_in_mov_ss_shadow",), True),
    # the STI shadow suppresses nothing, but SVM reports it as MOV SS too (svm_get_interrupt_shadow())
    (0, ShadowBits.STI, (), "vmx"),
])
def test_code_breakpoint_on_the_emulated_instruction(vendor, rflags, shadow, bugs, db):
    if isinstance(db, str):
        db = vendor.value == db
    vcpu, program = forced(vendor, BP)
    breakpoint_at(vcpu, program)
    vcpu.ops.set_rflags(vcpu.ops.get_rflags() | rflags)
    vcpu.ops.set_interrupt_shadow(shadow)
    handle_ud(vcpu, bugs)
    if db:  # fault-like: nothing ran, RIP at the instruction, DR6.B0 as payload
        assert (vcpu.exception.pending, vcpu.exception.vector) == (True, Vec.DB)
        assert vcpu.exception.payload == 0x1
        assert vcpu.ops.rip_read() == program.symbol("insn")
        assert vcpu.cpu.regs[1] == 0
    else:
        assert not vcpu.exception.pending
        assert vcpu.ops.rip_read() == program.symbol("next")
        assert vcpu.cpu.regs[1] == 1
        assert not vcpu.ops.get_rflags() & RF  # cleared once the instruction completed


@pytest.mark.parametrize(("dr7", "db"), [
    (0x1, True),  # L0, R/W=00 LEN=00: an instruction breakpoint
    (0x2, True),  # G0
    (0x0, False),  # disabled
    (0x10001, False),  # R/W=01: a data write breakpoint, not checked here
    (0x40001, False),  # LEN=01 with R/W=00: kvm_vcpu_check_hw_bp() wants the whole nibble 0
])
def test_code_breakpoint_dr7_rows(vendor, dr7, db):
    vcpu, program = forced(vendor, BP)
    breakpoint_at(vcpu, program, dr7)
    assert bool(emulate.code_breakpoint(vcpu, program.symbol("insn"))) == db


def test_clear_rflags_rf_knob_lets_the_breakpoint_fire(vendor):
    """KVM_FEP_CLEAR_RFLAGS_RF: the #UD exit saved RF=1; KVM clears it before the check."""
    vcpu, program = forced(vendor, BP)
    breakpoint_at(vcpu, program)
    vcpu.ops.set_rflags(vcpu.ops.get_rflags() | RF)
    vcpu.kvm.fep_clear_rflags_rf = True
    handle_ud(vcpu)
    assert (vcpu.exception.pending, vcpu.exception.vector) == (True, Vec.DB)


def test_single_step_is_a_trap_after_the_emulated_instruction(vendor):
    vcpu, program = forced(vendor, BP)
    vcpu.ops.set_rflags(vcpu.ops.get_rflags() | TF)
    handle_ud(vcpu)
    assert vcpu.cpu.regs[1] == 1
    assert vcpu.ops.rip_read() == program.symbol("next")
    assert (vcpu.exception.vector, vcpu.exception.payload) == (Vec.DB, DR6_BS)


def test_emulated_hlt_halts_the_vcpu_past_the_hlt(vendor):
    vcpu, program = forced(vendor, "fep: KVM_FEP\n hlt\nnext: nop")
    handle_ud(vcpu)
    assert vcpu.mp_state is MpState.HALTED
    assert vcpu.ops.rip_read() == program.symbol("next")
    assert vcpu.stats.halt_exits == 1


@pytest.mark.parametrize("insn", ["iretq", "int3", "int $0x40"])
def test_iret_and_soft_interrupts_are_real_mode_only_in_the_emulator(vendor, insn):
    vcpu, _ = forced(vendor, f"fep: KVM_FEP\n {insn}")
    with pytest.raises(ModelLimit, match="outside real mode"):
        handle_ud(vcpu)


def test_without_the_module_parameter_the_ud_goes_back(vendor):
    vcpu, program = forced(vendor, BP, fep=False)
    handle_ud(vcpu)
    assert (vcpu.exception.pending, vcpu.exception.vector) == (True, Vec.UD)
    assert vcpu.ops.rip_read() == program.symbol("fep")
