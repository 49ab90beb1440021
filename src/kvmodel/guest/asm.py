"""Assemble guest text with GNU binutils into a flat image linked at a base address.

`as` assembles (AT&T syntax by default; `.intel_syntax noprefix` works), `ld`
links with a small script that lays .text, .rodata, .data and .bss out
contiguously at `base`, `objcopy` produces the flat image, `nm` the labels
and `objdump --dwarf=decodedline` the address-to-source-line map. Results are
cached on disk by a digest of everything that goes in. Guest code is never
run on the host.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from kvmodel.errors import ScenarioError, ToolMissing

TOOLS = ("as", "ld", "objcopy", "nm", "objdump")
INCLUDE_DIR = Path(__file__).parent / "include"  # macros scenarios may `.include`
INSTALL_HINT = ("install binutils (Debian/Ubuntu: apt-get install binutils; "
                "Fedora: dnf install binutils; macOS: brew install x86_64-elf-binutils)")
_ERROR = re.compile(r"^[^:]*:(\d+): Error: (.*)$")
_LINKER_SCRIPT = """SECTIONS {{
  . = {base:#x};
  .text : {{ *(.text) *(.text.*) }}
  .rodata : {{ *(.rodata) *(.rodata.*) }}
  .data : {{ *(.data) *(.data.*) }}
  .bss : {{ *(.bss) *(.bss.*) *(COMMON) }}
  /DISCARD/ : {{ *(.note*) *(.comment) *(.eh_frame) }}
}}
"""


class Bits(IntEnum):
    B32 = 32
    B64 = 64


@dataclass(frozen=True, slots=True)
class Program:
    """An assembled guest: its bytes at `base`, its labels and its line map."""

    base: int
    image: bytes
    symbols: tuple[tuple[str, int], ...]  # (label, address), by address then name
    lines: tuple[tuple[int, int], ...]  # (address, source line), by address

    def symbol(self, name: str) -> int:
        for label, address in self.symbols:
            if label == name:
                return address
        close = [s for s, _ in self.symbols if s.lower() == name.lower()]
        raise LookupError(f'no label "{name}"' + (f'; did you mean "{close[0]}"?' if close else ""))

    def where(self, address: int) -> str:
        """"label+0x3" for the nearest label at or below address, else the hex address."""
        best = None
        for label, at in self.symbols:
            if at <= address and (best is None or at >= best[1]):
                best = (label, at)
        if best is None or address >= self.base + len(self.image) + 0x1000:
            return f"{address:#x}"
        offset = address - best[1]
        return best[0] if offset == 0 else f"{best[0]}+{offset:#x}"

    def line_of(self, address: int) -> int | None:
        """Source line of the instruction containing `address`."""
        starts = [a for a, _ in self.lines]
        k = bisect.bisect_right(starts, address) - 1
        return self.lines[k][1] if k >= 0 else None


def find_binutils() -> None:
    """Raise ToolMissing naming the missing binutils program and how to install it."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise ToolMissing(f"GNU {' and '.join(missing)} (binutils) not found on PATH: "
                          + INSTALL_HINT)


_memory_cache: dict[str, Program] = {}


def assemble(source: str, bits: Bits, base: int, *, filename: str = "<guest>",
             line_offset: int = 0, defines: tuple[tuple[str, int], ...] = ()) -> Program:
    """Assemble `source`; line numbers (errors and `lines`) are offset by `line_offset`.

    `defines` are absolute symbols the source may use (`as --defsym`), not labels.
    """
    key = _digest(source, bits, base, line_offset, defines)
    program = _memory_cache.get(key) or _read_cache(key)
    if program is None:
        find_binutils()
        program = _build(source, bits, base, filename, line_offset, defines)
        _write_cache(key, program)
    _memory_cache[key] = program
    return program


@functools.cache
def _includes() -> str:
    """The shipped guest library (`.include "sev_es.s"`), part of every cache key."""
    return "".join(p.read_text() for p in sorted(INCLUDE_DIR.glob("*.s")))


