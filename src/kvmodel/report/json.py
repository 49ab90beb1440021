"""The same run as one JSON document; its JSON Schema ships beside this file (schemas/)."""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import resources

from kvmodel.arch.observe import Delivery, Iret, Observation, to_dict
from kvmodel.check.oracle import Comparison
from kvmodel.guest.asm import Program
from kvmodel.scenario.runner import RunResult

SCHEMA_VERSION = 1  # of every --json document: changes when a field changes meaning or goes away


def json_schema(command: str) -> dict:
    """The JSON Schema of `command`'s --json document: "run" (also `replay`) or "explore"."""
    return json.loads(resources.files("kvmodel.report").joinpath(
        "schemas", f"{command}.schema.json").read_text())


def _entry(obs: Observation, program: Program) -> dict:
    d = to_dict(obs)
    if isinstance(obs, Delivery):
        d["return_where"] = program.where(obs.return_rip)
        d["handler_where"] = program.where(obs.handler)
    if isinstance(obs, Iret):
        d["to_where"] = program.where(obs.to_rip)
    return d


def result_dict(result: RunResult) -> dict:
    s = result.scenario
    final = None
    if result.final is not None:
        f = result.final
        final = {name: value for name, value in f.registers}
        final.update(rip=f.rip, rflags=f.rflags, cr2=f.cr2, dr6=f.dr6, dr7=f.dr7,
                     retired=f.retired, halted=f.halted, shutdown=f.shutdown,
                     nmi_blocked=f.nmi_blocked, stop=f.stop)
    return {
        "scenario": {"path": s.path, "title": s.title, "cite": s.cite, "mode": s.mode.name.lower()},
        "trace": [_entry(o, result.program) for o in result.trace],
        "final": final,
        **_several_cpus(result),
        "verdict": {
            "passed": result.passed,
            "mismatches": [{"line": m.line, "message": m.message} for m in result.mismatches],
            "model_limit": result.limit,
        },
    }


def comparison_dict(c: Comparison) -> dict:
    """A KVM run (its trace includes the VM exits and injections) and its verdict vs bare metal."""
    if c.virt is None:
        out = result_dict(c.bare)
        out["comparison"] = {"not_applicable": c.not_applicable, "passed": True}
        return out
    out = result_dict(c.virt)
    out["vendor"] = c.virt.vendor.value
    out["kvm_stats"] = [{k: getattr(st, k) for k in st.__slots__} for st in c.virt.stats]
    d = c.divergence
    out["comparison"] = {
        "passed": c.passed,
        "hypervisor_error": c.virt.hypervisor_error,
        "divergence": None if d is None else {
            "entry": d.event_index + 1 if d.index >= 0 else "final",
            "bare": d.bare if isinstance(d.bare, str) or d.bare is None else to_dict(d.bare),
            "virt": d.virt if isinstance(d.virt, str) or d.virt is None else to_dict(d.virt),
            "expected": c.divergence_expected,
        },
        "declared": None if c.known is None else asdict(c.known),
        "problems": c.problems,
    }
    return out


def document(results: list[RunResult | Comparison], errors: list[dict]) -> dict:
    return {"schema_version": SCHEMA_VERSION, "results": [
        comparison_dict(r) if isinstance(r, Comparison) else result_dict(r) for r in results],
        "errors": errors}


def _several_cpus(result: RunResult) -> dict:
    """[cpus]: the CPU of each trace entry and how the run was interleaved; nothing for one CPU."""
    if not result.cpu_of:
        return {}
    smp = result.smp
    return {"cpu_of": list(result.cpu_of),
            "interleaving": {"choice_points": len(smp.points), "steps": smp.steps}}
