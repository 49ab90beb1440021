"""Interleavings of two CPUs per second, with and without the partial-order reduction.

    .venv/bin/python bench/bench_smp.py [--repeat N] [--max-switches N]

For each 2-CPU scenario in scenarios/smp/, on bare metal: the interleavings the
explorer runs with choice points only where the CPUs interact (check/interleave.py),
and with a choice point at every step (the naive search), each timed in process CPU
time (best of `--repeat`), with the distinct outcomes each found (they must agree);
then the reduced search under KVM on SVM (vCPU threads, KVM's steps interleaved too).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvmodel.check.interleave import explore_interleavings
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-switches", type=int, default=2)
    args = parser.parse_args()
    for path in sorted((ROOT / "scenarios" / "smp").glob("*.toml")):
        scenario = load(path)
        explore_interleavings(scenario, 0)  # warm the assembler cache
        line = [f"{path.stem}:"]
        for name, reduce, vendor in (("reduced", True, Vendor.BARE), ("naive", False, Vendor.BARE),
                                     ("under KVM (svm), reduced", True, Vendor.SVM)):
            times = []
            for _ in range(args.repeat):
                start = time.process_time()
                found = explore_interleavings(scenario, args.max_switches, reduce=reduce,
                                              vendor=vendor)
                times.append(time.process_time() - start)
            best = min(times)
            line.append(f"{name} {found.explored} interleavings, {len(found.outcomes)} outcomes, "
                        f"{best:.3f} s ({found.explored / best:,.0f}/s)")
        print("  ".join(line[:1]) + " " + "; ".join(line[1:]))


if __name__ == "__main__":
    main()
