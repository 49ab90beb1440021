"""The SDM tables kvmodel encodes, checked row by row against the manual's values."""

import pytest

from kvmodel.arch.events import (
    DOUBLE_FAULT_RULES,
    VECTORS,
    DfClass,
    DfOutcome,
    EventType,
    df_class,
    double_fault_outcome,
    has_error_code,
    parse_vector,
    vector_name,
)  # fmt: skip
from kvmodel.arch.priority import MODELLED, PRIORITY, Source

# SDM 6.15 Table 6-5, written out as the manual prints it.
TABLE_6_5 = {
    ("benign", "benign"): "serial", ("benign", "contributory"): "serial",
    ("benign", "page_fault"): "serial",
    ("contributory", "benign"): "serial", ("contributory", "contributory"): "double_fault",
    ("contributory", "page_fault"): "serial",
    ("page_fault", "benign"): "serial", ("page_fault", "contributory"): "double_fault",
    ("page_fault", "page_fault"): "double_fault",
    ("double_fault", "benign"): "serial", ("double_fault", "contributory"): "shutdown",
    ("double_fault", "page_fault"): "shutdown",
}  # fmt: skip


@pytest.mark.parametrize("first,second", sorted(TABLE_6_5))
def test_double_fault_row(first, second):
    outcome = double_fault_outcome(DfClass[first.upper()], DfClass[second.upper()])
    assert outcome is DfOutcome[TABLE_6_5[first, second].upper()]


def test_double_fault_table_has_exactly_the_manual_rows():
    rows = {(r.first.name.lower(), r.second.name.lower()) for r in DOUBLE_FAULT_RULES}
    assert rows == set(TABLE_6_5)
    assert all(r.cite.startswith("SDM 6.15") for r in DOUBLE_FAULT_RULES)


# SDM 6.15 Table 6-4: contributory and page-fault classes; everything else is benign.
CONTRIBUTORY = {0, 10, 11, 12, 13, 21}
PAGE_FAULT = {14, 20}


@pytest.mark.parametrize("vector", range(32))
def test_exception_class(vector):
    got = df_class(vector, EventType.HW_EXCEPTION)
    if vector in CONTRIBUTORY:
        assert got is DfClass.CONTRIBUTORY
    elif vector in PAGE_FAULT:
        assert got is DfClass.PAGE_FAULT
    elif vector == 8:
        assert got is DfClass.DOUBLE_FAULT
    else:
        assert got is DfClass.BENIGN


@pytest.mark.parametrize("type_", [EventType.EXT_INT, EventType.NMI, EventType.SW_INT])
def test_interrupts_and_int_n_are_benign(type_):
    assert df_class(13, type_) is DfClass.BENIGN


def test_error_codes_only_for_hardware_exceptions():
    # SDM Table 6-1: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP push an error code; AMD's #VC
    # pushes the exit code (APM 15.35.5).
    assert {v.vector for v in VECTORS if v.error_code} == {8, 10, 11, 12, 13, 14, 17, 21, 29}
    assert has_error_code(13, EventType.HW_EXCEPTION)
    assert not has_error_code(13, EventType.SW_INT)  # INT 13 pushes none (SDM 6.13)
    assert not has_error_code(13, EventType.EXT_INT)


def test_vector_names_round_trip():
    assert vector_name(14) == "#PF" and vector_name(2) == "NMI"
    assert vector_name(0x30) == "vector 0x30"
    assert parse_vector("#PF") == 14 and parse_vector("pf") == 14 and parse_vector("NMI") == 2


def test_priority_table_is_the_manuals():
    """SDM 6.9 Table 6-2: ten classes, ranks 1..10, the modelled ones in check order."""
    assert [c.rank for c in PRIORITY] == list(range(1, 11))
    assert [c.source for c in PRIORITY if c.rank <= 3] == [None, None, None]
    assert tuple(Source) == MODELLED
    assert [int(s) for s in MODELLED] == [4, 5, 6, 7, 8, 9, 10]