@functools.cache
def _as_version() -> str:
    out = subprocess.run(["as", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


@functools.cache
def _ld_flags() -> tuple[str, ...]:
    help_text = subprocess.run(["ld", "--help"], capture_output=True, text=True,
                               check=False).stdout
    flags = ["-z", "noexecstack"]
    if "--no-warn-rwx-segments" in help_text:
        flags.append("--no-warn-rwx-segments")
    return tuple(flags)


def _digest(source: str, bits: Bits, base: int, line_offset: int,
            defines: tuple[tuple[str, int], ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in (source, str(int(bits)), str(base), str(line_offset), repr(defines),
                 _as_version(), _includes()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _build(source: str, bits: Bits, base: int, filename: str, line_offset: int,
           defines: tuple[tuple[str, int], ...]) -> Program:
    with tempfile.TemporaryDirectory(prefix="kvmodel-asm-") as tmp:
        d = Path(tmp)
        (d / "guest.s").write_text(source if source.endswith("\n") else source + "\n")
        (d / "link.ld").write_text(_LINKER_SCRIPT.format(base=base))
        emulation = "elf_x86_64" if bits is Bits.B64 else "elf_i386"
        defsyms = [arg for name, value in defines for arg in ("--defsym", f"{name}={value:#x}")]
        result = _tool(["as", f"--{int(bits)}", "-g", "-I", str(INCLUDE_DIR), *defsyms, "-o",
                        "guest.o", "guest.s"], d)
        if result.returncode != 0:
            raise _assembly_error(result.stderr, filename, line_offset)
        _tool(["ld", "-m", emulation, *_ld_flags(), "-T", "link.ld", "-o", "guest.elf",
               "guest.o"], d, check=True)
        _tool(["objcopy", "-O", "binary", "--set-section-flags", ".bss=alloc,load,contents",
               "guest.elf", "guest.bin"], d, check=True)
        image = (d / "guest.bin").read_bytes()
        symbols = _symbols(_tool(["nm", "-n", "guest.elf"], d, check=True).stdout)
        lines = _lines(_tool(["objdump", "--dwarf=decodedline", "guest.elf"], d,
                             check=True).stdout, line_offset)
    return Program(base, image, symbols, lines)


def _tool(argv: list[str], cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise ScenarioError("<guest>", None, f"{argv[0]} failed: {result.stderr.strip()}")
    return result


def _assembly_error(stderr: str, filename: str, line_offset: int) -> ScenarioError:
    errors = [m for m in map(_ERROR.match, stderr.splitlines()) if m]
    if not errors:
        return ScenarioError(filename, None, f"assembler: {stderr.strip()}")
    first = errors[0]
    hint = f"{len(errors) - 1} more assembler errors follow" if len(errors) > 1 else None
    return ScenarioError(filename, line_offset + int(first.group(1)),
                         f"assembler: {first.group(2)}", hint)


def _symbols(nm_output: str) -> tuple[tuple[str, int], ...]:
    out = []
    for line in nm_output.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[1] in "aNUw" or parts[2].startswith(".L"):
            continue
        out.append((parts[2], int(parts[0], 16)))
    return tuple(sorted(out, key=lambda s: (s[1], s[0])))


def _lines(dwarf: str, line_offset: int) -> tuple[tuple[int, int], ...]:
    """Rows "guest.s  <line>  0x<address>" of objdump's decoded line table."""
    rows = {}
    for line in dwarf.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "guest.s" and parts[1].isdigit():
            rows.setdefault(int(parts[2], 0), line_offset + int(parts[1]))
    return tuple(sorted(rows.items()))


def _cache_dir() -> Path:
    if os.environ.get("KVMODEL_CACHE_DIR"):
        return Path(os.environ["KVMODEL_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kvmodel" / "asm"


def _read_cache(key: str) -> Program | None:
    try:
        data = json.loads((_cache_dir() / f"{key}.json").read_text())
        return Program(data["base"], bytes.fromhex(data["image"]),
                       tuple((s, a) for s, a in data["symbols"]),
                       tuple((a, n) for a, n in data["lines"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or corrupt: assemble again


def _write_cache(key: str, program: Program) -> None:
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        data = {"base": program.base, "image": program.image.hex(),
                "symbols": program.symbols, "lines": program.lines}
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, directory / f"{key}.json")  # atomic: workers may race
    except OSError:
        pass  # the cache is an optimisation only
