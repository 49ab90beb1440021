"""Assemble guest text with GNU binutils into a flat image linked at a base address.

`as` assembles (AT&T syntax by default; `.intel_syntax noprefix` works), `ld`
links with a small script that lays .text, .rodata, .data and .bss out
contiguously at `base`, `objcopy` produces the flat image, `nm` the labels
and `objdump --dwarf=decodedline` the address-to-source-line map. Results are
cached on disk by a digest of everything that goes in, and of every file the
source included. Guest code is never run on the host.

No host file reaches the guest but those in the scenario's folder and the
guest library: `.include`/`.incbin` names are checked before `as` runs, and
the files `as` opened (its --MD list; macros can build the directives) after.
Each program runs with no input, a wall-clock limit and limits on memory and
on the size of what it writes, so a `.space` or `.align` of gigabytes is an
error, not a full disk.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from kvmodel.errors import ScenarioError, ToolMissing

try:
    import resource
except ImportError:  # not a Unix host
    resource = None

TOOLS = ("as", "ld", "objcopy", "nm", "objdump")
INCLUDE_DIR = Path(__file__).parent / "include"  # macros scenarios may `.include`
INSTALL_HINT = ("install binutils (Debian/Ubuntu: apt-get install binutils; "
                "Fedora: dnf install binutils; macOS: brew install x86_64-elf-binutils)")
LIBRARY_NAME = "src/kvmodel/guest/include"  # how messages name INCLUDE_DIR
SECONDS = 30  # wall-clock limit of each binutils program
TOOL_MEMORY = 2 << 30  # address space of each binutils program
MAX_IMAGE = 64 << 20  # the largest image when the caller gives no memory size
_ERROR = re.compile(r"^(.*?):(\d+): (?:Error|Fatal error): (.*)$")
_DIRECTIVE = re.compile(r"\.(incbin|include)\b\s*(.*)", re.IGNORECASE)
_COMMENT = re.compile(r'#(?=(?:[^"]*"[^"]*")*[^"]*$).*')  # from a # outside double quotes
_SECTION = re.compile(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+[0-9a-f]+\s+\S+\s+(.*)$")
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
    B16 = 16  # `as --32` with .code16: real-mode code, linked as i386
    B32 = 32
    B64 = 64


@dataclass(frozen=True, slots=True)
class Program:
    """An assembled guest: its bytes at `base`, its labels and its line map."""

    base: int
    image: bytes
    symbols: tuple[tuple[str, int], ...]  # (label, address), by address then name
    lines: tuple[tuple[int, int], ...]  # (address, source line), by address
    deps: tuple[tuple[str, str], ...] = ()  # (file, digest of its bytes) of what was included

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


_memory_cache: dict[str, Program] = {}  # the most recently used first out last
MEMORY_CACHE_ENTRIES = 256  # a long campaign assembles many programs; keep the recent ones


def assemble(source: str, bits: Bits, base: int, *, filename: str = "<guest>",
             line_offset: int = 0, defines: tuple[tuple[str, int], ...] = (),
             folder: Path | None = None, max_image: int = MAX_IMAGE) -> Program:
    """Assemble `source`; line numbers (errors and `lines`) are offset by `line_offset`.

    `defines` are absolute symbols the source may use (`as --defsym`), not labels.
    `folder`: the scenario's folder, whose files `.include`/`.incbin` may name (as
    does the guest library); `max_image`: the most bytes the image may take.
    """
    where = _Where(filename, line_offset, source)
    roots = _roots(folder)
    _check_directives(where, folder, roots)
    key = _digest(source, bits, base, line_offset, defines, folder)
    program = _memory_cache.pop(key, None) or _read_cache(key)
    if program is None or not _unchanged(program.deps):
        find_binutils()
        program = _build(source, bits, base, where, defines, folder, roots, max_image)
        _write_cache(key, program)
    _memory_cache[key] = program
    if len(_memory_cache) > MEMORY_CACHE_ENTRIES:
        del _memory_cache[next(iter(_memory_cache))]
    if len(program.image) > max_image:
        raise where.error(f"the guest image is {len(program.image):#x} bytes, more than the "
                          f"{max_image:#x} the memory has above its load address", None,
                          _MEMORY_HINT)
    return program


_MEMORY_HINT = "raise [cpu] memory_kib, or make the guest smaller"


@dataclass(frozen=True, slots=True)
class _Where:
    """The scenario the source comes from, to name the file:line of a problem."""

    filename: str
    line_offset: int
    source: str

    def error(self, message: str, line: int | None = None, hint: str | None = None) -> ScenarioError:
        """`line`: of the guest source; None: the line where the code starts."""
        return ScenarioError(self.filename, self.line_offset + (line or 1), message, hint)


def _roots(folder: Path | None) -> tuple[Path, ...]:
    """The folders whose files a guest may include: the guest library and the scenario's own."""
    roots = [INCLUDE_DIR.resolve()]
    if folder is not None:
        roots.append(folder.resolve())
    return tuple(roots)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    try:
        real = path.resolve()  # symbolic links followed, `..` gone
    except (OSError, ValueError, RuntimeError):  # a NUL in the name, a loop of links
        return False
    return any(real.is_relative_to(root) for root in roots)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return True  # unreadable or unnamable: let _inside judge it


