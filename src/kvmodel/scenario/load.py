"""Read and validate a scenario file; every error names file:line and what is allowed.

Nothing in a scenario file is executed on the host: the guest code goes to
GNU as and then only to the model.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmodel.arch.cpu import External
from kvmodel.arch.events import EventType, parse_vector, saved_ip_undefined
from kvmodel.arch.regs import Mode
from kvmodel.arch.task import FIRST_TASK_SELECTOR, TASK_GATE
from kvmodel.errors import ScenarioError
from kvmodel.guest.layout import CODE_BASE, DEFAULT_MEMORY, IDT_BASE, GateKind
from kvmodel.scenario.locate import Locator
from kvmodel.scenario.schema import (
    CHOICE_KEYS,
    DOCUMENT,
    EVENT_TYPES,
    EVENTS,
    KVM_PARAMS,
    KVM_VENDORS,
    MODES,
    NOTIFY_MODES,
    QEMU_ACCELS,
    STAT_NAMES,
    VENDORS,
    Address,
    Bool,
    Choice,
    CpusSpec,
    Either,
    Expected,
    ExpectedDelivery,
    ExpectedStats,
    ExploreSpec,
    Expr,
    Field,
    FredSpec,
    GateSpec,
    Happening,
    HostEvent,
    HostHappening,
    Int,
    KnownDivergence,
    KnownFinding,
    List,
    Pattern,
    QemuDifference,
    Scenario,
    Table,
    Tables,
    Tagged,
    Text,
    Vector,
    VmmStep,
)  # fmt: skip
from kvmodel.scenario.vmm import CALL_FIELDS as VMM_CALL_FIELDS
from kvmodel.scenario.vmm import CHOICE_NAMES as VMM_CHOICES

DEFAULT_MAX_STEPS = 100_000
MAX_NESTING = 32  # arrays and inline tables inside each other; the format needs 3
MAX_FILE = 16 << 20  # bytes of a scenario file
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



def load(path: str | Path) -> Scenario:
    """Parse and validate one scenario file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE + 1)  # a bound, for /dev/zero and its kind
    except OSError as e:
        raise ScenarioError(str(path), None, f"cannot read scenario: {e.strerror}") from None
    if len(raw) > MAX_FILE:
        raise ScenarioError(str(path), None, f"larger than {MAX_FILE >> 20} MiB: not a scenario")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ScenarioError(str(path), line, f"not UTF-8: byte {raw[e.start]:#04x} at offset "
                            f"{e.start}", "TOML files are UTF-8 text") from None
    return parse(text, str(path), folder=path.parent)


