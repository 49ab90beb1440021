"""The same run as one JSON document (schema version 1)."""

from __future__ import annotations

from kvmodel.arch.observe import Delivery, Iret, Observation, to_dict
from kvmodel.guest.asm import Program
from kvmodel.scenario.runner import RunResult

JSON_SCHEMA = 1


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
        "verdict": {
            "passed": result.passed,
            "mismatches": [{"line": m.line, "message": m.message} for m in result.mismatches],
            "model_limit": result.limit,
        },
    }


def document(results: list[RunResult], errors: list[dict]) -> dict:
    return {"schema": JSON_SCHEMA, "results": [result_dict(r) for r in results],
            "errors": errors}
