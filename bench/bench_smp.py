"""Interleavings of two CPUs per second, with and without the partial-order reduction.

    .venv/bin/python bench/bench_smp.py [--repeat N] [--max-switches N]

For each 2-CPU scenario in scenarios/smp/, on bare metal: the interleavings the
explorer runs with choice points only where the CPUs interact (check/interleave.py),
and with a choice point at every step (the naive search), each timed in process CPU
time (best of `--repeat`), with the distinct outcomes each found (they must agree).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvmodel.check.interleave import explore_interleavings
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
        for reduce in (True, False):
            times = []
            for _ in range(args.repeat):
                start = time.process_time()
                found = explore_interleavings(scenario, args.max_switches, reduce=reduce)
                times.append(time.process_time() - start)
            best = min(times)
            name = "reduced" if reduce else "naive"
            line.append(f"{name} {found.explored} interleavings, {len(found.outcomes)} outcomes, "
                        f"{best:.3f} s ({found.explored / best:,.0f}/s)")
        print("  ".join(line[:1]) + " " + "; ".join(line[1:]))


if __name__ == "__main__":
    main()
