"""The scenario data model: what a scenario file says, before labels are resolved.

Addresses are kept as `Expr` ("label", "label+0x4", or a number) and
resolved once the guest is assembled; `line` fields point into the file so
every later error can name file:line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from kvmodel.arch.cpu import External, Forced
from kvmodel.arch.events import EventType
from kvmodel.arch.machine import MAX_CPUS
from kvmodel.arch.regs import GPR32, GPR64, Mode
from kvmodel.guest.layout import CODE_BASE, DEFAULT_MEMORY, TSS_BASE, gate_size
from kvmodel.kvm.uapi import EVENT_FIELD_BITS
from kvmodel.scenario.vmm import CALL_FIELDS as VMM_CALL_FIELDS
from kvmodel.scenario.vmm import CALLS as VMM_CALLS
from kvmodel.scenario.vmm import CHOICE_NAMES as VMM_CHOICES
from kvmodel.scenario.vmm import IRQ_WINDOW, KVM_ENABLE_CAP, KVM_SET_VCPU_EVENTS, VECTOR_CALLS

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
    dpl: int = 0  # the gate's DPL: 3 lets INT n, INT3 and INTO through from CPL 3
    task: Expr | None = None  # a task gate: its TSS (selector holds the TSS descriptor's)


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
class CpusSpec:
    """[cpus]: several CPUs on one memory (arch/machine.py), running one program."""

    count: int
    entries: tuple[Expr, ...]  # where CPU n starts; CPUs beyond these wait for a SIPI
    rsp: tuple[Expr, ...]  # initial RSP of CPU n (default: cpu_stack_top(n))
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
    state: Forced | None = None  # External.STATE: bare metal's counterpart of a VMM's state


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
    the label `at` (a signal kicks the vCPU out there). `args` are the call's
    arguments (scenario/vmm.py CALL_FIELDS): the fields of struct
    kvm_vcpu_events or kvm_debugregs a crafted SET changes, a capability's
    arguments, KVM_SET_GUEST_DEBUG's control. `exit` 0: before KVM_CREATE_VCPU.
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
    cpu: int = 0  # the CPU it is delivered on ([cpus])


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
    folder: Path | None = None  # the file's folder: its guest may include files from there
    cpus: CpusSpec | None = None  # several CPUs; None: one
    cr3: tuple[Expr, int] | None = None  # [memory] cr3: the guest's own page tables (arch/paging.py)


# -- the document: every table and key a scenario file may hold, and what each takes --------
#
# load.py checks the whole parsed document against DOCUMENT before it builds the
# dataclasses above, so the builders see only values of the declared type and range;
# what remains for them are the rules that tie keys together.

U64 = (1 << 64) - 1
MAX_STEPS = 10_000_000  # the step budget's ceiling: a looping guest runs it in 4 s bare, 9 s under KVM
MAX_HAPPENINGS = 1_000  # [[happen]] tables in one file (arch/cpu.py looks at each at every arrival)
MIN_MEMORY_KIB = DEFAULT_MEMORY // 1024  # the layout's IST stacks end at 0x38000
MAX_MEMORY_KIB = 64 * 1024  # a run allocates and copies all of it

MODES = {"long64": Mode.LONG64, "protected32": Mode.PROTECTED32, "real16": Mode.REAL16}
EVENT_TYPES = {t.name.lower(): t for t in EventType}
EVENTS = {"nmi": External.NMI, "interrupt": External.INTERRUPT,
          "host_interrupt": External.HOST_INTERRUPT, "host_nmi": External.HOST_NMI,
          "notify": External.NOTIFY_TIMER,
          "host_fault": HostEvent.FAULT, "save_restore": HostEvent.SAVE_RESTORE}
VENDORS = {"bare": "bare", "svm": "svm", "vmx": "vmx"}
KVM_VENDORS = {"svm": ("svm",), "vmx": ("vmx",), "any": ("svm", "vmx")}
FLAGS_FINAL = ("halted", "shutdown", "nmi_blocked")
NUMBERS_FINAL = ("rip", "rflags", "cr2", "dr6", "dr7")
# struct kvm_vcpu_stat counters a scenario may pin, summed over the vCPUs of a run
STAT_NAMES = ("nmi_injections", "irq_injections", "nmi_window_exits", "irq_window_exits",
              "irq_exits", "halt_exits", "notify_window_exits", "request_irq_exits",
              "pf_fixed", "pf_guest", "invlpg")
STOPS = ("halted", "shutdown", "budget", "vmm")
# kvm_amd.nrips/vnmi/vgif/debug_swap, kvm_intel.enable_vnmi, the model's intercept_db
# (kvm/vmx/vmx.py), the SEV-ES VM type, kvm.enable_vmware_backdoor (#GP intercepted) and
# kvm.force_emulation_prefix (KVM emulates the instruction after "ud2; .ascii \"kvm\"") and
# its KVM_FEP_CLEAR_RFLAGS_RF bit (force_emulation_prefix=3: RF cleared before emulating)
# and tdp (kvm_intel.ept / kvm_amd.npt; false: shadow paging, for a guest with [memory] cr3)
KVM_PARAMS = ("nrips", "vnmi", "vgif", "enable_vnmi", "intercept_db", "sev_es", "debug_swap",
              "host_fred", "vmware_backdoor", "force_emulation_prefix", "fep_clear_rflags_rf", "tdp")
# What the VMM asks of the VM, with QEMU's names (-accel kvm,notify-vmexit=...,notify-window=N)
NOTIFY_MODES = {"run": "run", "internal-error": "internal-error", "disable": "disable"}
# Where the interrupt controllers are (kvm/vm.py IrqChip): KVM_CREATE_IRQCHIP, KVM_CAP_SPLIT_IRQCHIP, none
IRQCHIPS = ("kernel", "split", "userspace")
CHOICE_KEYS = ("nmi", "interrupts", "host_interrupts", "host_nmis", "host_faults", "save_restore",
               "vmm")
HAPPENING_KINDS = ("nmi", "interrupt", "host_interrupt", "host_nmi", "host_fault", "save_restore",
                   "vmm")
QEMU_ACCELS = {"tcg": ("tcg",), "kvm": ("kvm",), "any": ("tcg", "kvm")}
# What a QEMU difference may name (check/qemu_compare.py compares these)
QEMU_FIELD = re.compile(r"^(entry|vector|rsp|frame word [0-9]|stop|memory|crash|rip|rflags|cr2|dr6|dr7"
                        r"|[re]?[abcd]x|[re]?[sd]i|[re]?[sb]p|r(8|9|1[0-5]))$")


def word(mode: Mode) -> int:
    """The largest register value or address in `mode`."""
    return U64 if mode is Mode.LONG64 else 0xFFFF_FFFF


def gprs(mode: Mode) -> tuple[str, ...]:
    return GPR64 if mode is Mode.LONG64 else GPR32


Bound = int | Callable[[Mode], int]


@dataclass(frozen=True, slots=True)
class Int:
    low: int = 0
    high: Bound = U64


@dataclass(frozen=True, slots=True)
class Bool:
    pass


@dataclass(frozen=True, slots=True)
class Text:
    nonblank: bool = False


@dataclass(frozen=True, slots=True)
class Choice:
    choices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Pattern:
    """A string matching `regex`; `doc` says what to write, for the message."""

    regex: re.Pattern[str]
    doc: str


@dataclass(frozen=True, slots=True)
class Address:
    """A number, a label, or label+offset / label-offset; a number fits the mode's width."""

    high: Bound = word


