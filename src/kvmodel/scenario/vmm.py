"""The VMM as an actor: the uAPI calls userspace makes once KVM_RUN has returned to it.

Each call is an immutable record whose `perform(vcpu)` issues the real ioctls
through the model's uAPI (kvm/x86.py: kvm_inject_nmi(), KVM_GET/SET_VCPU_EVENTS,
KVM_RUN with immediate_exit); kvm/ does not know who calls it. A call KVM
rejects returns its negative errno and must change nothing; the run goes on.

Each call also says what it stands for on bare metal, which the oracle is
given at the guest boundary where the VMM acted (`Performed.nmis`):

- KVM_NMI: an NMI arriving there (what the LINT1 pin or a board NMI button
  does to a real CPU; api.rst KVM_NMI);
- KVM_GET_VCPU_EVENTS then KVM_SET_VCPU_EVENTS of what it returned, on the
  same vCPU (QEMU at reset and loadvm): nothing at all;
- a crafted KVM_SET_VCPU_EVENTS that raises nmi.pending: that many more NMIs
  arriving there (KVM clamps them as process_nmi() does, bare metal drops
  the ones beyond the one held, SDM 6.7.1);
- KVM_RUN with immediate_exit set (-EINTR at once): nothing;
- KVM_INTERRUPT (userspace or split irqchip): the 8259's vector on INTR, arriving there
  (SDM 10.5.1 ExtINT; taken at a boundary with IF=1, no shadow, GIF=1);
- the interrupt-window protocol (`Pic`, QEMU's kvm_arch_pre_run()): the same, at the
  boundary where the VMM's 8259 raised INTR; KVM_INTERRUPT comes later, when KVM says
  the guest is ready;
- a rejected call: nothing.

A crafted state that changes anything else (NMI masking, an exception or
interrupt to inject, a shadow) has no bare-metal counterpart in the model
yet: performing one stops the run with a model limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

from kvmodel.errors import ModelLimit
from kvmodel.kvm.uapi import EEXIST, EINVAL, ENXIO, InvalidArgument, KvmVcpuEvents, VcpuEventsFlag
from kvmodel.kvm.x86 import Vcpu

KVM_NMI = "KVM_NMI"
KVM_SET_VCPU_EVENTS = "KVM_SET_VCPU_EVENTS"
IMMEDIATE_EXIT = "immediate_exit"
KVM_INTERRUPT = "KVM_INTERRUPT"
IRQ_WINDOW = "interrupt_window"  # the protocol: raise INTR, KVM_INTERRUPT once KVM says ready
CALLS = (KVM_NMI, KVM_SET_VCPU_EVENTS, IMMEDIATE_EXIT, KVM_INTERRUPT, IRQ_WINDOW)
VECTOR_CALLS = (KVM_INTERRUPT, IRQ_WINDOW)  # the calls that take `vector`
EVENT_FIELDS = tuple(f.name for f in fields(KvmVcpuEvents))


@dataclass(frozen=True, slots=True)
class Performed:
    result: int  # what the ioctl returned: 0, or a negative errno
    nmis: int  # NMIs the bare-metal counterpart receives at this boundary
    detail: str = ""
    extints: tuple[int, ...] = ()  # vectors the 8259 presents on INTR from this boundary on


@dataclass(frozen=True, slots=True)
class VmmRecord:
    """A uAPI call the VMM made, and what it returned (trace only)."""

    kind: ClassVar[str] = "vmm"
    call: str
    result: int
    retired: int
    detail: str


@dataclass(frozen=True, slots=True)
class KvmNmi:
    """KVM_NMI: kvm_vcpu_ioctl_nmi() -> kvm_inject_nmi(): nmi_queued++, KVM_REQ_NMI. Returns 0."""

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        vcpu.inject_nmi()
        return Performed(0, 1)


@dataclass(frozen=True, slots=True)
class SetVcpuEvents:
    """KVM_GET_VCPU_EVENTS, then KVM_SET_VCPU_EVENTS of it with `changes` made, same vCPU.

    No changes: the round trip QEMU makes at reset and loadvm (kvm_arch_put_registers()
    after kvm_arch_get_registers()), which must change nothing the guest can see.
    """

    changes: tuple[tuple[str, int], ...] = ()

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        before = vcpu.get_vcpu_events()
        crafted = replace(before, **dict(self.changes))
        try:
            vcpu.set_vcpu_events(KvmVcpuEvents.unpack(crafted.pack()))
        except InvalidArgument as e:
            return Performed(e.errno, 0, str(e))
        return Performed(0, _added_nmis(before, crafted), crafted.pack().hex())


@dataclass(frozen=True, slots=True)
class ImmediateExit:
    """KVM_RUN with kvm_run->immediate_exit = 1: returns -EINTR without entering the guest."""

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        return Performed(vcpu.run_immediate_exit(), 0)


@dataclass(frozen=True, slots=True)
class KvmInterrupt:
    """KVM_INTERRUPT now, whatever the last exit said (kvm_vcpu_ioctl_interrupt()): what a VMM
    does that ignores ready_for_interrupt_injection and if_flag, or has a split irqchip (KVM
    then waits for the window itself)."""

    vector: int

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        result = vcpu.kvm_interrupt(self.vector)
        return Performed(result, 0, "" if result == 0 else _ERRNO.get(result, ""),
                         (self.vector,) if result == 0 else ())


@dataclass(frozen=True, slots=True)
class InterruptWindow:
    """The VMM's 8259 raises INTR with `vector`: userspace keeps it until KVM says the guest
    can take it (Pic.pre_run()). Returns 0; the KVM_INTERRUPT is traced when it is made."""

    vector: int

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        if vcpu.kvm.pic_in_kernel:  # the VMM's 8259 is KVM's: it uses KVM_IRQ_LINE instead
            return Performed(ENXIO, 0, "the 8259 is in the kernel (full irqchip)")
        if pic is None:
            raise ModelLimit("an interrupt window needs the VMM's 8259 (Pic)")
        pic.pending.append(self.vector)
        return Performed(0, 0, "", (self.vector,))


@dataclass(slots=True)
class Pic:
    """The VMM's 8259, for a userspace or split irqchip: the vectors it has raised on INTR and
    not yet handed to KVM, oldest first (no priorities, masks or EOI)."""

    pending: list[int] = field(default_factory=list)

    def pre_run(self, vcpu: Vcpu) -> Performed | None:
        """Before each KVM_RUN, as QEMU's kvm_arch_pre_run(): KVM_INTERRUPT if the last exit
        said ready_for_interrupt_injection with IF=1; then request_interrupt_window while a
        vector still waits (api.rst, "request_interrupt_window"). The KVM_INTERRUPT made, if any."""
        done = None
        run = vcpu.kvm_run
        if self.pending and run.ready_for_interrupt_injection and run.if_flag:
            vector = self.pending[0]
            result = vcpu.kvm_interrupt(vector)
            if result == 0:
                self.pending.pop(0)
            done = Performed(result, 0, f"vector {vector:#x}: the guest is ready for it")
        run.request_interrupt_window = bool(self.pending)
        return done


VmmAction = KvmNmi | SetVcpuEvents | ImmediateExit | KvmInterrupt | InterruptWindow
_ERRNO = {EINVAL: "vector >= KVM_NR_INTERRUPTS", ENXIO: "the 8259 is in the kernel (full irqchip)",
          EEXIST: "the split irqchip holds a vector already"}


def _added_nmis(before: KvmVcpuEvents, crafted: KvmVcpuEvents) -> int:
    """The bare-metal counterpart of an accepted crafted state: NMIs arriving, or a limit."""
    changed = [f for f in EVENT_FIELDS if getattr(before, f) != getattr(crafted, f)]
    dropped_flags = before.flags & ~crafted.flags
    for name in changed:
        if name == "flags" and not (dropped_flags & VcpuEventsFlag.VALID_PAYLOAD
                                    or crafted.flags & ~before.flags):
            continue  # leaving NMI_PENDING/SHADOW/SMM/TRIPLE_FAULT out keeps KVM's own
        if (name == "nmi_pending" and crafted.flags & VcpuEventsFlag.VALID_NMI_PENDING
                and crafted.nmi_pending > before.nmi_pending):
            continue
        raise ModelLimit(f"KVM_SET_VCPU_EVENTS with {name} = {getattr(crafted, name):#x} (was "
                         f"{getattr(before, name):#x}) was accepted, but the model has no "
                         "bare-metal counterpart for that state yet (only more pending NMIs)")
    if crafted.flags & VcpuEventsFlag.VALID_NMI_PENDING:
        return max(0, crafted.nmi_pending - before.nmi_pending)
    return 0


def action(call: str, args: tuple[tuple[str, int], ...] = ()) -> VmmAction:
    """The action a [[vmm]] step or an explored choice names (validated by the loader)."""
    if call == KVM_NMI:
        return KvmNmi()
    if call == IMMEDIATE_EXIT:
        return ImmediateExit()
    if call == KVM_INTERRUPT:
        return KvmInterrupt(dict(args)["vector"])
    if call == IRQ_WINDOW:
        return InterruptWindow(dict(args)["vector"])
    return SetVcpuEvents(args)


# What the explorer may try at an exit, by the names `[explore] vmm = [...]` uses; each is
# (call, arguments). The order is the order calls at one exit are made in.
CHOICES: dict[str, tuple[str, tuple[tuple[str, int], ...]]] = {
    "nmi": (KVM_NMI, ()),
    "nmi_pending_3": (KVM_SET_VCPU_EVENTS, (("nmi_pending", 3),)),  # beyond process_nmi()'s 2
    "events_same_vcpu": (KVM_SET_VCPU_EVENTS, ()),
    "immediate_exit": (IMMEDIATE_EXIT, ()),
    # Rejected with -EINVAL, changing nothing: an unknown flag, an NMI as an exception.
    "reject_flags": (KVM_SET_VCPU_EVENTS, (("flags", 0xFF),)),
    "reject_nmi_vector": (KVM_SET_VCPU_EVENTS, (("exception_injected", 1), ("exception_nr", 2))),
    # A userspace or split irqchip's interrupt: by the protocol, and with no regard for it.
    "irq_window": (IRQ_WINDOW, (("vector", 0x30),)),
    "kvm_interrupt": (KVM_INTERRUPT, (("vector", 0x30),)),
    "reject_vector_256": (KVM_INTERRUPT, (("vector", 0x100),)),  # -EINVAL
}
CHOICE_NAMES = tuple(CHOICES)
# Calls that break api.rst's protocol, whose findings are userspace's: only a scenario that
# names them gets them, never `--max-vmm` alone.
PROTOCOL_BREAKING = ("kvm_interrupt",)
DEFAULT_CHOICE_NAMES = tuple(n for n in CHOICE_NAMES if n not in PROTOCOL_BREAKING)


def in_flight(vcpu: Vcpu) -> bool:
    """An event KVM will deliver before anything that arrives now: one whose delivery an exit
    cut short, or an exception an emulated instruction raised (kvm_event_needs_reinjection(),
    exception.pending). Its delivery is part of the boundary the VMM acted at."""
    return vcpu.event_needs_reinjection() or vcpu.exception.pending
