"""Copies of a run's object graph, made fast enough to branch a run at a choice point.

`copy.deepcopy` is general (reduce protocol, a memo of every object, atomic
values visited too) and costs about 2 ms for a nested run's vCPU: more than a
run from reset. This copier knows more: values of the types below are shared
(immutable, or never changed once made: decoded instructions, trace records),
and each class's attributes are listed once, so copying an object is one pass
over its slots or one C-level copy of its __dict__.

Sharing inside the graph is kept (a memo by id), so two references to one
VMCS stay two references to one copy. Bound methods are rebound to the copy
of their object; plain functions (closures over configuration) are shared.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from enum import Enum
from typing import Any

_ATOMIC: set[type] = {int, bool, float, str, bytes, type(None), range, frozenset,
                      types.FunctionType, types.BuiltinFunctionType, type}
_SPARES = -1  # the memo's entry for reusable buffers (no id() is negative)


class _Copiers(dict):
    """The copy function of each class, made the first time one is met."""

    def __missing__(self, cls: type) -> Callable[[Any, dict], Any]:
        copier = self[cls] = _copier_for(cls)
        if copier is _share:
            _ATOMIC.add(cls)
        return copier


_COPIERS = _Copiers()


def shared(*classes: type) -> None:
    """Objects of these classes are never changed once made: copies share them."""
    _ATOMIC.update(classes)
    for cls in classes:
        _COPIERS.pop(cls, None)


def is_shared(cls: type) -> bool:
    """Whether copies share objects of `cls` (as far as the copier has met it)."""
    return cls in _ATOMIC


def copy_graph(root: Any, memo: dict | None = None,
               spares: list[bytearray] | None = None) -> Any:
    """A copy of everything `root` reaches that can change; `memo` maps id() to copies
    made so far (pass one dict to copy several roots that share objects). A bytearray is
    copied into one of `spares` of its size, if there is one (which it takes from the
    list): a fresh one costs a page fault per page, more than the copy."""
    memo = {} if memo is None else memo
    memo[_SPARES] = spares or []
    return _copy(root, memo)


def _copy(value: Any, memo: dict) -> Any:
    if value.__class__ in _ATOMIC:
        return value
    done = memo.get(id(value))
    if done is not None:
        return done
    return _COPIERS[value.__class__](value, memo)


def _share(value: Any, memo: dict) -> Any:
    return value


def _copier_for(cls: type) -> Callable[[Any, dict], Any]:
    if issubclass(cls, Enum):
        return _share
    if cls is list:
        return _copy_list
    if cls is dict:
        return _copy_dict
    if cls is set:
        return _copy_set
    if cls is bytearray:
        return _copy_bytearray
    if cls is tuple:
        return _copy_tuple
    if cls is types.MethodType:
        return _copy_method
    params = getattr(cls, "__dataclass_params__", None)
    if params is not None and params.frozen:
        return _copy_frozen
    slots = [name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())
             if name not in ("__dict__", "__weakref__")]
    has_dict = any("__dict__" in vars(klass) for klass in cls.__mro__ if klass is not object)
    return _object_copier(cls, tuple(slots), has_dict)


def _copy_list(value: list, memo: dict) -> list:
    new = value.copy()
    memo[id(value)] = new
    if _ATOMIC.issuperset(map(type, value)):  # the common case, checked in C
        return new
    for i, item in enumerate(value):
        if type(item) not in _ATOMIC:
            new[i] = _copy(item, memo)
    return new


def _copy_dict(value: dict, memo: dict) -> dict:
    new = value.copy()
    memo[id(value)] = new
    if _ATOMIC.issuperset(map(type, value.values())):
        return new
    for key, item in value.items():
        if type(item) not in _ATOMIC:
            new[key] = _copy(item, memo)
    return new


def _copy_set(value: set, memo: dict) -> set:
    # members hashed by identity (objects) are copied too
    new = (value.copy() if _ATOMIC.issuperset(map(type, value))
           else {_copy(item, memo) for item in value})
    memo[id(value)] = new
    return new


def _copy_bytearray(value: bytearray, memo: dict) -> bytearray:
    spares = memo[_SPARES]
    fitting = next((n for n, spare in enumerate(spares) if len(spare) == len(value)), None)
    if fitting is None:
        new = bytearray(value)
    else:
        new = spares.pop(fitting)
        new[:] = value
    memo[id(value)] = new
    return new


def _copy_tuple(value: tuple, memo: dict) -> tuple:
    if all(type(item) in _ATOMIC for item in value):
        return value
    new = tuple(_copy(item, memo) for item in value)
    memo[id(value)] = new
    return new


def _copy_frozen(value: Any, memo: dict) -> Any:
    """A frozen dataclass: shared unless a field holds something that can change."""
    names = [f.name for f in dataclasses.fields(value)]
    items = [getattr(value, name) for name in names]
    copies = [_copy(item, memo) for item in items]
    if all(c is item for c, item in zip(copies, items, strict=True)):
        return value
    new = dataclasses.replace(value, **dict(zip(names, copies, strict=True)))
    memo[id(value)] = new
    return new


def _copy_method(value: types.MethodType, memo: dict) -> types.MethodType:
    new = types.MethodType(value.__func__, _copy(value.__self__, memo))
    memo[id(value)] = new
    return new


def _object_copier(cls: type, slots: tuple[str, ...], has_dict: bool
                   ) -> Callable[[Any, dict], Any]:
    """Straight-line code per class: one line per slot, so a CPU's hundred registers copy
    in microseconds (a loop over names with getattr/setattr costs four times as much)."""
    lines = [f"    v = value.{name}\n"
             f"    if v.__class__ not in atomic:\n"
             f"        done = memo.get(id(v))\n"
             f"        v = done if done is not None else copiers[v.__class__](v, memo)\n"
             f"    new.{name} = v"
             for name in slots]
    if has_dict:
        lines.append("    attrs = value.__dict__.copy()\n"
                     "    for key, item in attrs.items():\n"
                     "        if item.__class__ not in atomic:\n"
                     "            attrs[key] = deep(item, memo)\n"
                     "    new.__dict__ = attrs")
    if not lines:
        return _share  # nothing in it can change
    source = (f"def copy_{cls.__name__}(value, memo):\n"
              "    new = make(cls)\n    memo[id(value)] = new\n"
              "    try:\n" + "\n".join("    " + line.replace("\n", "\n    ") for line in lines)
              + "\n    except AttributeError:\n        return unset(value, new, memo)\n"
              "    return new\n")
    scope = {"make": object.__new__, "cls": cls, "atomic": _ATOMIC, "deep": _copy, "copiers": _COPIERS,
             "unset": _with_unset_slots(slots, has_dict)}
    exec(source, scope)  # noqa: S102 - generated from the class's own slot names
    return scope[f"copy_{cls.__name__}"]


def _with_unset_slots(slots: tuple[str, ...], has_dict: bool) -> Callable[[Any, Any, dict], Any]:
    """The slow path, for an object with a slot never set."""

    def copy_rest(value: Any, new: Any, memo: dict) -> Any:
        for name in slots:
            try:
                item = getattr(value, name)
            except AttributeError:
                continue
            setattr(new, name, item if type(item) in _ATOMIC else _copy(item, memo))
        if has_dict:
            new.__dict__ = {key: item if type(item) in _ATOMIC else _copy(item, memo)
                            for key, item in value.__dict__.items()}
        return new

    return copy_rest
