"""Explorer throughput.

    .venv/bin/python bench/bench_explore.py [--skip-suite] [--repeat N]

1. Schedules per second on one core for bench/explore20.toml (about 20 guest
   instructions, one NMI and one interrupt placed anywhere, no host choices), per
   vendor. Every schedule is a complete KVM run plus a (shared) bare-metal run.
   The search takes a fifth of a second: the figure is the best of `--repeat`
   searches, timed in process CPU time, so other work on the machine moves it less.
2. Wall time of `kvmodel explore --vendor both scenarios/` at the default bounds
   with 1 and 2 worker processes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from kvmodel.check.explore import Bounds, explore
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load

ROOT = Path(__file__).parents[1]


def one_core(repeat: int) -> None:
    scenario = load(ROOT / "bench" / "explore20.toml")
    explore(scenario, Vendor.VMX, Bounds(max_host=0))  # warm the assembler cache
    for vendor in (Vendor.SVM, Vendor.VMX):
        times = []
        for _ in range(repeat):
            start = time.process_time()
            result = explore(scenario, vendor, Bounds(max_host=0))
            times.append(time.process_time() - start)
        best = min(times)
        print(f"{vendor.value}: {result.schedules} schedules, {result.distinct} distinct outcomes "
              f"in {best:.3f} s (best of {repeat}): {result.schedules / best:,.0f} schedules/s")


def suite(workers: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kvmodel", "explore", "--vendor", "both", "--workers",
                    str(workers), "--out", "/tmp/kvmodel-bench-findings", str(ROOT / "scenarios")],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-suite", action="store_true")
    parser.add_argument("--repeat", type=int, default=5, metavar="N")
    args = parser.parse_args()
    one_core(args.repeat)
    if not args.skip_suite:
        for workers in (1, 2):
            print(f"all shipped scenarios, both vendors, {workers} worker(s): {suite(workers):.1f} s")


if __name__ == "__main__":
    main()
