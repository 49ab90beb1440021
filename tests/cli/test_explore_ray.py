"""`kvmodel explore --engine ray`: the same findings, outcomes, summary and replay files as one
worker and as worker processes, on a local Ray instance of 2 CPUs; a signal still ends every
process (Ray's too) with the summary so far; without Ray installed, exit 2 saying how to get it."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmodel.check.campaign import explore_all
from kvmodel.check.engine import RAY_MISSING, Engine, EngineKind
from kvmodel.check.explore import Bounds, explore
from kvmodel.cli import Exit, main
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load

ROOT = Path(__file__).parents[2]
SCENARIOS = [ROOT / "scenarios" / p for p in (
    "virt/nmi_wakes_hlt.toml", "virt/nmi_and_interrupt_together.toml",
    "softint/int_n_code_breakpoint.toml",  # declared findings, written too with known=True
    "vnmi/two_nmis_in_sti_shadow.toml", "virt/save_restore_nmi_injected.toml")]
# Catalogued bugs (kvmodel bugs list) with the shipped scenario that finds each, both vendors.
BUGS = {"svm_retry_soft_exception": ROOT / "scenarios/virt/int3_code_breakpoint_host_fault.toml",
        "notify_no_nmi_reblock": ROOT / "scenarios/notify/nmi_iret_interrupted.toml"}
SLOW = ROOT / "scenarios" / "virt" / "explore_nmi_with_host_faults.toml"  # seconds per vendor
RAY = Engine(EngineKind.RAY, workers=2)
VENDORS = (Vendor.SVM, Vendor.VMX)

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'kvmodel[ray]', "
                                                   "as .ci/run does): --engine ray is not tested")


@pytest.fixture(scope="module")
def local_ray():
    """One local instance for the module (starting one takes seconds); the engine uses it as
    it finds it. ray.init() sets its own SIGTERM handler: the test process keeps its own."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             object_store_memory=100 * 2**20)
    for s, handler in handlers.items():
        signal.signal(s, handler)
    yield ray
    ray.shutdown()


