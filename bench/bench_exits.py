"""VM exits handled per second under the KVM model, on one core.

    .venv/bin/python bench/bench_exits.py [--repeat N]

Runs scenarios/virt/nmi_window_second_nmi_waits_for_iret.toml and
scenarios/virt/host_fault_stack_during_nmi.toml under SVM and under VMX,
many times each (assembly cached, before timing), and prints exits and
complete KVM runs per second. An explorer run is made of such runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.load import load
from kvmodel.scenario.runner import run

ROOT = Path(__file__).parents[1] / "scenarios" / "virt"
SCENARIOS = ("nmi_window_second_nmi_waits_for_iret.toml", "host_fault_stack_during_nmi.toml")


def measure(vendor: Vendor, rounds: int) -> tuple[int, int, float]:
    scenarios = [load(ROOT / name) for name in SCENARIOS]
    for s in scenarios:
        run(s, vendor=vendor)  # warm the assembler cache
    exits = runs = 0
    start = time.perf_counter()
    for _ in range(rounds):
        for s in scenarios:
            result = run(s, vendor=vendor)
            exits += sum(st.exits for st in result.stats)
            runs += 1
    return exits, runs, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    for vendor in (Vendor.SVM, Vendor.VMX):
        exits, runs, elapsed = measure(vendor, args.rounds)
        print(f"{vendor.value}: {runs} runs, {exits} exits in {elapsed:.2f} s: "
              f"{exits / elapsed:,.0f} exits/s, {runs / elapsed:,.0f} runs/s")


if __name__ == "__main__":
    main()
