"""The scenario data model: what a scenario file says, before labels are resolved.

Addresses are kept as `Expr` ("label", "label+0x4", or a number) and
resolved once the guest is assembled; `line` fields point into the file so
every later error can name file:line.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvmodel.arch.cpu import External
from kvmodel.arch.events import EventType
from kvmodel.arch.regs import Mode

Expr = str | int


@dataclass(frozen=True, slots=True)
class GateSpec:
    vector: int
    handler: Expr
    kind: int  # gate type nibble: 0xE interrupt, 0xF trap, or a deliberately bad one
    ist: int
    present: bool
    selector: int
    line: int


@dataclass(frozen=True, slots=True)
class FredSpec:
    """[fred]: CR4.FRED=1 and the FRED MSRs (arch/fred.py)."""

    entry: Expr  # IA32_FRED_CONFIG[63:12]; events at CPL 0 enter at +256
    redzone: int  # 64-byte units skipped below the interrupted RSP
    interrupt_level: int
    stack_levels: tuple[tuple[int, int], ...]  # (vector, level) for IA32_FRED_STKLVLS
    rsp: tuple[tuple[int, Expr], ...]  # (level 1-3, stack top) for IA32_FRED_RSP1-3
    line: int


@dataclass(frozen=True, slots=True)
class Happening:
    """An NMI or interrupt arriving after `after` retired instructions or when RIP reaches `at`."""

    event: External
    vector: int
    after: int | None
    at: Expr | None
    line: int
    delivered: int | None = None  # set: where a VMM acted (arch/cpu.py Scheduled.delivered)


class HostEvent(Enum):
    """Host-side happenings; a bare-metal run has no host and ignores them."""

    FAULT = "host_fault"  # the page is missing from EPT/NPT until the guest first touches it
    SAVE_RESTORE = "save_restore"  # KVM_GET/SET_VCPU_EVENTS into a fresh vCPU at exit N


@dataclass(frozen=True, slots=True)
class HostHappening:
    event: HostEvent
    page: Expr | None
    exit: int | None
    line: int


@dataclass(frozen=True, slots=True)
class VmmStep:
    """[[vmm]]: one uAPI call the VMM makes when KVM_RUN has returned to it.

    At the `exit`-th VM exit, or at the first exit once the guest has reached
    the label `at` (a signal kicks the vCPU out there). `args` are the fields
    of struct kvm_vcpu_events a crafted KVM_SET_VCPU_EVENTS changes.
    """

    call: str
    exit: int | None
    at: Expr | None
    args: tuple[tuple[str, int], ...]
    line: int


@dataclass(frozen=True, slots=True)
class ExploreSpec:
    """Choice points: what the explorer may add, anywhere, up to these counts."""

    nmis: int
    interrupts: tuple[int, ...]  # vectors that may each arrive once
    host_interrupts: int
    host_faults: tuple[tuple[Expr, int], ...]  # pages that may be missing from EPT/NPT, with lines
    save_restores: int
    line: int
    host_nmis: int = 0  # NMIs for the host (perf, watchdog), each at any boundary
    vmm: tuple[str, ...] = ()  # VMM calls (scenario/vmm.py CHOICES) after any VM exit


@dataclass(frozen=True, slots=True)
class KnownFinding:
    """An exploration finding that is understood: explored schedules with all of
    `involves` that show a divergence are reported as known, not as new."""

    vendors: tuple[str, ...]
    involves: tuple[str, ...]  # happening kinds, with repeats: ("nmi", "nmi") needs two NMIs
    same_boundary: bool  # the involved arrivals all happen at one boundary
    why: str
    line: int


@dataclass(frozen=True, slots=True)
class ExpectedDelivery:
    vector: int
    type: EventType | None
    error_code: int | None
    return_rip: Expr | None
    retired: int | None
    line: int
    repeats: bool = False  # the last one only: it recurs until the run ends (an event storm)


@dataclass(frozen=True, slots=True)
class QemuDifference:
    """A difference QEMU is known to show from the bare-metal model, QEMU being wrong.

    `kvmodel differential` accepts it instead of reporting a disagreement; one
    that does not show (QEMU got fixed) is reported as a note.
    """

    accels: tuple[str, ...]  # "tcg", "kvm"
    entry: int  # 1-based position among deliveries and port output; 0 for the final state
    fields: tuple[str, ...]  # what differs there: "entry", "vector", "rsp", "frame word N",
    #                          "stop", a register, "memory", "crash" (QEMU itself fails)
    mask: int | None  # only these bits may differ (None: any)
    why: str  # the QEMU source (file, function, fixing commit) and the SDM rule
    line: int


@dataclass(frozen=True, slots=True)
class KnownDivergence:
    """A difference from bare metal the hypervisor is known to show, and why.

    The run passes only if exactly this divergence appears: if it goes away
    (say KVM got fixed), the scenario fails and asks to be updated.
    """

    vendors: tuple[str, ...]
    entry: int  # 1-based position in the guest-observable trace; 0 for the final state
    why: str
    line: int


@dataclass(frozen=True, slots=True)
class ExpectedStats:
    """KVM's counters after a run on one vendor, summed over its vCPUs."""

    vendor: str
    counts: tuple[tuple[str, int], ...]
    line: int


@dataclass(frozen=True, slots=True)
class Expected:
    value: Expr | bool | str
    line: int


@dataclass(frozen=True, slots=True)
class Scenario:
    path: str
    text: str  # the file as read, for digests and replay
    title: str
    cite: str
    mode: Mode
    code: str
    code_line: int  # line of the file just before the first line of `code`
    entry: Expr
    gates: tuple[GateSpec, ...]
    ist: tuple[tuple[int, Expr, int], ...]  # (k, top, line)
    registers: tuple[tuple[str, Expr, int], ...]
    rflags: int
    idt_limit: int | None
    idt_base: int
    memory_size: int
    not_present: tuple[tuple[Expr, int], ...]
    sti_blocks_nmi: bool
    max_steps: int
    happenings: tuple[Happening, ...]
    host: tuple[HostHappening, ...]
    vendor: str  # "bare", "svm" or "vmx": what `kvmodel run` uses without --vendor
    deliveries: tuple[ExpectedDelivery, ...] | None  # None: not checked
    final: tuple[tuple[str, Expected], ...]
    memory: tuple[tuple[Expr, Expected], ...]
    divergences: tuple[KnownDivergence, ...] = ()
    kvm_params: tuple[tuple[str, bool | int | str], ...] = ()  # module parameters, VM capabilities
    explore: ExploreSpec | None = None  # None: the explorer's default host-only choice points
    known_findings: tuple[KnownFinding, ...] = ()
    stats: tuple[ExpectedStats, ...] = ()
    fred: FredSpec | None = None
    vmx: bool = False  # the CPU may enter VMX operation: the guest is an L1 hypervisor
    svm: bool = False  # the CPU has SVM (EFER.SVME can be set): the guest is an L1 hypervisor
    cs_base: int = 0  # the code segment's base (protected32): labels are offsets in it
    qemu: tuple[QemuDifference, ...] = ()  # known QEMU inaccuracies ([[expect.qemu]])
    vmm: tuple[VmmStep, ...] = ()  # the VMM's script of uAPI calls ([[vmm]])