def parse(text: str, path: str = "<scenario>", folder: Path | None = None) -> Scenario:
    """`folder`: where the file is; its guest may `.include` and `.incbin` files there."""
    _check_nesting(text, path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        line = int(m.group(1)) if m else text.count("\n") + 1  # "(at end of document)"
        message = re.sub(r"\s*\(at (line|end).*\)", "", str(e))
        raise ScenarioError(path, line, f"not valid TOML: {message}") from None
    except RecursionError:  # a backstop: _check_nesting's limit is far below tomllib's
        raise ScenarioError(path, text.count("\n") + 1, "arrays or inline tables nested too "
                            "deeply", f"at most {MAX_NESTING}") from None
    ctx = _Ctx(path, text)
    mode = _Checker(ctx).document(data)
    guest = data["guest"]
    cpu = data.get("cpu", {})
    if cpu.get("vmx") and cpu.get("svm"):
        raise ctx.error("[cpu] vmx and svm are both true: an L1 hypervisor uses one of them",
                        "cpu", "svm")
    for extension, other in (("svm", "vmx"), ("vmx", "svm")):
        if cpu.get(extension) and cpu.get("vendor") == other:
            raise ctx.error(f"[cpu] {extension} = true with vendor = \"{other}\": an "
                            f"{extension.upper()} L1 hypervisor does not run on {other.upper()}",
                            "cpu", "vendor")
    expect = data.get("expect", {})
    explore = data.get("explore", {})
    happen = data.get("happen", [])
    if data.get("kvm", {}).get("irqchip") == "userspace":
        _no_apic_interrupts(ctx, happen, explore)
    return Scenario(
        path=path,
        text=text,
        title=data.get("title", Path(path).stem),
        cite=data.get("cite", ""),
        mode=mode,
        code=guest["code"],
        code_line=_code_line(ctx),
        entry=_expr(guest.get("entry", "start")),
        gates=_gates(ctx, data.get("idt", {}), mode),
        ist=_ist(ctx, data.get("tss", {}), mode),
        fred=_fred(ctx, data.get("fred", {}), mode),
        registers=tuple((k, _expr(v), ctx.line("registers", k))
                        for k, v in data.get("registers", {}).items()),
        rflags=cpu.get("rflags", 0x2),
        cs_base=_cs_base(ctx, cpu, mode),
        idt_limit=cpu.get("idt_limit"),
        idt_base=_idt_base(ctx, cpu),
        memory_size=cpu.get("memory_kib", DEFAULT_MEMORY // 1024) * 1024,
        not_present=_not_present(ctx, data.get("memory", {})),
        sti_blocks_nmi=cpu.get("sti_blocks_nmi", True),
        vmx=cpu.get("vmx", False),
        svm=cpu.get("svm", False),
        max_steps=data.get("max_steps", DEFAULT_MAX_STEPS),
        happenings=_happenings(ctx, happen),
        host=_host_happenings(ctx, happen),
        vendor=VENDORS[cpu.get("vendor", "bare")],
        deliveries=_deliveries(ctx, expect),
        final=_final(ctx, expect),
        memory=tuple((_expr(k), Expected(v, ctx.line("expect.memory", k)))
                     for k, v in expect.get("memory", {}).items()),
        divergences=_divergences(ctx, expect),
        qemu=_qemu_differences(ctx, expect),
        stats=_stats_expect(ctx, expect),
        kvm_params=_kvm_params(ctx, data.get("kvm", {})),
        explore=_explore(ctx, explore),
        known_findings=_known_findings(ctx, explore, "cpus" in data),
        vmm=_vmm_steps(ctx, data.get("vmm", [])),
        folder=folder,
        cpus=_cpus(ctx, data.get("cpus"), expect),
        cr3=_cr3(ctx, data, mode),
    )


def _check_nesting(text: str, path: str) -> None:
    """Refuse arrays and inline tables nested deeper than MAX_NESTING, naming the line.

    tomllib recurses once per level and fails with RecursionError a few hundred
    deep; this scan skips strings and comments and is linear in the text.
    """
    depth, line, n, size = 0, 1, 0, len(text)
    while n < size:
        c = text[n]
        if c == "\n":
            line += 1
        elif c in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise ScenarioError(path, line, "arrays or inline tables nested too deeply",
                                    f"at most {MAX_NESTING}")
        elif c in "]}":
            depth = max(depth - 1, 0)
        elif c == "#":
            end = text.find("\n", n)
            n = size if end < 0 else end
            continue
        elif c in "\"'":
            quote = c * 3 if text.startswith(c * 3, n) else c
            end = _string_end(text, n + len(quote), quote)
            line += text.count("\n", n, end)
            n = end
            continue
        n += 1


def _string_end(text: str, n: int, quote: str) -> int:
    """Index just past the string whose body starts at `n` (or where tomllib will refuse it)."""
    while True:
        end = text.find(quote, n)
        if end < 0:
            return len(text)
        if len(quote) == 1 and "\n" in text[n:end]:
            return text.find("\n", n)  # unterminated: tomllib names the line
        if quote[0] == '"':  # a quote after an odd number of backslashes is in the string
            k = end
            while k > n and text[k - 1] == "\\":
                k -= 1
            if (end - k) % 2:
                n = end + 1
                continue
        while len(quote) == 3 and text.startswith(quote[0], end + 3):
            end += 1  # up to two quotes may end a multi-line string's body
        return end + len(quote)


def _code_line(ctx: _Ctx) -> int:
    """Line holding `code = '''`: guest line k is file line code_line + k - 1 ... or + k."""
    line = ctx.loc.key("guest", "code") or 1
    opening = ctx.loc.lines[line - 1] if line <= len(ctx.loc.lines) else ""
    # A newline right after the opening quotes is trimmed by TOML: line 1 starts below.
    after = opening.split("=", 1)[1].strip() if "=" in opening else ""
    return line if after in ("'''", '"""') else line - 1


# -- the document against schema.DOCUMENT -----------------------------------------------

def _clip(text: str, most: int = 60) -> str:
    return text if len(text) <= most else text[:most] + "..."


def _show(value: Any) -> str:
    """A value for a message: its repr, cut short."""
    return _clip(repr(value))


@dataclass(frozen=True, slots=True)
class _At:
    """Where a value is: the line of `anchor` in the `index`-th `[table]` (of the header
    itself if no anchor), and the dotted name of the table it is or is in, for messages."""

    name: str | None
    table: str | None = None
    index: int | None = None
    anchor: str | None = None

    def inside(self, key: str) -> _At:
        """Where a key of this table is: its own line, or the line of the inline table's key."""
        return self if self.anchor is not None else _At(self.name, self.table, self.index, key)


class _Checker:
    """Checks a parsed document against the declared schema; the first problem is an error."""

    def __init__(self, ctx: _Ctx):
        self.ctx = ctx
        self.mode = Mode.LONG64

    def document(self, data: dict) -> Mode:
        """Check `data`; the guest's mode, which sets the width of registers and addresses."""
        top = _At(None)
        self.known(data, tuple(DOCUMENT.fields), top)
        if "guest" not in data:
            raise self.ctx.error("missing [guest] table", None, None)
        self.member(data["guest"], DOCUMENT.fields["guest"], top, "guest")
        self.mode = MODES[data["guest"].get("mode", "long64")]
        self.table(data, DOCUMENT, top)
        return self.mode

    def error(self, message: str, at: _At, hint: str | None = None) -> ScenarioError:
        return self.ctx.error(message, at.table, at.anchor, at.index, hint)

    def known(self, data: dict, allowed: tuple[str, ...], at: _At) -> None:
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f'did you mean "{close[0]}"?' if close else "allowed: " + ", ".join(allowed)
                where = f"[{at.name}]" if at.name else "the top level"
                raise self.error(f'unknown key "{_clip(key)}" in {where}', at.inside(key), hint)

    def table(self, value: dict, spec: Table, at: _At) -> None:
        fields = spec.fields(self.mode) if callable(spec.fields) else spec.fields
        if spec.keys is None:
            self.known(value, tuple(fields), at)
        for key, message in spec.required:
            if key not in value:
                raise self.error(message, at)
        for key, item in value.items():
            if spec.keys is None:
                self.member(item, fields[key], at, key)
            else:
                self.value(key, spec.keys, at.inside(key), key)
                self.value(item, spec.values, at.inside(key), key)

    def member(self, value: Any, spec: Field, parent: _At, key: str) -> None:
        """A key's value; a table of its own ([name] or [[name]]) is found by its header."""
        if not isinstance(spec, Table | Tables):
            self.value(value, spec, parent.inside(key), key)
            return
        name = f"{parent.name}.{key}" if parent.name else key
        if parent.anchor is None and self.ctx.loc.defines(name):
            self.value(value, spec, _At(name, name), key)
        else:
            inline = parent.inside(key)
            self.value(value, spec, _At(name, inline.table, inline.index, inline.anchor), key)

    def value(self, value: Any, spec: Field, at: _At, key: str) -> None:
        """Check one value against its declaration; errors name `key`, at the line of `at`."""
        def fail(what: str, hint: str | None = None) -> ScenarioError:
            return self.error(f"{key} must be {what}, got {_show(value)}", at, hint)

        match spec:
            case Int(low, high):
                high = high if isinstance(high, int) else high(self.mode)
                if not _is_int(value) or not low <= value <= high:
                    raise fail(f"an integer in [{low:#x}, {high:#x}]")
            case Bool():
                if not isinstance(value, bool):
                    raise fail("true or false")
            case Text(nonblank):
                if not isinstance(value, str) or nonblank and not value.strip():
                    raise fail("a non-empty string" if nonblank else "a string")
            case Choice(choices):
                if not isinstance(value, str) or value not in choices:
                    close = difflib.get_close_matches(value, choices, n=1) if isinstance(
                        value, str) else []
                    allowed = ", ".join(f'"{c}"' for c in choices)
                    raise self.error(f"{key} = {_show(value)} is not one of {allowed}", at,
                                     f'did you mean "{close[0]}"?' if close else None)
            case Address(high):
                high = high if isinstance(high, int) else high(self.mode)
                if not _address_fits(value, high):
                    raise fail(f"an address: a number up to {high:#x}, a label or label+offset")
            case Vector(high):
                vector = _vector_number(value)
                if vector is None or not 0 <= vector <= high:
                    raise fail(f'a vector 0-{high} or a name like "NMI", "#PF"')
            case Either(options, doc):
                chosen = next((o for o in options if _kind_fits(value, o)), None)
                if chosen is None:
                    raise fail(doc)
                self.value(value, chosen, at, key)
            case Pattern(regex, doc):
                if not isinstance(value, str) or not regex.match(value):
                    raise fail(doc)
            case List(item, least):
                if not isinstance(value, list) or len(value) < least:
                    raise fail("a list" if least == 0 else "a non-empty list" if least == 1
                               else f"a list of {least} or more")
                for element in value:
                    self.value(element, item, at, key)
            case Table():
                if not isinstance(value, dict):
                    raise fail("a table")
                self.table(value, spec, at)
            case Tables(element, most):
                if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                    raise fail(f"an array of tables: [[{at.name}]]")
                if most is not None and len(value) > most:
                    raise self.error(f"{len(value)} [[{at.name}]] tables, more than the {most} a "
                                     "scenario may have", at, "split the scenario")
                for n, item in enumerate(value):
                    own = at.anchor is None  # [[name]] headers: each table has its own line
                    self.value(item, element, _At(at.name, at.table, n) if own else at, key)
            case Tagged():
                self.tagged(value, spec, at)

    def tagged(self, value: dict, spec: Tagged, at: _At) -> None:
        if spec.tag not in value:
            raise self.error(spec.missing, at)
        self.value(value[spec.tag], Choice(tuple(spec.variants)), at.inside(spec.tag), spec.tag)
        chosen = spec.variants[value[spec.tag]]
        for key in value:
            owner = next((v for v, t in spec.variants.items() if key in t.fields), None)
            if key not in chosen.fields and owner is not None:
                raise self.error(spec.foreign.format(key=_clip(key), name=at.name, tag=spec.tag,
                                                     owner=owner), at.inside(key))
        self.table(value, chosen, at)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _address_fits(value: Any, high: int) -> bool:
    if _is_int(value):
        return 0 <= value <= high
    m = _EXPR.match(value) if isinstance(value, str) else None
    return m is not None and (m.group(3) is None or int(m.group(3), 0) <= high)


def _vector_number(value: Any) -> int | None:
    if _is_int(value):
        return value
    if not isinstance(value, str):
        return None
    parsed = parse_vector(value)
    if parsed is None:
        try:
            parsed = int(value, 0)
        except ValueError:
            return None
    return parsed


def _kind_fits(value: Any, spec: Field) -> bool:
    """Whether `value` is of the kind `spec` takes (its own check then says what is wrong)."""
    match spec:
        case Int():
            return _is_int(value)
        case Bool():
            return isinstance(value, bool)
        case Text() | Pattern():
            return isinstance(value, str)
        case List():
            return isinstance(value, list)
        case Address():
            return isinstance(value, str) or _is_int(value)
        case Choice():
            return isinstance(value, str)
        case Table():
            return isinstance(value, dict)
    return False


def _expr(value: Expr) -> Expr:
    """An address the schema let through: a number, or a label expression without spaces."""
    return value.replace(" ", "") if isinstance(value, str) else value


def _vector(value: Any) -> int:
    vector = _vector_number(value)
    assert vector is not None, "checked by the schema"
    return vector


# -- sections: the rules that tie keys together (types and ranges are checked) ------------

def _gates(ctx: _Ctx, idt: dict, mode: Mode) -> tuple[GateSpec, ...]:
    gates = []
    kinds = {"interrupt": GateKind.INTERRUPT, "trap": GateKind.TRAP}
    task_selectors: dict[str, int] = {}
    for key, spec in idt.items():
        if not isinstance(spec, dict):
            spec = {"handler": spec}
        if "task" in spec:
            gates.append(_task_gate(ctx, key, spec, mode, task_selectors))
            continue
        if "handler" not in spec:
            raise ctx.error('a gate needs handler = "label" (or task = "label" for a task gate)',
                            "idt", key)
        gate = spec.get("gate", "interrupt")
        gates.append(GateSpec(
            vector=_vector(key),
            handler=_expr(spec["handler"]),
            kind=kinds[gate] if isinstance(gate, str) else gate,
            ist=spec.get("ist", 0),
            present=spec.get("present", True),
            selector=spec.get("selector", 0x08),
            line=ctx.line("idt", key),
            dpl=spec.get("dpl", 0),
        ))
    return tuple(sorted(gates, key=lambda g: g.vector))


def _task_gate(ctx: _Ctx, key: str, spec: dict, mode: Mode,
               task_selectors: dict[str, int]) -> GateSpec:
    """A task gate (type 5): the TSS label gets a TSS descriptor in the model's GDT, one per
    label, at FIRST_TASK_SELECTOR, +8, ... in the order of the [idt] keys (arch/task.py)."""
    if mode is not Mode.PROTECTED32:
        raise ctx.error("task = ... (a task gate) needs mode = \"protected32\": IA-32e mode has no "
                        "task switching", "idt", key,
                        hint="gate = 5 writes a task gate's type, which a 64-bit IDT refuses with #GP")
    for other in ("handler", "gate", "ist", "selector"):
        if other in spec:
            raise ctx.error(f"a task gate has no {other} (task = \"label\" names its TSS)", "idt", key)
    label = _expr(spec["task"])
    selector = task_selectors.setdefault(label, FIRST_TASK_SELECTOR + 8 * len(task_selectors))
    return GateSpec(vector=_vector(key), handler=0, kind=TASK_GATE, ist=0,
                    present=spec.get("present", True), selector=selector,
                    line=ctx.line("idt", key), dpl=spec.get("dpl", 0), task=label)


def _cs_base(ctx: _Ctx, cpu: dict, mode: Mode) -> int:
    """The code segment's base: the guest is linked at CODE_BASE - cs_base and loaded at CODE_BASE."""
    base = cpu.get("cs_base", 0)
    if mode is Mode.REAL16:
        if "cs_base" in cpu:
            raise ctx.error("[cpu] cs_base: real16 code runs in segment 0x1000 (base 0x10000)",
                            "cpu", "cs_base")
        return CODE_BASE  # real mode: CS = 0x1000, labels are offsets in it (layout.py)
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


def _idt_base(ctx: _Ctx, cpu: dict) -> int:
    """Where the loader writes the IDT (the schema keeps it clear of the TSS)."""
    base = cpu.get("idt_base", IDT_BASE)
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
    stack_levels = []
    for name, level in fred.get("stack_levels", {}).items():
        vector = _vector(name)
        if vector >= 32:
            raise ctx.error(f"stack_levels: vector {vector} has none (IA32_FRED_STKLVLS covers "
                            "0-31)", "fred", "stack_levels")
        stack_levels.append((vector, level))
    return FredSpec(
        entry=_expr(fred["entry"]),
        redzone=fred.get("redzone", 1),
        interrupt_level=fred.get("interrupt_level", 0),
        stack_levels=tuple(stack_levels),
        rsp=tuple((k, _expr(fred[f"rsp{k}"])) for k in (1, 2, 3) if f"rsp{k}" in fred),
        line=ctx.line("fred", None),
    )


def _ist(ctx: _Ctx, tss: dict, mode: Mode) -> tuple[tuple[int, Expr, int], ...]:
    if tss and mode is not Mode.LONG64:
        raise ctx.error("[tss] IST slots exist only in long64 mode", "tss")
    return tuple((int(k[3:]), _expr(v), ctx.line("tss", k)) for k, v in sorted(tss.items()))


def _cr3(ctx: _Ctx, data: dict, mode: Mode) -> tuple[Expr, int] | None:
    """[memory] cr3: the guest's own page tables (arch/paging.py), and what they exclude."""
    memory, cpu = data.get("memory", {}), data.get("cpu", {})
    if "cr3" not in memory:
        if data.get("kvm", {}).get("tdp") is False:
            raise ctx.error("tdp = false (shadow paging) needs the guest's own page tables",
                            "kvm", "tdp", hint='add [memory] cr3 = "label"')
        return None
    if mode is not Mode.LONG64:
        raise ctx.error("guest paging is modelled in long64 mode only (4-level paging); 32-bit "
                        "and PAE paging are not", "memory", "cr3")
    if memory.get("not_present"):
        raise ctx.error("with guest page tables, a page is not present by its entry: drop "
                        "not_present", "memory", "not_present")
    for key in ("vmx", "svm"):
        if cpu.get(key):
            raise ctx.error("guest paging with an L1 hypervisor (nested EPT/NPT) is not modelled",
                            "cpu", key)
    if "cpus" in data:
        raise ctx.error("guest paging with several CPUs is not modelled", "memory", "cr3")
    if "fred" in data:
        raise ctx.error("guest paging with FRED is not modelled", "memory", "cr3")
    return _expr(memory["cr3"]), ctx.line("memory", "cr3")


def _not_present(ctx: _Ctx, memory: dict) -> tuple[tuple[Expr, int], ...]:
    line = ctx.line("memory", "not_present")
    return tuple((_expr(p), line) for p in memory.get("not_present", []))


def _happenings(ctx: _Ctx, items: list[dict]) -> tuple[Happening, ...]:
    out = []
    for n, h in enumerate(items):
        event = EVENTS[h["event"]]
        if isinstance(event, HostEvent):
            continue
        if event is External.NOTIFY_TIMER:
            # the vector slot carries NOTIFY_VM_CONTEXT_INVALID (arch/cpu.py Scheduled)
            vector = int(h.get("context_invalid", False))
        elif event is External.INTERRUPT:
            vector = _vector(h["vector"])
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
            after=h.get("after"),
            at=_expr(h["at"]) if "at" in h else None,
            line=ctx.line("happen", None, n),
        ))
    return tuple(out)


