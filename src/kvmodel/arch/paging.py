"""The guest's own page tables: 4-level paging in IA-32e mode (SDM Vol.3 4.5-4.8, 4.10).

A scenario switches this on with `[memory] cr3 = "label"`; without it memory is
flat and identity-mapped and none of this runs (the CPU's fast path never looks
here). With it, every linear access (fetch, data read and write, and the
implicit supervisor-mode accesses of event delivery: IDT, TSS, stack pushes)
walks the tables CR3 names: 4 KiB pages, 2 MiB pages (PDE.PS) and 1 GiB pages
(PDPTE.PS); the permissions of SDM 4.6 (R/W, U/S, XD with EFER.NXE, CR0.WP;
CR4.SMEP/SMAP/PKE stay 0 in the model); #PF with the error code of SDM 4.7
and CR2; the accessed and dirty flags of SDM 4.8.

The TLB (SDM 4.10): a CPU may keep using a translation after the guest changed
the paging-structure entries behind it, until INVLPG or a CR3 write (4.10.4.2),
so bare metal then has two allowed outcomes. The model does not pick one: it
remembers every translation it used since the last invalidation (`tlb`), walks
afresh on every access, and stops with a model limit when the two differ.
Translations that faulted are never cached (4.10.2.3: no TLB entry for a not-
present page), and a #PF drops the faulting page's entry (4.10.4.1), so a guest
may make a not-present page present, or widen rights after a #PF, with no
INVLPG, as the SDM allows (4.10.4.3).
"""

from __future__ import annotations

from enum import IntFlag
from typing import TYPE_CHECKING, NamedTuple

from kvmodel.arch.faults import Access

if TYPE_CHECKING:
    from collections.abc import Callable

PAGE_SHIFT = 12
# No CPUID leaf 80000008H: MAXPHYADDR is 36 (SDM 4.1.4; the same value as execute.MAXPHYADDR)
MAXPHYADDR = 36
_FRAME = ((1 << MAXPHYADDR) - 1) & ~0xFFF  # bits M-1:12 of an entry: the next table or page
_ABOVE_MAXPHYADDR = ((1 << 52) - 1) & ~((1 << MAXPHYADDR) - 1)  # bits 51:M, reserved
_LARGE_RESERVED = {1: 0x3FFFE000, 2: 0x1FE000}  # 1 GiB PDPTE: bits 29:13; 2 MiB PDE: bits 20:13
_LEVEL_SHIFTS = (39, 30, 21, 12)  # PML4, PDPT, PD, PT index bits (SDM 4.5.4 Figure 4-8)


class Pte(IntFlag):
    """Bits of a paging-structure entry in 4-level paging (SDM 4.5.5 Tables 4-15 to 4-20)."""

    P = 1 << 0
    RW = 1 << 1
    US = 1 << 2
    A = 1 << 5
    D = 1 << 6
    PS = 1 << 7  # a page, not a table (PDPTE: 1 GiB, PDE: 2 MiB); reserved in a PML4E
    XD = 1 << 63  # execute-disable; reserved unless IA32_EFER.NXE = 1


# The walk runs on every linear access: plain ints, since an IntFlag operation builds an enum
# member each time (it was most of a paged run's time).
_P, _RW, _US, _A, _D, _PS, _XD = (int(bit) for bit in (Pte.P, Pte.RW, Pte.US, Pte.A, Pte.D,
                                                       Pte.PS, Pte.XD))


class PfCode(IntFlag):
    """The #PF error code (SDM 4.7 Figure 4-12)."""

    P = 1 << 0  # 0: no translation (a P=0 entry); 1: a protection violation (or RSVD)
    W = 1 << 1  # the access was a write
    U = 1 << 2  # a user-mode access (CPL 3, other than an implicit supervisor-mode access)
    RSVD = 1 << 3  # a reserved bit set in an entry used (only with P=1)
    ID = 1 << 4  # an instruction fetch; 0 unless EFER.NXE = 1 (the model has no SMEP)


class Translation(NamedTuple):
    """What the TLB caches for one 4 KiB linear page (SDM 4.10.2.2): the physical frame and
    the rights combined over every level."""

    frame: int  # physical address of the 4 KiB frame
    writable: bool  # R/W = 1 at every level
    user: bool  # U/S = 1 at every level
    executable: bool  # XD = 0 at every level (always, with EFER.NXE = 0)


