"""Explore streams its schedules: made lazily, in exactly the order of the old sorted set,
so progress and the time limit work from the first schedule and memory stays bounded."""

import itertools
import random
import time
from array import array

import pytest

from kvmodel.check.explore import (
    Choices,
    async_schedules,
    first_schedules,
    host_schedules,
    second_schedules,
    with_save_restores,
    with_vmm_calls,
)  # fmt: skip
from kvmodel.scenario.schema import ExploreSpec


def _smallest_first(schedule):
    return (len(schedule), schedule)


def _choices(nmis=0, interrupts=(), host_interrupts=0, host_nmis=0, pages=(), save_restores=0,
             max_async=2, max_host=2, n=3, max_vmm=0, vmm=()):
    spec = ExploreSpec(nmis, tuple(interrupts), host_interrupts, (), save_restores, host_nmis)
    return Choices(spec, max_async, max_host, n, tuple(pages), max_vmm, vmm)


def _old_first(c):
    """What explore() built before: the whole set, sorted."""
    return sorted({tuple(sorted(a + h)) for a in async_schedules(c) for h in host_schedules(c)},
                  key=_smallest_first)


CASES = [
    _choices(),
    _choices(nmis=2),
    _choices(nmis=1, interrupts=(0x40, 0x50)),
    _choices(nmis=2, interrupts=(0x40, 0x40, 0x30), max_async=3),
    _choices(host_interrupts=1, pages=(0x1000, 0x2f000), max_host=1),
    _choices(nmis=1, interrupts=(0x40,), host_interrupts=2, host_nmis=1, pages=(0x1000, 0x3000),
             max_async=2, max_host=3, n=4),
    _choices(nmis=3, interrupts=(0x20, 0x21, 0x22), host_interrupts=1, host_nmis=1,
             pages=(0x1000,), max_async=1, max_host=0, n=5),
    _choices(nmis=0, interrupts=(), host_interrupts=0, pages=(0x1000, 0x2000, 0x3000), max_host=2),
    _choices(nmis=2, interrupts=(0x40,), host_interrupts=1, pages=(0x1000,), max_async=0, max_host=2),
]


@pytest.mark.parametrize("c", CASES)
def test_first_stage_is_the_old_sorted_set_in_the_same_order(c):
    assert list(first_schedules(c)) == _old_first(c)


@pytest.mark.parametrize("c", [
    _choices(nmis=1, host_interrupts=1, pages=(0x1000,), save_restores=1, max_host=2),
    _choices(nmis=2, host_interrupts=1, save_restores=2, max_host=3, n=4),
    _choices(nmis=1, interrupts=(0x40,), max_vmm=2, vmm=(0, 2)),
    _choices(nmis=1, host_interrupts=1, save_restores=1, max_host=2, max_vmm=1, vmm=(1,)),
])
def test_second_stage_is_the_old_sorted_set_in_the_same_order(c):
    rng = random.Random(23)
    first = _old_first(c)
    exits = {s: rng.choice([-1, 0, 1, 2, 3, 4]) for s in first}  # -1: stopped at a model limit
    old = sorted({tuple(sorted(x)) for s in first if exits[s] >= 0
                  for x in itertools.chain(with_save_restores(c, s, exits[s]),
                                           with_vmm_calls(c, s, exits[s]))}, key=_smallest_first)
    sizes = [sum(len(s) == n for s in first) for n in range(c.max_async + c.max_host + 1)]
    assert list(second_schedules(c, array("i", [exits[s] for s in first]), sizes)) == old
    assert old  # the case adds something


def test_a_scenario_with_millions_of_schedules_starts_at_once():
    # Five million boundaries, about 10^25 first-stage schedules: building them first never ends.
    huge = _choices(nmis=2, interrupts=(0x40, 0x50), host_interrupts=2, host_nmis=1,
                    pages=(0x1000, 0x2000), max_async=4, max_host=4, n=5_000_000)
    start = time.monotonic()
    head = list(itertools.islice(first_schedules(huge), 20000))
    assert time.monotonic() - start < 5
    assert head[0] == () and head == sorted(head, key=_smallest_first) and len(set(head)) == len(head)


LONG_GUEST = """title = "20,000 boundaries, four happenings anywhere: far too many schedules to list first"
[guest]
code = '''
start:
    sti
    mov $5000, %ecx
again:
    add %rcx, %rax
    nop
    loop again
    hlt
nmi_handler:
    iretq
irq_handler:
    iretq
'''
[idt]
NMI = "nmi_handler"
0x40 = "irq_handler"
0x50 = "irq_handler"
[explore]
nmi = 2
interrupts = [0x40, 0x50]
"""


def test_the_time_limit_works_from_the_first_schedule(tmp_path):
    from kvmodel.check.explore import Bounds, explore
    from kvmodel.kvm.vcpu import Vendor
    from kvmodel.scenario.load import load

    path = tmp_path / "long.toml"
    path.write_text(LONG_GUEST)
    start = time.monotonic()
    result = explore(load(path), Vendor.SVM, Bounds(max_async=4, max_host=0), time_limit=1.0)
    assert time.monotonic() - start < 6
    assert not result.complete and result.schedules >= 1 and result.findings == []