def _host_happenings(ctx: _Ctx, items: list[dict]) -> tuple[HostHappening, ...]:
    out = []
    for n, h in enumerate(items):
        event = EVENTS[h["event"]]
        if event is HostEvent.FAULT:
            out.append(HostHappening(event, _expr(h["page"]), None, ctx.line("happen", None, n)))
        elif event is HostEvent.SAVE_RESTORE:
            out.append(HostHappening(event, None, h["exit"], ctx.line("happen", None, n)))
    return tuple(out)


def _known_findings(ctx: _Ctx, explore: dict, cpus: bool) -> tuple[KnownFinding, ...]:
    """With [cpus], `involves = []` declares divergences of interleavings (which have no
    happenings); elsewhere it would explain every finding, so it is refused."""
    t = "explore.known"
    out = []
    for n, k in enumerate(explore.get("known", [])):
        if not k["involves"] and not cpus:
            raise ctx.error("involves = [...] names at least one happening kind", t, "involves",
                            n)
        out.append(KnownFinding(KVM_VENDORS[k["vendor"]], tuple(k["involves"]),
                                k.get("same_boundary", False), k["why"], ctx.line(t, None, n)))
    return tuple(out)


def _explore(ctx: _Ctx, spec: dict) -> ExploreSpec | None:
    t = "explore"
    if not any(key in spec for key in CHOICE_KEYS):
        return None
    interrupts = tuple(_vector(v) for v in spec.get("interrupts", []))
    if any(v < 16 for v in interrupts):
        raise ctx.error("interrupt vectors must be 16..255", t, "interrupts", None, "SDM 10.5.2")
    line = ctx.line(t, "host_faults")
    return ExploreSpec(spec.get("nmi", 0), interrupts, spec.get("host_interrupts", 0),
                       tuple((_expr(p), line) for p in spec.get("host_faults", [])),
                       spec.get("save_restore", 0), ctx.line(t, None), spec.get("host_nmis", 0),
                       tuple(sorted(set(spec.get("vmm", [])), key=VMM_CHOICES.index)))


