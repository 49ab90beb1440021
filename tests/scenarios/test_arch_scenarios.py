"""Every shipped scenario holds on the bare-metal model, and the SDM tables' rows
that a program can show are each shown by one named scenario."""

from pathlib import Path

import pytest

from kvmodel.arch.events import DOUBLE_FAULT_RULES, DfClass, DfOutcome, vector_name
from kvmodel.arch.priority import PRIORITY
from kvmodel.scenario.load import load
from kvmodel.scenario.runner import run

ARCH = Path(__file__).parents[2] / "scenarios" / "arch"
SCENARIOS = sorted(ARCH.glob("*.toml"))


def test_the_library_is_large_enough():
    assert len(SCENARIOS) >= 30


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_holds(path):
    scenario = load(path)
    result = run(scenario)
    assert result.limit is None, result.limit
    assert result.mismatches == (), [m.message for m in result.mismatches]
    # Each scenario states what it expects: deliveries or final state.
    assert scenario.deliveries is not None or scenario.final


# SDM 6.9 Table 6-2: for each modelled class, a scenario where it meets the class
# below it at one boundary, and the vector the higher class delivers first.
PRIORITY_SHOWN_BY = {
    4: ("single_step_before_nmi", "#DB", "NMI"),
    5: ("nmi_before_interrupt", "NMI", "vector 0x30"),
    6: ("interrupt_before_code_breakpoint", "vector 0x30", "#DB"),
    7: ("code_breakpoint_before_fetch_fault", "#DB", "#PF"),
    8: ("fetch_fault_before_decode_fault", "#PF", None),
    9: ("decode_fault_before_execute_fault", "#UD", None),
    10: ("page_fault_read_not_present", "#PF", None),
}


@pytest.mark.parametrize("row", PRIORITY, ids=lambda r: f"class{r.rank}")
def test_priority_row(row):
    if row.source is None:
        assert row.rank <= 3  # RESET/#MC, task-switch traps, SMI/INIT: not modelled
        return
    name, first, second = PRIORITY_SHOWN_BY[row.rank]
    result = run(load(ARCH / f"{name}.toml"))
    names = [vector_name(d.vector) for d in result.deliveries]
    assert names[0] == first
    if second is not None:
        assert names[1] == second
    else:
        assert len(names) == 1  # the lower-priority exception was discarded


# SDM 6.15 Table 6-5: rows whose second exception a delivery can raise.
DOUBLE_FAULT_SHOWN_BY = {
    (DfClass.BENIGN, DfClass.CONTRIBUTORY): ("benign_then_contributory_is_serial", "#NP"),
    (DfClass.BENIGN, DfClass.PAGE_FAULT): ("double_fault_stack_not_present", "#DF"),
    (DfClass.CONTRIBUTORY, DfClass.CONTRIBUTORY): ("double_fault_contributory_pair", "#DF"),
    (DfClass.CONTRIBUTORY, DfClass.PAGE_FAULT): ("gp_then_page_fault_is_serial", "#PF"),
    (DfClass.PAGE_FAULT, DfClass.CONTRIBUTORY): ("page_fault_then_gp_is_double_fault", "#DF"),
    (DfClass.PAGE_FAULT, DfClass.PAGE_FAULT): ("double_fault_stack_not_present", "#DF"),
    (DfClass.DOUBLE_FAULT, DfClass.CONTRIBUTORY): ("triple_fault_without_idt_entries", None),
    (DfClass.DOUBLE_FAULT, DfClass.PAGE_FAULT): ("double_fault_then_page_fault_shuts_down", None),
}


@pytest.mark.parametrize("rule", DOUBLE_FAULT_RULES,
                         ids=lambda r: f"{r.first.name}-{r.second.name}")
def test_double_fault_row_in_a_program(rule):
    shown = DOUBLE_FAULT_SHOWN_BY.get((rule.first, rule.second))
    if shown is None:
        # No delivery raises a benign exception by itself; the row is checked as data.
        assert rule.second is DfClass.BENIGN and rule.outcome is DfOutcome.SERIAL
        return
    name, delivered = shown
    result = run(load(ARCH / f"{name}.toml"))
    if rule.outcome is DfOutcome.SHUTDOWN:
        assert result.final.shutdown and result.deliveries == ()
    else:
        assert [vector_name(d.vector) for d in result.deliveries][-1] == delivered
