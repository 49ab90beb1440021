"""kvmodel._util.state_key: equal graphs, equal keys; any difference that counts, another key."""

from __future__ import annotations

from kvmodel._util.snapshot import copy_graph
from kvmodel._util.state_key import state_key


class Node:
    __slots__ = ("value", "items", "other", "cache")

    def __init__(self, value, items, other=None):
        self.value, self.items, self.other, self.cache = value, items, other, {}


def test_a_copy_has_the_key_of_its_original():
    a = Node(1, [1, 2, {3: "x"}])
    b = Node(2, [a, a], a)
    assert state_key(copy_graph(b)) == state_key(b)


def test_a_value_anywhere_changes_the_key():
    a = Node(1, [1, 2, {3: "x"}])
    b = Node(2, [a], a)
    before = state_key(b)
    a.items[2][3] = "y"
    assert state_key(b) != before


def test_sharing_counts():
    a, a2 = Node(1, []), Node(1, [])
    assert state_key(Node(0, [a, a])) != state_key(Node(0, [a, a2]))


def test_ignored_attributes_and_tokens_leave_things_out():
    a, b = Node(1, []), Node(1, [])
    a.cache[1] = 2
    assert state_key(a) != state_key(b)
    assert state_key(a, frozenset({"Node.cache"})) == state_key(b, frozenset({"Node.cache"}))
    memory_a, memory_b = bytearray(b"12"), bytearray(b"34")
    assert (state_key(Node(0, [memory_a]), tokens={id(memory_a): "same"})
            == state_key(Node(0, [memory_b]), tokens={id(memory_b): "same"}))
