"""A run cut short (budget, VMM stop) is compared with bare metal only as far as it went."""

from dataclasses import replace
from pathlib import Path

from kvmodel.check.oracle import first_divergence
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load
from kvmodel.scenario.runner import run

STORM = Path(__file__).parents[3] / "scenarios" / "notify" / "db_storm_on_idt_gate.toml"


def test_a_shorter_storm_is_a_prefix_not_a_divergence():
    scenario = load(STORM)
    long, short = run(scenario, vendor=Vendor.BARE), run(scenario, vendor=Vendor.BARE, max_steps=20)
    assert len(short.deliveries) < len(long.deliveries)
    assert first_divergence(long, short) is None and first_divergence(short, long) is None


def test_a_different_entry_inside_the_prefix_still_diverges():
    scenario = load(STORM)
    bare, other = run(scenario, vendor=Vendor.BARE), run(scenario, vendor=Vendor.BARE, max_steps=20)
    moved = replace(other.deliveries[1], rsp=other.deliveries[1].rsp - 8)
    trace = tuple(moved if o is other.deliveries[1] else o for o in other.trace)
    d = first_divergence(bare, replace(other, trace=trace))
    assert d is not None and d.index == 1
