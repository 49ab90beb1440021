"""Task switches (arch/task.py), field by field of the 32-bit TSS (SDM 7.2.1 Figure 7-2) and
step by step of SDM 7.3: what is saved in the old TSS, what is loaded from the new one, the
busy bits, NT, the back link, CR0.TS, DR7 and the T flag."""

import pytest

from kvmodel.arch import deliver, task
from kvmodel.arch.events import Event, EventType, Vec
from kvmodel.arch.faults import Fault
from kvmodel.arch.regs import CR0_TS, DR6_BT, NT, RF, RSP, Mode
from kvmodel.arch.task import FIRST_TASK_SELECTOR as NEW
from kvmodel.arch.task import TSS_SELECTOR as OLD
from kvmodel.arch.task import Reason, Tss32
from kvmodel.errors import ModelLimit
from kvmodel.guest.layout import TSS_BASE, Gate, Machine, build_cpu

NEW_TSS = 0x8000
NEW_EIP, NEW_ESP = 0x10040, 0x9000
NEW_GPRS = [0xA0 + n for n in range(8)]  # EAX, ECX, EDX, EBX, ESP (replaced), EBP, ESI, EDI
NEW_GPRS[RSP] = NEW_ESP
OLD_GPRS = [0x50 + n for n in range(8)]


def _put(cpu, base, field, value, size=4):
    cpu.mem[base + field:base + field + size] = value.to_bytes(size, "little")


def _get(cpu, base, field, size=4):
    return int.from_bytes(cpu.mem[base + field:base + field + size], "little")


def _cpu(t_flag=False, gates=()):
    machine = Machine(mode=Mode.PROTECTED32, image=b"\x90" * 0x100, base=0x10000, entry=0x10000,
                      gates=gates, tasks=((NEW, NEW_TSS),))
    cpu = build_cpu(machine)
    _put(cpu, NEW_TSS, Tss32.EIP, NEW_EIP)
    _put(cpu, NEW_TSS, Tss32.EFLAGS, 0x202)
    _put(cpu, NEW_TSS, Tss32.CR3, cpu.cr3)  # the model's paging root (another is a model limit)
    for n, value in enumerate(NEW_GPRS):
        _put(cpu, NEW_TSS, Tss32.EAX + 4 * n, value)
    for field, selector in zip(task.SEGMENTS, (0x10, 0x8, 0x10, 0x10, 0x10, 0x10), strict=True):
        _put(cpu, NEW_TSS, field, selector)
    _put(cpu, NEW_TSS, Tss32.T, int(t_flag), 2)
    cpu.regs[:] = OLD_GPRS
    return cpu


def test_old_task_state_is_saved_field_by_field():
    cpu = _cpu()
    _put(cpu, TSS_BASE, Tss32.CR3, 0x1234)  # static fields stay as they are
    task.switch(cpu, NEW, Reason.GATE, 0x10007, 0x10246)
    assert _get(cpu, TSS_BASE, Tss32.EIP) == 0x10007
    assert _get(cpu, TSS_BASE, Tss32.EFLAGS) == 0x10246
    for n, value in enumerate(OLD_GPRS):
        assert _get(cpu, TSS_BASE, Tss32.EAX + 4 * n) == value
    assert [_get(cpu, TSS_BASE, f, 2) for f in task.SEGMENTS] == [0x10, 0x8, 0x10, 0x10, 0x10, 0x10]
    assert _get(cpu, TSS_BASE, Tss32.CR3) == 0x1234
    assert _get(cpu, TSS_BASE, Tss32.PREVIOUS_TASK_LINK) == 0


def test_new_task_state_is_loaded_field_by_field():
    cpu = _cpu()
    task.switch(cpu, NEW, Reason.GATE, 0x10007, 0x2)
    assert cpu.rip == NEW_EIP
    assert cpu.regs == NEW_GPRS
    assert (cpu.cs, cpu.ss) == (0x8, 0x10)
    assert cpu.rflags == 0x202 | NT  # nested: NT set in what is loaded (SDM 7.4)
    assert _get(cpu, NEW_TSS, Tss32.EFLAGS) == 0x202  # not in the TSS image itself


def test_gate_switch_links_and_marks_busy():
    cpu = _cpu()
    task.switch(cpu, NEW, Reason.GATE, 0x10007, 0x2)
    assert _get(cpu, NEW_TSS, Tss32.PREVIOUS_TASK_LINK, 2) == OLD
    assert cpu.tr == NEW
    assert cpu.tasks == {OLD: (TSS_BASE, True), NEW: (NEW_TSS, True)}  # both busy: nested
    assert cpu.cr0 & CR0_TS


def test_dr7_local_enables_are_cleared_and_globals_kept():
    cpu = _cpu()
    cpu.dr7 = 0x400 | 0x155 | 0x2AA  # L0-L3, LE; G0-G3, GE
    task.switch(cpu, NEW, Reason.GATE, 0x10007, 0x2)
    assert cpu.dr7 == 0x400 | 0x2AA