def _kvm_params(ctx: _Ctx, kvm: dict) -> tuple[tuple[str, bool | int | str], ...]:
    out: list[tuple[str, bool | int | str]] = [(name, kvm[name]) for name in KVM_PARAMS
                                               if name in kvm]
    flags = dict(out)
    if flags.get("sev_es") and flags.get("nrips") is False:
        raise ctx.error("SEV-ES guests need NRIPS: drop nrips = false", "kvm", "nrips")
    if flags.get("sev_es") and flags.get("vnmi"):
        raise ctx.error("vNMI with SEV-ES is not modelled", "kvm", "vnmi")
    if flags.get("debug_swap") and not flags.get("sev_es"):
        raise ctx.error("debug_swap is for SEV-ES guests: add sev_es = true", "kvm", "debug_swap")
    if "notify_vmexit" in kvm:
        out.append(("notify_vmexit", NOTIFY_MODES[kvm["notify_vmexit"]]))
    if "notify_window" in kvm:
        if kvm.get("notify_vmexit", "disable") == "disable":
            raise ctx.error("notify_window needs notify_vmexit = \"run\" or \"internal-error\"",
                            "kvm", "notify_window")
        out.append(("notify_window", kvm["notify_window"]))
    if "irqchip" in kvm:
        out.append(("irqchip", kvm["irqchip"]))
    return tuple(out)