def _campaign(paths, engine, out: Path, bugs=frozenset()) -> tuple[list, dict[str, bytes]]:
    """Everything explore_all() reports but the time taken, replays named by file name only."""
    items = explore_all(paths, VENDORS, Bounds(), engine=engine, bugs=bugs, out_dir=out, known=True)
    seen = []
    for item in items:
        r = item.result
        shrunk = [(f, Path(p).name) for f, p in item.shrunk + item.known]
        seen.append((item.path, item.vendor, item.error, r.schedules, sorted(r.outcomes), r.findings,
                     r.known, r.unseen_known, r.model_limits, r.limit, r.complete, shrunk))
    return seen, {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _identical(paths, tmp_path, bugs=frozenset()):
    one, one_files = _campaign(paths, Engine(), tmp_path / "one", bugs)
    for name, engine in (("ray", RAY), ("processes", Engine(workers=2))):
        other, other_files = _campaign(paths, engine, tmp_path / name, bugs)
        assert other == one, name
        assert other_files == one_files, name  # replay files byte for byte
    return one, one_files


# Before the module's own instance: this command starts (and ends) one of its own.
@needs_ray
def test_a_signal_under_ray_ends_every_ray_process_and_prints_the_summary_so_far(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "kvmodel", "explore", "--engine", "ray",
                             "--workers", "2", "--max-async", "3", "--out", str(tmp_path), str(SLOW),
                             str(SLOW)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not any(_command(p).startswith("ray::_run_in") for p in _descendants(proc.pid)):
        assert time.monotonic() < deadline and proc.poll() is None, "no Ray task started"
        time.sleep(0.1)
    time.sleep(0.5)  # into the search
    processes = _descendants(proc.pid)  # Ray's GCS server, raylet, agents and workers
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == Exit.TERMINATED, err
    assert time.monotonic() - start < 15
    assert not any(_alive(p) for p in processes), "a Ray process outlived the command"
    assert "Traceback" not in err and "interrupted: SIGTERM after 0 of 4" in err
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM after 0 of 4 explorations"), last


def _stat(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return ["X", "0"]


def _command(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    return _stat(pid)[0] not in ("Z", "X")


def _descendants(pid: int) -> list[int]:
    everyone = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    parent = {p: int(_stat(p)[1]) for p in everyone}
    out, todo = [], [pid]
    while todo:
        of = todo.pop()
        children = [p for p, up in parent.items() if up == of]
        out += children
        todo += children
    return out


@needs_ray
def test_ray_finds_what_one_worker_finds_on_shipped_scenarios(tmp_path, local_ray):
    one, files = _identical(SCENARIOS, tmp_path)
    assert len(one) == 2 * len(SCENARIOS) and files  # the declared findings' replays
    assert all(schedules > 40 for _, _, _, schedules, *_ in one)


@needs_ray
def test_ray_finds_catalogued_bugs_as_one_worker_does(tmp_path, local_ray):
    one, files = _identical(list(BUGS.values()), tmp_path, frozenset(BUGS))
    found = {(path, vendor) for path, vendor, _, _, _, findings, *_ in one if findings}
    assert found == {(str(BUGS["svm_retry_soft_exception"]), Vendor.SVM),
                     (str(BUGS["notify_no_nmi_reblock"]), Vendor.VMX)}
    assert any("-svm-" in name for name in files) and any("-vmx-" in name for name in files)


@needs_ray
def test_schedule_chunks_on_ray_give_what_one_process_gives(local_ray):
    scenario, bounds, bugs = load(SLOW), Bounds(max_async=1, max_host=1), frozenset({"no_reinjection"})
    for vendor in VENDORS:
        one = explore(scenario, vendor, bounds, bugs=bugs)
        chunked = explore(scenario, vendor, bounds, bugs=bugs, engine=RAY)
        assert (chunked.schedules, chunked.outcomes, chunked.findings, chunked.known) == (
            one.schedules, one.outcomes, one.findings, one.known)
        assert one.schedules > 100 and one.findings


@needs_ray
def test_the_cli_summary_under_ray_is_the_one_workers_give(tmp_path, capsys, local_ray):
    bug = "svm_retry_soft_exception"
    docs = {}
    for name, engine in (("one", []), ("ray", ["--engine", "ray", "--workers", "2"])):
        code = main(["explore", "--json", "--bug", bug, *engine, "--out", str(tmp_path / name),
                     str(SCENARIOS[0]), str(BUGS[bug])])
        assert code == Exit.FAILED
        docs[name] = json.loads(capsys.readouterr().out)
        for item in docs[name]["explored"]:
            del item["elapsed_s"]
            for f in item["findings"]:
                f["replay"] = Path(f["replay"]).name
    assert docs["ray"] == docs["one"]


@needs_ray
def test_the_time_limit_under_ray_bounds_the_whole_command(tmp_path, capsys, local_ray):
    start = time.monotonic()
    code = main(["explore", "--engine", "ray", "--time-limit", "1", "--max-async", "3",
                 "--out", str(tmp_path), str(SLOW), str(SLOW), str(SLOW)])
    assert code == Exit.INCOMPLETE
    assert time.monotonic() - start < 5
    assert "the time limit ended the search before the bounds were covered" in capsys.readouterr().out


def test_engine_ray_without_ray_is_bad_input_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: import fails
    assert main(["explore", "--engine", "ray", "--out", str(tmp_path), str(SCENARIOS[0])]) == Exit.BAD_INPUT
    err = capsys.readouterr().err
    assert RAY_MISSING in err and "pip install 'kvmodel[ray]'" in err
    assert not list(tmp_path.iterdir())


def test_an_address_without_engine_ray_is_bad_input(tmp_path, capsys):
    assert main(["explore", "--address", "auto", "--out", str(tmp_path), str(SCENARIOS[0])]) == Exit.BAD_INPUT
    assert "--address" in capsys.readouterr().err


@needs_ray
def test_a_signal_while_ray_starts_waits_for_it_then_reaches_the_callers_handler():
    """ray.init() cut short crashed the process at exit, and it sets a SIGTERM handler of its
    own (sys.exit): the signal waits, and then it is the caller's handler that gets it."""
    from kvmodel.check.engine import _signals_held

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), _signals_held(ray):
            ray._private.utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # delivered here, and held
        assert signal.getsignal(signal.SIGTERM) is interrupt
    finally:
        signal.signal(signal.SIGTERM, before)
