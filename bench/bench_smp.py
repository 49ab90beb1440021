"""Interleavings of two CPUs per second, with and without the partial-order reduction.

    .venv/bin/python bench/bench_smp.py [--repeat N] [--max-switches N] [--naive-seconds S] [NAME...]

For each 2-CPU scenario in scenarios/smp/ (or those whose name contains one of the NAMEs),
on bare metal and under KVM (on VMX for an L1 that uses VMX, else on SVM): the
interleavings (schedules) the explorer runs with choice points only where the CPUs
interact (check/interleave.py), and with a choice point at every step (the naive search),
each timed in process CPU time (best of `--repeat`), with the distinct outcomes (end
states) each found. A naive search still running after `--naive-seconds` is cut there
and its count shown as "over N". The last lines add the counts up.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvmodel.check.interleave import explore_interleavings
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load

ROOT = Path(__file__).parents[1]
SEARCHES = (("bare metal", Vendor.BARE), ("under KVM", None))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-switches", type=int, default=2)
    parser.add_argument("--naive-seconds", type=float, default=30.0)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    totals: dict[tuple[str, bool], list[float]] = {}
    for path in sorted((ROOT / "scenarios" / "smp").glob("*.toml")):
        if args.names and not any(name in path.stem for name in args.names):
            continue
        scenario = load(path)
        kvm = Vendor.VMX if scenario.vmx else Vendor.SVM
        explore_interleavings(scenario, 0)  # warm the assembler cache
        print(f"{path.stem}:")
        for where, vendor in SEARCHES:
            vendor = vendor or kvm
            label = where if vendor is Vendor.BARE else f"{where} ({vendor.value})"
            counts = []
            for reduce in (True, False):
                best, found = float("inf"), None
                for _ in range(args.repeat):
                    deadline = None if reduce else time.monotonic() + args.naive_seconds
                    start = time.process_time()
                    found = explore_interleavings(scenario, args.max_switches, deadline,
                                                  reduce=reduce, vendor=vendor)
                    best = min(best, time.process_time() - start)
                over = "" if found.complete else "over "
                name = "reduced" if reduce else "naive"
                counts.append(f"{name} {over}{found.explored} interleavings, "
                              f"{len(found.outcomes)} outcomes, {best:.3f} s "
                              f"({found.explored / best:,.0f}/s)")
                total = totals.setdefault((label.split(" (")[0], reduce), [0, 0.0])
                total[0] += found.explored
                total[1] += best
            print(f"  {label}: " + "; ".join(counts))
    for (where, reduce), (explored, seconds) in totals.items():
        name = "reduced" if reduce else "naive"
        print(f"total {where}, {name}: {explored:,.0f} interleavings in {seconds:.2f} s "
              f"({explored / seconds:,.0f}/s)")


if __name__ == "__main__":
    main()