def _stats_expect(ctx: _Ctx, expect: dict) -> tuple[ExpectedStats, ...]:
    t = "expect.stats"
    out = []
    for n, item in enumerate(expect.get("stats", [])):
        counts = tuple((name, item[name]) for name in STAT_NAMES if name in item)
        if not counts:
            raise ctx.error(f"give at least one KVM stat: {', '.join(STAT_NAMES)}", t, None, n)
        out.append(ExpectedStats(item["vendor"], counts, ctx.line(t, None, n)))
    return tuple(out)


def _divergences(ctx: _Ctx, expect: dict) -> tuple[KnownDivergence, ...]:
    t = "expect.divergence"
    return tuple(KnownDivergence(KVM_VENDORS[d["vendor"]], 0 if d["entry"] == "final" else d["entry"],
                                 d["why"], ctx.line(t, None, n))
                 for n, d in enumerate(expect.get("divergence", [])))


def _qemu_differences(ctx: _Ctx, expect: dict) -> tuple[QemuDifference, ...]:
    t = "expect.qemu"
    out = []
    for n, d in enumerate(expect.get("qemu", [])):
        fields = d["field"] if isinstance(d["field"], list) else [d["field"]]
        out.append(QemuDifference(QEMU_ACCELS[d["accel"]], 0 if d["entry"] == "final" else d["entry"],
                                  tuple(fields), d.get("mask"), d["why"], ctx.line(t, None, n)))
    return tuple(out)


