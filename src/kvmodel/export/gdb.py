"""A minimal client of QEMU's gdbstub (GDB Remote Serial Protocol, gdb/doc "Packets").

Used to stop the guest at an address (under TCG a breakpoint set through the
gdbstub, `Z0`, is a translator breakpoint, so the guest's code, DR0-DR7 and
flags never see it) and to send it through the stub's interrupt trampoline
(`M` memory and `P` register writes). One request at a time, no-ack mode off.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

RIP_REGISTER = 16


class GdbError(Exception):
    pass


class GdbTimeout(GdbError):
    """The guest did not stop in time (it never reached the breakpoint)."""


def connect_unix(path: Path, alive: Callable[[], bool], what: str) -> socket.socket:
    """Connect to a socket QEMU is about to open; give up after 10 s or when QEMU is gone."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if not alive() or time.monotonic() > deadline:
                raise GdbError(f"QEMU did not open its {what}") from None
            time.sleep(0.02)


class Gdb:
    def __init__(self, path: Path, timeout: float, alive: Callable[[], bool]):
        self.sock = connect_unix(path, alive, "gdbstub")
        self.timeout = timeout
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.request("qSupported")

    def set_breakpoint(self, address: int) -> None:
        self._ok(self.request(f"Z0,{address:x},1"), "Z0")

    def clear_breakpoint(self, address: int) -> None:
        self._ok(self.request(f"z0,{address:x},1"), "z0")

    def write_memory(self, address: int, data: bytes) -> None:
        """Write RAM (QEMU's debug writes skip memory-mapped I/O)."""
        self._ok(self.request(f"M{address:x},{len(data):x}:{data.hex()}"), "M")

    def write_rip(self, rip: int) -> None:
        """RIP is register 16 in QEMU's x86-64 layout, 8 bytes in every mode (gdb-xml).

        QEMU answers `P` only to a client that has read the target description.
        """
        self.request("qXfer:features:read:target.xml:0,ffb")
        self._ok(self.request(f"P{RIP_REGISTER:x}={rip.to_bytes(8, 'little').hex()}"), "P")

    def resume_until_stop(self) -> str:
        """Continue; the stop reply ("T05..." at a breakpoint) when the guest stops."""
        return self.request("c")

    def step(self) -> str:
        """Execute one instruction (QEMU's default: no interrupts or timers meanwhile)."""
        return self.request("s")

    def resume(self) -> None:
        """Continue without waiting: the guest runs until QEMU is stopped some other way."""
        self._send("c")

    def request(self, packet: str) -> str:
        self._send(packet)
        return self._receive()

    def _send(self, packet: str) -> None:
        checksum = sum(packet.encode()) & 0xFF
        self.sock.sendall(f"${packet}#{checksum:02x}".encode())

    def _receive(self) -> str:
        while True:
            start = self.buffer.find(b"$")
            end = self.buffer.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self.buffer) >= end + 3:
                body = self.buffer[start + 1:end].decode(errors="replace")
                self.buffer = self.buffer[end + 3:]
                self.sock.sendall(b"+")
                return body
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                raise GdbTimeout("the guest did not reach the breakpoint in time") from None
            if not chunk:
                raise GdbError("QEMU closed its gdbstub")
            self.buffer += chunk

    @staticmethod
    def _ok(reply: str, what: str) -> None:
        if reply != "OK":
            raise GdbError(f"gdbstub refused {what}: {reply or 'unsupported'}")

    def close(self) -> None:
        self.sock.close()
