"""Find the line of a table or key in a TOML text, for file:line error messages.

tomllib gives values without positions; scenario files are plain enough
(tables, arrays of tables, key = value) that a line scan finds them. The
scan is done once: every look-up after it is a dictionary access or a walk
over one table's lines, so a file with thousands of tables loads in linear time.
"""

from __future__ import annotations

import bisect
import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_DOTTED = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*[.=]")


class Locator:
    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str, bool]] = []  # (line number, name, is array)
        self.by_name: dict[str, list[int]] = {}  # table name -> lines of its headers
        self.prefixes: set[str] = set()  # every table name and the names it is under
        self.dotted: dict[str, int] = {}  # first `head.key = ...` or `head = ...` line of a head
        for n, line in enumerate(self.lines, start=1):
            m = _HEADER.match(line)
            if m:
                name = m.group(2).replace('"', "").replace("'", "").replace(" ", "")
                self.headers.append((n, name, m.group(1) == "[["))
                self.by_name.setdefault(name, []).append(n)
                parts = name.split(".")
                self.prefixes.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
                continue
            d = _DOTTED.match(line)
            if d:
                self.dotted.setdefault(d.group(1), n)
        self.starts = [n for n, _, _ in self.headers]

    def table(self, name: str, index: int | None = None) -> int | None:
        """Line of `[name]`, or of the index-th `[[name]]`."""
        found = self.by_name.get(name, ())
        if index is None:
            return found[0] if found else None
        return found[index] if index < len(found) else None

    def defines(self, name: str) -> bool:
        """Whether `name` is a table with a header of its own or headers under it."""
        return name in self.prefixes

    def key(self, table: str | None, key: str, index: int | None = None) -> int | None:
        """Line of `key = ...` inside a table (None: the top level before any header)."""
        start = 0 if table is None else self.table(table, index)
        if table is not None and start is None:
            return self._dotted(table, key)
        k = bisect.bisect_right(self.starts, start)
        end = self.starts[k] if k < len(self.starts) else len(self.lines) + 1
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for n in range(start + 1, end):
            if pattern.match(self.lines[n - 1]):
                return n
        below = self.table(f"{table}.{key}" if table else key)  # [table.key] on its own
        return below or start or self._dotted(table or "", key)

    def _dotted(self, table: str, key: str) -> int | None:
        """`table.key = ...` or `table = {...}` written inline."""
        head = table.split(".")[0] if table else key
        return self.dotted.get(head)