def _no_apic_interrupts(ctx: _Ctx, happen: list[dict], explore: dict) -> None:
    """With a userspace irqchip KVM has no local APIC to accept an interrupt: the VMM's 8259
    sends them ([[vmm]] interrupt_window or KVM_INTERRUPT)."""
    why = 'irqchip = "userspace" has no in-kernel local APIC'
    hint = 'the VMM\'s 8259 sends interrupts: [[vmm]] call = "interrupt_window"'
    for n, h in enumerate(happen):
        if h.get("event") == "interrupt":
            raise ctx.error(f"an interrupt happening needs a local APIC: {why}", "happen", "event",
                            n, hint)
    if explore.get("interrupts"):
        raise ctx.error(f"explored interrupts need a local APIC: {why}", "explore", "interrupts",
                        None, hint)


def _vmm_steps(ctx: _Ctx, items: list[dict]) -> tuple[VmmStep, ...]:
    """[[vmm]]: call = one of scenario/vmm.py CALLS, exit = N or at = "label"; a call's
    arguments by name (CALL_FIELDS: struct kvm_vcpu_events or kvm_debugregs fields a crafted
    SET changes, `enable` for KVM_ENABLE_CAP_EXCEPTION_PAYLOAD; `vector` for KVM_INTERRUPT
    and interrupt_window)."""
    t = "vmm"
    out = []
    for n, item in enumerate(items):
        if ("exit" in item) == ("at" in item):
            raise ctx.error("give exactly one of exit = N (after the Nth VM exit) or at = \"label\" "
                            "(the first exit once the guest is there)", t, None, n)
        # the schema let through only the call's own arguments, as bools or numbers
        names = VMM_CALL_FIELDS.get(item["call"], ()) + ("vector",)
        args = tuple((name, int(item[name])) for name in names if name in item)
        out.append(VmmStep(item["call"], item.get("exit"),
                           _expr(item["at"]) if "at" in item else None, args,
                           ctx.line(t, None, n)))
    return tuple(out)


