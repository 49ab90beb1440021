"""dataclasses.replace() made once per call site, for the explorer's hot paths.

`dataclasses.replace()` looks up the fields and runs `__init__`, whose frozen
assignments go through `object.__setattr__` one by one: about 9 us for a
scenario's 40 fields, paid two or three times a schedule. A replacer is
straight-line code for one class and one set of changed fields that fills a
new object through the slots' own descriptors: about 2 us.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def replacer(cls: type, *changed: str) -> Callable[..., Any]:
    """`f(obj, *values)`: `dataclasses.replace(obj, **dict(zip(changed, values)))` for a
    dataclass with slots whose fields are all set by `__init__` and that has no
    `__post_init__` (anything else would skip what `__init__` does)."""
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    if (not all(f.init for f in fields) or hasattr(cls, "__post_init__")
            or "__slots__" not in vars(cls) or not set(changed) <= set(names)):
        raise TypeError(f"{cls.__name__}: not a slotted dataclass plain enough to replace "
                        f"{', '.join(changed)} in")
    scope = {"make": object.__new__, "cls": cls,
             **{f"set_{name}": getattr(cls, name).__set__ for name in names}}
    values = {name: f"v{n}" for n, name in enumerate(changed)}
    source = (f"def replace_{cls.__name__}(obj, {', '.join(values.values())}):\n"
              "    new = make(cls)\n"
              + "".join(f"    set_{name}(new, {values.get(name, 'obj.' + name)})\n" for name in names)
              + "    return new\n")
    exec(source, scope)  # noqa: S102 - generated from the class's own field names
    return scope[f"replace_{cls.__name__}"]
