"""Link an exported scenario into a multiboot image QEMU boots with `-kernel`.

QEMU's multiboot loader takes 32-bit ELF files only, so the stub is linked as
x86-64 and converted with `objcopy -O elf32-i386`, as kvm-unit-tests does for
its 64-bit tests (x86/Makefile.x86_64).
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmodel.arch.regs import BOOT_CR3, BOOT_GDT_BASE
from kvmodel.errors import ToolMissing
from kvmodel.export.boot import DEBUG_PORT, STUB_BASE, boot_source
from kvmodel.export.reset import ResetState
from kvmodel.guest.asm import find_binutils

KERNEL = "kernel.elf"
LOG = "debugcon.bin"
_LINKER_SCRIPT = f"""ENTRY(kv_start)
SECTIONS {{
  . = {STUB_BASE:#x};
  .multiboot : {{ *(.multiboot) }}
  . = {BOOT_GDT_BASE:#x};
  .kv_fixed : {{ *(.kv_fixed) }}
  .text : {{ *(.text) }}
  .data : {{ *(.data) }}
  .bss : {{ *(.bss) *(COMMON) }}
  /DISCARD/ : {{ *(.note*) *(.comment) *(.eh_frame) }}
}}
"""


@dataclass(frozen=True, slots=True)
class Image:
    directory: Path
    kernel: Path
    symbols: dict[str, int]  # the stub's labels: where each logging entry is


def build_image(state: ResetState, out: Path) -> Image:
    """Write boot.s, memory.bin, kernel.elf and run.sh into `out`."""
    find_binutils()
    out.mkdir(parents=True, exist_ok=True)
    (out / "boot.s").write_text(boot_source(state))
    (out / "memory.bin").write_bytes(state.memory)
    (out / "link.ld").write_text(_LINKER_SCRIPT)
    _tool(["as", "--64", "-o", "boot.o", "boot.s"], out)
    _tool(["ld", "-m", "elf_x86_64", "-z", "noexecstack", "-T", "link.ld", "-o", "kernel64.elf",
           "boot.o"], out)
    _tool(["objcopy", "-O", "elf32-i386", "kernel64.elf", KERNEL], out)
    symbols = {}
    for line in _tool(["nm", "kernel64.elf"], out).splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    if (symbols.get("kv_gdt"), symbols.get("kv_root")) != (BOOT_GDT_BASE, BOOT_CR3):
        raise RuntimeError("the boot stub's GDT or paging root is not where the model's GDTR and "
                           "CR3 say (arch/regs.py BOOT_GDT_BASE, BOOT_CR3)")
    script = out / "run.sh"
    script.write_text("#!/bin/sh\n# Boot the exported scenario; the log is written to "
                      f"{LOG}.\ncd \"$(dirname \"$0\")\"\nexec "
                      + " ".join(shlex.quote(a) for a in qemu_command("tcg"))
                      + ' "$@"\n')
    script.chmod(0o755)
    return Image(out, out / KERNEL, symbols)


def qemu_command(accel: str, *, qmp: Path | None = None) -> list[str]:
    """The QEMU command line: no devices but the debug port, no reboot on a triple fault."""
    cpu = "max" if accel == "tcg" else "host"  # all TCG offers; the real CPU under KVM
    argv = ["qemu-system-x86_64", "-machine", "pc", "-accel", accel, "-cpu", cpu, "-m", "64M",
            "-nodefaults", "-display", "none", "-no-reboot", "-no-shutdown",
            "-kernel", KERNEL,
            "-chardev", f"file,id=kvlog,path={LOG}",
            "-device", f"isa-debugcon,iobase={DEBUG_PORT:#x},chardev=kvlog"]
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv


def _tool(argv: list[str], cwd: Path) -> str:
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                                timeout=60)
    except FileNotFoundError as e:
        raise ToolMissing(f"{argv[0]} not found on PATH") from e
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed on the generated boot stub: {result.stderr.strip()}")
    return result.stdout