def _deliveries(ctx: _Ctx, expect: dict) -> tuple[ExpectedDelivery, ...] | None:
    if "delivery" not in expect:
        return None
    items = expect["delivery"]
    t = "expect.delivery"
    out = []
    for n, d in enumerate(items):
        repeats = d.get("repeats", False)
        if repeats and n != len(items) - 1:
            raise ctx.error("only the last [[expect.delivery]] can repeat", t, "repeats", n)
        vector = _vector(d["vector"])
        type_ = EVENT_TYPES[d["type"]] if "type" in d else None
        if "return" in d and saved_ip_undefined(vector, type_ or EventType.HW_EXCEPTION):
            raise ctx.error(
                "the return address of a #DF is undefined (SDM 6.15 Interrupt 8: the saved CS "
                "and EIP are undefined): the model pushes one, but no guest can rely on it and "
                "runs are never compared on it", t, "return", n,
                hint='leave return out; for INT 8, a software interrupt, say type = "sw_int"')
        out.append(ExpectedDelivery(
            vector=vector,
            type=type_,
            error_code=d.get("error_code"),
            return_rip=_expr(d["return"]) if "return" in d else None,
            retired=d.get("retired"),
            line=ctx.line(t, None, n),
            repeats=repeats,
            cpu=d.get("cpu", 0),
        ))
    return tuple(out)


