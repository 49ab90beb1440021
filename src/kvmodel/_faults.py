"""The switch fault points read: which known-wrong behaviours are switched on.

It sits below every layer so `kvm/` and `hw/` can ask `on("name")` without
importing `bugs/`, which names and documents each fault point.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_enabled: frozenset[str] = frozenset()


def on(name: str) -> bool:
    return name in _enabled


@contextmanager
def switched_on(names: frozenset[str]) -> Iterator[None]:
    """Run the body with exactly these fault points on."""
    global _enabled
    saved, _enabled = _enabled, frozenset(names)
    try:
        yield
    finally:
        _enabled = saved
