"""Read and validate a scenario file; every error names file:line and what is allowed.

Nothing in a scenario file is executed on the host: the guest code goes to
GNU as and then only to the model.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

from kvmodel.arch.cpu import External
from kvmodel.arch.events import EventType, parse_vector, saved_ip_undefined
from kvmodel.arch.regs import GPR32, GPR64, Mode
from kvmodel.errors import ScenarioError
from kvmodel.guest.layout import CODE_BASE, DEFAULT_MEMORY, IDT_BASE, TSS_BASE, GateKind, gate_size
from kvmodel.scenario.locate import Locator
from kvmodel.scenario.schema import (
    Expected,
    ExpectedDelivery,
    ExpectedStats,
    ExploreSpec,
    Expr,
    FredSpec,
    GateSpec,
    Happening,
    HostEvent,
    HostHappening,
    KnownDivergence,
    KnownFinding,
    QemuDifference,
    Scenario,
    VmmStep,
)  # fmt: skip
from kvmodel.scenario.vmm import CALLS as VMM_CALLS
from kvmodel.scenario.vmm import CHOICE_NAMES as VMM_CHOICES
from kvmodel.scenario.vmm import EVENT_FIELDS, KVM_SET_VCPU_EVENTS

MODES = {"long64": Mode.LONG64, "protected32": Mode.PROTECTED32}
EVENT_TYPES = {t.name.lower(): t for t in EventType}
EVENTS = {"nmi": External.NMI, "interrupt": External.INTERRUPT,
          "host_interrupt": External.HOST_INTERRUPT, "host_nmi": External.HOST_NMI,
          "notify": External.NOTIFY_TIMER,
          "host_fault": HostEvent.FAULT, "save_restore": HostEvent.SAVE_RESTORE}
VENDORS = {"bare": "bare", "svm": "svm", "vmx": "vmx"}
FLAGS_FINAL = ("halted", "shutdown", "nmi_blocked")
NUMBERS_FINAL = ("rip", "rflags", "cr2", "dr6", "dr7", "retired")
# struct kvm_vcpu_stat counters a scenario may pin, summed over the vCPUs of a run
STAT_NAMES = ("nmi_injections", "irq_injections", "nmi_window_exits", "irq_window_exits",
              "irq_exits", "halt_exits", "notify_window_exits")
STOPS = ("halted", "shutdown", "budget", "vmm")
DEFAULT_MAX_STEPS = 100_000

TOP_KEYS = ("title", "cite", "max_steps", "guest", "cpu", "kvm", "registers", "idt", "tss", "fred",
            "memory", "happen", "expect", "explore", "vmm")
# kvm_amd.nrips/vnmi/vgif/debug_swap, kvm_intel.enable_vnmi, the model's intercept_db
# (kvm/vmx/vmx.py), and the SEV-ES VM type
KVM_PARAMS = ("nrips", "vnmi", "vgif", "enable_vnmi", "intercept_db", "sev_es", "debug_swap",
              "host_fred")
# What the VMM asks of the VM, with QEMU's names (-accel kvm,notify-vmexit=...,notify-window=N)
NOTIFY_MODES = {"run": "run", "internal-error": "internal-error", "disable": "disable"}
_EXPR = re.compile(r"^\s*([A-Za-z_.$][\w.$]*)\s*(?:([+-])\s*(0x[0-9a-fA-F]+|\d+))?\s*$")


class _Ctx:
    """Where in the file we are, to turn a problem into a ScenarioError."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.loc = Locator(text)

    def error(self, message: str, table: str | None = None, key: str | None = None,
              index: int | None = None, hint: str | None = None) -> ScenarioError:
        line = self.line(table, key, index)
        return ScenarioError(self.path, line, message, hint)

    def line(self, table: str | None, key: str | None = None, index: int | None = None) -> int:
        if key is not None:
            found = self.loc.key(table, key, index)
        else:
            found = self.loc.table(table, index) if table else None
        return found or 1

    def keys(self, data: dict, allowed: tuple[str, ...], table: str | None,
             index: int | None = None) -> None:
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f'did you mean "{close[0]}"?' if close else "allowed: " + ", ".join(allowed)
                where = f"[{table}]" if table else "the top level"
                raise self.error(f'unknown key "{key}" in {where}', table, key, index, hint)


