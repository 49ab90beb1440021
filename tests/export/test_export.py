"""The bridge to QEMU: the boot stub's reset state, the log format, the differential verdicts."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from kvmodel.arch.regs import Mode
from kvmodel.check.differential import Verdict, differential, static_limit
from kvmodel.export.boot import DELIVERY, MAGIC, NO_X2APIC
from kvmodel.export.image import build_image
from kvmodel.export.qemu import LoggedDelivery, LoggedOutput, QemuStop, parse_log, run_image
from kvmodel.export.reset import reset_state
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import prepare

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86 is not installed (.ci/run installs it)")


def scenario(code: str, extra: str = "", mode: str = "long64"):
    return parse(f'title = "t"\ncite = "c"\n[guest]\nmode = "{mode}"\ncode = \'\'\'\n'
                 f"{textwrap.dedent(code)}'''\n{textwrap.dedent(extra)}")


def test_log_records_and_guest_output_interleave_in_order():
    word = 8
    record = MAGIC + DELIVERY + bytes([14]) + b"".join(
        v.to_bytes(word, "little") for v in (0x2FFD0, 0xFFFF0FF0, 0x5000, 2, 0x10003, 8, 0x10002,
                                             0x30000, 0x10))
    events, x2apic = parse_log(b"A" + MAGIC + NO_X2APIC + record + b"B" + record[:20], word)
    assert not x2apic
    assert events == (LoggedOutput(ord("A")),
                      LoggedDelivery(14, 0x2FFD0, 0xFFFF0FF0, 0x5000, (2, 0x10003, 8, 0x10002,
                                                                        0x30000, 0x10)),
                      LoggedOutput(ord("B")))  # a record cut off at the end is dropped


@pytest.mark.parametrize(("happen", "reason"), [
    ('[[happen]]\nevent = "nmi"\nat = "idle"\n' * 2, "two events at one place"),
    ('[[happen]]\nevent = "nmi"\nat = "idle"\n[[happen]]\nevent = "interrupt"\n'
     'vector = 0x30\nat = "idle"\n', "two events at one place"),
    ('[[happen]]\nevent = "interrupt"\nvector = 0x30\nafter = 1\n'
     '[[happen]]\nevent = "interrupt"\nvector = 0x31\nafter = 3\n', "two arrivals at one address"),
    ('[[happen]]\nevent = "nmi"\nafter = 1\n[[happen]]\nevent = "nmi"\nafter = 4\n',
     "after a delivery returned there"),
])
def test_arrivals_a_breakpoint_cannot_place_are_not_realizable(tmp_path, happen, reason):
    sc = scenario("start:\n    cli\nidle:\n    nop\n    jmp idle\nnmi_handler:\n    iretq\n",
                  '[idt]\nNMI = "nmi_handler"\n0x30 = "nmi_handler"\n' + happen)
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.NOT_REALIZABLE and reason in result.reason


@needs_qemu
def test_an_nmi_while_halted_wakes_the_cpu_past_its_hlt(tmp_path):
    sc = scenario("start:\n    hlt\nwoken:\n    hlt\nnmi_handler:\n    iretq\n",
                  '[idt]\nNMI = "nmi_handler"\n[[happen]]\nevent = "nmi"\nafter = 1\n')
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.AGREE, result.difference
    (delivery,) = result.qemu.events
    assert delivery.vector == 2 and delivery.stack[0] == result.model.program.symbol("woken")


@needs_qemu
def test_an_nmi_by_retired_count_arrives_at_the_nth_reach_of_its_place(tmp_path):
    sc = scenario("""\
        start:
            mov $3, %ecx
        again:
            dec %ecx
            jnz again
            hlt
        nmi_handler:
            mov %ecx, %eax
            hlt
        """, '[idt]\nNMI = "nmi_handler"\n[[happen]]\nevent = "nmi"\nafter = 4\n')
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.AGREE, result.difference
    (delivery,) = result.qemu.events
    # after mov, dec, jnz, dec: the second reach of jnz, with ECX = 1
    assert delivery.stack[0] == result.model.program.symbol("again") + 2
    assert result.qemu.registers["RAX"] == 1


def test_host_side_happenings_are_nothing_to_qemus_cpu_but_not_to_real_kvm():
    happen = '[[happen]]\nevent = "host_interrupt"\nafter = 1\n'
    assert static_limit(scenario("start:\n    nop\n    hlt\n", happen)) is None
    assert "host-side" in static_limit(scenario("start:\n    nop\n    hlt\n", happen), "kvm")


@needs_qemu
def test_an_nmi_at_a_label_arrives_before_that_instruction(tmp_path):
    sc = scenario("""\
        start:
            nop
        idle:
            hlt
        nmi_handler:
            hlt
        """, '[idt]\nNMI = "nmi_handler"\n[[happen]]\nevent = "nmi"\nat = "idle"\n')
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.AGREE, result.difference
    (delivery,) = result.qemu.events
    assert delivery.vector == 2 and delivery.stack[0] == result.model.program.symbol("idle")


INTERRUPT_AT_LABEL = """\
    start:
        {enable}
        mov $0x1234, %eax
    here:
        add $1, %eax
        {after}
        hlt
    handler:
        add $0x100, %eax
        {ret}
    """


@needs_qemu
@pytest.mark.parametrize("mode", ["long64", "protected32"])
def test_an_interrupt_at_a_label_is_taken_before_that_instruction(tmp_path, mode):
    ret = "iretq" if mode == "long64" else "iret"
    sc = scenario(INTERRUPT_AT_LABEL.format(enable="sti", after="", ret=ret),
                  '[idt]\n0x30 = "handler"\n[[happen]]\nevent = "interrupt"\nvector = 0x30\n'
                  'at = "here"\n', mode)
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.AGREE, result.difference
    (delivery,) = result.qemu.events
    assert delivery.vector == 0x30 and delivery.stack[0] == result.model.program.symbol("here")
    assert result.qemu.registers["RAX" if mode == "long64" else "EAX"] & 0xFFFF == 0x1335


@needs_qemu
def test_an_interrupt_at_a_label_with_if_clear_stays_pending_until_sti(tmp_path):
    sc = scenario(INTERRUPT_AT_LABEL.format(enable="cli", after="sti\n    nop", ret="iretq"),
                  '[idt]\n0x30 = "handler"\n[[happen]]\nevent = "interrupt"\nvector = 0x30\n'
                  'at = "here"\n')
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.AGREE, result.difference
    (delivery,) = result.qemu.events
    program = result.model.program
    # STI's shadow covers the NOP: the IPI is taken at the HLT (SDM 6.8.3)
    assert delivery.stack[0] == program.symbol("here") + 3 + 1 + 1


@needs_qemu
def test_an_interrupt_in_an_sti_shadow_is_not_realizable(tmp_path):
    sc = scenario("start:\n    cli\n    sti\nhere:\n    nop\n    hlt\nhandler:\n    iretq\n",
                  '[idt]\n0x30 = "handler"\n[[happen]]\nevent = "interrupt"\nvector = 0x30\n'
                  'at = "here"\n')
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.NOT_REALIZABLE and "shadow" in result.reason


@needs_qemu
@pytest.mark.parametrize("mode", ["long64", "protected32"])
def test_boot_stub_reproduces_the_model_reset_state_field_by_field(tmp_path, mode):
    regs = ("rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi") if mode == "long64" else (
        "eax", "ecx", "edx", "ebx", "ebp", "esi", "edi")
    values = {name: 0x1111 * (k + 1) for k, name in enumerate(regs)}
    if mode == "long64":
        values |= {"r9": 0x123456789ABCDEF0, "r15": 0xFEDCBA9876543210}
    sc = scenario("start:\n    hlt\nhandler:\n    hlt\n", "[registers]\n" + "".join(
        f"{n} = {v:#x}\n" for n, v in values.items()) + "[cpu]\nrflags = 0x246\nidt_limit = 0x7ff\n"
        '[idt]\nNMI = "handler"\n', mode)
    cpu, _ = prepare(sc)
    state = reset_state(cpu)
    run = run_image(build_image(state, tmp_path), state.mode, len(state.memory))
    got = run.registers
    assert run.stop is QemuStop.HALTED and run.events == ()
    width = 64 if mode == "long64" else 32
    names = [n.upper() for n in (("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI") if
                                 mode == "long64" else ("EAX", "ECX", "EDX", "EBX", "ESP", "EBP",
                                                        "ESI", "EDI"))]
    if mode == "long64":
        names += ["R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"]
    for name, value in zip(names, cpu.regs, strict=True):
        assert got[name] == value, name
    assert got["RIP" if width == 64 else "EIP"] == cpu.rip + 1  # after the HLT
    assert got["RFL" if width == 64 else "EFL"] == cpu.rflags
    for name in ("CR0", "CR4", "DR6", "DR7", "CR2"):
        assert got[name] == getattr(cpu, name.lower()), name
    for n in range(4):
        assert got[f"DR{n}"] == cpu.dr[n]
    assert got["CS"] == cpu.cs and got["SS"] == cpu.ss
    if mode == "long64":
        assert got["EFER"] == cpu.efer
    assert run.memory == bytes(cpu.mem)  # code, IDT, TSS where the model has them


@needs_qemu
def test_a_matching_scenario_agrees(tmp_path):
    sc = scenario("""\
        start:
            int3
        after:
            mov $0x41, %al
            mov $0xe9, %dx
            out %al, %dx
            hlt
        bp_handler:
            incq counter
            iretq
            .balign 8
        counter:
            .quad 0
        """, '[idt]\n"#BP" = "bp_handler"\n')
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.AGREE, result.difference
    assert [type(e) for e in result.qemu.events] == [LoggedDelivery, LoggedOutput]


@needs_qemu
def test_a_difference_is_reported_at_its_entry_and_can_be_declared(tmp_path):
    # QEMU 7.2's 64-bit IDT error code is vector * 16 + 2 (fixed by "i386: Emit correct
    # error code for 64-bit IDT entry", QEMU 8.0); the model's is vector * 8 + 2 (SDM 6.13).
    code = """\
        start:
            int $0x40
            hlt
        np_handler:
            hlt
        """
    idt = '[idt]\n0x40 = { handler = "np_handler", present = false }\n"#NP" = "np_handler"\n'
    result = differential(scenario(code, idt), tmp_path / "a")
    if result.verdict is Verdict.AGREE:
        pytest.skip(f"this QEMU ({result.qemu.version}) has the 64-bit IDT error code fixed")
    assert result.verdict is Verdict.DISAGREE
    assert (result.difference.entry, result.difference.field) == (1, "frame word 0")
    assert (result.difference.model, result.difference.qemu) == ("0x202", "0x402")
    def declared(extra: str):
        return differential(scenario(code, idt + '[[expect.qemu]]\naccel = "tcg"\nentry = 1\n'
                                     f'why = "QEMU issue 1382"\n{extra}'),
                            tmp_path / f"d{len(list(tmp_path.iterdir()))}")

    right = declared('field = "frame word 0"\nmask = 0x600\n')
    assert right.verdict is Verdict.AGREE and len(right.declared) == 1
    assert declared('field = "frame word 2"\n').verdict is Verdict.DISAGREE  # another field
    assert declared('field = "frame word 0"\nmask = 0x10000\n').verdict is Verdict.DISAGREE


@needs_qemu
def test_guest_that_loads_its_own_idt_is_not_realizable(tmp_path):
    sc = scenario("""\
        start:
            lidt idtr
            hlt
        idtr:
            .word 0xfff
            .quad 0x1000
        """)
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.NOT_REALIZABLE and "IDTR" in result.reason


def test_reset_state_reads_the_gates_present_in_memory():
    sc = scenario("start:\n    hlt\nh1:\n    hlt\nh2:\n    hlt\n",
                  '[idt]\nNMI = "h1"\n0x30 = { handler = "h2", present = false }\n')
    cpu, program = prepare(sc)
    state = reset_state(cpu)
    assert state.mode is Mode.LONG64
    assert [(g.vector, g.handler) for g in state.gates] == [(2, program.symbol("h1"))]


def test_a_run_says_whether_the_guest_used_the_x2apic():
    """The differential needs it: QEMU 7.2's TCG CPU has no x2APIC, so such a guest is not
    realizable there; other MSRs (EFER) do not count."""
    from kvmodel.kvm.vcpu import Vendor
    from kvmodel.scenario.runner import run

    tpr = scenario("start:\n    mov $0x808, %ecx\n    rdmsr\n    hlt\n")
    efer = scenario("start:\n    mov $0xc0000080, %ecx\n    rdmsr\n    hlt\n")
    assert run(tpr, vendor=Vendor.BARE).apic_used
    assert not run(efer, vendor=Vendor.BARE).apic_used


# -- the comparison itself, against made-up QEMU runs ------------------------------------

def _compare(tmp_path, code: str, extra: str, qemu_events, stop, registers=None, memory=None):
    from kvmodel.check.differential import _verdict
    from kvmodel.check.qemu_compare import StubMap
    from kvmodel.export.qemu import QemuRun
    from kvmodel.kvm.vcpu import Vendor
    from kvmodel.scenario.runner import run

    sc = scenario(code, extra)
    model = run(sc, vendor=Vendor.BARE, expectations=False)
    state = reset_state(prepare(sc)[0])
    fake = QemuRun(stop, tuple(qemu_events), registers or {}, memory or bytes(model.memory),
                   True, "fake")
    return _verdict(sc, model, fake, StubMap(build_image(state, tmp_path), state), list(sc.qemu))


OUTPUT_A = "start:\n    mov $0x41, %al\n    mov $0xe9, %dx\n    out %al, %dx\n    hlt\n"


def test_qemu_still_running_where_the_model_halted_is_a_difference(tmp_path):
    result = _compare(tmp_path, OUTPUT_A, "", [LoggedOutput(0x41)], QemuStop.TIMEOUT)
    assert result.verdict is Verdict.DISAGREE
    assert (result.difference.field, result.difference.model) == ("stop", "halted")


def test_a_missing_entry_is_a_difference_even_when_qemu_timed_out(tmp_path):
    result = _compare(tmp_path, OUTPUT_A, "", [], QemuStop.TIMEOUT)
    assert result.verdict is Verdict.DISAGREE and result.difference.field == "entry"


def test_a_declared_unpaired_difference_ends_the_comparison_without_claiming_agreement(tmp_path):
    extra = ('[[expect.qemu]]\naccel = "tcg"\nentry = 1\nfield = "entry"\nwhy = "w"\n')
    result = _compare(tmp_path, OUTPUT_A, extra, [LoggedOutput(0x42)], QemuStop.HALTED)
    assert result.verdict is Verdict.DECLARED and "entry 1" in result.reason


def test_final_registers_and_memory_are_compared_when_both_halted(tmp_path):
    regs = {"RAX": 0x41, "RDX": 0xE9, "RIP": 0x10008, "RFL": 2, "CR2": 0, "DR6": 0xFFFF0FF0,
            "DR7": 0x400}
    ok = _compare(tmp_path / "a", OUTPUT_A, "", [LoggedOutput(0x41)], QemuStop.HALTED, regs)
    assert ok.verdict is Verdict.AGREE, ok.difference
    bad = _compare(tmp_path / "b", OUTPUT_A, "", [LoggedOutput(0x41)], QemuStop.HALTED,
                   regs | {"RAX": 0x40})
    assert (bad.difference.field, bad.difference.model, bad.difference.qemu) == ("rax", "0x41", "0x40")
    changed = bytearray(ok.model.memory)
    changed[0x20000] ^= 1
    mem = _compare(tmp_path / "c", OUTPUT_A, "", [LoggedOutput(0x41)], QemuStop.HALTED, regs,
                   bytes(changed))
    assert mem.difference.field == "memory" and "0x20000" in mem.difference.detail


def test_fred_is_not_realizable():
    sc = scenario("fred_entry:\n    hlt\n.balign 4096\nstart:\n    hlt\n",
                  '[fred]\nentry = "fred_entry"\n')
    assert "FRED" in static_limit(sc)


def test_a_delivery_interrupted_before_its_logging_entry_ran_is_put_back_in_order():
    """A data breakpoint hit by an NMI's push delivers #DB before the NMI's logging entry
    runs: the #DB is logged first, the NMI when its entry runs, or never."""
    from kvmodel.check.qemu_compare import StubMap, in_delivery_order
    from kvmodel.export.reset import Gate

    stub = StubMap.__new__(StubMap)
    stub.entries = {0x1000100: Gate(2, 0x10020)}  # the NMI's logging entry -> nmi_handler
    db = LoggedDelivery(1, 0x2FFA8, 0, 0, (0x1000100, 8, 2, 0x2FFD8, 0x10, 0))
    nmi = LoggedDelivery(2, 0x2FFD8, 0, 0, (0x10011, 8, 2, 0x30000, 0x10, 0))
    assert in_delivery_order((db, nmi), stub) == (nmi, db)
    (placeholder, first) = in_delivery_order((db,), stub)
    assert placeholder.vector == 2 and placeholder.stack == () and first is db


