"""The `kvmodel` command: argument parsing and outcome -> exit code, nothing else."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from enum import IntEnum

from rich.console import Console

from kvmodel import __version__
from kvmodel.check.oracle import compare
from kvmodel.errors import KvmodelError
from kvmodel.guest.asm import find_binutils
from kvmodel.kvm.vcpu import Vendor
from kvmodel.report.json import document
from kvmodel.report.text import print_comparison, print_result
from kvmodel.scenario.load import load
from kvmodel.scenario.runner import run


class Exit(IntEnum):
    """Exit codes (STYLE.md lesson 8)."""

    OK = 0  # every expectation holds
    FAILED = 1  # an expectation does not hold
    BAD_INPUT = 2  # malformed scenario, missing tool, or outside what the model covers
    MODEL_BUG = 4  # an internal error: probably a kvmodel bug


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmodel",
        description="An executable model of how KVM virtualizes x86 events, checked against "
                    "a bare-metal x86 model (Intel SDM / AMD APM).",
        epilog="Exit codes: 0 all expectations hold, 1 an expectation fails, 2 bad input "
               "(scenario error, missing GNU as, instruction outside the model), "
               "4 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"kvmodel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_p = sub.add_parser(
        "run", help="run scenarios on the bare-metal model and check their expectations",
        description="Run each scenario file (TOML) on the bare-metal x86 model, print its "
                    "trace (deliveries, IRETs, halts, arrivals of NMIs and interrupts) and "
                    "the verdict against the file's [expect] tables.",
    )
    run_p.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario .toml files")
    run_p.add_argument("--json", action="store_true",
                       help="print one JSON document instead of the text trace")
    run_p.add_argument("--instructions", action="store_true",
                       help="also list every retired instruction in the trace")
    run_p.add_argument("--max-steps", type=int, metavar="N",
                       help="override the scenario's step budget (instructions tried)")
    run_p.add_argument("--vendor", choices=[v.value for v in Vendor],
                       help="bare: the bare-metal model; svm/vmx: run under the KVM model on "
                            "AMD SVM / Intel VMX and compare what the guest sees with bare metal "
                            "(default: the scenario's [cpu] vendor, else bare)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    try:
        return _run(args, console)
    except KvmodelError as e:
        console.print(f"[bold red]error[/]: {e}", markup=True)
        return Exit.BAD_INPUT
    except Exception:  # noqa: BLE001 - report, save, and say it is ours
        with tempfile.NamedTemporaryFile("w", prefix="kvmodel-crash-", suffix=".txt",
                                         delete=False) as f:
            traceback.print_exc(file=f)
        print(f"internal error: this is probably a kvmodel bug; traceback saved to {f.name}",
              file=sys.stderr)
        return Exit.MODEL_BUG


def _run(args: argparse.Namespace, console: Console) -> int:
    find_binutils()  # say how to install GNU as before reading anything
    results, errors = [], []
    worst = Exit.OK
    for path in args.scenarios:
        try:
            scenario = load(path)
            vendor = Vendor(args.vendor or scenario.vendor)
            if vendor is Vendor.BARE:
                result = run(scenario, vendor=vendor, record_instructions=args.instructions,
                             max_steps=args.max_steps)
            else:
                result = compare(scenario, vendor, record_instructions=args.instructions,
                                 max_steps=args.max_steps)
        except KvmodelError as e:
            errors.append({"path": path, "error": str(e)})
            if not args.json:
                console.print(f"[bold red]error[/]: {e}", highlight=False)
            worst = max(worst, Exit.BAD_INPUT)
            continue
        results.append(result)
        if not args.json:
            (print_result if vendor is Vendor.BARE else print_comparison)(console, result)
        if _limit(result) is not None:
            worst = max(worst, Exit.BAD_INPUT)
        elif not result.passed:
            worst = max(worst, Exit.FAILED)
    if args.json:
        print(json.dumps(document(results, errors), indent=1))
    elif len(args.scenarios) > 1:
        passed = sum(r.passed for r in results)
        console.print(f"[bold]{passed}/{len(args.scenarios)}[/] scenarios pass")
    return worst




def _limit(result) -> str | None:
    """A model limit in either run stops the comparison: bad input, not a verdict."""
    if hasattr(result, "bare"):
        return result.bare.limit or (result.virt.limit if result.virt is not None else None)
    return result.limit
