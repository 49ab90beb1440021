"""What the architecture leaves undefined is marked in the delivery record and never compared.

A #DF's saved CS:RIP are undefined (SDM 6.15 Interrupt 8), and so is the RF
beside them: the model pushes RF=1 as Bochs does, while KVM injects a #DF with
the guest's RF (exception_type() makes #DF an abort). Neither is right; a
guest cannot rely on either, so neither may count as a divergence, while a
difference in a defined word (error code, RSP) still does.
"""

from dataclasses import replace
from pathlib import Path

from kvmodel.arch.events import EventType, Vec
from kvmodel.arch.observe import Delivery
from kvmodel.arch.regs import RF, Mode
from kvmodel.check.oracle import first_divergence
from kvmodel.kvm.vcpu import Vendor
from kvmodel.report.text import frame_text
from kvmodel.scenario.load import load
from kvmodel.scenario.runner import run

DF_PAIR = Path(__file__).parents[3] / "scenarios" / "arch" / "double_fault_contributory_pair.toml"
ERROR, RIP, CS, RFLAGS, RSP = range(5)  # a 64-bit frame with an error code, lowest word first


def _runs():
    scenario = load(DF_PAIR)
    return run(scenario, vendor=Vendor.BARE), run(scenario, vendor=Vendor.VMX)


def _with_df_frame(result, change):
    """`result` with its #DF delivery's frame (and what follows from it) changed by `change`."""
    df = next(d for d in result.deliveries if d.vector == Vec.DF)
    frame = list(df.frame)
    change(frame)
    moved = replace(df, frame=tuple(frame), return_rip=frame[RIP],
                    error_code=frame[ERROR])
    return replace(result, trace=tuple(moved if o is df else o for o in result.trace))


def test_the_df_record_marks_cs_rip_and_rf_undefined():
    bare, _ = _runs()
    df = next(d for d in bare.deliveries if d.vector == Vec.DF)
    assert df.return_undefined
    assert df.undefined[:RSP] == (0, (1 << 64) - 1, (1 << 64) - 1, RF)
    assert not any(df.undefined[RSP:])
    assert df.frame[RFLAGS] & RF  # the model still pushes a value: deterministic
    text = frame_text(df, bare.program, Mode.LONG64)
    assert "rip=bad (undefined)" in text and "cs=0x8 (undefined)" in text
    assert "(RF undefined)" in text and "rsp=0x30000 ss=0x10" in text


def test_a_df_frame_with_rf_clear_is_no_divergence():
    bare, vmx = _runs()
    assert first_divergence(bare, vmx) is None

    def clear_rf(frame):
        frame[RFLAGS] &= ~RF  # what KVM pushes when it injects the #DF itself

    assert first_divergence(bare, _with_df_frame(vmx, clear_rf)) is None

    def other_rip(frame):
        frame[RIP] += 1
        frame[CS] = 0x10

    assert first_divergence(bare, _with_df_frame(vmx, other_rip)) is None


def test_a_defined_word_of_the_df_frame_still_diverges():
    bare, vmx = _runs()

    def error_code(frame):
        frame[ERROR] = 8

    def rsp(frame):
        frame[RSP] -= 8

    def other_flag(frame):
        frame[RFLAGS] |= 1 << 0  # CF: defined, unlike RF

    for change in (error_code, rsp, other_flag):
        d = first_divergence(bare, _with_df_frame(vmx, change))
        assert d is not None and isinstance(d.virt, Delivery) and d.virt.vector == Vec.DF, change


def test_other_deliveries_compare_every_bit():
    gp = Delivery(Vec.GP, EventType.HW_EXCEPTION, 0, 0x10000, 1, 0x10010, 0x2ffd0, (0, 0x10000, 8, 0x10002))
    assert gp.undefined == () and not gp.return_undefined
    assert gp.observable()[3] == 0x10000
    assert gp.observable() != replace(gp, frame=(0, 0x10000, 8, 0x2)).observable()