def _check_directives(where: _Where, folder: Path | None, roots: tuple[Path, ...]) -> None:
    """Refuse `.include`/`.incbin` of a file outside `roots`, before `as` opens it.

    `as` looks for a relative name in its working directory (the scenario's
    folder) and then in the guest library (-I); an absolute name is used as is.
    """
    for number, text in enumerate(where.source.splitlines(), start=1):
        for m in _DIRECTIVE.finditer(_COMMENT.sub("", text)):
            name = re.match(r'"([^"\\]*)"', m.group(2))
            if name is None or not name.group(1):
                raise where.error(f".{m.group(1).lower()} takes a file name in double quotes, "
                                  "nothing else", number, _INCLUDE_HINT)
            candidates = [Path(name.group(1))] if Path(name.group(1)).is_absolute() else [
                d / name.group(1) for d in (folder, INCLUDE_DIR) if d is not None]
            found = next((c for c in candidates if _exists(c)), None)
            if found is not None and not _inside(found, roots):
                raise where.error(f'.{m.group(1).lower()} "{name.group(1)}" is outside the '
                                  "scenario's folder and the guest library", number, _INCLUDE_HINT)


_INCLUDE_HINT = f"a guest may include files of its scenario's folder and of {LIBRARY_NAME}"


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
            defines: tuple[tuple[str, int], ...], folder: Path | None) -> str:
    """What goes in but the included files (a cached Program lists those with their digests)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (source, str(int(bits)), str(base), str(line_offset), repr(defines),
                 _as_version(), str(folder.resolve()) if folder is not None else ""):
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def _file_digest(path: str) -> str | None:
    try:
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return None


def _unchanged(deps: tuple[tuple[str, str], ...]) -> bool:
    return all(_file_digest(path) == digest for path, digest in deps)


def _build(source: str, bits: Bits, base: int, where: _Where,
           defines: tuple[tuple[str, int], ...], folder: Path | None, roots: tuple[Path, ...],
           max_image: int) -> Program:
    with tempfile.TemporaryDirectory(prefix="kvmodel-asm-") as tmp:
        d = Path(tmp)
        src = d / "guest.s"
        if bits is Bits.B16:
            source = ".code16; " + source  # on the first line: the line numbers stay
        src.write_text(source if source.endswith("\n") else source + "\n", encoding="utf-8",
                       errors="surrogateescape")
        (d / "link.ld").write_text(_LINKER_SCRIPT.format(base=base))
        cwd = folder if folder is not None and folder.is_dir() else d / "empty"
        cwd.mkdir(exist_ok=True)
        # A .o holds the image and its line table; anything much larger than the image is not one.
        limits = max_image * 4 + (16 << 20)
        emulation = "elf_x86_64" if bits is Bits.B64 else "elf_i386"
        defsyms = [arg for name, value in defines for arg in ("--defsym", f"{name}={value:#x}")]
        result = _tool(["as", f"--{max(int(bits), 32)}", "-g", "-I", str(INCLUDE_DIR), *defsyms,
                        "--MD", str(d / "deps.d"), "-o", str(d / "guest.o"), str(src)],
                       cwd, where, limits)
        deps = _dependencies(d / "deps.d", src, cwd, where, roots)
        if result.returncode != 0:
            raise _assembly_error(result.stderr, src, where)
        _tool(["ld", "-m", emulation, *_ld_flags(), "-T", "link.ld", "-o", "guest.elf",
               "guest.o"], d, where, limits, check=True)
        _check_extent(_tool(["objdump", "-h", "-w", "guest.elf"], d, where, limits,
                            check=True).stdout, base, max_image, where)
        _tool(["objcopy", "-O", "binary", "--set-section-flags", ".bss=alloc,load,contents",
               "guest.elf", "guest.bin"], d, where, limits, check=True)
        image = (d / "guest.bin").read_bytes()
        symbols = _symbols(_tool(["nm", "-n", "guest.elf"], d, where, limits, check=True).stdout)
        lines = _lines(_tool(["objdump", "--dwarf=decodedline", "guest.elf"], d, where, limits,
                             check=True).stdout, where.line_offset)
    return Program(base, image, symbols, lines, deps)


def _restrict(pid: int, file_size: int) -> None:
    """Limit a running binutils program's memory and the size of each file it writes.

    Set from outside (Linux prlimit) just after it starts: a preexec_fn would make
    every start a full fork of this process, ten times slower. It has written
    nothing by then; elsewhere the wall-clock limit stays.
    """
    prlimit = getattr(resource, "prlimit", None) if resource is not None else None
    if prlimit is None:
        return
    try:
        prlimit(pid, resource.RLIMIT_FSIZE, (file_size, file_size))
        prlimit(pid, resource.RLIMIT_AS, (TOOL_MEMORY, TOOL_MEMORY))
    except (ProcessLookupError, PermissionError):
        pass  # it has ended already


def _dependencies(depfile: Path, src: Path, cwd: Path, where: _Where,
                  roots: tuple[Path, ...]) -> tuple[tuple[str, str], ...]:
    """The files `as` opened besides the source (its --MD list), each inside `roots`."""
    try:
        text = depfile.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return ()  # `as` stopped before writing it
    names = re.split(r"(?<!\\)\s+", text.replace("\\\n", " ").partition(":")[2].strip())
    out = []
    for name in filter(None, names):
        path = cwd / name.replace("\\ ", " ").replace("$$", "$")
        if path.resolve() == src.resolve():
            continue
        if not _inside(path, roots):
            raise where.error(f'the guest includes "{name}", outside the scenario\'s folder '
                              "and the guest library", _line_naming(where.source, name),
                              _INCLUDE_HINT)
        out.append((str(path.resolve()), _file_digest(str(path)) or ""))
    return tuple(sorted(set(out)))


def _line_naming(source: str, name: str) -> int | None:
    """The first source line that mentions a file's name (a macro's argument, say)."""
    stem = Path(name).name
    return next((n for n, text in enumerate(source.splitlines(), start=1) if stem in text), None)


def _check_extent(sections: str, base: int, max_image: int, where: _Where) -> None:
    """Every allocated section within [base, base + max_image), before objcopy writes it."""
    for line in sections.splitlines():
        m = _SECTION.match(line)
        if m is None or "ALLOC" not in m.group(4):
            continue
        size, vma = int(m.group(2), 16), int(m.group(3), 16)
        if size and (vma < base or vma + size > base + max_image):
            raise where.error(f"the guest's {m.group(1)} ({size:#x} bytes at {vma:#x}) lies "
                              f"outside the {max_image:#x} bytes of memory from {base:#x}", None,
                              _MEMORY_HINT)


def _tool(argv: list[str], cwd: Path, where: _Where, file_size: int,
          check: bool = False) -> subprocess.CompletedProcess:
    with subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, encoding="utf-8",
                          errors="replace") as process:
        _restrict(process.pid, file_size)
        try:
            stdout, stderr = process.communicate(timeout=SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise where.error(f"{argv[0]} did not finish within {SECONDS} s", None,
                              "a .rept, .fill or .space too large?") from None
    result = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    if result.returncode == -signal.SIGXFSZ:
        raise where.error(f"{argv[0]} wrote more than the guest's memory can hold", None,
                          _MEMORY_HINT)
    if check and result.returncode != 0:
        message = result.stderr.strip()
        m = re.search(r"guest\.s:(\d+)", message)
        raise where.error(f"{argv[0]} failed: {_shorten(message)}", int(m.group(1)) if m else None)
    return result


def _shorten(text: str, most: int = 400) -> str:
    return text if len(text) <= most else text[:most] + " ..."


def _assembly_error(stderr: str, src: Path, where: _Where) -> ScenarioError:
    errors = [m for m in map(_ERROR.match, stderr.splitlines()) if m]
    if not errors:
        text = re.sub(r"^.*?Assembler messages:\s*", "", stderr.strip(), flags=re.S)
        return where.error(f"assembler: {_shorten(text.replace(str(src), 'guest'))}")
    first = errors[0]
    hint = f"{len(errors) - 1} more assembler errors follow" if len(errors) > 1 else None
    if Path(first.group(1)) == src:
        return where.error(f"assembler: {_shorten(first.group(3))}", int(first.group(2)), hint)
    return where.error(f"assembler: in {Path(first.group(1)).name}:{first.group(2)}: "
                       f"{_shorten(first.group(3))}", None, hint)


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
                       tuple((a, n) for a, n in data["lines"]),
                       tuple((p, d) for p, d in data["deps"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or corrupt: assemble again


def _write_cache(key: str, program: Program) -> None:
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        data = {"base": program.base, "image": program.image.hex(),
                "symbols": program.symbols, "lines": program.lines, "deps": program.deps}
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, directory / f"{key}.json")  # atomic: workers may race
    except OSError:
        pass  # the cache is an optimisation only
