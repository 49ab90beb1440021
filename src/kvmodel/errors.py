"""Errors a user can see, each mapped to an exit code by the command line.

ScenarioError and ToolMissing are bad input (exit 2); ModelLimit is a program
that leaves what the model covers (an instruction outside the subset, a
feature not modelled): it stops the run and is reported, never guessed at.
"""

from __future__ import annotations


class KvmodelError(Exception):
    """Base of every error kvmodel reports without a traceback."""


class ScenarioError(KvmodelError):
    """A scenario file is malformed; rendered as file:line: message (hint)."""

    def __init__(self, file: str, line: int | None, message: str, hint: str | None = None):
        self.file = file
        self.line = line
        self.message = message
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class ToolMissing(KvmodelError):
    """An external tool kvmodel needs (GNU as) is not installed."""


class ModelLimit(KvmodelError):
    """The guest did something the model does not cover; the run stops here."""

    def __init__(self, message: str, rip: int | None = None):
        self.rip = rip
        super().__init__(message if rip is None else f"{message} at {rip:#x}")
