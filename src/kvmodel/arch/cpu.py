"""The bare-metal CPU: working state, memory accesses, and the run loop.

`Cpu` is the private, mutable working copy the arch core steps (the TLC
`TLCStateMut` idea in STYLE.md): one instruction is a handful of list and
attribute updates. Each instruction boundary checks for events only when
something asked for attention (`attn`), so a plain loop costs one attribute
test per instruction.

Order of work at a boundary follows SDM 6.9 Table 6-2 (see priority.py):
debug traps of the previous instruction, NMI, maskable interrupt, code
breakpoint; fetch, decode and execution faults then come from running the
instruction itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

from kvmodel.arch import deliver
from kvmodel.arch.apic import Apic
from kvmodel.arch.cost import DELIVERY_CYCLES
from kvmodel.arch.decode import Decoded, Exiting, decode
from kvmodel.arch.events import Event, EventType, External, Vec
from kvmodel.arch.faults import Access, Fault
from kvmodel.arch.fred import FredMsrs
from kvmodel.arch.host import Host, HostExit, SvmInstructions, VmxInstructions
from kvmodel.arch.observe import NO_VECTOR, Arrival, ArrivalFate, Halt, Observation, Retire, Shutdown
from kvmodel.arch.paging import Paging, PfCode, accessed_dirty, error_code, permitted, walk
from kvmodel.arch.priority import Source
from kvmodel.arch.regs import (
    BOOT_CR3,
    BOOT_GDT_BASE,
    BOOT_GDT_LIMIT,
    BREAKPOINT_LEN,
    CODE_SELECTOR,
    CR0_WP,
    CR4_DE,
    DATA_SELECTOR,
    DR6_BS,
    DR6_BT,
    DR6_CONDITIONS,
    DR6_RESET,
    DR7_GD,
    DR7_RESET,
    EFER_NXE,
    IF,
    REAL_ADDR_MASK,
    RF,
    RFLAGS_FIXED,
    RPL_MASK,
    TF,
    BreakpointRw,
    Mode,
    Shadow,
    canonical,
    real_base,
)  # fmt: skip
from kvmodel.arch.task import TSS_SELECTOR
from kvmodel.errors import ModelLimit

PAGE_SHIFT = 12
LINE_SHIFT = 6  # 64-byte cache lines: the grain of self-modifying-code checks


@dataclass(frozen=True, slots=True)
class Forced:
    """A state the CPU is in at one boundary, which the instruction stream before it did not
    make: bare metal's counterpart of an event state a VMM set (KVM_SET_VCPU_EVENTS).

    `nmi_blocked`: as inside an NMI handler (True, blocked until the next IRET, SDM 6.7.1) or
    as after its IRET (False). `shadow`: the boundary is in an STI or MOV SS shadow (SDM
    6.8.3). `event`: delivered here before anything else, with the return address of this
    boundary and RF as `push_rf` says, leaving DR6/DR7 alone (as a VM entry injects it, SDM
    26.6.1); `cr2`: a #PF's address, written first (SDM 4.7). `raised`: the event is raised
    here rather than injected, so a host's intercepts see it (an exception KVM_SET_VCPU_EVENTS
    made pending for L2, which KVM morphs into L1's VM exit if L1 intercepts it:
    kvm_vcpu_ioctl_x86_set_vcpu_events() sets exception_from_userspace). `shutdown`: the CPU
    shuts down here (a pending triple fault, KVM_VCPUEVENT_VALID_TRIPLE_FAULT), which in a
    guest is the host's VM exit, as a triple fault of its own (SDM 25.2, APM 15.13.5).
    """

    nmi_blocked: bool | None = None
    shadow: Shadow | None = None
    event: Event | None = None
    cr2: int | None = None
    raised: bool = False
    shutdown: bool = False
    # A VMM's snapshot of the vCPU and its rollback to it (scenario/vmm.py VcpuSnapshotTake,
    # VcpuRollback): `snapshot` n keeps the CPU's state here; `rollback` n puts it back; with
    # `rollback_events` (the VMM SET the events too) blocking by NMI is the snapshot's as
    # well and the NMIs the CPU holds are dropped (nmi.pending 0).
    snapshot: int | None = None
    rollback: int | None = None
    rollback_events: bool = False


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """What a rollback puts back: the registers KVM_GET_REGS, _SREGS and _DEBUGREGS carry,
    NMI blocking, and the VMX root's state (KVM_GET_NESTED_STATE outside guest mode). Not
    memory, the local APIC, or NMIs and interrupts waiting outside the core."""

    regs: tuple[int, ...]
    rip: int
    rflags: int
    control: tuple[int, int, int, int, int]  # CR0, CR2, CR3, CR4, EFER
    idtr: tuple[int, int]
    debug: tuple[tuple[int, ...], int, int]  # DR0-DR3, DR6, DR7
    nmi_blocked: bool
    vmx: object | None  # VmxInstructions.snapshot_root()


@dataclass(frozen=True, slots=True)
class Scheduled:
    """An external event arriving after `after` retired instructions or when RIP is `at_rip`.

    `vector` is the interrupt vector; for NOTIFY_TIMER, the exit qualification
    bits the expiry carries (NOTIFY_VM_CONTEXT_INVALID).
    """

    event: External
    vector: int = Vec.NMI
    after: int | None = None
    at_rip: int | None = None
    # Set: the guest stood here when a VMM acted (after `after` retired and this many deliveries
    # completed); it arrives there, never earlier by time passing while halted before it.
    delivered: int | None = None
    state: Forced | None = None  # External.STATE: what the CPU's state is there


class Stop(IntEnum):
    HALTED = 0  # halted with nothing left that could wake it
    SHUTDOWN = 1
    BUDGET = 2  # the step budget ran out


_NEVER = 1 << 62


# KVM's forced emulation prefix, __KVM_EMULATE_PREFIX: "ud2; .ascii \"kvm\"" (x86.c handle_ud())
FORCED_EMULATION_PREFIX = bytes((0x0F, 0x0B, 0x6B, 0x76, 0x6D))


class Cpu:
    """One logical processor with flat segments at CPL 0 or 3 (CPL is CS.RPL), except that in
    protected mode the code segments may have a base (`cs_base`, constant for the run).

    RIP is the offset in the code segment, as pushed on the stack and saved in a
    VMCB/VMCS; fetches, the decoded-instruction cache's lines and code breakpoints
    work on linear addresses (SDM 3.4.3, 17.2.4). The cache and the breakpoint
    lookup are keyed by RIP, which the constant base makes exact.
    """

    __slots__ = (
        "mode", "addr_mask", "regs", "rip", "rflags", "cs", "ss", "cr0", "cr2", "cr3", "cr4",
        "efer", "idtr_base", "idtr_limit", "gdtr_base", "gdtr_limit", "tr_base", "dr", "dr6", "dr7", "apic",
        "nmi_blocked", "nmi_pending", "shadow", "shadow_prev", "pending_dbg", "db_hits",
        "halted", "shutdown", "retired", "mem", "mem_size", "not_present", "slow_mem",
        "exec_bps", "data_bps", "io_bps", "icache", "code_lines", "trace", "record_instructions",
        "sti_blocks_nmi", "attn", "scheduled", "next_after", "at_rip_scheduled",
        "host", "host_attn", "host_unmapped", "apic_delivers", "vectoring", "iret_unblocked_nmi",
        "since_window", "window_retired", "deliveries", "delivered", "ghcb_msr", "fred", "csl", "vmx", "svm",
        "vm_hsave_pa", "has_svm", "gif", "cs_base", "retire_at", "extint", "hif", "vtpr",
        "star", "lstar", "fmask", "machine", "wait_for_sipi", "fep_is_prefix", "amd_ext", "tr", "tasks",
        "paging", "step_trap_replaced", "snapshots", "waits",
    )  # fmt: skip

    def __init__(self, mode: Mode, mem: bytearray, *, not_present: frozenset[int] = frozenset(),
                 sti_blocks_nmi: bool = True, record_instructions: bool = False):
        self.mode = mode
        self.addr_mask = REAL_ADDR_MASK if mode is Mode.REAL16 else (1 << mode.value) - 1
        self.regs = [0] * (16 if mode is Mode.LONG64 else 8)
        self.rip = 0
        self.rflags = RFLAGS_FIXED
        self.cs = CODE_SELECTOR
        self.cs_base = 0  # CODE_SELECTOR's descriptor base; 64-bit mode ignores it (SDM 3.4.4)
        self.ss = DATA_SELECTOR
        self.cr0 = 0x10 if mode is Mode.REAL16 else 0x80000011  # ET; PG, ET, PE
        self.cr2 = 0
        self.cr3 = BOOT_CR3  # the boot's identity map (not walked: memory is flat)
        self.cr4 = 0x20 if mode is Mode.LONG64 else 0  # PAE in long mode
        self.efer = 0xD00 if mode is Mode.LONG64 else 0  # NXE, LMA, LME
        self.idtr_base = 0
        self.idtr_limit = 0xFFFF
        self.gdtr_base, self.gdtr_limit = BOOT_GDT_BASE, BOOT_GDT_LIMIT  # read by SGDT only
        self.tr_base = 0
        self.dr = [0, 0, 0, 0]
        self.dr6 = DR6_RESET
        self.dr7 = DR7_RESET
        self.apic = Apic()
        self.nmi_blocked = False
        self.nmi_pending = 0  # NMIs waiting: 1 latched, or 2 when one is taken at once
        self.shadow = Shadow.NONE
        self.shadow_prev = Shadow.NONE
        self.pending_dbg = 0  # DR6 bits of debug traps waiting for the next boundary
        self.db_hits = 0  # data breakpoints hit by the current instruction or delivery
        self.halted = False
        self.shutdown = False
        self.retired = 0
        self.mem = mem
        self.mem_size = len(mem)
        self.not_present = not_present
        self.exec_bps: dict[int, int] = {}
        self.data_bps: tuple[tuple[int, int, int, bool], ...] = ()
        self.io_bps: tuple[tuple[int, int, int], ...] = ()  # (first port, end, DR6 bit)
        self.slow_mem = bool(not_present)
        self.icache: dict[int, Decoded] = {}
        self.code_lines: dict[int, set[int]] = {}
        self.trace: list[Observation] = []
        self.record_instructions = record_instructions
        # (trace position, count) of the running instruction's Retire, when it retired early
        self.retire_at: tuple[int, int] | None = None
        self.sti_blocks_nmi = sti_blocks_nmi
        # KVM's forced emulation prefix read as a prefix of the next instruction (see
        # through_forced_prefix()): the oracle for a guest run with kvm.force_emulation_prefix
        self.fep_is_prefix = False
        self.attn = True
        self.scheduled: list[Scheduled] = []
        self.snapshots: dict[int, CpuSnapshot] = {}  # taken where a VMM took its (Forced)
        self.next_after = _NEVER
        self.at_rip_scheduled = False  # an event arrives by RIP: every boundary must look
        self.waits = 0  # times time passed while halted (next_arrival()): see check/resume.py
        # Virtualization (see host.py); bare metal leaves these alone.
        self.host: Host | None = None
        self.host_attn = False  # the host watches every boundary (an open window)
        self.host_unmapped: set[int] = set()  # guest-physical pages the host has not mapped
        self.apic_delivers = True  # False when the host injects every interrupt itself
        self.vectoring: Event | None = None  # the event whose delivery is under way
        self.iret_unblocked_nmi = False  # the current IRET unblocked NMIs (SDM 27.2.3 bit 12)
        # The running instruction, single-stepped, was a VM entry that succeeded: the guest's
        # pending debug exceptions replace its single-step trap (SDM 26.7.3; hw/vmx/root.py)
        self.step_trap_replaced = False
        # Cycles since the last event window (cost.py), counted by deliveries: an
        # instruction that completes opens one at the boundary after it.
        self.since_window = 0
        self.window_retired = 0
        self.deliveries = 0  # started, like `retired` an observer's count
        self.delivered = 0  # completed (a Delivery in the trace)
        self.ghcb_msr = 0  # MSR_AMD64_SEV_ES_GHCB (arch/ghcb.py)
        # An AMD CPU's EXT bit in error codes (deliver.py ext_bit()): set by the SVM models
        self.amd_ext = False
        self.vm_hsave_pa = 0  # VM_HSAVE_PA (APM 15.30.4), on a CPU with SVM
        self.fred: FredMsrs | None = None  # the FRED MSRs, when CR4.FRED is set (arch/fred.py)
        self.csl = 0  # FRED's current stack level
        self.vmx: VmxInstructions | None = None  # VMX root operation, for an L1 on the model
        self.svm: SvmInstructions | None = None  # SVM host mode, for an L1 on the model
        self.has_svm = False  # CPUID 8000_0001h ECX.SVM: EFER.SVME can be set
        # GIF (APM 15.17): clear, it holds NMIs and interrupts. In an SVM guest it
        # stands for vGIF's V_GIF; otherwise only CLGI clears it.
        self.gif = True
        # Vectors an 8259 presents on INTR, oldest first, each acknowledged once (INTA). The
        # 8259 itself is not modelled (no IRR/ISR priority, masks or EOI): it is what a VMM's
        # KVM_INTERRUPT stands for on bare metal.
        self.extint: tuple[int, ...] = ()
        # SVM's V_INTR_MASKING for an L2 on the model that takes physical interrupts itself:
        # the host's IF, saved at VMRUN, masks them instead of the guest's (APM 15.21.1).
        # None: RFLAGS.IF does, as everywhere else.
        self.hif: int | None = None
        # SVM's V_TPR while an L2 with V_INTR_MASKING runs: its CR8 reads and writes go to
        # the VMCB's virtual TPR, not to the APIC's (APM 15.21.4). None: the APIC's TPR.
        self.vtpr: int | None = None
        # SYSCALL/SYSRET's MSRs (IA32_STAR, IA32_LSTAR, IA32_FMASK; SDM Vol.2 SYSCALL)
        self.star = self.lstar = self.fmask = 0
        # Several CPUs (arch/machine.py): the machine sees this CPU's memory accesses and
        # carries its IPIs; None for a CPU of its own.
        self.machine = None
        self.wait_for_sipi = False  # INIT received: nothing runs until a SIPI (SDM 10.4.7.3)
        # TR's selector and the model's TSS descriptors, selector -> (base, busy) (task.py)
        self.tr = TSS_SELECTOR
        self.tasks: dict[int, tuple[int, bool]] = {}
        # The guest's own page tables (arch/paging.py; enable_paging()); None: flat memory
        self.paging: Paging | None = None

    # -- memory --------------------------------------------------------------

    def read(self, addr: int, size: int, access: Access = Access.READ) -> int:
        """Little-endian read of `size` bytes; raises Fault(#PF) on a not-present page."""
        addr &= self.addr_mask
        end = addr + size
        if self.slow_mem or end > self.mem_size:
            self._check_canonical(addr, size)
            if self.paging is not None:
                return self._read_paged(addr, size, access)
            self._check(addr, size, access)
        return int.from_bytes(self.mem[addr:end], "little")

    def write(self, addr: int, size: int, value: int) -> None:
        addr &= self.addr_mask
        end = addr + size
        if self.slow_mem or end > self.mem_size:
            self._check_canonical(addr, size)
            if self.paging is not None:
                self._write_paged(addr, size, value)
                return
            self._check(addr, size, Access.WRITE)
        self.mem[addr:end] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        code_lines = self.code_lines
        if addr >> LINE_SHIFT in code_lines or (end - 1) >> LINE_SHIFT in code_lines:
            self._forget_code(addr, end)

    def _check_canonical(self, addr: int, size: int) -> None:
        """A data access at a non-canonical address in 64-bit mode is #GP(0) (SDM Vol.1
        3.3.7.1, Vol.3 6.15 "#GP"), before any paging check; one through SS is #SS(0), which
        the stack operations raise first (operands.py stack_address())."""
        if self.mode is Mode.LONG64 and not canonical(addr, size):
            raise Fault(Vec.GP, 0)

    def _forget_code(self, addr: int, end: int) -> None:
        """Self-modifying code: drop decoded instructions in the written cache lines."""
        for line in range(addr >> LINE_SHIFT, ((end - 1) >> LINE_SHIFT) + 1):
            for rip in self.code_lines.pop(line, ()):
                self.icache.pop(rip, None)

    def linear(self, rip: int) -> int:
        """The linear address of code at `rip` (SDM 3.4.3)."""
        return (self.cs_base + rip) & self.addr_mask

    def load_real_cs(self, segment: int) -> None:
        """Real mode: CS and its base (segment * 16, SDM 20.1.1) change together. Decoded
        instructions and code breakpoints are keyed by IP, so a new base forgets them."""
        if segment & RPL_MASK:
            # the model reads CPL as CS's low bits (cpl_of()); real mode is always CPL 0
            raise ModelLimit(f"real mode: a code segment {segment:#x} not a multiple of 4 is "
                             "not modelled", self.rip)
        self.cs = segment
        base = real_base(segment)
        if base != self.cs_base:
            self.cs_base = base
            self.icache.clear()
            self.code_lines.clear()
            if self.dr7 & 0xFF:
                self.update_breakpoints()

    def remember_code(self, rip: int, length: int) -> None:
        """Note which cache lines a decoded instruction came from."""
        start = self.linear(rip)
        first, last = start >> LINE_SHIFT, (start + length - 1) >> LINE_SHIFT
        code_lines = self.code_lines
        for line in range(first, last + 1):
            rips = code_lines.get(line)
            if rips is None:
                code_lines[line] = {rip}
            else:
                rips.add(rip)

    def check_write(self, addr: int, size: int) -> None:
        """Raise the fault a write would raise, without writing or matching breakpoints."""
        addr &= self.addr_mask
        if not self.slow_mem and addr + size <= self.mem_size:
            return  # every page is present and mapped
        self._check_canonical(addr, size)
        if self.paging is not None:
            self._translate_range(addr, size, Access.WRITE)
            return
        for page in range(addr >> PAGE_SHIFT, ((addr + size - 1) >> PAGE_SHIFT) + 1):
            if page in self.not_present or (page << PAGE_SHIFT) >= self.mem_size:
                raise self.page_fault(max(addr, page << PAGE_SHIFT), Access.WRITE)
            if page in self.host_unmapped:
                self.host.unmapped(self, max(addr, page << PAGE_SHIFT), Access.WRITE)

    def fetch_bytes(self, addr: int, size: int) -> bytes:
        """Up to `size` code bytes at addr, stopping before a not-present page."""
        if not self.slow_mem and addr + size <= self.mem_size:
            return bytes(self.mem[addr:addr + size])  # no page to check: the common case
        if self.mode is Mode.LONG64 and not canonical(addr):
            # #GP(0), on the branch, IRET or RET that loaded it on Intel (SDM Vol.2 JMP,
            # IRET, RET): where AMD reports it was not found, so no answer is guessed
            raise ModelLimit(f"a fetch from the non-canonical address {addr:#x} is not modelled",
                             self.rip)
        if self.paging is not None:
            return self._fetch_paged(addr, size)
        out = bytearray()
        while len(out) < size:
            page = (addr + len(out)) >> PAGE_SHIFT
            if page in self.not_present or (page << PAGE_SHIFT) >= self.mem_size:
                break
            if page in self.host_unmapped:
                self.host.unmapped(self, max(addr, page << PAGE_SHIFT), Access.FETCH)
            start = addr + len(out)
            out += self.mem[start:min(addr + size, (page + 1) << PAGE_SHIFT)]
        return bytes(out)

    def _check(self, addr: int, size: int, access: Access) -> None:
        end = addr + size
        for page in range(addr >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1):
            if page in self.not_present or (page << PAGE_SHIFT) >= self.mem_size:
                raise self.page_fault(max(addr, page << PAGE_SHIFT), access)
            if page in self.host_unmapped:
                self.host.unmapped(self, max(addr, page << PAGE_SHIFT), access)
        for lo, hi, bit, write_only in self.data_bps:
            if addr < hi and lo < end and (access is Access.WRITE or not write_only):
                self.db_hits |= bit
        if self.machine is not None:
            self.machine.touched(self, addr, end, access)

    # -- the guest's page tables (arch/paging.py) -----------------------------

    def enable_paging(self, cr3: int) -> None:
        """Walk the guest's own tables from now on, starting at `cr3`. Memory accesses leave
        the fast path for good, and decoded instructions are no longer cached by RIP: a fetch
        walks (and checks XD and U/S) every time, and a CR3 write or INVLPG may change the
        code behind a RIP."""
        if self.mode is not Mode.LONG64:
            raise ModelLimit("guest paging outside IA-32e mode (32-bit and PAE paging) is not "
                             "modelled", self.rip)
        self.cr3 = cr3
        self.paging = Paging()
        self.icache.clear()
        self.code_lines.clear()
        self._update_slow_mem()

    def _read_entry(self, address: int) -> int:
        """A paging-structure entry: an 8-byte physical read (guest-physical under EPT/NPT)."""
        if address + 8 > self.mem_size:
            raise ModelLimit(f"a paging-structure entry at {address:#x}, outside the guest's "
                             "memory, is not modelled", self.rip)
        if address >> PAGE_SHIFT in self.host_unmapped:
            self.host.unmapped(self, address, Access.READ)
        return int.from_bytes(self.mem[address:address + 8], "little")

    def translate(self, linear: int, access: Access) -> int:
        """The physical address of `linear` for `access`, or Fault(#PF) with its error code
        and CR2 (SDM 4.5-4.8); A/D flags are set once the access is allowed. An access at CPL
        3 is a user-mode access unless event delivery makes it (SDM 4.6: IDT, TSS and the
        handler's stack are implicit supervisor-mode accesses)."""
        paging = self.paging
        page = linear >> PAGE_SHIFT
        user_mode = self.cs & RPL_MASK == 3 and self.vectoring is None
        nxe = bool(self.efer & EFER_NXE)
        done = walk(self._read_entry, self.cr3, linear, nxe)
        cached = paging.tlb.get(page)
        if isinstance(done, PfCode):
            if cached is not None:
                self._stale(linear)
            raise Fault(Vec.PF, error_code(access, user_mode, nxe, done), cr2=linear)
        translation = done.translation
        if cached is not None and cached != translation:
            self._stale(linear)
        if not permitted(translation, access, user_mode, bool(self.cr0 & CR0_WP), nxe):
            paging.invalidate(linear)  # a #PF drops the page's TLB entry (SDM 4.10.4.1)
            raise Fault(Vec.PF, error_code(access, user_mode, nxe), cr2=linear)
        missing = paging.shadow_missing
        if missing and page in missing:
            # Shadow paging: the tables the CPU really walks lack the page, a not-present #PF
            # the host intercepts (its exception bitmap) and the guest never sees as such.
            raise Fault(Vec.PF, error_code(access, user_mode, nxe, PfCode(0)), cr2=linear)
        frame = translation.frame
        if frame + (1 << PAGE_SHIFT) > self.mem_size:
            raise ModelLimit(f"linear {linear:#x} mapped to {frame:#x}, outside the guest's "
                             "memory, is not modelled", self.rip)
        if frame >> PAGE_SHIFT in self.host_unmapped:
            self.host.unmapped(self, frame | (linear & 0xFFF), access)
        for address, value in accessed_dirty(done.entries, access is Access.WRITE):
            self.mem[address:address + 8] = value.to_bytes(8, "little")
        paging.tlb[page] = translation
        return frame | (linear & 0xFFF)

    def _stale(self, linear: int) -> None:
        raise ModelLimit(
            f"the guest changed the paging-structure entries for {linear:#x} without INVLPG "
            "or a CR3 write and used it again: bare metal may use the old translation or the "
            "new one (SDM 4.10.4.2); the model refuses to pick", self.rip)

    def _translate_range(self, addr: int, size: int, access: Access) -> list[tuple[int, int]]:
        """(physical address, length) of each page `addr`..`addr+size` touches, every page
        translated before any is accessed (a fault on the second leaves the first alone)."""
        if self.machine is not None:
            raise ModelLimit("guest paging with several CPUs is not modelled", self.rip)
        pieces = []
        end = addr + size
        while addr < end:
            stop = min(end, ((addr >> PAGE_SHIFT) + 1) << PAGE_SHIFT)
            pieces.append((self.translate(addr, access), stop - addr))
            addr = stop
        return pieces

    def _match_data_bps(self, addr: int, end: int, access: Access) -> None:
        for lo, hi, bit, write_only in self.data_bps:  # linear addresses (SDM 17.2.4)
            if addr < hi and lo < end and (access is Access.WRITE or not write_only):
                self.db_hits |= bit

    def _read_paged(self, addr: int, size: int, access: Access) -> int:
        out = bytearray()
        for phys, length in self._translate_range(addr, size, access):
            out += self.mem[phys:phys + length]
        self._match_data_bps(addr, addr + size, access)
        return int.from_bytes(out, "little")

    def _write_paged(self, addr: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        at = 0
        for phys, length in self._translate_range(addr, size, Access.WRITE):
            self.mem[phys:phys + length] = data[at:at + length]
            at += length
        self._match_data_bps(addr, addr + size, Access.WRITE)

    def _fetch_paged(self, addr: int, size: int) -> bytes:
        """Code bytes up to the first page a fetch may not use (decode raises its #PF if the
        instruction needs bytes from there: fetch_fault())."""
        out = bytearray()
        end = addr + size
        while addr < end:
            stop = min(end, ((addr >> PAGE_SHIFT) + 1) << PAGE_SHIFT)
            try:
                phys = self.translate(addr, Access.FETCH)
            except Fault:
                break
            out += self.mem[phys:phys + stop - addr]
            addr = stop
        return bytes(out)

    def fetch_fault(self, addr: int) -> Fault:
        """The #PF of an instruction fetch at linear `addr` that fetch_bytes() stopped before."""
        if self.paging is None:
            return self.page_fault(addr, Access.FETCH)
        try:
            self.translate(addr, Access.FETCH)
        except Fault as fault:
            return fault
        raise AssertionError(f"the fetch at {addr:#x} does not fault")

    def invlpg(self, linear: int) -> None:
        """INVLPG (SDM Vol.2 INVLPG, 4.10.4.1): the page's TLB entry goes; no-op on flat memory."""
        if self.paging is not None:
            self.paging.invalidate(linear)

    def load_cr3(self, value: int) -> None:
        """MOV to CR3: with the guest's tables, the TLB is flushed (SDM 4.10.4.1)."""
        self.cr3 = value
        if self.paging is not None:
            self.paging.flush()

    def page_fault(self, addr: int, access: Access) -> Fault:
        """#PF for a not-present page (SDM 4.7): P=0, W/R, U/S, I/D.

        U/S is 1 for an access at CPL 3, other than the supervisor-mode accesses event
        delivery makes (IDT, TSS, the handler's stack: SDM 4.6 "implicit supervisor-mode
        accesses"), which run while `vectoring` names the event."""
        code = 2 if access is Access.WRITE else 0
        if self.cs & RPL_MASK == 3 and self.vectoring is None:
            code |= 4
        if access is Access.FETCH and self.efer & 0x800:  # I/D needs PAE paging with NXE
            code |= 0x10
        return Fault(Vec.PF, code, cr2=addr)

    # -- debug registers -----------------------------------------------------

    def update_breakpoints(self) -> None:
        """Derive the breakpoint lookups from DR0-DR3 and DR7 (SDM 17.2.4, 17.2.5)."""
        exec_bps: dict[int, int] = {}
        data_bps = []
        io_bps = []
        for n in range(4):
            if not (self.dr7 >> (2 * n)) & 3:
                continue
            rw = BreakpointRw((self.dr7 >> (16 + 4 * n)) & 3)
            length = BREAKPOINT_LEN[(self.dr7 >> (18 + 4 * n)) & 3]
            addr = self.dr[n] & ~(length - 1) & self.addr_mask
            if rw is BreakpointRw.EXECUTE:  # LEN must be 00b: the address is exact
                key = (self.dr[n] - self.cs_base) & self.addr_mask  # the RIP that fetches there
                exec_bps[key] = exec_bps.get(key, 0) | (1 << n)
            elif rw is BreakpointRw.IO:
                if not self.cr4 & CR4_DE:  # R/W=10b is undefined without CR4.DE (SDM 17.2.4)
                    raise ModelLimit("DR7 R/W=10b with CR4.DE=0 is undefined", self.rip)
                port = self.dr[n] & 0xFFFF & ~(length - 1)
                io_bps.append((port, port + length, 1 << n))
            else:
                data_bps.append((addr, addr + length, 1 << n, rw is BreakpointRw.WRITE))
        self.exec_bps = exec_bps
        self.data_bps = tuple(data_bps)
        self.io_bps = tuple(io_bps)
        self._update_slow_mem()
        self.attn = True

    def io_access(self, port: int, size: int) -> None:
        """IN/OUT touch ports port..port+size-1: I/O breakpoints match like data ones and
        trap after the instruction (SDM 17.2.4, 17.3.1.2)."""
        for lo, hi, bit in self.io_bps:
            if port < hi and lo < port + size:
                self.db_hits |= bit

    def _update_slow_mem(self) -> None:
        self.slow_mem = bool(self.not_present or self.data_bps or self.host_unmapped
                             or self.machine is not None or self.paging is not None)

    def set_host_unmapped(self, pages: set[int]) -> None:
        """The host's second-level tables (EPT/NPT) lack these guest-physical pages."""
        self.host_unmapped = pages
        self._update_slow_mem()

    # -- external events -----------------------------------------------------

    def schedule(self, events: list[Scheduled]) -> None:
        self.scheduled = list(events)
        self._update_next_after()

    def _update_next_after(self) -> None:
        afters = [s.after for s in self.scheduled if s.after is not None]
        self.next_after = min(afters) if afters else _NEVER
        self.at_rip_scheduled = any(s.at_rip is not None for s in self.scheduled)
        self.attn = True

    def nmi_can_be_taken(self) -> bool:
        """NMIs are unblocked, GIF is set and no shadow holds them (SDM 6.7.1, 6.8.3; APM 15.17)."""
        shadow = self.shadow
        return not self.nmi_blocked and self.gif and not (
            shadow is Shadow.MOV_SS or (shadow is Shadow.STI and self.sti_blocks_nmi))

    def raise_nmi(self) -> ArrivalFate:
        """NMI pin: while one NMI is held, another is lost (SDM 6.7.1).

        An NMI that can be taken at this boundary starts its delivery, so a
        second one arriving with it is held rather than lost: "first NMI
        delivered, second pended" (KVM's process_nmi() allows 2 for this).
        """
        self.attn = True
        limit = 2 if self.nmi_can_be_taken() else 1
        if self.nmi_pending >= limit:
            return ArrivalFate.DROPPED
        self.nmi_pending += 1
        if self.nmi_pending == 1 and limit == 2:
            return ArrivalFate.PENDING
        return ArrivalFate.LATCHED

    def raise_interrupt(self, vector: int) -> ArrivalFate:
        self.attn = True
        if self.apic.irr >> vector & 1:
            return ArrivalFate.MERGED
        self.apic.request(vector)
        return ArrivalFate.PENDING

    def raise_extint(self, vector: int) -> ArrivalFate:
        """INTR from the 8259: a maskable interrupt outside the APIC's priority scheme (SDM
        10.5.1 ExtINT), taken like any at a boundary with IF=1, no shadow and GIF=1."""
        self.attn = True
        self.extint += (vector,)
        return ArrivalFate.PENDING

    def nmi_from_apic(self) -> ArrivalFate:
        """The local APIC sent this CPU an NMI (ICR delivery mode NMI)."""
        if self.host is not None:
            return self.host.nmi_from_apic(self)
        return self.raise_nmi()

    def _arrive(self, s: Scheduled) -> None:
        self.scheduled.remove(s)
        if s.event is External.STATE:
            self._update_next_after()
            self._force(s.state)
            return
        if self.host is not None:
            fate = self.host.external(self, s.event, s.vector)
            name = s.event.name.lower()
        elif s.event in (External.HOST_INTERRUPT, External.NOTIFY_TIMER, External.HOST_NMI):
            self._update_next_after()
            return
        elif s.event is External.NMI:
            fate, name = self.raise_nmi(), "nmi"
        elif s.event is External.EXTINT:
            fate, name = self.raise_extint(s.vector), "extint"
        else:
            fate, name = self.raise_interrupt(s.vector), "interrupt"
        self.trace.append(Arrival(name, s.vector, self.retired, self.rip, fate))
        self._update_next_after()

    def _force(self, state: Forced) -> None:
        """Put the CPU in `state` at this boundary (Forced)."""
        if state.snapshot is not None:
            self.snapshots[state.snapshot] = self._snapshot()
        if state.rollback is not None:
            self._roll_back(self.snapshots[state.rollback], state.rollback_events)
        if state.nmi_blocked is not None:
            self.nmi_blocked = state.nmi_blocked
        if state.shadow is not None:
            self.shadow = state.shadow
        if state.shutdown:
            self.shutdown, self.halted, self.attn = True, False, True
            self.trace.append(Shutdown(self.rip, self.retired, NO_VECTOR, NO_VECTOR))
            return
        if state.event is not None:
            if self.host is not None and state.event.vector == Vec.DB:
                raise ModelLimit("a #DB a VMM forced (KVM_SET_VCPU_EVENTS, KVM_GUESTDBG_INJECT_DB) "
                                 "while L1 runs a guest is not modelled", self.rip)
            if state.event.vector == Vec.DB:
                # A debugger's #DB (KVM_GUESTDBG_INJECT_DB): no debug condition was met, so DR6
                # stays (what KVM's payload-less kvm_queue_exception(DB) leaves; UNVERIFIED for
                # a probe-mode #DB); DR7.GD is cleared by any #DB delivery (SDM 17.2.4).
                self.dr7 &= ~DR7_GD
            self.halted = False
            event = replace(state.event, rip=self.rip, fault_address=state.cr2)
            screened = False
            if state.raised and self.host is not None:
                # In a guest, a raised event meets the host's intercepts first: an intercepted
                # #PF leaves CR2 alone (SDM 27.1, APM 15.12.15); an injected event does not
                # meet them (SDM 26.5.1.2, APM 15.20), only the faults of its delivery do.
                self.host.event(self, event)
                screened = True
            if state.cr2 is not None:
                self.cr2 = state.cr2
            deliver.deliver(self, event, injected=not screened, screened=screened)
            return
        if state.cr2 is not None:
            self.cr2 = state.cr2

    def _snapshot(self) -> CpuSnapshot:
        if self.shadow is not Shadow.NONE or self.pending_dbg or self.halted:
            raise ModelLimit("a snapshot at a boundary in a shadow, with a debug trap pending or "
                             "halted is not modelled", self.rip)
        return CpuSnapshot(tuple(self.regs), self.rip, self.rflags,
                           (self.cr0, self.cr2, self.cr3, self.cr4, self.efer),
                           (self.idtr_base, self.idtr_limit), (tuple(self.dr), self.dr6, self.dr7),
                           self.nmi_blocked, self.vmx.snapshot_root() if self.vmx else None)

    def _roll_back(self, snap: CpuSnapshot, events: bool) -> None:
        """The CPU continues from `snap`: an L2 it runs is left without a VM exit (nothing is
        written to its VMCS), what the instruction stream before left waiting at this boundary
        (a debug trap, a shadow) goes, memory stays as it is. Blocking by NMI and the NMI
        latch are event state: the snapshot's only with `events`."""
        if self.svm is not None and self.host is not None:
            raise ModelLimit("a rollback while an SVM guest runs on the model is not modelled",
                             self.rip)
        if self.vmx is not None:
            self.vmx.restore_root(self, snap.vmx)
        self.regs = list(snap.regs)
        self.rip, self.rflags = snap.rip, snap.rflags
        self.cr0, self.cr2, cr3, self.cr4, self.efer = snap.control
        if cr3 != self.cr3:
            self.load_cr3(cr3)
        self.idtr_base, self.idtr_limit = snap.idtr
        dr, self.dr6, self.dr7 = snap.debug
        self.dr = list(dr)
        self.update_breakpoints()
        self.shadow, self.pending_dbg, self.halted = Shadow.NONE, 0, False
        if events:
            self.nmi_blocked, self.nmi_pending = snap.nmi_blocked, 0
        self.attn = True

    def _fire_due(self) -> None:
        for s in list(self.scheduled):
            if (s.after is not None and self.retired >= s.after
                    and (s.delivered is None or self.delivered >= s.delivered)) or s.at_rip == self.rip:
                self._arrive(s)

    def next_arrival(self) -> bool:
        """Time passes while nothing runs (HLT): an event placed at this RIP arrives now,
        else the next one scheduled by count."""
        self.waits += 1
        here = [s for s in self.scheduled if s.at_rip == self.rip]
        if here:
            self._arrive(here[0])
            return True
        by_count = [s for s in self.scheduled if s.after is not None and (
            s.delivered is None or (self.retired >= s.after and self.delivered >= s.delivered))]
        if not by_count:
            return False
        self._arrive(min(by_count, key=lambda s: s.after))
        return True

    # -- instruction boundary ------------------------------------------------

    def pending_source(self) -> Source | None:
        """Highest-priority event due at this boundary (SDM 6.9 Table 6-2), if any."""
        shadow = self.shadow
        if self.pending_dbg and shadow is not Shadow.MOV_SS:
            return Source.DEBUG_TRAP
        if self.nmi_pending and self.nmi_can_be_taken():
            return Source.NMI
        if_flag = self.rflags if self.hif is None else self.hif
        if if_flag & IF and shadow is Shadow.NONE and self.gif and (self.extint or (
                self.apic_delivers and self.apic.pending_vector() is not None)):
            return Source.INTR
        # Intel: a code breakpoint on the instruction after MOV SS / POP SS is suppressed "as
        # if EFLAGS.RF were 1" (SDM Vol.2 MOV, POP; 6.8.3), as KVM's
        # kvm_is_code_breakpoint_inhibited() has it for an Intel-compatible guest CPUID
        if (not self.halted and self.rip in self.exec_bps and not self.rflags & RF
                and shadow is not Shadow.MOV_SS):
            return Source.CODE_BREAKPOINT
        return None

    def boundary(self, allowance: int = _NEVER) -> Stop | None:
        """Deliver what is due before the next instruction; a Stop when nothing can run.

        `allowance` bounds the deliveries: an event storm (each delivery raising
        the next, no instruction in between) never reaches an instruction, and
        bare metal hangs there; the model runs out of budget instead.
        """
        while not self.shutdown:
            if self.scheduled:
                self._fire_due()
            if self.host is not None:
                self.host.before_traps(self)
            source = self.pending_source()
            if source is not Source.DEBUG_TRAP and self.host is not None:
                started = self.deliveries
                self.host.boundary(self)  # window exits rank below debug traps (SDM 25.2)
                if self.deliveries != started:
                    continue  # it delivered a virtual interrupt (SVM V_IRQ): look again
            if source is not None:
                if allowance <= 0:
                    return Stop.BUDGET
                allowance -= 1
                self._take(source)
                continue
            if self.halted and not self.shutdown and self.next_arrival():
                continue
            break
        self.shadow_prev = self.shadow
        self.shadow = Shadow.NONE
        if self.shutdown:
            return Stop.SHUTDOWN
        if self.halted:
            return Stop.HALTED
        self.attn = bool(
            self.pending_dbg or self.nmi_pending or self.apic.irr or self.extint or self.shadow_prev
            or self.exec_bps or self.host_attn or self.at_rip_scheduled
        )
        return None

    def _take(self, source: Source) -> None:
        if source is Source.DEBUG_TRAP:
            bits, self.pending_dbg = self.pending_dbg, 0
            event = Event(Vec.DB, EventType.HW_EXCEPTION, self.rip, dr6=bits & (DR6_CONDITIONS | DR6_BT))
        elif source is Source.NMI:
            self.nmi_pending -= 1
            event = Event(Vec.NMI, EventType.NMI, self.rip)
        elif source is Source.INTR:
            # The ExtINT first, as KVM's kvm_cpu_get_interrupt() (UNVERIFIED on hardware: the
            # SDM does not order an 8259's INTR against a pending fixed APIC interrupt).
            if self.extint:
                vector, self.extint = self.extint[0], self.extint[1:]
            else:
                vector = self.apic.acknowledge()
            event = Event(vector, EventType.EXT_INT, self.rip)
        else:
            bits = self.exec_bps[self.rip]
            event = Event(Vec.DB, EventType.HW_EXCEPTION, self.rip, dr6=bits)
        deliver.deliver(self, event)

    def charge_delivery(self) -> None:
        """A delivery starts: it costs cycles and opens no event window (cost.py)."""
        self.deliveries += 1
        if self.retired != self.window_retired:
            self.window_retired = self.retired
            self.since_window = 0
        self.since_window += DELIVERY_CYCLES
        if self.host is not None:
            self.host.no_event_window(self)

    @property
    def work(self) -> int:
        """Instructions retired plus deliveries started: what a step budget spans."""
        return self.retired + self.deliveries

    def open_event_window(self) -> None:
        """VM entry: the notify timer starts afresh."""
        self.window_retired = self.retired
        self.since_window = 0

    # -- the run loop --------------------------------------------------------

    def run(self, max_steps: int) -> Stop:
        """Run until halted for good, shut down, or `max_steps` instructions were tried."""
        icache = self.icache
        steps = 0
        while steps < max_steps:
            if self.attn or self.retired >= self.next_after:
                stop = self.boundary(max_steps - steps)
                if stop is not None:
                    return stop
            steps += 1
            rip = self.rip
            flags = self.rflags
            if flags & RF:
                self.rflags = flags & ~RF  # RF lasts one instruction (SDM 17.3.1.1)
            try:
                if self.fep_is_prefix and self.at_forced_prefix(rip):
                    rip = self.through_forced_prefix(rip, flags)
                    if rip is None:
                        continue
                insn = icache.get(rip) or decode(self, rip)
                software_event = insn.execute(self)
            except Fault as fault:
                self.fault(fault, rip)
                continue
            except HostExit:
                self.rflags = flags  # the instruction did not happen
                self.db_hits = 0
                raise
            if software_event is not None:
                # INT n, INT3, INTO, INT1 retire only if their delivery completes (deliver.py),
                # whose Delivery stands for them in the trace: a VMM may inject them with no
                # instruction behind. TF was cleared, so no single-step trap follows (17.3.1.4).
                deliver.deliver(self, software_event)
                continue
            self.retired += 1
            if self.record_instructions:
                self._record_retire(rip, insn)
            if self.db_hits:
                self.pending_dbg |= self.db_hits  # data breakpoints trap (SDM 17.2.4)
                self.db_hits = 0
                self.attn = True
            if flags & TF:
                if self.step_trap_replaced:
                    self.step_trap_replaced = False
                else:
                    self.pending_dbg |= DR6_BS  # single-step trap (SDM 17.3.1.4)
                    self.attn = True
            if self.halted:
                if insn.exiting is Exiting.HLT:  # not a VM entry into the HLT activity state
                    self.trace.append(Halt(rip, self.retired))
                self.attn = True
        return Stop.SHUTDOWN if self.shutdown else Stop.BUDGET

    def at_forced_prefix(self, rip: int) -> bool:
        """KVM_FEP ("ud2; .ascii \"kvm\"", handle_ud()) is at `rip`."""
        return self.fetch_bytes(self.linear(rip), len(FORCED_EMULATION_PREFIX)) == (
            FORCED_EMULATION_PREFIX)

    def through_forced_prefix(self, rip: int, flags: int) -> int | None:
        """What a guest sees of an instruction KVM emulates on the forced emulation prefix:
        the instruction after it, run as if KVM had intercepted it without an exception
        (x86.c kvm_vcpu_check_code_breakpoint()'s comment), so RIP moves past the prefix
        for good and no instruction retires for it. Hardware checked code breakpoints at the
        prefix; the one at the instruction is checked here, fault-like (SDM 17.3.1.1) and
        with RF and the MOV SS suppression of pending_source() as they stood before it.
        Returns the instruction's RIP, or None when a #DB was delivered instead."""
        rip = (rip + len(FORCED_EMULATION_PREFIX)) & self.addr_mask
        self.rip = rip
        bits = self.exec_bps.get(rip)
        if bits and not flags & RF and self.shadow_prev is not Shadow.MOV_SS:
            deliver.deliver(self, Event(Vec.DB, EventType.HW_EXCEPTION, rip, dr6=bits))
            return None
        return rip

    def _record_retire(self, rip: int, insn: Decoded) -> None:
        if self.retire_at is None:
            self.trace.append(Retire(rip, insn.text, self.retired))
        else:  # a VM entry: before what L2 showed (hw/base.py entry_retired())
            at, retired = self.retire_at
            self.trace.insert(at, Retire(rip, insn.text, retired))
            self.retire_at = None

    def fault(self, fault: Fault, rip: int) -> None:
        """Deliver an exception raised by the instruction at `rip` (a fault: RIP is not advanced)."""
        self.db_hits = 0  # the faulting instruction's accesses do not count
        self.retire_at = None  # a VM entry that faults did not retire early after all
        # Faults push RF=1 (SDM 17.3.1.1), except a fault-like #DB (general detect), which
        # pushes RF as it is, like a code breakpoint: KVM inject_pending_event()'s comment
        # ("most versions of Intel's SDM and AMD's APM incorrectly describe the behavior of
        # General Detect #DBs ... They do _not_ set RF"; 5623f751bd9c); Bochs exception.cc.
        event = Event(fault.vector, EventType.HW_EXCEPTION, rip, error_code=fault.error_code,
                      push_rf=fault.vector != Vec.DB, fault_address=fault.cr2, dr6=fault.dr6)
        if self.host is not None:
            self.host.event(self, event)  # an intercepted #PF leaves CR2 alone (SDM 27.1)
        self.iret_unblocked_nmi = False  # the exit above may report it (SDM 27.2.2 bit 12)
        if fault.cr2 is not None:
            self.cr2 = fault.cr2
        deliver.deliver(self, event, screened=True)
