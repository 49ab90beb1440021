"""Run an exported image in QEMU and read what the guest showed.

QEMU is driven through QMP (docs/interop/qmp-spec): the run ends when the
guest has halted with nothing to wake it (`info registers` says HLT=1 and the
log has stopped growing), when a triple fault shut it down (`-no-reboot
-no-shutdown` leaves the VM in state "shutdown" with its registers), or at the
time limit. Registers come from `info registers`, memory from `pmemsave`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kvmodel.arch.regs import Mode
from kvmodel.errors import ToolMissing
from kvmodel.export.boot import DELIVERY, FRAME_WORDS, ICR_FIXED_TO_SELF, MAGIC, NO_X2APIC
from kvmodel.export.gdb import Gdb, GdbError, GdbTimeout, connect_unix
from kvmodel.export.image import LOG, Image, qemu_command

QEMU = "qemu-system-x86_64"
INSTALL_HINT = (
    "install QEMU (Debian/Ubuntu: apt-get install qemu-system-x86; Fedora: dnf install qemu-system-x86)")
LOG_LIMIT = 1 << 20  # a delivery storm is cut here: the comparison needs its start only
_REGISTER = re.compile(r"\b([A-Z][A-Z0-9]*)\s*=\s*([0-9a-fA-F]+)\b")


class QemuStop(Enum):
    HALTED = "halted"
    SHUTDOWN = "shutdown"
    TIMEOUT = "timeout"  # still running at the time limit (a loop)
    LOG_LIMIT = "log limit"  # still running with LOG_LIMIT bytes logged (an event storm)


@dataclass(frozen=True, slots=True)
class LoggedDelivery:
    """One delivery as the logging stub saw it at the gate's entry."""

    vector: int
    rsp: int
    dr6: int
    cr2: int
    stack: tuple[int, ...]  # FRAME_WORDS words from RSP up


@dataclass(frozen=True, slots=True)
class LoggedOutput:
    value: int  # a byte the guest wrote to port 0xE9


@dataclass(frozen=True, slots=True)
class QemuRun:
    stop: QemuStop
    events: tuple[LoggedDelivery | LoggedOutput, ...]
    registers: dict[str, int]
    memory: bytes
    x2apic: bool
    version: str
    unrealized: str = ""  # why an arrival could not be made where the scenario puts it


@dataclass(frozen=True, slots=True)
class Arrive:
    """An event from outside, raised once when execution first reaches `address` (linear)."""

    address: int
    vector: int | None = None  # None: an NMI; else a fixed interrupt, sent as a self-IPI
    reach: int = 1  # the k-th time execution reaches `address`
    halted: bool = False  # an NMI for a CPU halted with RIP at `address` (no breakpoint)


def find_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise ToolMissing(f"{QEMU} not found on PATH: {INSTALL_HINT}")
    return path


