"""Real-address mode: IVT delivery (SDM 20.1.4) and IRET row by row, on CPUs built directly."""

import pytest

from kvmodel.arch.cpu import Cpu
from kvmodel.arch.deliver import deliver
from kvmodel.arch.events import Event, EventType, Vec, delivers_error_code
from kvmodel.arch.observe import Delivery, Iret, Shutdown
from kvmodel.arch.regs import AC, CR0_PE, DF, IF, IOPL, NT, RF, RSP, TF, Mode
from kvmodel.errors import ModelLimit
from kvmodel.guest.layout import (
    CODE_BASE,
    IDT_BASE,
    REAL_STACK_TOP,
    Gate,
    Machine,
    build_cpu,
)  # fmt: skip
from kvmodel.hw.base import EntryFailed
from kvmodel.hw.vmx.cpu import check_entry_controls
from kvmodel.hw.vmx.vmcs import Vmcs, intr_info

HANDLER = 0x100  # an offset in the code segment 0x1000
CODE_SEGMENT = CODE_BASE >> 4
IRET = b"\xcf"  # 16-bit IRET


def real_cpu(*vectors: int, image: bytes = b"\x90", idt_limit: int | None = None) -> Cpu:
    machine = Machine(mode=Mode.REAL16, image=image.ljust(0x200, b"\x90"), base=CODE_BASE,
                      entry=0, cs_base=CODE_BASE, idt_limit=idt_limit,
                      gates=tuple((v, Gate(HANDLER + 0x10 * v)) for v in vectors))
    return build_cpu(machine)


def deliveries(cpu: Cpu) -> list[Delivery]:
    return [o for o in cpu.trace if isinstance(o, Delivery)]


def test_reset_state():
    cpu = real_cpu()
    assert not cpu.cr0 & CR0_PE
    assert (cpu.cs, cpu.cs_base, cpu.ss, cpu.regs[RSP]) == (CODE_SEGMENT, CODE_BASE, 0, REAL_STACK_TOP)
    assert cpu.read(IDT_BASE + 4 * 3, 4) == 0  # no entry written for an absent vector


# (vector, type): every kind of event; none pushes an error code in real mode (SDM 20.1.4)
ROWS = [
    (Vec.DE, EventType.HW_EXCEPTION), (Vec.UD, EventType.HW_EXCEPTION),
    (Vec.GP, EventType.HW_EXCEPTION), (Vec.PF, EventType.HW_EXCEPTION),
    (Vec.SS, EventType.HW_EXCEPTION), (Vec.NMI, EventType.NMI), (0x30, EventType.EXT_INT),
    (0x40, EventType.SW_INT), (Vec.BP, EventType.SW_EXCEPTION),
    (Vec.DB, EventType.PRIV_SW_EXCEPTION),
]  # fmt: skip


@pytest.mark.parametrize("vector,type_", ROWS)
def test_ivt_frame(vector, type_):
    cpu = real_cpu(vector)
    kept = DF | IOPL | NT | 0x2
    cpu.rflags = kept | IF | TF | AC
    cpu.rip = 0x20
    software = type_ in (EventType.SW_INT, EventType.SW_EXCEPTION, EventType.PRIV_SW_EXCEPTION)
    event = Event(vector, type_, 0x22, error_code=0x18, insn_rip=0x20 if software else None,
                  push_rf=type_ is EventType.HW_EXCEPTION)
    deliver(cpu, event)
    (d,) = deliveries(cpu)
    assert d.error_code is None
    assert d.frame == (0x22, CODE_SEGMENT, (kept | IF | TF | AC) & 0xFFFF)  # IP, CS, FLAGS
    assert d.rsp == REAL_STACK_TOP - 6 == cpu.regs[RSP]
    for n, word in enumerate(d.frame):  # 16-bit words at SS:SP (SS = 0)
        assert cpu.read(d.rsp + 2 * n, 2) == word
    assert cpu.read(d.rsp + 6, 2) == 0  # nothing above: no error code, no SS:SP
    assert (cpu.cs, cpu.rip, d.handler) == (CODE_SEGMENT, HANDLER + 0x10 * vector, cpu.rip)
    assert cpu.rflags == kept  # IF, TF, AC cleared (and RF); DF, IOPL, NT kept
    assert not cpu.rflags & RF
    assert cpu.retired == (1 if software else 0)


def test_nmi_delivery_blocks_nmis():
    cpu = real_cpu(Vec.NMI)
    deliver(cpu, Event(Vec.NMI, EventType.NMI, 0))
    assert cpu.nmi_blocked