class Walk(NamedTuple):
    """A completed walk: the translation and the entries it used, leaf last (address, value)."""

    translation: Translation
    entries: tuple[tuple[int, int], ...]


def walk(read_entry: Callable[[int], int], cr3: int, linear: int, nxe: bool) -> Walk | PfCode:
    """Walk the tables from CR3 for `linear` (SDM 4.5.4), without side effects: the walk,
    or the error-code bits of the translation fault (P=0, or P=1 with RSVD).

    `read_entry(address)` reads an 8-byte entry from physical memory (under EPT/NPT a
    guest-physical access the host may intercept)."""
    reserved = _ABOVE_MAXPHYADDR | (0 if nxe else _XD)
    table = cr3 & _FRAME
    writable = user = executable = True
    entries = []
    for level, shift in enumerate(_LEVEL_SHIFTS):
        address = table | ((linear >> shift) & 0x1FF) << 3
        entry = read_entry(address)
        if not entry & _P:
            return PfCode(0)
        entries.append((address, entry))
        large = level in (1, 2) and entry & _PS
        bad = reserved | (_PS if level == 0 else 0) | (_LARGE_RESERVED[level] if large else 0)
        if entry & bad:
            return PfCode.P | PfCode.RSVD
        writable = writable and bool(entry & _RW)
        user = user and bool(entry & _US)
        executable = executable and not (nxe and entry & _XD)
        if large or level == 3:
            size_mask = (1 << shift) - 1
            frame = (entry & _FRAME & ~size_mask) | (linear & size_mask & ~0xFFF)
            return Walk(Translation(frame, writable, user, executable), tuple(entries))
        table = entry & _FRAME
    raise AssertionError("a 4-level walk ends at the PTE")


def permitted(t: Translation, access: Access, user_mode: bool, wp: bool, nxe: bool) -> bool:
    """The access rights of SDM 4.6.1 with CR4.SMEP = CR4.SMAP = 0 (the model's CR4):
    a user-mode access needs U/S = 1; a write needs R/W = 1 in user mode, and in supervisor
    mode when CR0.WP = 1; an instruction fetch needs XD = 0 when IA32_EFER.NXE = 1."""
    if user_mode and not t.user:
        return False
    if access is Access.WRITE:
        return t.writable or not (user_mode or wp)
    if access is Access.FETCH:
        return t.executable or not nxe
    return True


def error_code(access: Access, user_mode: bool, nxe: bool, fault: PfCode = PfCode.P) -> int:
    """The #PF error code (SDM 4.7): `fault`'s P and RSVD, then W/R, U/S and I/D from the access."""
    code = fault
    if access is Access.WRITE:
        code |= PfCode.W
    if user_mode:
        code |= PfCode.U
    if access is Access.FETCH and nxe:
        code |= PfCode.ID
    return int(code)


def accessed_dirty(entries: tuple[tuple[int, int], ...], write: bool) -> list[tuple[int, int]]:
    """The entries a successful walk updates (SDM 4.8): A in every entry used, and D in the
    leaf on a write; (address, new value) for each that changes."""
    out = []
    last = len(entries) - 1
    for n, (address, entry) in enumerate(entries):
        new = entry | _A | (_D if write and n == last else 0)
        if new != entry:
            out.append((address, new))
    return out


class Paging:
    """The paging state beside CR3: the TLB the model keeps to refuse ambiguous runs, and
    the host's view a shadow-paging hypervisor gives the CPU (see Cpu.translate())."""

    __slots__ = ("tlb", "shadow_missing")

    def __init__(self):
        self.tlb: dict[int, Translation] = {}  # linear page number -> translation used
        # Shadow paging (KVM without EPT/NPT): the linear pages the tables the CPU really walks
        # lack, each a #PF the host intercepts; None when the CPU walks the guest's own tables
        # (bare metal, EPT/NPT).
        self.shadow_missing: set[int] | None = None

    def flush(self) -> None:
        """MOV to CR3 (no PCIDs, no global pages: CR4.PCIDE = CR4.PGE = 0; SDM 4.10.4.1)."""
        self.tlb.clear()

    def invalidate(self, linear: int) -> None:
        """INVLPG, or a #PF for `linear` (SDM 4.10.4.1)."""
        self.tlb.pop(linear >> PAGE_SHIFT, None)
