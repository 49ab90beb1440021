"""Explorer throughput.

    .venv/bin/python bench/bench_explore.py [--skip-suite] [--skip-ray] [--bound3] [--repeat N]

1. Schedules per second on one core for bench/explore20.toml (about 20 guest
   instructions, one NMI and one interrupt placed anywhere, no host choices), per
   vendor, and for nested scenarios (NESTED: an L1 on the hardware model runs an L2
   that ends each stage with VMCALL; host interrupts and save/restores placed too; and
   SLOW_NESTED, among the suite's slowest), each with runs under KVM resumed from a
   shorter schedule's copies (check/resume.py, the default) and with --from-reset. Every
   schedule is a KVM run plus a (shared) bare-metal run. The figure is the best of
   `--repeat` searches, timed in process CPU time, so other work on the machine moves
   it less; "copies" are the trunks' copies taken and the runs resumed from them.
2. Wall time and schedules/s of `kvmodel explore --vendor both` on bench/explore20.toml
   (no host choices) and on the shipped suite (scenarios/, default bounds; with
   `--bound3` also at --max-async 3 --max-host 3), with 1 and 2
   worker processes and with `--engine ray` on a local instance of 2 CPUs (its start-up
   included: the command starts and ends it); the time Ray takes to start and stop on its
   own is printed beside. The unit of work is one scenario on one vendor, so explore20 has
   two units: one per worker. For the suite, the scenarios that took longest are listed
   with their rate: what limits the figure.
3. explore20's schedules sharded in chunks (the API's explore(..., engine=...)): 2 worker
   processes and 2 Ray CPUs (Ray started before the clock, the processes' start-up counted).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from kvmodel.check import resume
from kvmodel.check.engine import Engine, EngineKind
from kvmodel.check.explore import Bounds, explore
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load

ROOT = Path(__file__).parents[1]


NESTED = ROOT / "scenarios" / "nested" / "vmx_l2_vmcall_exits_to_l1.toml"
SLOW_NESTED = [ROOT / "scenarios" / "nested" / name for name in (
    "vmx_vmlaunch_invalid_event_injection.toml", "vmx_l1_injects_int3_without_instruction.toml")]


class Counting:
    """Counts the copies trunks take and the runs resumed from them (check/resume.py)."""

    def __enter__(self) -> Counting:
        self.copies = self.resumed = 0
        self.watch, self.resume = resume.Trunk.watch, resume.Resumer._resume
        counting = self

        def watch(trunk, session):
            counting.copies += 1
            return counting.watch(trunk, session)

        def resumed(resumer, *args):
            counting.resumed += 1
            return counting.resume(resumer, *args)

        resume.Trunk.watch, resume.Resumer._resume = watch, resumed
        return self

    def __exit__(self, *exc) -> None:
        resume.Trunk.watch, resume.Resumer._resume = self.watch, self.resume


def one_core(repeat: int) -> None:
    explore20 = load(ROOT / "bench" / "explore20.toml")
    explore(explore20, Vendor.VMX, Bounds(max_host=0))  # warm the assembler cache
    cases = [("explore20", explore20, Vendor.SVM, Bounds(max_host=0)),
             ("explore20", explore20, Vendor.VMX, Bounds(max_host=0)),
             (NESTED.stem, load(NESTED), Vendor.VMX, Bounds())]
    cases += [(path.stem, load(path), Vendor.VMX, Bounds()) for path in SLOW_NESTED]
    for name, scenario, vendor, bounds in cases:
        runs = 1 if scenario.path in map(str, SLOW_NESTED) else repeat  # these take seconds
        for from_reset in (False, True):
            times = []
            for _ in range(runs):
                start = time.process_time()
                with Counting() as counted:
                    result = explore(scenario, vendor, bounds, from_reset=from_reset)
                times.append(time.process_time() - start)
            best = min(times)
            how = "from reset" if from_reset else (f"resumed ({counted.copies:,} copies, "
                                                    f"{counted.resumed:,} runs resumed)")
            print(f"{name} on {vendor.value}, {how}: {result.schedules:,} schedules, "
                  f"{result.distinct} distinct outcomes in {best:.3f} s (best of {runs}): "
                  f"{result.schedules / best:,.0f} schedules/s")


ENGINES = {"1 worker": ["--workers", "1"], "2 worker processes": ["--workers", "2"],
           "2 worker processes, --from-reset": ["--workers", "2", "--from-reset"],
           "Ray, 2 local CPUs": ["--engine", "ray", "--workers", "2"]}
TARGETS = {"explore20": [str(ROOT / "bench" / "explore20.toml"), "--max-host", "0"],
           "shipped suite": [str(ROOT / "scenarios")],
           "shipped suite at bound 3": ["--max-async", "3", "--max-host", "3", str(ROOT / "scenarios")]}
SLOWEST = 5  # scenarios listed per suite run


def command(target: list[str], engine: list[str]) -> tuple[float, int]:
    """Wall time of one `kvmodel explore --json` and the schedules it ran; for a run of
    several scenarios, the slowest are printed."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kvmodel", "explore", "--json", "--vendor", "both",
                           *engine, "--out", "/tmp/kvmodel-bench-findings", *target],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"kvmodel explore exited {done.returncode}: {done.stderr}")
    explored = json.loads(done.stdout)["explored"]
    if len(explored) > 2:
        for item in sorted(explored, key=lambda i: -i["elapsed_s"])[:SLOWEST]:
            rate = item["schedules"] / max(item["elapsed_s"], 1e-6)
            print(f"    {item['elapsed_s']:6.2f} s  {item['schedules']:7,} schedules "
                  f"({rate:6,.0f}/s, {item['distinct_outcomes']} distinct)  "
                  f"{item['vendor']} {Path(item['scenario']).relative_to(ROOT / 'scenarios')}")
    return elapsed, sum(item["schedules"] for item in explored)