def load(path: str | Path) -> Scenario:
    """Parse and validate one scenario file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ScenarioError(str(path), None, f"cannot read scenario: {e.strerror}") from None
    return parse(text, str(path))


def parse(text: str, path: str = "<scenario>") -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        message = re.sub(r"\s*\(at line.*\)", "", str(e))
        raise ScenarioError(path, int(m.group(1)) if m else None,
                            f"not valid TOML: {message}") from None
    ctx = _Ctx(path, text)
    ctx.keys(data, TOP_KEYS, None)
    guest = _table(ctx, data, "guest", required=True)
    ctx.keys(guest, ("mode", "entry", "code"), "guest")
    mode = _choice(ctx, guest, "mode", MODES, "guest", default="long64")
    code = guest.get("code")
    if not isinstance(code, str) or not code.strip():
        raise ctx.error("[guest] needs code = '''...''' with the guest assembly", "guest", "code")
    cpu = _table(ctx, data, "cpu")
    ctx.keys(cpu, ("sti_blocks_nmi", "rflags", "memory_kib", "idt_limit", "vendor", "vmx", "svm",
                   "cs_base", "idt_base"), "cpu")
    if cpu.get("vmx") and cpu.get("svm"):
        raise ctx.error("[cpu] vmx and svm are both true: an L1 hypervisor uses one of them",
                        "cpu", "svm")
    memory = _table(ctx, data, "memory")
    ctx.keys(memory, ("not_present",), "memory")
    return Scenario(
        path=path,
        text=text,
        title=_str(ctx, data, "title", None, default=Path(path).stem),
        cite=_str(ctx, data, "cite", None, default=""),
        mode=mode,
        code=code,
        code_line=_code_line(ctx, text),
        entry=_expr(ctx, guest.get("entry", "start"), "guest", "entry"),
        gates=_gates(ctx, _table(ctx, data, "idt")),
        ist=_ist(ctx, _table(ctx, data, "tss"), mode),
        fred=_fred(ctx, _table(ctx, data, "fred"), mode),
        registers=_registers(ctx, _table(ctx, data, "registers"), mode),
        rflags=_int(ctx, cpu, "rflags", "cpu", default=0x2),
        cs_base=_cs_base(ctx, cpu, mode),
        idt_limit=_int(ctx, cpu, "idt_limit", "cpu", default=None),
        idt_base=_idt_base(ctx, cpu, mode),
        memory_size=_int(ctx, cpu, "memory_kib", "cpu", default=DEFAULT_MEMORY // 1024) * 1024,
        not_present=_not_present(ctx, memory),
        sti_blocks_nmi=_bool(ctx, cpu, "sti_blocks_nmi", "cpu", default=True),
        vmx=_bool(ctx, cpu, "vmx", "cpu", default=False),
        svm=_bool(ctx, cpu, "svm", "cpu", default=False),
        max_steps=_int(ctx, data, "max_steps", None, default=DEFAULT_MAX_STEPS),
        happenings=_happenings(ctx, data.get("happen", [])),
        host=_host_happenings(ctx, data.get("happen", [])),
        vendor=_choice(ctx, cpu, "vendor", VENDORS, "cpu", default="bare"),
        deliveries=_deliveries(ctx, data.get("expect", {})),
        final=_final(ctx, data.get("expect", {}), mode),
        memory=_memory_expect(ctx, data.get("expect", {})),
        divergences=_divergences(ctx, data.get("expect", {})),
        qemu=_qemu_differences(ctx, data.get("expect", {})),
        stats=_stats_expect(ctx, data.get("expect", {})),
        kvm_params=_kvm_params(ctx, _table(ctx, data, "kvm")),
        explore=_explore(ctx, data),
        known_findings=_known_findings(ctx, data),
        vmm=_vmm_steps(ctx, data.get("vmm", [])),
    )


def _code_line(ctx: _Ctx, text: str) -> int:
    """Line holding `code = '''`: guest line k is file line code_line + k - 1 ... or + k."""
    line = ctx.loc.key("guest", "code") or 1
    opening = ctx.loc.lines[line - 1]
    # A newline right after the opening quotes is trimmed by TOML: line 1 starts below.
    after = opening.split("=", 1)[1].strip()
    return line if after in ("'''", '"""') else line - 1


