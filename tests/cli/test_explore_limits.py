"""Interrupts and limits lose nothing and claim nothing: SIGINT/SIGTERM end every worker and
print the summary so far (a valid JSON document with --json), replay files stay, exit 130/143;
--time-limit bounds the whole command; bounds that allow nothing and unreadable files are bad
input, and the other files still run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from kvmodel.check.replay import read
from kvmodel.cli import Exit, main
from kvmodel.report.json import json_schema

ROOT = Path(__file__).parents[2]
SCENARIOS = ROOT / "scenarios"
SLOW = SCENARIOS / "virt" / "explore_nmi_with_host_faults.toml"  # seconds per vendor
QUICK = SCENARIOS / "virt" / "nmi_wakes_hlt.toml"
BUGGY = SCENARIOS / "virt" / "int3_code_breakpoint_host_fault.toml"  # svm_retry_soft_exception


def valid(doc: dict, command: str) -> dict:
    Draft202012Validator(json_schema(command)).validate(doc)
    return doc


def _kvmodel(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "kvmodel", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_for_workers(proc: subprocess.Popen, n: int) -> list[int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        children = _children(proc.pid)
        if len(children) >= n:
            return children
        time.sleep(0.05)
    raise AssertionError("the workers did not start")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, Exit.TERMINATED),
                                           (signal.SIGINT, Exit.INTERRUPTED)])
def test_a_signal_ends_every_worker_and_prints_the_summary_so_far(tmp_path, sig, code):
    proc = _kvmodel("explore", "--workers", "2", "--max-async", "3", "--out", str(tmp_path),
                    str(SLOW), str(SLOW))
    workers = _wait_for_workers(proc, 2)
    time.sleep(0.5)  # into the search
    start = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == code, err
    assert time.monotonic() - start < 10
    assert not any(_alive(w) for w in workers), "a worker outlived the command"
    assert "Traceback" not in err and f"interrupted: {sig.name} after 0 of 4" in err
    last = out.rstrip().splitlines()[-1]
    assert "no counterexample" not in out
    assert last.startswith(f"interrupted by {sig.name} after 0 of 4 explorations"), last


def test_an_interrupt_with_json_prints_a_valid_document_and_keeps_the_replays(tmp_path):
    # One worker: BUGGY is explored and its replay written, then SLOW is interrupted.
    proc = _kvmodel("explore", "--json", "--vendor", "svm", "--bug", "svm_retry_soft_exception",
                    "--max-async", "3", "--out", str(tmp_path), str(BUGGY), str(SLOW))
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == Exit.TERMINATED, err
    doc = valid(json.loads(out), "explore")  # stdout is the document and nothing else
    assert doc["interrupted"] == "SIGTERM" and doc["complete"] is False
    first, *rest = doc["explored"]  # the second, if the signal came once it had started
    assert first["findings"] and first["complete"] and not first["interrupted"]
    assert all(r["interrupted"] and not r["complete"] for r in rest) and len(rest) <= 1
    replay, = tmp_path.glob("*.json")
    assert first["findings"][0]["replay"] == str(replay)
    assert read(replay).bugs == {"svm_retry_soft_exception"}  # whole, and still valid
    assert not list(tmp_path.glob(".*.partial"))


def test_the_time_limit_bounds_the_whole_command_and_is_not_a_clean_exit(tmp_path, capsys):
    start = time.monotonic()
    code = main(["explore", "--time-limit", "1", "--max-async", "3", "--out", str(tmp_path),
                 str(SLOW), str(SLOW), str(SLOW)])
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    assert code == Exit.INCOMPLETE, out
    assert elapsed < 4  # not a second per scenario and vendor (six of them)
    assert "the time limit ended the search before the bounds were covered" in out
    assert "no counterexample" not in out


def test_a_time_limit_that_covers_everything_is_a_clean_exit(tmp_path, capsys):
    assert main(["explore", "--time-limit", "600", "--out", str(tmp_path), str(QUICK)]) == Exit.OK
    assert "no counterexample within the bounds" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--max-async", "-1"], ["--max-host", "-3"], ["--max-vmm", "-1"],
                                  ["--time-limit", "0"], ["--time-limit", "-1"],
                                  ["--time-limit", "nan"], ["--workers", "0"]])
def test_bounds_that_allow_nothing_are_bad_input(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as e:
        main(["explore", *args, "--out", str(tmp_path), str(QUICK)])
    assert e.value.code == Exit.BAD_INPUT
    assert args[0] in capsys.readouterr().err


def test_bounds_that_allow_nothing_are_refused_by_the_api_too():
    from kvmodel.check.explore import Bounds, explore
    from kvmodel.errors import KvmodelError
    from kvmodel.kvm.vcpu import Vendor
    from kvmodel.scenario.load import load

    with pytest.raises(KvmodelError, match="max-async -1 allows no schedule"):
        explore(load(QUICK), Vendor.SVM, Bounds(max_async=-1))
    with pytest.raises(KvmodelError, match="time limit 0 allows no schedule"):
        explore(load(QUICK), Vendor.SVM, time_limit=0)


def test_one_bad_file_among_many_is_reported_and_the_others_still_run(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("title = 5 5\n")
    unlabelled = tmp_path / "unlabelled.toml"  # fails later, at the first run
    unlabelled.write_text(QUICK.read_text().replace('NMI = "nmi_handler"', 'NMI = "no_such"'))
    assert unlabelled.read_text() != QUICK.read_text()
    missing = tmp_path / "missing.toml"
    args = ["explore", "--out", str(tmp_path / "out"), str(bad), str(QUICK), str(unlabelled),
            str(missing)]
    assert main(args) == Exit.BAD_INPUT
    out, err = capsys.readouterr()
    assert err.count(f"error: {bad}:1: not valid TOML") == 1  # once, not once per vendor
    assert err.count("no_such") == 1
    assert err.count(f"{missing}: no such scenario file or directory") == 1
    assert out.count("nmi_wakes_hlt") >= 2  # explored on both vendors
    assert "3 scenario files could not be explored (errors above); in what was explored, no finding" in out
    assert "no counterexample" not in out
    assert main(["explore", "--json", *args[1:]]) == Exit.BAD_INPUT
    doc = valid(json.loads(capsys.readouterr().out), "explore")
    assert [e["path"] for e in doc["errors"]] == [str(missing)] * 2 + [str(bad)] * 2 + [
        str(unlabelled)] * 2
    assert [e["vendor"] for e in doc["explored"]] == ["svm", "vmx"]


def test_a_model_limit_is_reported_as_not_explored_and_exit_two(tmp_path, capsys):
    cmc = tmp_path / "cmc.toml"
    cmc.write_text("title = 'cmc'\n[guest]\ncode = '''\nstart:\n    cmc\n    hlt\n'''\n")
    assert main(["explore", "--out", str(tmp_path / "out"), str(cmc), str(QUICK)]) == Exit.BAD_INPUT
    out = capsys.readouterr().out
    assert f"MODEL LIMIT {cmc} [svm]: not explored" in out and "no counterexample" not in out
