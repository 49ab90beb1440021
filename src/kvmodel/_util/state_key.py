"""A digest of everything an object graph holds, to find runs that reached the same state.

Two graphs get the same key when they hold equal values in the same shape:
plain values (numbers, strings, bytes) by value, frozen dataclasses field by
field, lists, tuples, dicts (in their order) and objects attribute by
attribute, references inside the graph by where they point. What is shared
and never changes (snapshot.shared(), functions, enum members) counts by
identity, which holds within one process. Equal graphs built in another
order may get other keys (a dict filled in another order, a set's iteration):
that only misses a merge, it never makes one.

`ignore` names attributes ("Class.attribute") left out: caches and records the
run only writes. `tokens` stand for objects by id() (e.g. guest memory, given
as a digest of its changed pages).
"""

from __future__ import annotations

import dataclasses
import hashlib
import marshal
import types
from collections.abc import Callable
from enum import Enum
from typing import Any

from kvmodel._util.snapshot import is_shared

_PLAIN = (int, bool, float, str, bytes, type(None))


class _Unset:
    """A slot never set."""


_UNSET = _Unset()
_Flatten = Callable[[Any, list, dict], None]


class _Flatteners(dict):
    def __init__(self, ignore: frozenset[str]):
        super().__init__()
        self.ignore = ignore

    def __missing__(self, cls: type) -> _Flatten:
        flatten = self[cls] = _flattener_for(cls, self)
        return flatten


_BY_IGNORE: dict[frozenset[str], _Flatteners] = {}


def state_key(root: Any, ignore: frozenset[str] = frozenset(), tokens: dict | None = None) -> bytes:
    """A 16-byte digest of `root`'s graph (see the module's docstring)."""
    flatteners = _BY_IGNORE.get(ignore)
    if flatteners is None:
        flatteners = _BY_IGNORE[ignore] = _Flatteners(ignore)
    out: list = []
    memo = {} if tokens is None else {key: ("=", value) for key, value in tokens.items()}
    _flatten(root, out, memo, flatteners)
    return hashlib.blake2b(marshal.dumps(out), digest_size=16).digest()


def _flatten(value: Any, out: list, memo: dict, flatteners: _Flatteners) -> None:
    cls = value.__class__
    if cls in _PLAIN:
        out.append(value)
        return
    seen = memo.get(id(value))
    if seen is not None:
        out.append(seen)
        return
    by_identity = _BY_IDENTITY.get(cls)
    if by_identity is None:
        by_identity = _BY_IDENTITY[cls] = (issubclass(cls, Enum) or is_shared(cls)
                                           and not dataclasses.is_dataclass(cls))
    if by_identity:
        out.append(("#", id(value)))
        return
    memo[id(value)] = ("@", len(memo))
    flatteners[cls](value, out, memo)


_BY_IDENTITY: dict[type, bool] = {}  # shared, never-changing objects count by identity


def _flattener_for(cls: type, flatteners: _Flatteners) -> _Flatten:
    def walk(value: Any, out: list, memo: dict) -> None:
        _flatten(value, out, memo, flatteners)

    if cls in (list, tuple, set, frozenset):  # a set in its iteration order (the docstring)
        def sequence(value, out, memo):
            out.append((cls.__name__, len(value)))
            for item in value:
                walk(item, out, memo)
        return sequence
    if cls is dict:
        def mapping(value, out, memo):
            out.append(("dict", len(value)))
            for key, item in value.items():
                walk(key, out, memo)
                walk(item, out, memo)
        return mapping
    if cls is bytearray:
        def buffer(value, out, memo):
            out.append(bytes(value))
        return buffer
    if cls is types.MethodType:
        def method(value, out, memo):
            out.append(("method", id(value.__func__)))
            walk(value.__self__, out, memo)
        return method
    names = [name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())
             if name not in ("__dict__", "__weakref__")]
    if dataclasses.is_dataclass(cls):
        names += [f.name for f in dataclasses.fields(cls) if f.name not in names]
    names = [n for n in names if f"{cls.__name__}.{n}" not in flatteners.ignore]
    has_dict = any("__dict__" in vars(klass) for klass in cls.__mro__ if klass is not object)
    # Straight-line code, one line per attribute: plain values go in without a call.
    lines = [f"    v = value.{name}\n"
             f"    if v.__class__ in plain:\n        append(v)\n    else:\n        walk(v, out, memo)"
             for name in names]
    if has_dict:
        lines.append("    for key, item in value.__dict__.items():\n"
                     "        if prefix + key not in ignore and key not in names:\n"
                     "            append(key)\n"
                     "            walk(item, out, memo)")
    body = "\n".join(lines).replace("\n", "\n    ")
    source = ("def flatten(value, out, memo):\n    append = out.append\n    append(tag)\n"
              f"    try:\n    {body}\n    except AttributeError:\n        slow(value, out, memo)\n")
    def slow(value: Any, out: list, memo: dict) -> None:
        """An object with a slot never set: attribute by attribute (its tag is out)."""
        for name in names:
            walk(getattr(value, name, _UNSET), out, memo)

    scope = {"walk": walk, "plain": frozenset(_PLAIN), "slow": slow, "names": frozenset(names),
             "ignore": flatteners.ignore, "prefix": f"{cls.__name__}.",
             "tag": (cls.__module__, cls.__qualname__)}
    exec(source, scope)  # noqa: S102 - generated from the class's own attribute names
    return scope["flatten"]