@dataclass(frozen=True, slots=True)
class Vector:
    """0-255 as a number or a string ("0x30"), or a name ("NMI", "#PF")."""

    high: int = 255


@dataclass(frozen=True, slots=True)
class Either:
    options: tuple[Field, ...]
    doc: str  # what to write, for the message


@dataclass(frozen=True, slots=True)
class List:
    item: Field
    least: int = 0  # items it must have


@dataclass(frozen=True, slots=True)
class Table:
    """`fields` by name (or by mode); `keys`/`values` for tables keyed by data ([idt])."""

    fields: Mapping[str, Field] | Callable[[Mode], Mapping[str, Field]] = field(default_factory=dict)
    required: tuple[tuple[str, str], ...] = ()  # (key, the message when it is missing)
    keys: Field | None = None
    values: Field | None = None


@dataclass(frozen=True, slots=True)
class Tagged:
    """A table whose keys depend on the value of one of them (`event` in [[happen]])."""

    tag: str
    variants: Mapping[str, Table]
    missing: str  # the message when the tag is missing
    # the message for a key of another variant ({key}, {name} of the table, {tag}, {owner})
    foreign: str = '{key} belongs to {tag} = "{owner}"'


@dataclass(frozen=True, slots=True)
class Tables:
    """An array of tables, [[name]]."""

    table: Table | Tagged
    most: int | None = None


Field = (Int | Bool | Text | Choice | Pattern | Address | Vector | Either | List | Table | Tagged
         | Tables)


def _final_fields(mode: Mode) -> dict[str, Field]:
    fields: dict[str, Field] = {name: Address() for name in gprs(mode) + NUMBERS_FINAL}
    return fields | {name: Bool() for name in FLAGS_FINAL} | {
        "retired": Int(), "stop": Choice(STOPS)}


_QEMU_FIELD_DOC = ('"entry", "vector", "rsp", "frame word N", "stop", a register name, "memory" '
                   'or "crash"')
