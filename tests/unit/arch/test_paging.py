"""4-level paging (arch/paging.py) row by row: the #PF error code of SDM Vol.3 4.7 (Figure
4-12) for each access-rights case of 4.6.1, reserved bits (4.5.4), large pages, the
accessed and dirty flags (4.8) and the TLB rules (4.10.4)."""

import pytest

from kvmodel.arch.cpu import Cpu
from kvmodel.arch.events import Vec
from kvmodel.arch.faults import Access, Fault
from kvmodel.arch.paging import PfCode, Pte
from kvmodel.arch.regs import CR0_WP, EFER_NXE, USER_CODE_SELECTOR, Mode
from kvmodel.errors import ModelLimit, ScenarioError
from kvmodel.scenario.load import parse

PML4, PDPT, PD, PT = 0x20000, 0x21000, 0x22000, 0x23000
PAGE = 0x5000  # the linear page under test (identity: frame 0x5000)
RWU = int(Pte.P | Pte.RW | Pte.US)


def _entry(cpu: Cpu, address: int) -> int:
    return int.from_bytes(cpu.mem[address:address + 8], "little")


def _set(cpu: Cpu, address: int, value: int) -> None:
    cpu.mem[address:address + 8] = value.to_bytes(8, "little")


def make_cpu(*, leaf: int = RWU, upper: int = RWU, cpl: int = 0, wp: bool = True,
             nxe: bool = True) -> Cpu:
    """Identity-mapped 4 KiB pages for the first 2 MiB; PAGE's PTE is `leaf` and the PML4E,
    PDPTE and PDE above it are `upper` (their flags)."""
    cpu = Cpu(Mode.LONG64, bytearray(0x40000))
    _set(cpu, PML4, PDPT | upper)
    _set(cpu, PDPT, PD | upper)
    _set(cpu, PD, PT | upper)
    for n in range(64):
        _set(cpu, PT + 8 * n, (n << 12) | RWU)
    _set(cpu, PT + 8 * (PAGE >> 12), PAGE | leaf)
    cpu.enable_paging(PML4)
    cpu.cr0 = cpu.cr0 | CR0_WP if wp else cpu.cr0 & ~CR0_WP
    cpu.efer = cpu.efer | EFER_NXE if nxe else cpu.efer & ~EFER_NXE
    if cpl == 3:
        cpu.cs = USER_CODE_SELECTOR
    return cpu


def outcome(cpu: Cpu, access: Access, linear: int = PAGE + 0x10) -> int | str:
    try:
        physical = cpu.translate(linear, access)
    except Fault as fault:
        assert fault.vector == Vec.PF
        assert fault.cr2 == linear  # CR2: the linear address that faulted (SDM 4.7)
        return fault.error_code
    assert physical == linear  # identity
    return "ok"


R, W, X = Access.READ, Access.WRITE, Access.FETCH
P, RW, US, XD = int(Pte.P), int(Pte.RW), int(Pte.US), int(Pte.XD)
RSVD_BIT = 1 << 40  # above MAXPHYADDR (36), below bit 52