def _cpus(ctx: _Ctx, cpus: dict | None, expect: dict) -> CpusSpec | None:
    if cpus is None:
        for n, d in enumerate(expect.get("delivery", [])):
            if d.get("cpu", 0):
                raise ctx.error(f"cpu = {d['cpu']}, but there is one CPU", "expect.delivery",
                                "cpu", n, hint="[cpus] count = N makes several")
        return None
    count = cpus["count"]
    for key in ("entry", "rsp"):
        if len(cpus.get(key, ())) > count:
            raise ctx.error(f"[cpus] {key} lists more than count = {count} CPUs", "cpus", key)
    for n, d in enumerate(expect.get("delivery", [])):
        if d.get("cpu", 0) >= count:
            raise ctx.error(f"cpu = {d['cpu']}, but [cpus] count = {count} (CPUs 0..{count - 1})",
                            "expect.delivery", "cpu", n)
    return CpusSpec(count, tuple(_expr(e) for e in cpus["entry"]),
                    tuple(_expr(r) for r in cpus.get("rsp", ())), ctx.line("cpus"))


def _final(ctx: _Ctx, expect: dict) -> tuple[tuple[str, Expected], ...]:
    return tuple((key, Expected(_expr(value) if not isinstance(value, bool) else value,
                                ctx.line("expect.final", key)))
                 for key, value in expect.get("final", {}).items())