@needs_qemu
def test_a_qemu_crash_is_reported_and_can_be_declared(tmp_path):
    """QEMU 7.2.22 segfaults on this scenario (a code breakpoint in a based code segment);
    the scenario declares it. A QEMU that does not crash leaves a note instead."""
    from pathlib import Path

    from kvmodel.scenario.load import load

    path = Path(__file__).parents[2] / "scenarios/softint/int3_cs_base.toml"
    result = differential(load(str(path)), tmp_path)
    if result.verdict is not Verdict.DECLARED:
        pytest.skip(f"this QEMU does not crash here ({result.verdict.value})")
    assert "QEMU exited" in result.reason


def test_a_vmm_script_is_not_realizable():
    sc = scenario("start:\n    nop\nidle:\n    hlt\n",
                  '[[vmm]]\ncall = "KVM_NMI"\nat = "idle"\n')
    assert "VMM script" in static_limit(sc)


def test_guest_that_writes_cr3_is_not_realizable(tmp_path):
    sc = scenario("start:\n    mov %cr3, %rax\n    mov %rax, %cr3\n    hlt\n")
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.NOT_REALIZABLE and "writes CR3" in result.reason


@needs_qemu
def test_cr3_and_gdtr_read_the_same_in_qemu_as_in_the_model(tmp_path):
    """The model boots with the stub's GDTR and paging root (arch/regs.py BOOT_GDT_BASE, BOOT_CR3):
    SGDT and MOV from CR3 are realizable, and both sides see the same values."""
    sc = scenario("start:\n    mov %cr3, %rax\n    sgdt gdtr\n    mov gdtr+2, %rbx\n    hlt\n"
                  "gdtr:\n    .skip 10\n")
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.AGREE, (result.reason, result.difference)
    assert dict(result.model.final.registers)["rbx"] != 0


