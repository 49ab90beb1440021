"""_util/records.py: replacer() is dataclasses.replace() for plain slotted dataclasses."""

import dataclasses

import pytest

from kvmodel._util.records import replacer
from kvmodel.scenario.load import parse


@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int
    tags: tuple[str, ...] = ()


def test_a_replacer_makes_what_replace_makes():
    p = Point(1, 2, ("a",))
    move = replacer(Point, "y", "x")
    q = move(p, 20, 10)
    assert q == dataclasses.replace(p, x=10, y=20) == Point(10, 20, ("a",))
    assert p == Point(1, 2, ("a",))  # the original is left as it was
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.x = 3  # still frozen


def test_a_scenario_with_other_happenings():
    s = parse("[guest]\ncode = '''\nstart:\n    hlt\n'''\n")
    events = replacer(type(s), "happenings", "host", "vmm")
    assert events(s, (), (), ()) == dataclasses.replace(s, happenings=(), host=(), vmm=())


@dataclasses.dataclass(frozen=True, slots=True)
class Checked:
    x: int

    def __post_init__(self):
        if self.x < 0:
            raise ValueError(self.x)


@dataclasses.dataclass(slots=True)
class Derived:
    x: int
    twice: int = dataclasses.field(init=False, default=0)


@dataclasses.dataclass(frozen=True)
class Unslotted:
    x: int


@pytest.mark.parametrize(("cls", "name"), [(Checked, "x"), (Derived, "x"), (Unslotted, "x"),
                                           (Point, "z")])
def test_what_init_would_do_differently_is_refused(cls, name):
    with pytest.raises(TypeError, match="not a slotted dataclass"):
        replacer(cls, name)
