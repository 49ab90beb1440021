"""Mutated shipped scenarios through `kvmodel run`: a verdict or file:line, never a crash or a hang.

The mutations (scenario_fuzz.py): byte flips, truncations, type swaps, huge and
negative numbers, tables written as arrays of tables and back, deep nesting,
long strings, unicode and binary junk, hostile and bad assembly, thousands of
happenings. A longer campaign: `python tests/unit/scenario/scenario_fuzz.py`.
"""

import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenario_fuzz import MUTATIONS, SCENARIOS, fuzz_once

SURVIVABLE = ("verdict", "refused", "limit")  # exit 0/1; exit 2 with file:line or a model limit


def check_one(seed: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kvmodel-fuzz-") as tmp:
        outcome, source, applied = fuzz_once(random.Random(seed), Path(tmp), seconds=30)
        assert outcome.kind in SURVIVABLE, (
            f"{source} with {', '.join(applied)}: {outcome.kind} (exit {outcome.code})\n"
            f"{outcome.detail}\n--- input ---\n{(Path(tmp) / 'fuzzed.toml').read_bytes()[:3000]!r}")


def test_the_fuzzer_has_material():
    assert len(SCENARIOS) > 100 and len({m.__name__ for m in MUTATIONS}) >= 14


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_mutated_scenarios_end_in_a_verdict_or_a_located_error(seed):
    check_one(seed)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_mutated_scenarios_at_length(seed):
    check_one(seed)