@needs_qemu
def test_an_svm_l2_delivery_goes_through_the_logging_stub(tmp_path):
    """L2 loads IDTR from the VMCB (the guest's IDT at 0x1000): the stub patches that IDT in place,
    so L2's NMI is logged, and the IDT bytes are left out of the memory comparison."""
    sc = scenario("""\
        .include "svm.s"
        start:
            SVM_START
            VMCB_SETUP vmcb, l2_start, l2_stack
            movl $(EVTINJ_VALID | EVTINJ_TYPE_NMI | 2), vmcb+VMCB_EVENT_INJ(%rip)
            RUN_L2 vmcb
            mov vmcb+VMCB_EXIT_CODE(%rip), %rbx
            hlt
        nmi_handler:
            hlt
        l2_start:
            hlt
            .balign 4096
            .skip 4096
        l2_stack:
        vmcb:
            .skip 4096
        """, '[cpu]\nsvm = true\nvendor = "svm"\n[idt]\nNMI = "nmi_handler"\n'
             '[[expect.qemu]]\naccel = "tcg"\nentry = "final"\nfield = "memory"\n'
             'why = "QEMU 7.2 leaves a stale EXITINTINFO (see scenarios/nested/svm_l1_injects_nmi)"\n')
    result = differential(sc, tmp_path)
    assert result.verdict is Verdict.AGREE, (result.reason, result.difference)
    assert [e.vector for e in result.qemu.events] == [2]
    assert dict(result.model.final.registers)["rbx"] == 0x78  # SVM_EXIT_HLT