# -- value helpers ---------------------------------------------------------------

def _table(ctx: _Ctx, data: dict, name: str, required: bool = False) -> dict:
    value = data.get(name)
    if value is None:
        if required:
            raise ctx.error(f"missing [{name}] table", None, None)
        return {}
    if not isinstance(value, dict):
        raise ctx.error(f"{name} must be a table", None, name)
    return value


def _int(ctx: _Ctx, data: dict, key: str, table: str | None, *, default: Any,
         index: int | None = None, low: int = 0, high: int = (1 << 64) - 1) -> Any:
    value = data.get(key, default)
    if value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ctx.error(f"{key} must be an integer in [{low:#x}, {high:#x}], got {value!r}",
                        table, key, index)
    return value


def _bool(ctx: _Ctx, data: dict, key: str, table: str | None, *, default: bool,
          index: int | None = None) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ctx.error(f"{key} must be true or false, got {value!r}", table, key, index)
    return value


def _str(ctx: _Ctx, data: dict, key: str, table: str | None, *, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ctx.error(f"{key} must be a string", table, key)
    return value


def _choice(ctx: _Ctx, data: dict, key: str, choices: dict, table: str | None, *,
            default: str | None = None, index: int | None = None) -> Any:
    value = data.get(key, default)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f'did you mean "{close[0]}"?' if close else None
        allowed = ", ".join(f'"{c}"' for c in choices)
        raise ctx.error(f"{key} = {value!r} is not one of {allowed}", table, key, index, hint)
    return choices[value]


def _expr(ctx: _Ctx, value: Any, table: str | None, key: str, index: int | None = None) -> Expr:
    """An address: a number, a label, or label+offset / label-offset."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _EXPR.match(value):
        return value.replace(" ", "")
    raise ctx.error(f"{key} must be an address: a number, a label or label+offset, got {value!r}",
                    table, key, index)


def _vector(ctx: _Ctx, value: Any, table: str | None, key: str, index: int | None = None) -> int:
    if isinstance(value, str):
        parsed = parse_vector(value)
        if parsed is None:
            try:
                parsed = int(value, 0)
            except ValueError:
                parsed = None
        value = parsed if parsed is not None else value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise ctx.error(f"{key} must be a vector 0-255 or a name like \"NMI\", \"#PF\", "
                        f"got {value!r}", table, key, index)
    return value


# -- sections ---------------------------------------------------------------------

def _gates(ctx: _Ctx, idt: dict) -> tuple[GateSpec, ...]:
    gates = []
    kinds = {"interrupt": GateKind.INTERRUPT, "trap": GateKind.TRAP}
    for key, spec in idt.items():
        vector = _vector(ctx, key, "idt", key)
        line = ctx.line("idt", key)
        if not isinstance(spec, dict):
            spec = {"handler": spec}
        ctx.keys(spec, ("handler", "gate", "ist", "present", "selector"), "idt")
        gate = spec.get("gate", "interrupt")
        if isinstance(gate, int) and not isinstance(gate, bool) and 0 <= gate <= 15:
            kind = gate
        else:
            kind = _choice(ctx, spec, "gate", kinds, "idt", default="interrupt")
        gates.append(GateSpec(
            vector=vector,
            handler=_expr(ctx, spec.get("handler"), "idt", key),
            kind=kind,
            ist=_int(ctx, spec, "ist", "idt", default=0, high=7),
            present=_bool(ctx, spec, "present", "idt", default=True),
            selector=_int(ctx, spec, "selector", "idt", default=0x08, high=0xFFFF),
            line=line,
        ))
    return tuple(sorted(gates, key=lambda g: g.vector))


def _cs_base(ctx: _Ctx, cpu: dict, mode: Mode) -> int:
    """The code segment's base: the guest is linked at CODE_BASE - cs_base and loaded at CODE_BASE."""
    base = _int(ctx, cpu, "cs_base", "cpu", default=0, high=CODE_BASE)
    if base and mode is not Mode.PROTECTED32:
        raise ctx.error("[cpu] cs_base needs protected32 mode (64-bit mode ignores CS.base)",
                        "cpu", "cs_base")
    if base:
        _not_nested(ctx, cpu, "cs_base")
    return base


def _not_nested(ctx: _Ctx, cpu: dict, key: str) -> None:
    """The L1 guest library (vmx.s, svm.s) gives L2 flat segments and the IDT at 0x1000."""
    if cpu.get("vmx") or cpu.get("svm"):
        raise ctx.error(f"[cpu] {key} is not modelled with an L1 hypervisor (vmx or svm)",
                        "cpu", key)


def _idt_base(ctx: _Ctx, cpu: dict, mode: Mode) -> int:
    """Where the loader writes the IDT; it must stay clear of the TSS."""
    size = 256 * gate_size(mode)
    base = _int(ctx, cpu, "idt_base", "cpu", default=IDT_BASE, high=TSS_BASE - size)
    if base % 8:  # DEVIATION: the SDM only recommends it (6.10); the loader writes whole gates
        raise ctx.error(f"[cpu] idt_base {base:#x} is not 8-byte aligned", "cpu", "idt_base")
    if base != IDT_BASE:
        _not_nested(ctx, cpu, "idt_base")
    return base


def _fred(ctx: _Ctx, fred: dict, mode: Mode) -> FredSpec | None:
    if not fred:
        return None
    if mode is not Mode.LONG64:
        raise ctx.error("[fred] needs long64 mode (CR4.FRED is 64-bit only)", "fred")
    ctx.keys(fred, ("entry", "redzone", "interrupt_level", "stack_levels", "rsp1", "rsp2",
                    "rsp3"), "fred")
    if "entry" not in fred:
        raise ctx.error("[fred] needs entry = \"label\" (4 KiB aligned; CPL 0 events enter at "
                        "+256)", "fred")
    levels = fred.get("stack_levels", {})
    if not isinstance(levels, dict):
        raise ctx.error("stack_levels must be a table: { \"#DB\" = 1, NMI = 2 }", "fred",
                        "stack_levels")
    stack_levels = []
    for name in levels:
        vector = _vector(ctx, name, "fred", "stack_levels")
        if vector >= 32:
            raise ctx.error(f"stack_levels: vector {vector} has none (IA32_FRED_STKLVLS covers "
                            "0-31)", "fred", "stack_levels")
        stack_levels.append((vector, _int(ctx, levels, name, "fred", default=0, high=3)))
    return FredSpec(
        entry=_expr(ctx, fred["entry"], "fred", "entry"),
        redzone=_int(ctx, fred, "redzone", "fred", default=1, high=7),
        interrupt_level=_int(ctx, fred, "interrupt_level", "fred", default=0, high=3),
        stack_levels=tuple(stack_levels),
        rsp=tuple((k, _expr(ctx, fred[f"rsp{k}"], "fred", f"rsp{k}")) for k in (1, 2, 3)
                  if f"rsp{k}" in fred),
        line=ctx.line("fred", None),
    )


def _ist(ctx: _Ctx, tss: dict, mode: Mode) -> tuple[tuple[int, Expr, int], ...]:
    if tss and mode is not Mode.LONG64:
        raise ctx.error("[tss] IST slots exist only in long64 mode", "tss")
    allowed = tuple(f"ist{k}" for k in range(1, 8))
    ctx.keys(tss, allowed, "tss")
    return tuple((int(k[3:]), _expr(ctx, v, "tss", k), ctx.line("tss", k))
                 for k, v in sorted(tss.items()))


def _registers(ctx: _Ctx, regs: dict, mode: Mode) -> tuple[tuple[str, Expr, int], ...]:
    names = GPR64 if mode is Mode.LONG64 else GPR32
    ctx.keys(regs, names, "registers")
    return tuple((k, _expr(ctx, v, "registers", k), ctx.line("registers", k))
                 for k, v in regs.items())


def _not_present(ctx: _Ctx, memory: dict) -> tuple[tuple[Expr, int], ...]:
    pages = memory.get("not_present", [])
    if not isinstance(pages, list):
        raise ctx.error("not_present must be a list of labels or addresses", "memory",
                        "not_present")
    line = ctx.line("memory", "not_present")
    return tuple((_expr(ctx, p, "memory", "not_present"), line) for p in pages)


def _happenings(ctx: _Ctx, items: Any) -> tuple[Happening, ...]:
    if not isinstance(items, list):
        raise ctx.error("happen must be an array of tables: [[happen]]", None, "happen")
    out = []
    for n, h in enumerate(items):
        event = _choice(ctx, h, "event", EVENTS, "happen", index=n)
        if isinstance(event, HostEvent):
            continue
        ctx.keys(h, ("event", "vector", "after", "at", "context_invalid"), "happen", n)
        if "context_invalid" in h and event is not External.NOTIFY_TIMER:
            raise ctx.error("context_invalid belongs to event = \"notify\"", "happen",
                            "context_invalid", n)
        if event is External.NOTIFY_TIMER:
            # the vector slot carries NOTIFY_VM_CONTEXT_INVALID (arch/cpu.py Scheduled)
            vector = int(_bool(ctx, h, "context_invalid", "happen", default=False, index=n))
        elif event is External.INTERRUPT:
            if "vector" not in h:
                raise ctx.error("an interrupt needs vector = 16..255", "happen", None, n)
            vector = _vector(ctx, h["vector"], "happen", "vector", n)
            if vector < 16:
                raise ctx.error(f"interrupt vector {vector} is illegal for the local APIC",
                                "happen", "vector", n, "use 16..255, SDM 10.5.2")
        else:
            vector = 2
        if ("after" in h) == ("at" in h):
            raise ctx.error("give exactly one trigger: after = N (retired instructions) "
                            "or at = \"label\"", "happen", None, n)
        out.append(Happening(
            event=event,
            vector=vector,
            after=_int(ctx, h, "after", "happen", default=None, index=n),
            at=_expr(ctx, h["at"], "happen", "at", n) if "at" in h else None,
            line=ctx.line("happen", None, n),
        ))
    return tuple(out)


def _host_happenings(ctx: _Ctx, items: list) -> tuple[HostHappening, ...]:
    out = []
    for n, h in enumerate(items):
        event = _choice(ctx, h, "event", EVENTS, "happen", index=n)
        if event is HostEvent.FAULT:
            ctx.keys(h, ("event", "page"), "happen", n)
            if "page" not in h:
                raise ctx.error("a host fault needs page = \"label\" (the page the host has not "
                                "mapped)", "happen", None, n)
            out.append(HostHappening(event, _expr(ctx, h["page"], "happen", "page", n), None,
                                     ctx.line("happen", None, n)))
        elif event is HostEvent.SAVE_RESTORE:
            ctx.keys(h, ("event", "exit"), "happen", n)
            at_exit = _int(ctx, h, "exit", "happen", default=None, index=n)
            if at_exit is None or at_exit < 1:
                raise ctx.error("save_restore needs exit = N (1 for the first VM exit)",
                                "happen", "exit", n)
            out.append(HostHappening(event, None, at_exit, ctx.line("happen", None, n)))
    return tuple(out)


def _vmm_steps(ctx: _Ctx, items: Any) -> tuple[VmmStep, ...]:
    """[[vmm]]: call = "KVM_NMI" | "KVM_SET_VCPU_EVENTS" | "immediate_exit", exit = N or
    at = "label"; a KVM_SET_VCPU_EVENTS may change struct kvm_vcpu_events fields by name."""
    t = "vmm"
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ctx.error("vmm must be an array of tables: [[vmm]]", None, "vmm")
    out = []
    for n, item in enumerate(items):
        call = _choice(ctx, item, "call", {c: c for c in VMM_CALLS}, t, index=n)
        fields = EVENT_FIELDS if call == KVM_SET_VCPU_EVENTS else ()
        ctx.keys(item, ("call", "exit", "at", *fields), t, n)
        if ("exit" in item) == ("at" in item):
            raise ctx.error("give exactly one of exit = N (after the Nth VM exit) or at = \"label\" "
                            "(the first exit once the guest is there)", t, None, n)
        at_exit = _int(ctx, item, "exit", t, default=None, index=n, low=1)
        args = tuple((name, int(_bool_or_int(ctx, item, name, t, n))) for name in fields
                     if name in item)
        out.append(VmmStep(call, at_exit, _expr(ctx, item["at"], t, "at", n) if "at" in item
                           else None, args, ctx.line(t, None, n)))
    return tuple(out)


def _bool_or_int(ctx: _Ctx, data: dict, key: str, table: str, index: int) -> int:
    if isinstance(data[key], bool):
        return int(data[key])
    return _int(ctx, data, key, table, default=None, index=index, high=(1 << 64) - 1)


CHOICE_KEYS = ("nmi", "interrupts", "host_interrupts", "host_nmis", "host_faults", "save_restore",
               "vmm")
HAPPENING_KINDS = ("nmi", "interrupt", "host_interrupt", "host_nmi", "host_fault", "save_restore",
                   "vmm")


def _known_findings(ctx: _Ctx, data: dict) -> tuple[KnownFinding, ...]:
    items = _table(ctx, data, "explore").get("known", [])
    t = "explore.known"
    out = []
    for n, k in enumerate(items):
        ctx.keys(k, ("vendor", "involves", "same_boundary", "why"), t, n)
        vendors = _choice(ctx, k, "vendor", {"svm": ("svm",), "vmx": ("vmx",), "any": ("svm", "vmx")},
                          t, index=n)
        involves = k.get("involves", [])
        if not isinstance(involves, list) or not involves or any(
                i not in HAPPENING_KINDS for i in involves):
            raise ctx.error("involves = [...] of " + ", ".join(HAPPENING_KINDS), t, "involves", n)
        why = k.get("why")
        if not isinstance(why, str) or not why.strip():
            raise ctx.error("a known finding needs why = \"...\"", t, "why", n)
        same = _bool(ctx, k, "same_boundary", t, default=False)
        out.append(KnownFinding(vendors, tuple(involves), same, why, ctx.line(t, None, n)))
    return tuple(out)


def _explore(ctx: _Ctx, data: dict) -> ExploreSpec | None:
    t = "explore"
    spec = _table(ctx, data, t)
    ctx.keys(spec, (*CHOICE_KEYS, "known"), t)
    if not any(key in spec for key in CHOICE_KEYS):
        return None
    vectors = spec.get("interrupts", [])
    if not isinstance(vectors, list):
        raise ctx.error("interrupts = [vector, ...]", t, "interrupts")
    interrupts = tuple(_vector(ctx, v, t, "interrupts") for v in vectors)
    if any(v < 16 for v in interrupts):
        raise ctx.error("interrupt vectors must be 16..255", t, "interrupts", None, "SDM 10.5.2")
    pages = spec.get("host_faults", [])
    if not isinstance(pages, list):
        raise ctx.error("host_faults = [page, ...] (labels or addresses)", t, "host_faults")
    line = ctx.line(t, "host_faults")
    counts = {}
    for key in ("nmi", "host_interrupts", "host_nmis", "save_restore"):
        counts[key] = _int(ctx, spec, key, t, default=0)
        if not 0 <= counts[key] <= 8:
            raise ctx.error(f"{key} = {counts[key]}: use 0..8", t, key)
    return ExploreSpec(counts["nmi"], interrupts, counts["host_interrupts"],
                       tuple((_expr(ctx, p, t, "host_faults"), line) for p in pages),
                       counts["save_restore"], ctx.line(t, None), counts["host_nmis"],
                       _explore_vmm(ctx, spec))


def _explore_vmm(ctx: _Ctx, spec: dict) -> tuple[str, ...]:
    """[explore] vmm = ["nmi", "events_same_vcpu", ...]: the VMM calls tried after any exit."""
    names = spec.get("vmm", [])
    if not isinstance(names, list) or any(name not in VMM_CHOICES for name in names):
        raise ctx.error("vmm = [...] of " + ", ".join(f'"{c}"' for c in VMM_CHOICES), "explore",
                        "vmm")
    return tuple(sorted(set(names), key=VMM_CHOICES.index))


def _kvm_params(ctx: _Ctx, kvm: dict) -> tuple[tuple[str, bool | int | str], ...]:
    ctx.keys(kvm, KVM_PARAMS + ("notify_vmexit", "notify_window"), "kvm")
    out: list[tuple[str, bool | int | str]] = [
        (name, _bool(ctx, kvm, name, "kvm", default=True)) for name in KVM_PARAMS if name in kvm]
    flags = dict(out)
    if flags.get("sev_es") and flags.get("nrips") is False:
        raise ctx.error("SEV-ES guests need NRIPS: drop nrips = false", "kvm", "nrips")
    if flags.get("sev_es") and flags.get("vnmi"):
        raise ctx.error("vNMI with SEV-ES is not modelled", "kvm", "vnmi")
    if flags.get("debug_swap") and not flags.get("sev_es"):
        raise ctx.error("debug_swap is for SEV-ES guests: add sev_es = true", "kvm", "debug_swap")
    if "notify_vmexit" in kvm:
        out.append(("notify_vmexit", _choice(ctx, kvm, "notify_vmexit", NOTIFY_MODES, "kvm")))
    if "notify_window" in kvm:
        window = _int(ctx, kvm, "notify_window", "kvm", default=0, high=0xFFFFFFFF)
        if kvm.get("notify_vmexit", "disable") == "disable":
            raise ctx.error("notify_window needs notify_vmexit = \"run\" or \"internal-error\"",
                            "kvm", "notify_window")
        out.append(("notify_window", window))
    return tuple(out)


def _stats_expect(ctx: _Ctx, expect: Any) -> tuple[ExpectedStats, ...]:
    t = "expect.stats"
    out = []
    for n, item in enumerate(_expect(ctx, expect).get("stats", [])):
        ctx.keys(item, ("vendor",) + STAT_NAMES, t, n)
        vendor = _choice(ctx, item, "vendor", {"svm": "svm", "vmx": "vmx"}, t, index=n)
        counts = tuple((name, _int(ctx, item, name, t, default=0, index=n))
                       for name in STAT_NAMES if name in item)
        if not counts:
            raise ctx.error(f"give at least one KVM stat: {', '.join(STAT_NAMES)}", t, None, n)
        out.append(ExpectedStats(vendor, counts, ctx.line(t, None, n)))
    return tuple(out)


def _divergences(ctx: _Ctx, expect: Any) -> tuple[KnownDivergence, ...]:
    items = _expect(ctx, expect).get("divergence", [])
    t = "expect.divergence"
    out = []
    for n, d in enumerate(items):
        ctx.keys(d, ("vendor", "entry", "why"), t, n)
        vendor = _choice(ctx, d, "vendor", {"svm": ("svm",), "vmx": ("vmx",),
                                             "any": ("svm", "vmx")}, t, index=n)
        entry = d.get("entry")
        if entry == "final":
            entry = 0
        if not isinstance(entry, int) or isinstance(entry, bool) or entry < 1 and entry != 0:
            raise ctx.error("entry = N (1-based, in the guest-observable trace) or \"final\"",
                            t, "entry", n)
        why = d.get("why")
        if not isinstance(why, str) or not why.strip():
            raise ctx.error("a known divergence needs why = \"...\" (the reason, with its source)",
                            t, "why", n)
        out.append(KnownDivergence(vendor, entry, why, ctx.line(t, None, n)))
    return tuple(out)


_QEMU_FIELD = re.compile(r"^(entry|vector|rsp|frame word [0-9]|stop|memory|crash|rip|rflags|cr2|dr6|dr7"
                         r"|[re]?[abcd]x|[re]?[sd]i|[re]?[sb]p|r(8|9|1[0-5]))$")


def _qemu_differences(ctx: _Ctx, expect: Any) -> tuple[QemuDifference, ...]:
    items = _expect(ctx, expect).get("qemu", [])
    t = "expect.qemu"
    if not isinstance(items, list):
        raise ctx.error("write [[expect.qemu]] (an array of tables)", None, "expect")
    out = []
    for n, d in enumerate(items):
        if not isinstance(d, dict):
            raise ctx.error("write [[expect.qemu]] (an array of tables)", None, "expect")
        ctx.keys(d, ("accel", "entry", "field", "mask", "why"), t, n)
        accels = _choice(ctx, d, "accel", {"tcg": ("tcg",), "kvm": ("kvm",),
                                           "any": ("tcg", "kvm")}, t, index=n)
        entry = d.get("entry")
        if entry == "final":
            entry = 0
        if not isinstance(entry, int) or isinstance(entry, bool) or entry < 0:
            raise ctx.error("entry = N (1-based, among deliveries and port output) or \"final\"",
                            t, "entry", n)
        fields = d.get("field")
        fields = (fields,) if isinstance(fields, str) else fields
        if (not isinstance(fields, list | tuple) or not fields
                or not all(isinstance(f, str) and _QEMU_FIELD.match(f) for f in fields)):
            raise ctx.error("field = what differs: \"entry\", \"vector\", \"rsp\", \"frame word N\", "
                            "\"stop\", a register name, \"memory\" or \"crash\" (or a list)",
                            t, "field", n)
        mask = d.get("mask")
        if mask is not None and (not isinstance(mask, int) or isinstance(mask, bool)
                                 or not 0 < mask < 1 << 64):
            raise ctx.error("mask = the bits that may differ (a 64-bit number)", t, "mask", n)
        why = d.get("why")
        if not isinstance(why, str) or not why.strip():
            raise ctx.error("a QEMU difference needs why = \"...\" (QEMU's source and the SDM rule)",
                            t, "why", n)
        out.append(QemuDifference(accels, entry, tuple(fields), mask, why, ctx.line(t, None, n)))
    return tuple(out)


def _expect(ctx: _Ctx, expect: Any) -> dict:
    if not isinstance(expect, dict):
        raise ctx.error("expect must be a table", None, "expect")
    ctx.keys(expect, ("delivery", "final", "memory", "divergence", "stats", "qemu"), "expect")
    return expect


def _deliveries(ctx: _Ctx, expect: Any) -> tuple[ExpectedDelivery, ...] | None:
    expect = _expect(ctx, expect)
    if "delivery" not in expect:
        return None
    out = []
    for n, d in enumerate(expect["delivery"]):
        t = "expect.delivery"
        ctx.keys(d, ("vector", "type", "error_code", "return", "retired", "repeats"), t, n)
        if "vector" not in d:
            raise ctx.error("each [[expect.delivery]] needs a vector", t, None, n)
        repeats = _bool(ctx, d, "repeats", t, default=False, index=n)
        if repeats and n != len(expect["delivery"]) - 1:
            raise ctx.error("only the last [[expect.delivery]] can repeat", t, "repeats", n)
        vector = _vector(ctx, d["vector"], t, "vector", n)
        type_ = _choice(ctx, d, "type", EVENT_TYPES, t, index=n) if "type" in d else None
        if "return" in d and saved_ip_undefined(vector, type_ or EventType.HW_EXCEPTION):
            raise ctx.error(
                "the return address of a #DF is undefined (SDM 6.15 Interrupt 8: the saved CS "
                "and EIP are undefined): the model pushes one, but no guest can rely on it and "
                "runs are never compared on it", t, "return", n,
                hint='leave return out; for INT 8, a software interrupt, say type = "sw_int"')
        out.append(ExpectedDelivery(
            vector=vector,
            type=type_,
            error_code=_int(ctx, d, "error_code", t, default=None, index=n),
            return_rip=_expr(ctx, d["return"], t, "return", n) if "return" in d else None,
            retired=_int(ctx, d, "retired", t, default=None, index=n),
            line=ctx.line(t, None, n),
            repeats=repeats,
        ))
    return tuple(out)


def _final(ctx: _Ctx, expect: Any, mode: Mode) -> tuple[tuple[str, Expected], ...]:
    final = _expect(ctx, expect).get("final", {})
    regs = GPR64 if mode is Mode.LONG64 else GPR32
    allowed = regs + NUMBERS_FINAL + FLAGS_FINAL + ("stop",)
    ctx.keys(final, allowed, "expect.final")
    out = []
    for key, value in final.items():
        line = ctx.line("expect.final", key)
        if key in FLAGS_FINAL:
            value = _bool(ctx, final, key, "expect.final", default=False)
        elif key == "stop":
            _choice(ctx, final, key, {s: s for s in STOPS}, "expect.final")
        else:
            value = _expr(ctx, value, "expect.final", key)
        out.append((key, Expected(value, line)))
    return tuple(out)


def _memory_expect(ctx: _Ctx, expect: Any) -> tuple[tuple[Expr, Expected], ...]:
    memory = _expect(ctx, expect).get("memory", {})
    out = []
    for key, value in memory.items():
        where = _expr(ctx, key, "expect.memory", key)
        value = _int(ctx, memory, key, "expect.memory", default=None)
        out.append((where, Expected(value, ctx.line("expect.memory", key))))
    return tuple(out)