@pytest.mark.parametrize("t_flag", [False, True])
def test_t_flag_makes_a_debug_trap_with_bt(t_flag):
    cpu = _cpu(t_flag=t_flag)
    task.switch(cpu, NEW, Reason.GATE, 0x10007, 0x2)
    assert bool(cpu.pending_dbg & DR6_BT) is t_flag


def test_error_code_is_pushed_on_the_new_stack():
    cpu = _cpu()
    task.switch(cpu, NEW, Reason.GATE, 0x10007, 0x2, error_code=0x18)
    assert cpu.regs[RSP] == NEW_ESP - 4
    assert _get(cpu, NEW_ESP - 4, 0) == 0x18


def test_iret_returns_through_the_back_link_and_frees_the_task():
    cpu = _cpu()
    task.switch(cpu, NEW, Reason.GATE, 0x10007, 0x246)
    cpu.regs[0] = 0x99
    task.task_return(cpu, NEW_EIP + 1)
    assert cpu.tr == OLD and cpu.rip == 0x10007 and cpu.rflags == 0x246
    assert cpu.regs[1:] == OLD_GPRS[1:] and cpu.regs[0] == OLD_GPRS[0]
    assert cpu.tasks[NEW] == (NEW_TSS, False) and cpu.tasks[OLD] == (TSS_BASE, True)
    assert _get(cpu, NEW_TSS, Tss32.EIP) == NEW_EIP + 1
    assert _get(cpu, NEW_TSS, Tss32.EFLAGS) == 0x202  # saved with NT cleared (step 7)
    assert _get(cpu, NEW_TSS, Tss32.EAX) == 0x99
    assert _get(cpu, TSS_BASE, Tss32.PREVIOUS_TASK_LINK, 2) == 0  # IRET writes no link


def test_iret_to_a_link_that_is_not_busy_is_ts():
    cpu = _cpu()
    task.switch(cpu, NEW, Reason.GATE, 0x10007, 0x2)
    cpu.tasks[OLD] = (TSS_BASE, False)
    with pytest.raises(Fault) as e:
        task.task_return(cpu, NEW_EIP)
    assert (e.value.vector, e.value.error_code) == (Vec.TS, OLD)
    assert cpu.tr == NEW  # nothing changed


@pytest.mark.parametrize("selector", [OLD, NEW | 4, 0x08, 0x100])
def test_gate_to_a_busy_or_missing_tss_is_gp(selector):
    cpu = _cpu()
    with pytest.raises(Fault) as e:
        task.gate_target(cpu, selector, 1)
    assert (e.value.vector, e.value.error_code) == (Vec.GP, (selector & 0xFFFC) | 1)


@pytest.mark.parametrize(("field", "value", "size"), [
    (Tss32.CS, 0x33, 2), (Tss32.SS, 0x2B, 2), (Tss32.DS, 0, 2), (Tss32.LDT, 0x40, 2),
    (Tss32.CR3, 0x5000, 4), (Tss32.EFLAGS, 0x20002, 4)])
def test_states_the_model_cannot_hold_are_limits_before_any_change(field, value, size):
    cpu = _cpu()
    _put(cpu, NEW_TSS, field, value, size)
    with pytest.raises(ModelLimit):
        task.switch(cpu, NEW, Reason.GATE, 0x10007, 0x2)
    assert cpu.tr == OLD and cpu.regs == OLD_GPRS and _get(cpu, TSS_BASE, Tss32.EIP) == 0


def test_delivery_through_a_task_gate_saves_the_return_address_and_rf():
    """A fault through a task gate: the old TSS keeps the faulting EIP and EFLAGS with RF=1
    (as its frame would have it, SDM 17.3.1.1; Bochs exception.cc), the error code is the
    one word on the new stack, and the trace's frame is that word."""
    cpu = _cpu(gates=((Vec.GP, Gate(0, kind=task.TASK_GATE, selector=NEW)),))
    deliver.deliver(cpu, Event(Vec.GP, EventType.HW_EXCEPTION, 0x10005, error_code=0x10,
                               push_rf=True))
    assert _get(cpu, TSS_BASE, Tss32.EIP) == 0x10005
    assert _get(cpu, TSS_BASE, Tss32.EFLAGS) == 0x2 | RF
    record = cpu.trace[-1]
    assert (record.vector, record.handler, record.rsp, record.frame) == (
        Vec.GP, NEW_EIP, NEW_ESP - 4, (0x10,))


def test_a_task_switch_under_a_hypervisor_is_a_named_limit():
    """KVM emulates task switches after a VM exit (kvm_task_switch()); the model does not yet."""
    cpu = _cpu()
    cpu.host = object()
    with pytest.raises(ModelLimit, match="emulator_task_switch"):
        task.switch(cpu, NEW, Reason.GATE, 0x10007, 0x2)
    assert cpu.tr == OLD and cpu.regs == OLD_GPRS