def ray_start_stop() -> float:
    """A local Ray instance of 2 CPUs started and shut down, as `--engine ray` does."""
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False, object_store_memory=100 * 2**20)
    ray.shutdown()
    return time.perf_counter() - start


def commands(targets: list[str], engines: list[str]) -> None:
    for name in targets:
        for engine in engines:
            elapsed, schedules = command(TARGETS[name], ENGINES[engine])
            print(f"{name}, both vendors, {engine}: {schedules:,} schedules in {elapsed:.1f} s: "
                  f"{schedules / elapsed:,.0f} schedules/s")


def chunks(with_ray: bool) -> None:
    scenario = load(ROOT / "bench" / "explore20.toml")
    engines = {"2 worker processes": Engine(workers=2)}
    if with_ray:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False, object_store_memory=100 * 2**20)
        engines["Ray, 2 local CPUs"] = Engine(EngineKind.RAY, 2)
    try:
        for name, engine in engines.items():
            start, schedules = time.perf_counter(), 0
            for vendor in (Vendor.SVM, Vendor.VMX):
                schedules += explore(scenario, vendor, Bounds(max_host=0), engine=engine).schedules
            elapsed = time.perf_counter() - start
            print(f"explore20 in chunks of schedules, {name}: {schedules:,} schedules in "
                  f"{elapsed:.2f} s: {schedules / elapsed:,.0f} schedules/s")
    finally:
        if with_ray:
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-suite", action="store_true")
    parser.add_argument("--skip-ray", action="store_true", help="also skipped without Ray installed")
    parser.add_argument("--bound3", action="store_true",
                        help="also the suite at --max-async 3 --max-host 3 (minutes)")
    parser.add_argument("--repeat", type=int, default=5, metavar="N")
    args = parser.parse_args()
    with_ray = not args.skip_ray
    if with_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("Ray is not installed (pip install 'kvmodel[ray]'): no --engine ray figures")
            with_ray = False
    one_core(args.repeat)
    engines = [name for name in ENGINES if with_ray or not name.startswith("Ray")]
    if with_ray:
        print(f"a local Ray instance of 2 CPUs started and shut down: {ray_start_stop():.1f} s")
    suites = [] if args.skip_suite else ["shipped suite"] + (
        ["shipped suite at bound 3"] if args.bound3 else [])
    commands(["explore20"] + suites, engines)
    chunks(with_ray)


if __name__ == "__main__":
    main()