@functools.cache
def qemu_version() -> str:
    out = subprocess.run([find_qemu(), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def run_image(image: Image, mode: Mode, memory_size: int, *, accel: str = "tcg",
              timeout: float = 10.0, arrivals: tuple[Arrive, ...] = (),
              cs_base: int = 0) -> QemuRun:
    """Boot `image` and collect the log, the registers and the memory.

    `arrivals`: events raised while a gdbstub breakpoint holds the guest at their
    place, the first time execution reaches it: an NMI by QMP inject-nmi, an
    interrupt through the stub's self-IPI trampoline (boot.py).
    """
    directory = image.directory
    find_qemu()
    (directory / LOG).unlink(missing_ok=True)
    # Sockets live in a short directory of their own: a socket path has at most 107 bytes.
    sockets = Path(tempfile.mkdtemp(prefix="kvmodel-qemu-"))
    argv = qemu_command(accel, qmp=sockets / "qmp")
    if arrivals:
        argv += ["-S", "-gdb", f"unix:{sockets / 'gdb'},server=on,wait=off"]
    process = subprocess.Popen(argv, cwd=directory, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dump = directory / "memory.after"
    clients: list[_Qmp | Gdb] = []
    unrealized = ""
    try:
        qmp = _Qmp(sockets / "qmp", process)
        clients.append(qmp)
        if arrivals:
            clients.append(Gdb(sockets / "gdb", timeout, lambda: process.poll() is None))
            unrealized = _arrive_at(qmp, clients[-1], arrivals, _Trampoline(image, cs_base))
        stop = _wait_for_stop(qmp, directory / LOG, timeout)
        qmp.command("stop")
        registers = _parse_registers(qmp.hmp("info registers"))
        qmp.command("pmemsave", val=0, size=memory_size, filename=str(dump))
        qmp.command("quit")
        process.wait(timeout=10)
    except (OSError, RuntimeError, GdbError) as e:
        raise QemuFailed(_failure(process, e)) from None
    finally:
        for client in clients:
            client.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
        shutil.rmtree(sockets, ignore_errors=True)
    word = mode.value // 8
    events, x2apic = parse_log((directory / LOG).read_bytes(), word)
    return QemuRun(stop, events, registers, dump.read_bytes(), x2apic, qemu_version(),
                   unrealized)


class QemuFailed(Exception):
    """QEMU itself stopped working (it crashed or refused the image): no trace to compare."""


def _failure(process: subprocess.Popen, error: Exception) -> str:
    try:
        status = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return f"QEMU stopped answering its monitor ({error})"
    stderr = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
    how = f"signal {-status}" if status < 0 else f"status {status}"
    return f"QEMU exited with {how}" + (f": {stderr.splitlines()[-1]}" if stderr else "")


def parse_log(data: bytes, word: int) -> tuple[tuple[LoggedDelivery | LoggedOutput, ...], bool]:
    """Records and the guest's own bytes, in order; a record cut off at the end is dropped."""
    events: list[LoggedDelivery | LoggedOutput] = []
    x2apic = True
    at = 0
    size = len(MAGIC) + 2 + (3 + FRAME_WORDS) * word
    while at < len(data):
        if not data.startswith(MAGIC, at):
            events.append(LoggedOutput(data[at]))
            at += 1
            continue
        kind = data[at + len(MAGIC):at + len(MAGIC) + 1]
        if kind == NO_X2APIC:
            x2apic = False
            at += len(MAGIC) + 1
            continue
        if kind != DELIVERY or at + size > len(data):
            break
        body = data[at + len(MAGIC) + 2:at + size]
        words = [int.from_bytes(body[i:i + word], "little") for i in range(0, len(body), word)]
        events.append(LoggedDelivery(data[at + len(MAGIC) + 1], words[0], words[1], words[2],
                                     tuple(words[3:])))
        at += size
    return tuple(events), x2apic


def _arrive_at(qmp: _Qmp, gdb: Gdb, arrivals: tuple[Arrive, ...],
               trampoline: _Trampoline) -> str:
    """Raise each event where it belongs, in the model's order, before the next instruction.

    A breakpoint stays at an address until its last arrival; a reach with no arrival
    steps over the instruction (QEMU would stop at the same breakpoint again). An NMI
    for a halted CPU waits for QEMU to show it halted there; the differential sends
    those only after every breakpoint arrival. A place the guest never reaches (it
    halts or loops first) ends the waiting at the time limit; the events left never
    arrive, and the comparison shows it. Returns why an interrupt could not be raised
    where it belongs, or "".
    """
    at_breakpoints = [a for a in arrivals if not a.halted]
    waiting = {(a.address, a.reach): a for a in at_breakpoints}
    reaches: dict[int, int] = {}
    for address in {a.address for a in at_breakpoints}:
        gdb.set_breakpoint(address)
    try:
        while waiting:
            gdb.resume_until_stop()
            registers = _parse_registers(qmp.hmp("info registers"))
            here = trampoline.cs_base + registers.get("RIP", registers.get("EIP", -1))
            reaches[here] = reaches.get(here, 0) + 1
            arrival = waiting.pop((here, reaches[here]), None)
            gdb.clear_breakpoint(here)
            if arrival is None:
                if _flags(registers) & _TF:
                    gdb.resume()  # a gdbstub step swallows the guest's own single-step trap
                    return f"stepping over {here:#x} to count its reaches: TF is set there"
                gdb.step()
                gdb.set_breakpoint(here)
                continue
            if arrival.vector is None:
                qmp.command("inject-nmi")
                continue
            blocked = _trampoline_blocked(registers)
            if blocked:
                gdb.resume()
                return f"the interrupt at {here:#x}: {blocked}"
            trampoline.send(gdb, arrival.vector, here, _flags(registers) & _IF)
    except GdbTimeout:
        return ""  # still running: the guest went on without reaching the rest
    gdb.resume()
    for arrival in arrivals:
        if arrival.halted and not _wait_halted_at(qmp, arrival.address, trampoline.cs_base,
                                                  gdb.timeout):
            return ""
        if arrival.halted:
            qmp.command("inject-nmi")
    return ""


def _wait_halted_at(qmp: _Qmp, address: int, cs_base: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        registers = _parse_registers(qmp.hmp("info registers"))
        if registers.get("HLT") == 1 and cs_base + registers.get(
                "RIP", registers.get("EIP", -1)) == address:
            return True
        time.sleep(0.01)
    return False


_IF, _TF = 1 << 9, 1 << 8


def _flags(registers: dict[str, int]) -> int:
    return registers.get("RFL", registers.get("EFL", 0))  # `info registers` in 64/32-bit form


def _trampoline_blocked(registers: dict[str, int]) -> str:
    """What would make the trampoline's own instructions visible to the guest."""
    if _flags(registers) & _TF:
        return "TF is set there, so the self-IPI's instructions would be single-stepped"
    if registers.get("II"):
        return "an interrupt shadow (STI, MOV SS) holds there, and the self-IPI's code would end it"
    return ""


@dataclass(frozen=True, slots=True)
class _Trampoline:
    """The stub's `kv_raise` entries and their data (boot.py `_raise_interrupt()`)."""

    image: Image
    cs_base: int

    def send(self, gdb: Gdb, vector: int, here: int, interrupts_enabled: int) -> None:
        symbols = self.image.symbols
        gdb.write_memory(symbols["kv_raise_icr"], (vector | ICR_FIXED_TO_SELF).to_bytes(4, "little"))
        gdb.write_memory(symbols["kv_raise_return"], (here - self.cs_base).to_bytes(8, "little"))
        entry = symbols["kv_raise_if" if interrupts_enabled else "kv_raise"]
        gdb.write_rip((entry - self.cs_base) & 0xFFFFFFFFFFFFFFFF)


def _wait_for_stop(qmp: _Qmp, log: Path, timeout: float) -> QemuStop:
    deadline = time.monotonic() + timeout
    halted_since = None
    while time.monotonic() < deadline:
        if qmp.command("query-status")["status"] == "shutdown":
            return QemuStop.SHUTDOWN
        size = log.stat().st_size if log.exists() else 0
        if size > LOG_LIMIT:
            return QemuStop.LOG_LIMIT
        halted = _parse_registers(qmp.hmp("info registers")).get("HLT") == 1
        if not halted:
            halted_since = None
        elif halted_since is None or halted_since[1] != size:
            halted_since = (time.monotonic(), size)
        elif time.monotonic() - halted_since[0] > 0.2:
            return QemuStop.HALTED
        time.sleep(0.02)
    return QemuStop.TIMEOUT


def _parse_registers(text: str) -> dict[str, int]:
    """`info registers`: "RAX=..." pairs; a segment line's first number is its selector."""
    registers: dict[str, int] = {}
    for name, value in _REGISTER.findall(text):
        registers.setdefault(name, int(value, 16))
    return registers


class _Qmp:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path: Path, process: subprocess.Popen):
        self.sock = connect_unix(path, lambda: process.poll() is None, "monitor")
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments) -> dict:
        message = {"execute": name} | ({"arguments": arguments} if arguments else {})
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error'].get('desc')}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()  # flushes: QEMU may be gone already
        self.sock.close()

    def hmp(self, line: str) -> str:
        return self.command("human-monitor-command", **{"command-line": line})

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise RuntimeError("QEMU closed its monitor")
        return json.loads(line)
