"""kvmodel._util.snapshot: a copy of an object graph shares only what cannot change."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kvmodel._util.snapshot import copy_graph, shared


class Colour(Enum):
    RED = 1


class Slotted:
    __slots__ = ("a", "items", "other", "unset")

    def __init__(self, a, items, other=None):
        self.a, self.items, self.other = a, items, other

    def bump(self) -> None:
        self.a += 1


class Plain:
    def __init__(self):
        self.table = {1: [1, 2]}
        self.colour = Colour.RED
        self.memory = bytearray(b"abc")
        self.seen = {3}


@dataclass(frozen=True)
class Frozen:
    values: list[int] = field(default_factory=list)


class Record:
    """Registered as shared below: never changed once made."""

    def __init__(self, n):
        self.n = n


shared(Record)


def test_mutable_parts_are_copied_and_values_shared():
    plain = Plain()
    inner = Slotted(1, [plain], None)
    copy = copy_graph(inner)
    assert copy is not inner and copy.items is not inner.items
    clone = copy.items[0]
    assert clone is not plain and clone.table is not plain.table
    assert clone.table[1] is not plain.table[1] and clone.table == plain.table
    assert clone.memory == plain.memory and clone.memory is not plain.memory
    assert clone.seen == plain.seen and clone.seen is not plain.seen
    assert clone.colour is Colour.RED
    clone.table[1].append(3)
    clone.memory[0] = 0
    assert plain.table[1] == [1, 2] and plain.memory == bytearray(b"abc")


def test_sharing_and_cycles_inside_the_graph_are_kept():
    a = Slotted(1, [])
    b = Slotted(2, [a], a)
    a.other = b  # a cycle
    copy = copy_graph(b)
    assert copy.other is copy.items[0]
    assert copy.other.other is copy


def test_several_roots_share_one_memo():
    a = Slotted(1, [])
    memo: dict = {}
    one, two = copy_graph([a], memo), copy_graph([a], memo)
    assert one[0] is two[0] is not a


def test_bound_methods_follow_their_object():
    a = Slotted(1, [])
    holder = Slotted(0, [a.bump])
    copy = copy_graph(holder)
    copy.items[0]()
    assert copy.items[0].__self__.a == 2 and a.a == 1


def test_an_unset_slot_stays_unset():
    copy = copy_graph(Slotted(1, []))
    assert not hasattr(copy, "unset") and copy.a == 1


def test_frozen_dataclasses_are_copied_only_when_they_hold_something_mutable():
    empty = Frozen(())
    assert copy_graph(empty) is empty
    full = Frozen([1])
    copy = copy_graph(full)
    assert copy == full and copy.values is not full.values


def test_registered_classes_are_shared():
    record = Record(1)
    assert copy_graph([record])[0] is record


def test_set_members_that_are_objects_are_copied_too():
    a = Slotted(1, [])
    holder = Slotted(0, [{a}], a)
    copy = copy_graph(holder)
    (member,) = copy.items[0]
    assert member is copy.other is not a
