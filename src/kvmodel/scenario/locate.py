"""Find the line of a table or key in a TOML text, for file:line error messages.

tomllib gives values without positions; scenario files are plain enough
(tables, arrays of tables, key = value) that a line scan finds them.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")


class Locator:
    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str, bool]] = []  # (line number, name, is array)
        for n, line in enumerate(self.lines, start=1):
            m = _HEADER.match(line)
            if m:
                name = m.group(2).replace('"', "").replace("'", "").replace(" ", "")
                self.headers.append((n, name, m.group(1) == "[["))

    def table(self, name: str, index: int | None = None) -> int | None:
        """Line of `[name]`, or of the index-th `[[name]]`."""
        found = [n for n, h, is_array in self.headers if h == name]
        if index is None:
            return found[0] if found else None
        return found[index] if index < len(found) else None

    def key(self, table: str | None, key: str, index: int | None = None) -> int | None:
        """Line of `key = ...` inside a table (None: the top level before any header)."""
        start = 0 if table is None else self.table(table, index)
        if table is not None and start is None:
            return self._dotted(table, key)
        end = next((n for n, _, _ in self.headers if n > start), len(self.lines) + 1)
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for n in range(start + 1, end):
            if pattern.match(self.lines[n - 1]):
                return n
        return start or self._dotted(table or "", key)

    def _dotted(self, table: str, key: str) -> int | None:
        """`table.key = ...` or `table = {...}` written inline."""
        head = table.split(".")[0] if table else key
        pattern = re.compile(rf"^\s*{re.escape(head)}\s*[.=]")
        for n, line in enumerate(self.lines, start=1):
            if pattern.match(line):
                return n
        return None
