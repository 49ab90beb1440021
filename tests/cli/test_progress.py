"""Progress on a terminal (explore, bugs check), quiet when piped; tables never cut when piped."""

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from kvmodel import cli
from kvmodel.cli import Exit, main

SCENARIOS = Path(__file__).parents[2] / "scenarios"
QUICK = SCENARIOS / "virt" / "nmi_wakes_hlt.toml"
BUGGY = SCENARIOS / "virt" / "int3_code_breakpoint_host_fault.toml"


@pytest.fixture
def terminal(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(cli, "_console", lambda: Console(file=screen, force_terminal=True, width=160,
                                                         highlight=False, soft_wrap=True))
    return screen


def _plain(screen: io.StringIO) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())


def test_explore_shows_progress_on_a_terminal(terminal, tmp_path):
    assert main(["explore", "--vendor", "svm", "--bug", "svm_retry_soft_exception", "--out",
                 str(tmp_path), str(QUICK), str(BUGGY)]) == Exit.FAILED
    screen = _plain(terminal)
    assert re.search(r"exploring .* 2/2 170 schedules \([\d,]+/s\), 40 findings", screen), screen


def test_explore_is_quiet_when_piped(tmp_path, capsys):
    assert main(["explore", "--vendor", "svm", "--out", str(tmp_path), str(QUICK)]) == Exit.OK
    out = capsys.readouterr().out
    assert "exploring" not in out and "/s)" not in out and "\x1b" not in out


def test_bugs_check_shows_progress_on_a_terminal(terminal, tmp_path, monkeypatch):
    from kvmodel.bugs import catalogue

    monkeypatch.setattr(catalogue, "CATALOGUE", catalogue.CATALOGUE[:2])
    monkeypatch.setattr(cli, "CATALOGUE", catalogue.CATALOGUE)
    monkeypatch.setattr("kvmodel.bugs.check.CATALOGUE", catalogue.CATALOGUE)
    total = sum(len(b.vendors) for b in catalogue.CATALOGUE)
    assert main(["bugs", "check", "--out", str(tmp_path)]) == Exit.OK
    assert re.search(rf"checking bugs .* {total}/{total} {total} found", _plain(terminal))


def test_tables_are_not_cut_when_piped(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    long_name = tmp_path / ("a_scenario_with_a_rather_long_name_" * 3 + ".toml")
    long_name.write_text(QUICK.read_text())
    assert main(["explore", "--vendor", "svm", "--out", str(tmp_path / "out"), str(long_name)]) == Exit.OK
    out = capsys.readouterr().out
    assert "…" not in out and long_name.stem in out
    row = next(line for line in out.splitlines() if long_name.stem in line and "│" in line)
    assert re.search(r"│\s+\d+\.\d\d s\s+│", row)  # the time column whole
