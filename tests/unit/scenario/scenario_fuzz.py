"""Mutated shipped scenarios fed through `kvmodel run`: the fuzz tests' engine and a campaign.

Every input must end as the command says it does: exit 0 or 1 (a verdict),
or exit 2 with "file:line: message" (a ScenarioError) or a model limit;
never exit 4 (an internal error) and never a hang.

    .venv/bin/python tests/unit/scenario/scenario_fuzz.py --inputs 20000 --out fuzz.json

runs a campaign and writes its figures (outcomes, the internal errors by
exception and place).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvmodel.cli import Exit, main

ROOT = Path(__file__).parents[3]
SCENARIOS = sorted((ROOT / "scenarios").rglob("*.toml"))

# Values of every TOML type and of sizes and signs no field allows, for type swaps.
ODD_VALUES = (
    "[]", "{}", "[1, 2]", "{ a = 1 }", '""', '"x"', "true", "false", "1.5", "nan", "-inf",
    "0", "-1", "256", "65536", "0xFFFF_FFFF", "0x1_0000_0000", "0xFFFF_FFFF_FFFF_FFFF",
    "0x1_0000_0000_0000_0000", "-9223372036854775808", "340282366920938463463374607431768211456",
    "1979-05-27T07:32:00Z", "07:32:00", '"start+0x1_0000_0000_0000_0000"', '"start-99"',
    '"#PF"', '"NMI"', '"\\u0000"', '"\\u202e\\ud7ff"', '"é"', "[[]]", "[{}]", '["x", 1]',
    '"start+0x10000000000000000000"', "[ [ [ 1 ] ] ]", '{ handler = [] }',
)
HUGE = ("18446744073709551616", "18446744073709551615", "9223372036854775807", "-1",
        "-9223372036854775808", "0x1_0000_0000", "0xFFFF_FFFF", "4294967296", "1000000000000",
        "99999999999999999999999999", "0", "256", "255", "65535", "65536", "0o777", "0b1")
TABLES = ("happen", "expect.delivery", "expect.final", "expect.memory", "expect.divergence",
          "expect.stats", "explore.known", "explore", "expect", "guest", "cpu", "kvm",
          "registers", "idt", "tss", "fred", "memory")
ASM_JUNK = (
    '.incbin "/etc/passwd"', '.incbin "/proc/self/environ"', '.include "/dev/stdin"',
    '.incbin "../../../../../../etc/hostname"', '.include "/etc/passwd"',
    '.incbin "/dev/zero", 0, 64', '.include "vmx.s"', '.include "../include/vmx.s"',
    ".space 0x10000000000", ".align 1<<30", ".balign 0x40000000", ".fill 0x7fffffff, 8, 0",
    ".org 0x100000000", ".rept 10000000\nnop\n.endr", ".bss\n.space 0x10000000", ".data\n.space 0x100000",
    '.macro m f\n.incbin "\\f"\n.endm\nm /etc/passwd', '.irp f, /etc/passwd\n.incbin "\\f"\n.endr',
    "jmp .", "1: jmp 1b", "ud2", "int $3", "cli", "sti", "hlt", "iretq", "iret", "lidt 0",
    "mov %cr0, %rax", "movabs $0x123456789, %rax", "xyzzy %rax", "mov $1, %eax\n.code16",
    ".byte 0x0f, 0x0b", ".quad 0", ".intel_syntax noprefix\nmov eax, [rax]", "int1", "into",
    "out %al, $0xe9", "mov $0x80b, %ecx\nwrmsr", "push %rax\npop %ss", "pause", "\\", '"',
    ".err", '.error "x"', ".end", ".equ start, 0", ".set start, 5", "nmi_handler:",
)
HEADER = re.compile(rb"^(\s*)(\[\[?)\s*([A-Za-z0-9_.]+)\s*(\]\]?)", re.M)
ASSIGN = re.compile(rb"^(\s*[A-Za-z0-9_\"'#.-]+\s*=\s*)(.+)$", re.M)
NUMBER = re.compile(rb"(?<![\w.#$])(0x[0-9A-Fa-f_]+|\d[\d_]*)(?![\w.])")


def _pick(rnd: random.Random, pattern: re.Pattern, data: bytes) -> re.Match | None:
    found = list(pattern.finditer(data))
    return rnd.choice(found) if found else None


def _replace(data: bytes, m: re.Match | None, group: int, new: bytes) -> bytes:
    if m is None:
        return data
    return data[:m.start(group)] + new + data[m.end(group):]


def flip_byte(data: bytes, rnd: random.Random) -> bytes:
    if not data:
        return data
    at = rnd.randrange(len(data))
    return data[:at] + bytes([data[at] ^ rnd.randrange(1, 256)]) + data[at + 1:]


def truncate(data: bytes, rnd: random.Random) -> bytes:
    return data[:rnd.randrange(len(data) + 1)]


def swap_type(data: bytes, rnd: random.Random) -> bytes:
    return _replace(data, _pick(rnd, ASSIGN, data), 2, rnd.choice(ODD_VALUES).encode())


def swap_values(data: bytes, rnd: random.Random) -> bytes:
    found = list(ASSIGN.finditer(data))
    if len(found) < 2:
        return data
    a, b = sorted(rnd.sample(found, 2), key=lambda m: m.start())
    return (data[:a.start(2)] + b.group(2) + data[a.end(2):b.start(2)] + a.group(2)
            + data[b.end(2):])


def huge_number(data: bytes, rnd: random.Random) -> bytes:
    return _replace(data, _pick(rnd, NUMBER, data), 1, rnd.choice(HUGE).encode())


def table_swap(data: bytes, rnd: random.Random) -> bytes:
    """An array of tables written as a table and the other way round, or a table as a value."""
    m = _pick(rnd, HEADER, data)
    choice = rnd.randrange(3)
    if choice == 0 and m is not None:
        opening = b"[" if m.group(2) == b"[[" else b"[["
        closing = b"]" if opening == b"[" else b"]]"
        return data[:m.start(2)] + opening + m.group(3) + closing + data[m.end(4):]
    table = rnd.choice(TABLES)
    if choice == 1:
        head, _, key = table.rpartition(".")
        line = f"{key} = {rnd.choice(ODD_VALUES)}\n"
        text = (f"\n[{head}]\n" if head else "") + line
        return (line.encode() + data) if not head else data + text.encode()
    form = rnd.choice(("[{t}]", "[[{t}]]"))
    return data + f"\n{form.format(t=table)}\nevent = \"nmi\"\nvector = 2\n".encode()


def deep_nesting(data: bytes, rnd: random.Random) -> bytes:
    n = rnd.choice((30, 100, 300, 1000, 3000))
    new = ("[" * n + "]" * n) if rnd.random() < 0.5 else ("{a=" * n + "1" + "}" * n)
    return _replace(data, _pick(rnd, ASSIGN, data), 2, new.encode())


def long_string(data: bytes, rnd: random.Random) -> bytes:
    n = rnd.choice((1000, 100_000, 1_000_000))
    return _replace(data, _pick(rnd, ASSIGN, data), 2, b'"' + b"A" * n + b'"')


def unicode_junk(data: bytes, rnd: random.Random) -> bytes:
    chars = "é\u202e\u200b\u0301\ufeff\U0001f600\u2028\x00\x7f\x1b" + "ｓｔａｒｔ"
    junk = "".join(rnd.choice(chars) for _ in range(rnd.randrange(1, 8))).encode()
    at = rnd.randrange(len(data) + 1)
    return data[:at] + junk + data[at:]


def binary_junk(data: bytes, rnd: random.Random) -> bytes:
    junk = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 32)))
    at = rnd.randrange(len(data) + 1)
    return data[:at] + junk + data[at:]


def bad_assembly(data: bytes, rnd: random.Random) -> bytes:
    m = re.search(rb"code\s*=\s*'''\n", data)
    if m is None:
        return data
    lines = data[m.end():].split(b"\n")
    at = rnd.randrange(len(lines))
    lines.insert(at, rnd.choice(ASM_JUNK).encode())
    return data[:m.end()] + b"\n".join(lines)


def many_happenings(data: bytes, rnd: random.Random) -> bytes:
    n = rnd.choice((10, 100, 1000))
    block = rnd.choice((b'[[happen]]\nevent = "nmi"\nafter = 1\n',
                        b'[[happen]]\nevent = "host_interrupt"\nafter = 2\n',
                        b'[[happen]]\nevent = "interrupt"\nvector = 0x30\nat = "start"\n'))
    return data + b"\n" + block * n


def edit_line(data: bytes, rnd: random.Random) -> bytes:
    lines = data.split(b"\n")
    at = rnd.randrange(len(lines))
    if rnd.random() < 0.5:
        del lines[at]
    else:
        lines.insert(at, lines[rnd.randrange(len(lines))])
    return b"\n".join(lines)


def rename_key(data: bytes, rnd: random.Random) -> bytes:
    m = _pick(rnd, ASSIGN, data)
    if m is None:
        return data
    names = (b"vector", b"after", b"at", b"event", b"mode", b"entry", b"ist1", b"rax", b"eax",
             b"handler", b"page", b"exit", b"why", b"vendor", b"involves", b"stop", b"NMI",
             b"max_steps", b"memory_kib", b"rsp", b"0x30", b"256", b"\"#XX\"", b"code")
    return data[:m.start(1)] + rnd.choice(names) + b" = " + data[m.end(1):]


VALID = {
    b"mode": (b'"long64"', b'"protected32"'), b"vendor": (b'"bare"', b'"svm"', b'"vmx"', b'"any"'),
    b"event": tuple(b'"%s"' % e for e in (b"nmi", b"interrupt", b"host_interrupt", b"host_nmi",
                                          b"notify", b"host_fault", b"save_restore")),
    b"gate": (b'"trap"', b'"interrupt"', b"0", b"5", b"12", b"15"), b"present": (b"false", b"true"),
    b"ist": tuple(b"%d" % k for k in range(8)), b"after": (b"0", b"1", b"2", b"5", b"50"),
    b"exit": (b"1", b"2", b"3"), b"vector": (b'"NMI"', b'"#DB"', b'"#PF"', b"0x30", b"255", b"16"),
    b"stop": (b'"halted"', b'"shutdown"', b'"budget"', b'"vmm"'),
    b"max_steps": (b"1", b"10", b"1000"), b"rflags": (b"0x2", b"0x202", b"0x302", b"0x10302"),
}


def valid_swap(data: bytes, rnd: random.Random) -> bytes:
    """A key given another value it may take: deeper paths than a refusal."""
    found = [m for m in ASSIGN.finditer(data) if m.group(1).strip(b" =") in VALID]
    if not found:
        return data
    m = rnd.choice(found)
    return _replace(data, m, 2, rnd.choice(VALID[m.group(1).strip(b" =")]))


def label_swap(data: bytes, rnd: random.Random) -> bytes:
    """A label in a value replaced by another label of the guest, maybe with an offset."""
    labels = re.findall(rb"^\s*([A-Za-z_][\w.]*):", data, re.M)
    uses = list(re.finditer(rb'= "([A-Za-z_][\w.]*)(?:[+-][\w]+)?"', data))
    if not labels or not uses:
        return data
    new = rnd.choice(labels) + rnd.choice((b"", b"+1", b"+0x2", b"-1", b"+0x1000"))
    return _replace(data, rnd.choice(uses), 1, new)


MUTATIONS = (valid_swap, valid_swap, label_swap, flip_byte, truncate, swap_type, swap_values,
             huge_number, table_swap, deep_nesting, long_string, unicode_junk, binary_junk,
             bad_assembly, bad_assembly, many_happenings, edit_line, rename_key, swap_type,
             huge_number)


def mutate(data: bytes, rnd: random.Random) -> tuple[bytes, tuple[str, ...]]:
    applied = []
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        op = rnd.choice(MUTATIONS)
        data = op(data, rnd)
        applied.append(op.__name__)
    return data, tuple(applied)


# -- the command under test ----------------------------------------------------------------

class Hang(BaseException):
    """The run took longer than its allowance (BaseException: the CLI's own handler lets it go)."""


@dataclass(frozen=True)
class Outcome:
    kind: str  # "verdict" (exit 0/1), "refused" (exit 2, file:line), "limit" (exit 2, model
    #            limit), "crash" (exit 4 or an exception), "unlocated" (exit 2 with no line), "hang"
    code: int | None
    detail: str  # the message, or the traceback of an internal error


def _alarm(signum, frame):
    raise Hang


def run_command(path: Path, argv: tuple[str, ...] = (), seconds: float = 60) -> Outcome:
    """`kvmodel run [argv] PATH` in this process, as a user runs it; what it ended as."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["run", *argv, str(path)])
    except Hang:
        return Outcome("hang", None, f"no answer within {seconds} s")
    except SystemExit as e:  # argparse
        return Outcome("crash", None, f"SystemExit {e.code}: {err.getvalue()}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    text = out.getvalue()
    if code in (Exit.OK, Exit.FAILED):
        return Outcome("verdict", code, "")
    if code == Exit.MODEL_BUG:
        m = re.search(r"traceback saved to (\S+)", err.getvalue())
        detail = Path(m.group(1)).read_text() if m else err.getvalue()
        if m:
            Path(m.group(1)).unlink(missing_ok=True)
        return Outcome("crash", code, detail)
    if code == Exit.BAD_INPUT:
        errors = [e["error"] for e in json.loads(text)["errors"]] if "--json" in argv else (
            [line[len("error: "):] for line in text.splitlines() if line.startswith("error: ")])
        if not errors:
            return Outcome("limit", code, text[-300:])
        located = re.match(rf"{re.escape(str(path))}:\d+: \S", errors[0], re.S)
        return Outcome("refused" if located else "unlocated", code, errors[0])
    return Outcome("crash", code, text[-2000:] + err.getvalue()[-2000:])


def fuzz_once(rnd: random.Random, folder: Path, seconds: float = 60) -> tuple[Outcome, str, tuple]:
    """One mutated shipped scenario through `kvmodel run`, in `folder`."""
    source = rnd.choice(SCENARIOS)
    data, applied = mutate(source.read_bytes(), rnd)
    path = folder / "fuzzed.toml"
    path.write_bytes(data)
    argv: tuple[str, ...] = ()
    if rnd.random() < 0.3:
        argv += ("--vendor", rnd.choice(("bare", "svm", "vmx")))
    if rnd.random() < 0.3:
        argv += ("--json",)
    return run_command(path, argv, seconds), source.name, applied


def crash_class(outcome: Outcome) -> str:
    """An internal error's exception and the innermost kvmodel frame: one class per bug."""
    lines = outcome.detail.strip().splitlines()
    frames = [f for f in re.findall(r'File "([^"]*kvmodel[^"]*)", line (\d+), in (\w+)',
                                    outcome.detail)]
    where = f"{Path(frames[-1][0]).name}:{frames[-1][2]}" if frames else "?"
    last = re.sub(r"0x[0-9a-f]+|\d+", "N", lines[-1])[:120] if lines else "?"
    return f"{last} @ {where}"


def _chunk(seeds: list[int], seconds: float) -> tuple[Counter, Counter, dict, dict]:
    """Some inputs, in a process of their own: a long campaign's memory stays that of one chunk."""
    outcomes: Counter = Counter()
    crashes: Counter = Counter()
    examples: dict[str, dict] = {}
    seeds_of: dict[str, list[int]] = {}  # every input of each class, to triage them all
    with tempfile.TemporaryDirectory(prefix="kvmodel-fuzz-") as tmp:
        path = Path(tmp) / "fuzzed.toml"
        for seed in seeds:
            began = time.monotonic()
            outcome, source, applied = fuzz_once(random.Random(seed), Path(tmp), seconds)
            outcomes[outcome.kind] += 1
            if outcome.kind in ("crash", "hang", "unlocated"):
                key = crash_class(outcome) if outcome.kind == "crash" else (
                    f"{outcome.kind}: " + re.sub(r"0x[0-9a-f]+|\d+", "N", outcome.detail.replace(
                        str(path), "FILE"))[:100])
                crashes[key] += 1
                seeds_of.setdefault(key, []).append(seed)
                examples.setdefault(key, {
                    "seed": seed, "source": source, "mutations": applied,
                    "input": path.read_bytes()[:20000].decode("utf-8", "replace"),
                    "seconds": round(time.monotonic() - began, 1)})
    return outcomes, crashes, examples, seeds_of


def campaign(inputs: int, seed: int, seconds: float, out: Path | None, chunk: int = 1000) -> dict:
    """`inputs` mutated scenarios, `chunk` at a time in a fresh process (one at a time)."""
    rnd = random.Random(seed)
    seeds = [rnd.getrandbits(64) for _ in range(inputs)]
    outcomes: Counter = Counter()
    crashes: Counter = Counter()
    examples: dict[str, dict] = {}
    seeds_of: dict[str, list[int]] = {}
    start = time.monotonic()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        for done in range(0, inputs, chunk):
            part = pool.submit(_chunk, seeds[done:done + chunk], seconds).result()
            outcomes.update(part[0])
            crashes.update(part[1])
            for key, example in part[2].items():
                examples.setdefault(key, example)
            for key, more in part[3].items():
                seeds_of.setdefault(key, []).extend(more)
            report = {"inputs": min(done + chunk, inputs), "seconds": round(time.monotonic() - start),
                      "outcomes": dict(outcomes), "classes": dict(crashes.most_common()),
                      "examples": examples, "seeds": seeds_of}
            if out is not None:
                out.write_text(json.dumps(report, indent=1))
            print(f"{report['inputs']} inputs, {report['seconds']} s: {dict(outcomes)}", flush=True)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=60, help="a run longer than this is a hang")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--chunk", type=int, default=1000, help="inputs per worker process")
    args = parser.parse_args()
    figures = campaign(args.inputs, args.seed, args.seconds, args.out, args.chunk)
    sys.exit(1 if figures["classes"] else 0)
