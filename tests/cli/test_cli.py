"""The `kvmodel` command: exit codes, messages, JSON."""

import json
import re
import shutil
from pathlib import Path

import pytest

from kvmodel.cli import Exit, main

ARCH = Path(__file__).parents[2] / "scenarios" / "arch"
EXAMPLE = ARCH / "nmi_latched_until_iret.toml"


def test_shipped_example_passes_and_prints_its_trace(capsys):
    assert main(["run", str(EXAMPLE)]) == Exit.OK
    out = capsys.readouterr().out
    assert "NMI delivered (nmi) -> nmi_handler" in out
    assert "NMI arrives: dropped" in out
    assert "PASS" in out


def test_all_arch_scenarios_exit_zero(capsys):
    assert main(["run", *map(str, sorted(ARCH.glob("*.toml")))]) == Exit.OK


def test_broken_expectation_exits_one_naming_the_delivery(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    text = EXAMPLE.read_text().replace('return = "main+1"\nretired = 6', 'return = "main+1"\nretired = 7')
    assert text != EXAMPLE.read_text()
    broken.write_text(text)
    assert main(["run", str(broken)]) == Exit.FAILED
    out = capsys.readouterr().out
    line = text.splitlines().index('retired = 7') - 3  # the [[expect.delivery]] header
    assert re.search(rf"FAIL {re.escape(str(broken))}:{line}: delivery 2: expected after 7 "
                     r"retired, got 6 \(got NMI \(nmi\) returning to main\+0x1", out)


def test_malformed_file_exits_two_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('[idt]\nNMI = "nmi_handler"', '[idt]\nNMI = 5 5'))
    assert main(["run", str(bad)]) == Exit.BAD_INPUT
    assert re.search(rf"error: {re.escape(str(bad))}:\d+: not valid TOML", capsys.readouterr().out)


def test_unknown_label_exits_two(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('NMI = "nmi_handler"', 'NMI = "nmi_handlr"'))
    assert main(["run", str(bad)]) == Exit.BAD_INPUT
    out = capsys.readouterr().out
    assert 'unknown label "nmi_handlr"' in out and "nmi_handler" in out


def test_instruction_outside_the_subset_is_named_with_its_address(tmp_path, capsys):
    text = EXAMPLE.read_text().replace("    mov $0, %rbx\n", "    mov $0, %rbx\n    cmc\n")
    bad = tmp_path / "cmc.toml"
    bad.write_text(text)
    assert main(["run", str(bad)]) == Exit.BAD_INPUT
    assert "MODEL LIMIT instruction outside the modelled subset: 'cmc' at 0x10007" in (
        capsys.readouterr().out)


def test_json_document(capsys):
    assert main(["run", "--json", str(EXAMPLE)]) == Exit.OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == 1
    result = doc["results"][0]
    assert result["verdict"] == {"passed": True, "mismatches": [], "model_limit": None}
    deliveries = [e for e in result["trace"] if e["kind"] == "delivery"]
    assert [(d["vector"], d["type"], d["error_code"], d["return_where"], d["retired"])
            for d in deliveries] == [(2, "nmi", None, "main+0x1", 2), (2, "nmi", None, "main+0x1", 6)]
    assert result["final"]["rbx"] == 2 and result["final"]["halted"] is True


def test_instructions_flag_lists_retired_instructions(capsys):
    main(["run", "--instructions", str(EXAMPLE)])
    assert "inc %rbx" in capsys.readouterr().out


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out and "SCENARIO" in out


def test_missing_gnu_as_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("KVMODEL_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert shutil.which("as") is None
    text = EXAMPLE.read_text().replace("nop\n    nop\n    iretq", "nop\n    nop\n    nop\n    iretq")
    fresh = tmp_path / "fresh.toml"
    fresh.write_text(text)
    assert main(["run", str(fresh)]) == Exit.BAD_INPUT
    assert "apt-get install binutils" in capsys.readouterr().out