_TRIGGER = {"after": Int(), "at": Address()}
_HAPPEN = Tagged("event", {
    "nmi": Table({"event": Choice(tuple(EVENTS))} | _TRIGGER),
    "interrupt": Table({"event": Choice(tuple(EVENTS)), "vector": Vector()} | _TRIGGER,
                       required=(("vector", "an interrupt needs vector = 16..255"),)),
    "host_interrupt": Table({"event": Choice(tuple(EVENTS))} | _TRIGGER),
    "host_nmi": Table({"event": Choice(tuple(EVENTS))} | _TRIGGER),
    "notify": Table({"event": Choice(tuple(EVENTS)), "context_invalid": Bool()} | _TRIGGER),
    "host_fault": Table({"event": Choice(tuple(EVENTS)), "page": Address()}, required=(
        ("page", 'a host fault needs page = "label" (the page the host has not mapped)'),)),
    "save_restore": Table({"event": Choice(tuple(EVENTS)), "exit": Int(low=1)}, required=(
        ("exit", "save_restore needs exit = N (1 for the first VM exit)"),)),
}, missing="each [[happen]] needs event = " + ", ".join(f'"{e}"' for e in EVENTS))
_VMM_WHEN = {"call": Choice(VMM_CALLS), "exit": Int(low=1), "at": Address()}
# A call's arguments by name (scenario/vmm.py CALL_FIELDS): struct kvm_vcpu_events or
# kvm_debugregs fields a crafted SET changes, a capability's args[0], kvm_guest_debug.control;
# KVM_INTERRUPT's struct kvm_interrupt.irq is a __u32 (KVM refuses 256 and above with -EINVAL)
_U32 = Int(high=0xFFFF_FFFF)
_ARG_TYPES = {"control": _U32, "flags": _U32, "window": _U32, "events_first": Bool(),
              "slot": Int(high=0xFF), "events": Bool()}
_VECTOR = {"vector": _U32}
_PIC_VECTOR = {"vector": Int(high=0xFF)}  # what an 8259 presents on INTA is one byte


def _arg_type(call: str, name: str) -> Either | Int | Bool:
    """A call argument's type: a struct kvm_vcpu_events field holds as many bits as its C type."""
    if call == KVM_SET_VCPU_EVENTS:
        bits = EVENT_FIELD_BITS[name]
        return Either((Bool(), Int(high=(1 << bits) - 1)), f"true, false or a {bits}-bit number")
    return _ARG_TYPES.get(name, Either((Bool(), Int()), "true, false or a number"))


_VMM = Tagged("call", {
    call: Table(_VMM_WHEN | {name: _arg_type(call, name) for name in VMM_CALL_FIELDS.get(call, ())}
                | ((_PIC_VECTOR if call == IRQ_WINDOW else _VECTOR) if call in VECTOR_CALLS else {})
                # exit = 0: on the VM, before KVM_CREATE_VCPU (where QEMU enables its caps)
                | ({"exit": Int(low=0)} if call == KVM_ENABLE_CAP else {}),
                required=(("vector", f'{call} needs vector = N (the 8259\'s vector)'),)
                if call in VECTOR_CALLS else ())
    for call in VMM_CALLS
}, missing="each [[vmm]] needs call = " + ", ".join(f'"{c}"' for c in VMM_CALLS),
    foreign='unknown key "{key}" in [{name}]: it belongs to {tag} = "{owner}"')
_GATE = Table({"handler": Address(), "gate": Either((Choice(("interrupt", "trap")), Int(high=15)),
                                                   '"interrupt", "trap" or a type 0-15'),
               "ist": Int(high=7), "present": Bool(), "selector": Int(high=0xFFFF),
               "dpl": Int(high=3),
               # a task gate (protected32): the label of the 32-bit TSS of the handler's task
               "task": Address()})

