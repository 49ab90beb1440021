"""[cpus]: a KVM divergence is kept only if bare metal with one switch more does not show its
outcome either (check/interleave.py confirm_with_bare()): a vCPU's finer steps reach within k
switches orders bare metal needs k+1 for."""

from pathlib import Path

from kvmodel.arch.machine import Switch
from kvmodel.check.interleave import InterleavingResult, confirm_with_bare, explore_interleavings
from kvmodel.scenario.load import load

SMP = Path(__file__).parents[2] / "scenarios" / "smp"


def test_a_divergence_bare_metal_shows_one_switch_deeper_is_dropped_and_others_kept():
    scenario = load(SMP / "apic_multiple_nmi.toml")
    at_zero = explore_interleavings(scenario, 0).outcomes
    only_deeper = sorted(explore_interleavings(scenario, 1).outcomes - at_zero)
    assert only_deeper  # the scenario has outcomes that need a switch
    artefact, real = (Switch(1, 1),), (Switch(2, 1),)
    virt = InterleavingResult(failures=[(artefact, "divergence", "x"), (real, "divergence", "y"),
                                        ((), "liveness", "z")],
                              unmatched={artefact: only_deeper[0], real: "never shown"})
    deeper = confirm_with_bare(scenario, 0, virt, None)
    assert deeper is not None and deeper.matched == 1 and deeper.complete
    assert deeper.explored > 1
    assert virt.failures == [(real, "divergence", "y"), ((), "liveness", "z")]


def test_nothing_to_confirm_runs_no_search():
    assert confirm_with_bare(load(SMP / "apic_multiple_nmi.toml"), 2, InterleavingResult(), None) is None