# (case, make_cpu arguments, access, #PF error code or "ok"): SDM 4.6.1 decides whether it
# faults, SDM 4.7 what the error code says (P, W/R, U/S, RSVD, I/D).
ROWS = [
    ("not present, supervisor read", dict(leaf=RW | US), R, 0x0),
    ("not present, supervisor write", dict(leaf=RW | US), W, 0x2),
    ("not present, user read", dict(leaf=RW | US, cpl=3), R, 0x4),
    ("not present, user write", dict(leaf=RW | US, cpl=3), W, 0x6),
    ("not present, supervisor fetch, NXE=1: I/D", dict(leaf=RW | US), X, 0x10),
    ("not present, user fetch, NXE=1", dict(leaf=RW | US, cpl=3), X, 0x14),
    ("not present, fetch, NXE=0: I/D reserved", dict(leaf=RW | US, nxe=False), X, 0x0),
    ("not present in the PDE", dict(upper=RW | US), R, 0x0),
    ("reserved bits of a not-present entry are not checked", dict(leaf=RW | RSVD_BIT), R, 0x0),
    ("read-only, supervisor write, CR0.WP=1", dict(leaf=P | US), W, 0x3),
    ("read-only, supervisor write, CR0.WP=0", dict(leaf=P | US, wp=False), W, "ok"),
    ("read-only, user write, CR0.WP=0", dict(leaf=P | US, cpl=3, wp=False), W, 0x7),
    ("read-only, user read", dict(leaf=P | US, cpl=3), R, "ok"),
    ("read-only in the PDPTE, supervisor write", dict(upper=P | US), W, 0x3),
    ("supervisor page, user read", dict(leaf=P | RW, cpl=3), R, 0x5),
    ("supervisor page, user write", dict(leaf=P | RW, cpl=3), W, 0x7),
    ("supervisor page, user fetch", dict(leaf=P | RW, cpl=3), X, 0x15),
    ("supervisor page, supervisor read", dict(leaf=P | RW), R, "ok"),
    ("supervisor PML4E, user read", dict(upper=P | RW, cpl=3), R, 0x5),
    ("user page, supervisor fetch (no SMEP)", dict(), X, "ok"),
    ("XD, supervisor fetch", dict(leaf=RWU | XD), X, 0x11),
    ("XD, user fetch", dict(leaf=RWU | XD, cpl=3), X, 0x15),
    ("XD, read", dict(leaf=RWU | XD), R, "ok"),
    ("XD in the PD, fetch", dict(upper=RWU | XD), X, 0x11),
    ("XD with NXE=0 is a reserved bit", dict(leaf=RWU | XD, nxe=False), R, 0x9),
    ("reserved bit 40, supervisor read", dict(leaf=RWU | RSVD_BIT), R, 0x9),
    ("reserved bit 40, user write", dict(leaf=RWU | RSVD_BIT, cpl=3), W, 0xF),
    ("reserved bit 40, fetch", dict(leaf=RWU | RSVD_BIT), X, 0x19),
    ("reserved bit 40 in the PDE", dict(upper=RWU | RSVD_BIT), R, 0x9),
]


@pytest.mark.parametrize("case,setup,access,expected", ROWS, ids=[r[0] for r in ROWS])
def test_error_code_row(case, setup, access, expected):
    assert outcome(make_cpu(**setup), access) == expected


def test_error_code_bits_are_the_sdm_figure():
    assert (PfCode.P, PfCode.W, PfCode.U, PfCode.RSVD, PfCode.ID) == (1, 2, 4, 8, 16)


def test_implicit_supervisor_access_at_cpl3():
    """IDT, TSS and the handler's stack during delivery are supervisor-mode accesses (SDM 4.6)."""
    cpu = make_cpu(leaf=P | RW, cpl=3)
    assert outcome(cpu, W) == 0x7
    cpu.vectoring = object()
    assert outcome(cpu, W) == "ok"


def test_ps_in_a_pml4e_is_reserved():
    cpu = make_cpu()
    _set(cpu, PML4, PDPT | RWU | int(Pte.PS))
    assert outcome(cpu, R) == 0x9


def test_2mib_page():
    cpu = make_cpu()
    _set(cpu, PD, 0x200000 | RWU | int(Pte.PS))  # linear 0-2 MiB -> physical 2-4 MiB
    cpu.mem.extend(bytes(0x400000 - len(cpu.mem)))
    cpu.mem_size = len(cpu.mem)
    assert cpu.translate(0x12345, R) == 0x212345


def test_2mib_page_reserved_bit_13():
    cpu = make_cpu()
    _set(cpu, PD, 0x200000 | RWU | int(Pte.PS) | 1 << 13)
    assert outcome(cpu, R) == 0x9


def test_1gib_page():
    cpu = make_cpu()
    _set(cpu, PDPT, 0 | RWU | int(Pte.PS))
    assert cpu.translate(0x3456, R) == 0x3456
    _set(cpu, PDPT, RWU | int(Pte.PS) | 1 << 13)
    cpu.invlpg(0x3456)
    assert outcome(cpu, R, 0x3456) == 0x9