def test_handler_in_another_segment_forgets_decoded_code():
    """CS:IP from the IVT may name any segment: its base becomes segment * 16 (SDM 20.1.1)."""
    cpu = real_cpu()
    cpu.write(IDT_BASE + 4 * 0x40, 4, 0x2000 << 16 | 0x0010)
    cpu.icache[0] = object()  # decoded at IP 0 of segment 0x1000
    deliver(cpu, Event(0x40, EventType.SW_INT, 2, insn_rip=0))
    assert (cpu.cs, cpu.cs_base, cpu.rip) == (0x2000, 0x20000, 0x10)
    assert cpu.linear(cpu.rip) == 0x20010
    assert not cpu.icache


def test_entry_beyond_the_ivt_limit_is_gp_then_df_then_shutdown():
    """vector * 4 + 3 > IDTR.limit is #GP (Vol.2 INT n REAL-ADDRESS-MODE); with #GP's and #DF's
    entries beyond it too, Table 6-5 ends in shutdown."""
    cpu = real_cpu(Vec.GP, idt_limit=4 * Vec.GP + 3)
    deliver(cpu, Event(0x40, EventType.EXT_INT, 5))
    (d,) = deliveries(cpu)
    assert (d.vector, d.error_code, d.frame[0]) == (Vec.GP, None, 5)
    cpu = real_cpu(idt_limit=4 * Vec.DF - 1)
    deliver(cpu, Event(0x40, EventType.EXT_INT, 5))
    assert not deliveries(cpu) and cpu.shutdown
    assert [o for o in cpu.trace if isinstance(o, Shutdown)]


def test_double_fault_frame_has_cs_ip_undefined():
    cpu = real_cpu(Vec.DF, idt_limit=4 * Vec.DF + 3)
    deliver(cpu, Event(Vec.GP, EventType.HW_EXCEPTION, 5, error_code=0))  # #GP beyond the limit
    (d,) = deliveries(cpu)
    assert d.vector == Vec.DF and d.error_code is None and d.return_undefined
    assert d.undefined == (0xFFFF, 0xFFFF, 0)


def test_frame_wrapping_sp_is_a_model_limit():
    cpu = real_cpu(0x40)
    cpu.regs[RSP] = 4
    with pytest.raises(ModelLimit):
        deliver(cpu, Event(0x40, EventType.EXT_INT, 0))


def test_sp_zero_wraps_to_the_top_of_the_segment():
    cpu = real_cpu(0x40)
    cpu.regs[RSP] = 0
    deliver(cpu, Event(0x40, EventType.EXT_INT, 0x33))
    assert cpu.regs[RSP] == 0xFFFA
    assert cpu.read(0xFFFA, 2) == 0x33


def test_iret_pops_ip_cs_flags_and_unblocks_nmis():
    """SDM Vol.2 IRET REAL-ADDRESS-MODE; 6.7.1: IRET ends NMI blocking in any mode."""
    cpu = real_cpu(image=b"\x90" * HANDLER + IRET)
    cpu.rip, cpu.nmi_blocked = HANDLER, True
    sp = REAL_STACK_TOP - 6
    cpu.regs[RSP] = sp
    for n, word in enumerate((0x1234, 0x2000, IF | DF | 0x2)):
        cpu.write(sp + 2 * n, 2, word)
    cpu.run(1)
    assert (cpu.rip, cpu.cs, cpu.cs_base, cpu.regs[RSP]) == (0x1234, 0x2000, 0x20000, REAL_STACK_TOP)
    assert cpu.rflags & (IF | DF) == IF | DF
    assert not cpu.nmi_blocked
    (iret,) = [o for o in cpu.trace if isinstance(o, Iret)]
    assert iret.nmi_unblocked and iret.to_rip == 0x1234


@pytest.mark.parametrize("cr0,expected", [(0x10, False), (0x11, True)])
def test_delivers_error_code_follows_cr0_pe(cr0, expected):
    assert delivers_error_code(Vec.GP, EventType.HW_EXCEPTION, cr0) is expected
    assert not delivers_error_code(Vec.UD, EventType.HW_EXCEPTION, cr0)


def test_vmx_entry_rejects_an_error_code_in_real_mode():
    """SDM 26.2.1.3: with CR0.PE=0 (unrestricted guest) deliver-error-code must be 0."""
    vmcs = Vmcs()
    vmcs.entry_intr_info = intr_info(Vec.GP, EventType.HW_EXCEPTION, 0)
    check_entry_controls(vmcs, False)
    with pytest.raises(EntryFailed):
        check_entry_controls(vmcs, False, protected=False)
    vmcs.entry_intr_info = intr_info(Vec.GP, EventType.HW_EXCEPTION, None)
    check_entry_controls(vmcs, False, protected=False)
    with pytest.raises(EntryFailed):
        check_entry_controls(vmcs, False)
