"""Fault: an exception detected while executing or delivering (SDM 6.5)."""

from __future__ import annotations

from enum import IntEnum


class Access(IntEnum):
    READ = 0
    WRITE = 1
    FETCH = 2


class Fault(Exception):
    """Raised by memory accesses and instructions; the run loop delivers it."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None,
                 dr6: int = 0):
        super().__init__(vector)
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2
        self.dr6 = dr6  # a fault-like #DB's condition bits (general detect: BD)