def test_accessed_and_dirty_flags():
    """A in every entry of a walk, D in the PTE on a write only (SDM 4.8)."""
    cpu = make_cpu()
    pte = PT + 8 * (PAGE >> 12)
    cpu.translate(PAGE, R)
    assert all(_entry(cpu, a) & Pte.A for a in (PML4, PDPT, PD, pte))
    assert not _entry(cpu, pte) & Pte.D
    cpu.translate(PAGE, W)
    assert _entry(cpu, pte) & Pte.D
    assert not _entry(cpu, PD) & Pte.D


def test_faulting_walk_sets_no_flags():
    cpu = make_cpu(leaf=P | US)
    with pytest.raises(Fault):
        cpu.translate(PAGE, W)
    assert not _entry(cpu, PT + 8 * (PAGE >> 12)) & (Pte.A | Pte.D)


def test_stale_translation_is_refused_until_invlpg():
    """A changed entry used again without INVLPG: bare metal may use either translation
    (SDM 4.10.4.2), so the model stops; after INVLPG the new one is used."""
    cpu = make_cpu()
    pte = PT + 8 * (PAGE >> 12)
    cpu.translate(PAGE, R)
    _set(cpu, pte, 0x6000 | RWU)
    with pytest.raises(ModelLimit, match="INVLPG"):
        cpu.translate(PAGE, R)
    cpu.invlpg(PAGE)
    assert cpu.translate(PAGE, R) == 0x6000


def test_stale_translation_made_not_present_is_refused():
    cpu = make_cpu()
    cpu.translate(PAGE, R)
    _set(cpu, PT + 8 * (PAGE >> 12), 0)
    with pytest.raises(ModelLimit):
        cpu.translate(PAGE, R)


def test_cr3_write_flushes():
    cpu = make_cpu()
    cpu.translate(PAGE, R)
    _set(cpu, PT + 8 * (PAGE >> 12), 0x6000 | RWU)
    cpu.load_cr3(PML4)
    assert cpu.translate(PAGE, R) == 0x6000


def test_no_invalidation_needed_after_a_fault():
    """Not-present translations are not cached, and a #PF drops the page's entry
    (SDM 4.10.2.3, 4.10.4.1): making the page present, or writable, needs no INVLPG."""
    cpu = make_cpu(leaf=P | US)
    cpu.translate(PAGE, R)
    with pytest.raises(Fault):
        cpu.translate(PAGE, W)
    _set(cpu, PT + 8 * (PAGE >> 12), PAGE | RWU)
    assert cpu.translate(PAGE, W) == PAGE


def test_access_crossing_pages_faults_before_writing():
    cpu = make_cpu(leaf=RW | US)  # PAGE not present, the page before it present
    before = PAGE - 4
    with pytest.raises(Fault) as fault:
        cpu.write(before, 8, 0x1122334455667788)
    assert fault.value.cr2 == PAGE
    assert cpu.mem[before:PAGE] == bytes(4)


def test_flat_memory_is_untouched_without_paging():
    cpu = Cpu(Mode.LONG64, bytearray(0x40000))
    assert cpu.paging is None and not cpu.slow_mem


# -- the scenario side: what [memory] cr3 and [kvm] tdp accept -----------------------------

GUEST = """
[guest]
mode = "{mode}"
code = '''
start:
    hlt
'''
"""


@pytest.mark.parametrize("extra,message", [
    ('[memory]\ncr3 = "start"\nnot_present = ["start"]\n', "drop not_present"),
    ('[memory]\ncr3 = "start"\n[cpu]\nvmx = true\n', "nested EPT/NPT"),
    ('[memory]\ncr3 = "start"\n[fred]\nentry = "start"\n', "FRED"),
    ('[kvm]\ntdp = false\n', "needs the guest's own page tables"),
])
def test_scenario_refuses(extra, message):
    with pytest.raises(ScenarioError, match=message):
        parse(GUEST.format(mode="long64") + extra, "t.toml")


def test_scenario_refuses_32bit_paging():
    with pytest.raises(ScenarioError, match="long64 mode only"):
        parse(GUEST.format(mode="protected32") + '[memory]\ncr3 = "start"\n', "t.toml")
