"""Guest instructions retired per second on one core, for the bare-metal model.

    .venv/bin/python bench/bench_retire.py [--repeat N]

Runs bench/loop.toml (a 2-million-instruction loop with one interrupt) and
prints the best of N runs. Assembly happens once, before timing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvmodel.scenario.load import load
from kvmodel.scenario.runner import prepare

SCENARIO = Path(__file__).with_name("loop.toml")


def measure() -> tuple[int, float]:
    scenario = load(SCENARIO)
    cpu, _ = prepare(scenario)
    start = time.perf_counter()
    cpu.run(scenario.max_steps)
    elapsed = time.perf_counter() - start
    return cpu.retired, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    measure()  # warm the assembler cache
    best = min((measure() for _ in range(args.repeat)), key=lambda r: r[1])
    retired, elapsed = best
    print(f"{retired} instructions in {elapsed:.3f} s: {retired / elapsed:,.0f} retired/s")


if __name__ == "__main__":
    main()