DOCUMENT = Table({
    "title": Text(),
    "cite": Text(),
    "max_steps": Int(low=1, high=MAX_STEPS),
    "guest": Table({"mode": Choice(tuple(MODES)), "entry": Address(), "code": Text(nonblank=True)},
                   required=(("code", "[guest] needs code = '''...''' with the guest assembly"),)),
    "cpu": Table({"sti_blocks_nmi": Bool(), "rflags": Int(high=word),
                  "memory_kib": Int(low=MIN_MEMORY_KIB, high=MAX_MEMORY_KIB),
                  "idt_limit": Int(high=0xFFFF),  # IDTR.limit is 16 bits (SDM 6.10)
                  "vendor": Choice(tuple(VENDORS)), "vmx": Bool(), "svm": Bool(),
                  "cs_base": Int(high=CODE_BASE),  # the code is loaded at CODE_BASE
                  "idt_base": Int(high=lambda mode: TSS_BASE - 256 * gate_size(mode))}),
    "kvm": Table({name: Bool() for name in KVM_PARAMS} | {
        "notify_vmexit": Choice(tuple(NOTIFY_MODES)), "notify_window": Int(high=0xFFFF_FFFF),
        "irqchip": Choice(IRQCHIPS)}),
    "registers": Table(lambda mode: {name: Address() for name in gprs(mode)}),
    "idt": Table(keys=Vector(), values=Either((Address(), _GATE),
                                              'an address (the handler) or a gate table')),
    "tss": Table({f"ist{k}": Address() for k in range(1, 8)}),
    "fred": Table({"entry": Address(), "redzone": Int(high=7), "interrupt_level": Int(high=3),
                   "stack_levels": Table(keys=Vector(), values=Int(high=3)),
                   "rsp1": Address(), "rsp2": Address(), "rsp3": Address()},
                  required=(("entry", '[fred] needs entry = "label" (4 KiB aligned; CPL 0 events '
                                      'enter at +256)'),)),
    "memory": Table({"not_present": List(Address()), "cr3": Address()}),
    "cpus": Table({"count": Int(low=2, high=MAX_CPUS), "entry": List(Address(), least=1),
                   "rsp": List(Address())},
                  required=(("count", "[cpus] needs count = 2..4"),
                            ("entry", '[cpus] needs entry = ["start", ...] (where each CPU starts; '
                                      "the CPUs after those listed wait for a SIPI)"))),
    "happen": Tables(_HAPPEN, most=MAX_HAPPENINGS),
    "vmm": Tables(_VMM, most=MAX_HAPPENINGS),
    "expect": Table({
        "delivery": Tables(Table(
            {"vector": Vector(), "type": Choice(tuple(EVENT_TYPES)),
             # 32 bits (SDM 6.13; zero-extended in a 64-bit frame, 6.14.2 Figure 6-8)
             "error_code": Int(high=0xFFFF_FFFF), "return": Address(), "retired": Int(),
             "repeats": Bool(), "cpu": Int(high=MAX_CPUS - 1)},
            required=(("vector", "each [[expect.delivery]] needs a vector"),))),
        "final": Table(_final_fields),
        "memory": Table(keys=Address(), values=Int(high=word)),  # 8 bytes in long64, 4 in protected32
        "divergence": Tables(Table(
            {"vendor": Choice(tuple(KVM_VENDORS)),
             "entry": Either((Int(), Choice(("final",))),
                             'N (1-based, in the guest-observable trace) or "final"'),
             "why": Text(nonblank=True)},
            required=(("vendor", 'a known divergence needs vendor = "svm", "vmx" or "any"'),
                      ("entry", 'a known divergence needs entry = N or "final"'),
                      ("why", 'a known divergence needs why = "..." (the reason, with its '
                              'source)')))),
        "stats": Tables(Table(
            {"vendor": Choice(("svm", "vmx"))} | {name: Int() for name in STAT_NAMES},
            required=(("vendor", 'KVM stats need vendor = "svm" or "vmx"'),))),
        "qemu": Tables(Table(
            {"accel": Choice(tuple(QEMU_ACCELS)),
             "entry": Either((Int(), Choice(("final",))),
                             'N (1-based, among deliveries and port output) or "final"'),
             "field": Either((Pattern(QEMU_FIELD, _QEMU_FIELD_DOC),
                              List(Pattern(QEMU_FIELD, _QEMU_FIELD_DOC), least=1)),
                             _QEMU_FIELD_DOC + " (or a list)"),
             "mask": Int(low=1),  # only these bits may differ
             "why": Text(nonblank=True)},
            required=(("accel", 'a QEMU difference needs accel = "tcg", "kvm" or "any"'),
                      ("entry", 'a QEMU difference needs entry = N (1-based, among deliveries '
                                'and port output) or "final"'),
                      ("field", "a QEMU difference needs field = what differs: "
                                + _QEMU_FIELD_DOC),
                      ("why", 'a QEMU difference needs why = "..." (QEMU\'s source and the SDM '
                              'rule)')))),
    }),
    "explore": Table({
        "nmi": Int(high=8), "interrupts": List(Vector()), "host_interrupts": Int(high=8),
        "host_nmis": Int(high=8), "host_faults": List(Address()), "save_restore": Int(high=8),
        "vmm": List(Choice(VMM_CHOICES)),  # VMM calls tried after any VM exit
        "known": Tables(Table(
            {"vendor": Choice(tuple(KVM_VENDORS)), "involves": List(Choice(HAPPENING_KINDS)),
             "same_boundary": Bool(), "why": Text(nonblank=True)},
            required=(("vendor", 'a known finding needs vendor = "svm", "vmx" or "any"'),
                      ("involves", "a known finding needs involves = [...] of "
                                   + ", ".join(HAPPENING_KINDS)),
                      ("why", 'a known finding needs why = "..."')))),
    }),
}, required=(("guest", "missing [guest] table"),))
