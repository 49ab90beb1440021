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
- a rejected call: nothing;
- a crafted KVM_SET_VCPU_EVENTS that sets another legal state: the CPU in
  that state at that boundary (`Performed.states`, arch/cpu.py Forced): NMIs
  masked as inside an NMI handler, a shadow, an exception, NMI or external
  interrupt delivered there as the state says (crafted_states());
- KVM_GET/SET_REGS, _SREGS, _DEBUGREGS round trips, alone or in a VMM's
  order with the events (RegistersRoundTrip, StateRoundTrip), and
  KVM_ENABLE_CAP(KVM_CAP_EXCEPTION_PAYLOAD): nothing;
- KVM_INTERRUPT (userspace or split irqchip): the 8259's vector on INTR, arriving there
  (SDM 10.5.1 ExtINT; taken at a boundary with IF=1, no shadow, GIF=1);
- the interrupt-window protocol (`Pic`, QEMU's kvm_arch_pre_run()): the same, at the
  boundary where the VMM's 8259 raised INTR; KVM_INTERRUPT comes later, when KVM says
  the guest is ready;
- a snapshot of the vCPU (every GET) and a rollback to it (VcpuSnapshotTake, VcpuRollback):
  the CPU keeps its own state where the VMM took the snapshot and continues from it where
  the VMM rolled back (`Performed.states`, Forced.snapshot / Forced.rollback).

A crafted state the oracle has no counterpart for stops the run with a model
limit naming what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

from kvmodel.arch.cpu import Forced
from kvmodel.arch.events import VECTORS, Event, EventType, Vec
from kvmodel.arch.regs import IF, Shadow
from kvmodel.errors import ModelLimit
from kvmodel.hw.vmx.vmcs import INTR_INFO_VALID
from kvmodel.kvm.uapi import (
    EEXIST,
    EINVAL,
    ENXIO,
    Busy,
    GuestDebug,
    InvalidArgument,
    KvmDebugregs,
    KvmRegs,
    KvmSregs,
    KvmVcpuEvents,
    ShadowBits,
    VcpuEventsFlag,
)
from kvmodel.kvm.vm import Cap, NotifyFlag, Vm
from kvmodel.kvm.vmx.nested import NestedState
from kvmodel.kvm.x86 import ExceptionType, MpState, Vcpu, exception_type

KVM_NMI = "KVM_NMI"
KVM_SET_VCPU_EVENTS = "KVM_SET_VCPU_EVENTS"
IMMEDIATE_EXIT = "immediate_exit"
KVM_SET_REGS = "KVM_SET_REGS"
KVM_SET_SREGS = "KVM_SET_SREGS"
KVM_SET_DEBUGREGS = "KVM_SET_DEBUGREGS"
KVM_ENABLE_CAP_EXCEPTION_PAYLOAD = "KVM_ENABLE_CAP_EXCEPTION_PAYLOAD"
KVM_INTERRUPT = "KVM_INTERRUPT"
IRQ_WINDOW = "interrupt_window"  # the protocol: raise INTR, KVM_INTERRUPT once KVM says ready
KVM_SET_GUEST_DEBUG = "KVM_SET_GUEST_DEBUG"
KVM_ENABLE_CAP = "KVM_ENABLE_CAP"  # KVM_CAP_X86_NOTIFY_VMEXIT; exit = 0: before KVM_CREATE_VCPU
KVM_SET_NESTED_STATE = "KVM_SET_NESTED_STATE"  # GET_NESTED_STATE and the events, SET them back
# A VMM's snapshot of the vCPU (every KVM_GET_*) and its rollback to it later (the KVM_SET_*)
VCPU_SNAPSHOT = "vcpu_snapshot"
VCPU_ROLLBACK = "vcpu_rollback"
# kvm_arch_get_registers() then kvm_arch_put_registers() on the same vCPU, in one VMM's order
GET_PUT_QEMU = "get_put_qemu"
GET_PUT_QEMU_OLD = "get_put_qemu_old"
GET_PUT_REGISTERS_FIRST = "get_put_registers_first"
REGISTER_CALLS = (KVM_SET_REGS, KVM_SET_SREGS, KVM_SET_DEBUGREGS)
STATE_ORDERS = (GET_PUT_QEMU, GET_PUT_QEMU_OLD, GET_PUT_REGISTERS_FIRST)
CALLS = (KVM_NMI, KVM_SET_VCPU_EVENTS, IMMEDIATE_EXIT, *REGISTER_CALLS,
         KVM_ENABLE_CAP_EXCEPTION_PAYLOAD, *STATE_ORDERS, KVM_INTERRUPT, IRQ_WINDOW,
         KVM_SET_GUEST_DEBUG, KVM_ENABLE_CAP, KVM_SET_NESTED_STATE, VCPU_SNAPSHOT, VCPU_ROLLBACK)
VECTOR_CALLS = (KVM_INTERRUPT, IRQ_WINDOW)  # the calls that take `vector`
EVENT_FIELDS = tuple(f.name for f in fields(KvmVcpuEvents))
DEBUGREGS_FIELDS = ("dr6", "dr7", "flags")  # struct kvm_debugregs fields a crafted SET changes
# The arguments each call takes in a [[vmm]] step, by name (integers; the loader checks them).
CALL_FIELDS: dict[str, tuple[str, ...]] = {
    KVM_SET_VCPU_EVENTS: EVENT_FIELDS,
    KVM_SET_DEBUGREGS: DEBUGREGS_FIELDS,
    KVM_ENABLE_CAP_EXCEPTION_PAYLOAD: ("enable",),
    KVM_SET_GUEST_DEBUG: ("control",),  # struct kvm_guest_debug.control
    KVM_ENABLE_CAP: ("flags", "window"),  # args[0] bits 31:0 and 63:32
    KVM_SET_NESTED_STATE: ("events_first",),  # 1: the events go back before the nested state
    VCPU_SNAPSHOT: ("slot",),  # the VMM's name for the snapshot (a number)
    VCPU_ROLLBACK: ("slot", "events"),  # events = 1: KVM_SET_VCPU_EVENTS too
}


@dataclass(frozen=True, slots=True)
class Performed:
    result: int  # what the ioctl returned: 0, or a negative errno
    nmis: int  # NMIs the bare-metal counterpart receives at this boundary
    detail: str = ""
    states: tuple[Forced, ...] = ()  # the state bare metal is in at this boundary
    extints: tuple[int, ...] = ()  # vectors the 8259 presents on INTR from this boundary on
    # vectors delivered on bare metal after the event in flight, in order (a debugger's #DB/#BP)
    exceptions: tuple[int, ...] = ()
    contract: str = ""  # set: the result is not what the documented uAPI says (a finding)


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
        flying = in_flight(vcpu)
        try:
            vcpu.set_vcpu_events(KvmVcpuEvents.unpack(crafted.pack()))
        except InvalidArgument as e:
            return Performed(e.errno, 0, str(e))
        applied = as_applied(crafted)
        states = crafted_states(vcpu, as_applied(before), applied, flying)
        return Performed(0, _added_nmis(as_applied(before), applied, states is not None),
                         crafted.pack().hex(), states or ())


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
                         extints=(self.vector,) if result == 0 else ())


# -- KVM_SET_GUEST_DEBUG, KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT), KVM_SET_NESTED_STATE ----

@dataclass(frozen=True, slots=True)
class SetGuestDebug:
    """KVM_SET_GUEST_DEBUG with struct kvm_guest_debug.control = `control` (no debug registers).

    Bare-metal counterpart: KVM_GUESTDBG_INJECT_DB (INJECT_BP) is a #DB (#BP) delivered at
    this boundary, as a hardware debugger would raise it; ENABLE alone or 0 (debugging off)
    is nothing. Single-step and breakpoints are the host's and must stay invisible to the
    guest: not modelled yet (kvm/x86.py stops the run with a model limit)."""

    control: int

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        try:
            vcpu.set_guest_debug(self.control)
        except (InvalidArgument, Busy) as e:
            return Performed(e.errno, 0, str(e))
        injects = self.control & (GuestDebug.INJECT_DB | GuestDebug.INJECT_BP)
        vector = Vec.DB if self.control & GuestDebug.INJECT_DB else Vec.BP
        return Performed(0, 0, f"control={self.control:#x}",
                         exceptions=(vector,) if injects else ())


@dataclass(frozen=True, slots=True)
class EnableNotifyCap:
    """KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT) on the VM, args[0] = window << 32 | flags.

    The VMM checks the result against the documented ABI (api.rst "KVM_CAP_X86_NOTIFY_VMEXIT"
    and kvm_vm_ioctl_enable_cap(), written down here apart from kvm/vm.py): only ENABLED and
    USER are flags, ENABLED must be among them, the CPU must have Notify VM exits, and no
    vCPU may exist yet. A result that differs is a finding. Bare-metal counterpart: nothing."""

    flags: int
    window: int = 0

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        return self.perform_on_vm(vcpu.kvm)

    def perform_on_vm(self, vm: Vm) -> Performed:
        expected = _documented_notify_result(vm, self.flags)
        try:
            vm.enable_cap(Cap.X86_NOTIFY_VMEXIT, self.window << 32 | self.flags)
            result, detail = 0, f"flags={self.flags:#x} window={self.window}"
        except InvalidArgument as e:
            result, detail = e.errno, str(e)
        contract = ""
        if result != expected:
            contract = (f"KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT, flags {self.flags:#x}) returned "
                        f"{result}, the documented uAPI says {expected}")
        return Performed(result, 0, detail, contract=contract)


def _documented_notify_result(vm: Vm, flags: int) -> int:
    """What KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT) must return: the VMM's own copy of the
    rules (api.rst; kvm_vm_ioctl_enable_cap() since v5.19), from what it can see of the VM."""
    valid = flags & ~(NotifyFlag.ENABLED | NotifyFlag.USER) == 0
    ok = valid and vm.has_notify_vmexit and flags & NotifyFlag.ENABLED and not vm.created_vcpus
    return 0 if ok else InvalidArgument.errno


@dataclass(frozen=True, slots=True)
class NestedStateRoundTrip:
    """KVM_GET_NESTED_STATE and KVM_GET_VCPU_EVENTS, then KVM_SET_NESTED_STATE and
    KVM_SET_VCPU_EVENTS of what they returned, on the same vCPU. QEMU puts the nested state
    before the registers and the events (kvm_arch_put_registers(): "must be before
    kvm_put_nested_state so that EFER.SVME is set"); `events_first` puts the events back
    first. Bare-metal counterpart: nothing; a vCPU without nested state skips the call."""

    events_first: bool = False

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        nested = vcpu.ops.get_nested_state()
        events = vcpu.get_vcpu_events().pack()
        vcpu.ops.sync_guest_state_to_core()  # KVM_GET_REGS; KVM_SET_REGS puts back the same
        if nested is None:
            return Performed(0, 0, "no nested state (not in VMX operation / nested off)")
        try:
            if self.events_first:
                vcpu.set_vcpu_events(KvmVcpuEvents.unpack(events))
                vcpu.ops.set_nested_state(nested)
            else:
                vcpu.ops.set_nested_state(nested)
                vcpu.set_vcpu_events(KvmVcpuEvents.unpack(events))
        except InvalidArgument as e:
            return Performed(e.errno, 0, str(e))
        order = "events, nested state" if self.events_first else "nested state, events"
        return Performed(0, 0, f"put back {order}: {events.hex()}")




# -- a snapshot of the vCPU and a rollback to it (VCPU_SNAPSHOT, VCPU_ROLLBACK) ---------------

@dataclass(frozen=True, slots=True)
class VcpuSnapshot:
    """What the VMM keeps of a vCPU: the GET ioctls' results, KVM_GET_VCPU_EVENTS packed."""

    regs: KvmRegs
    sregs: KvmSregs
    debugregs: KvmDebugregs
    events: bytes
    nested: NestedState | None


@dataclass(frozen=True, slots=True)
class VcpuSnapshotTake:
    """KVM_GET_VCPU_EVENTS, _REGS, _SREGS, _DEBUGREGS and _NESTED_STATE, kept as snapshot
    `slot` for a rollback later (VcpuRollback): what a VMM that rolls a running VM back to
    a snapshot takes. Bare-metal counterpart: nothing happens; the CPU's state at this
    boundary is what a rollback to it restores (Forced.snapshot).

    Modelled for a vCPU with nothing to deliver and no blocking by NMI or shadow (the events
    a rollback may leave out then hold nothing but NMIs waiting, which stay where they are
    on both sides), running, outside L2 (VMX only)."""

    slot: int

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        if pic is None:
            raise ModelLimit("a snapshot needs the VMM's memory (Pic)")
        events = vcpu.get_vcpu_events()
        busy = [name for name in _SNAPSHOT_EMPTY if getattr(events, name)]
        if busy or vcpu.mp_state is not MpState.RUNNABLE:
            raise ModelLimit(f"a snapshot of a vCPU with {', '.join(busy) or vcpu.mp_state.name}: "
                             "a rollback without KVM_SET_VCPU_EVENTS or KVM_SET_MP_STATE would "
                             "not restore it, which is not modelled")
        nested = vcpu.ops.get_nested_state()
        if nested is not None and not isinstance(nested, NestedState):
            raise ModelLimit("a snapshot of nested SVM state: its rollback is not modelled")
        if nested is not None and nested.guest_mode:
            raise ModelLimit("a snapshot while L2 runs: the bare-metal counterpart of a rollback "
                             "into L2 is not modelled")
        pic.saved[self.slot] = VcpuSnapshot(vcpu.get_regs(), vcpu.get_sregs(),
                                            vcpu.get_debugregs(), events.pack(), nested)
        return Performed(0, 0, f"snapshot {self.slot}: rip {vcpu.ops.rip_read():#x}",
                         (Forced(snapshot=self.slot),))


# Fields of struct kvm_vcpu_events a snapshot must have clear (VcpuSnapshotTake).
# Not nmi.pending: NMIs waiting stay where they are unless the events are SET (VcpuRollback).
_SNAPSHOT_EMPTY = ("exception_injected", "exception_pending", "interrupt_injected",
                   "interrupt_shadow", "nmi_injected", "nmi_masked")


@dataclass(frozen=True, slots=True)
class VcpuRollback:
    """The vCPU back to snapshot `slot`, as a VMM that rolls a running VM back: the nested
    state first (outside guest mode: vmx_set_nested_state() leaves L2 with vmx_leave_nested(),
    a forced nested exit), then KVM_SET_SREGS, KVM_SET_REGS, KVM_SET_VCPU_EVENTS if `events`,
    KVM_SET_DEBUGREGS. The snapshot holds no events, so a VMM may leave KVM_SET_VCPU_EVENTS
    out; with it, the events' SET purges whatever KVM queued meanwhile (and would hide
    d953540430c5's bug, as upstream says). Neither restores guest memory or the local APIC.

    Bare-metal counterpart: the CPU continues from the snapshot's state at this boundary
    (Forced.rollback), before an event whose delivery the exit cut short (the rollback
    discards it); blocking by NMI stays as the CPU has it (L1's, if it ran L2), unless
    `events` puts the snapshot's back and drops the NMIs it holds (nmi.pending 0). A VMM
    with no such snapshot makes no call."""

    slot: int
    events: bool = False

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        snap = pic.saved.get(self.slot) if pic is not None else None
        if snap is None:
            return Performed(0, 0, f"no snapshot {self.slot} yet: nothing restored")
        _check_rollback(vcpu, snap)
        if self.events and KvmVcpuEvents.unpack(snap.events).nmi_pending:
            raise ModelLimit("a rollback that SETs a snapshot's pending NMI: the bare-metal "
                             "counterpart (NMIs arriving again) is not modelled")
        try:
            if snap.nested is not None:
                vcpu.ops.set_nested_state(snap.nested)
            vcpu.set_sregs(snap.sregs)
            vcpu.set_regs(snap.regs)
            if self.events:
                vcpu.set_vcpu_events(KvmVcpuEvents.unpack(snap.events))
            vcpu.set_debugregs(snap.debugregs)
        except InvalidArgument as e:
            raise ModelLimit(f"a rollback refused half-way ({e}): what it changed before has no "
                             "bare-metal counterpart") from e
        if not self.events and vcpu.ops.get_interrupt_shadow():
            raise ModelLimit("a rollback without KVM_SET_VCPU_EVENTS leaves KVM's interrupt "
                             "shadow, which the snapshot did not have: userspace's own doing")
        sets = "nested state, sregs, regs" + (", events" if self.events else "") + ", debugregs"
        return Performed(0, 0, f"snapshot {self.slot}: set {sets}",
                         (Forced(rollback=self.slot, rollback_events=self.events),))


def _check_rollback(vcpu: Vcpu, snap: VcpuSnapshot) -> None:
    """The rollbacks the oracle has a counterpart for (VcpuRollback)."""
    if vcpu.mp_state is not MpState.RUNNABLE:
        raise ModelLimit(f"a rollback of a vCPU in {vcpu.mp_state.name}: KVM_SET_MP_STATE is "
                         "not modelled")
    if vcpu.nmi_injected or vcpu.interrupt.injected:
        raise ModelLimit("a rollback while an NMI or interrupt is in delivery: the bare-metal "
                         "counterpart of discarding it is not modelled")
    nested = getattr(vcpu.ops, "nested", None)
    if in_flight(vcpu) and nested is not None and nested.guest_mode and (
            nested.vmcs12.entry_intr_info & INTR_INFO_VALID):
        raise ModelLimit("a rollback while L1's VM-entry injection may be in delivery: on bare "
                         "metal no boundary comes before it")
    current = vcpu.ops.get_nested_state()
    if (snap.nested is None) != (current is None):
        raise ModelLimit("a rollback into or out of VMX operation (KVM_SET_NESTED_STATE with "
                         "vmxon_pa -1) is not modelled")


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
        return Performed(0, 0, "", extints=(self.vector,))


@dataclass(slots=True)
class Pic:
    """The VMM's 8259, for a userspace or split irqchip: the vectors it has raised on INTR and
    not yet handed to KVM, oldest first (no priorities, masks or EOI)."""

    pending: list[int] = field(default_factory=list)
    saved: dict[int, VcpuSnapshot] = field(default_factory=dict)  # the VMM's vCPU snapshots

    def pre_run(self, vcpu: Vcpu) -> Performed | None:
        """Before each KVM_RUN, as QEMU's kvm_arch_pre_run(): KVM_INTERRUPT if the last exit
        said ready_for_interrupt_injection with IF=1; then request_interrupt_window while a
        vector still waits (api.rst, "request_interrupt_window"). The KVM_INTERRUPT made, if any."""
        done = None
        run = vcpu.kvm_run
        if self.pending and run.ready_for_interrupt_injection and run.if_flag:
            # QEMU acknowledged the vector from its 8259 already: a refused KVM_INTERRUPT
            # loses it ("KVM: injection failed, interrupt lost"), it is never retried.
            vector = self.pending.pop(0)
            result = vcpu.kvm_interrupt(vector)
            lost = "" if result == 0 else ", refused: the interrupt is lost, as in QEMU"
            done = Performed(result, 0, f"vector {vector:#x}: the guest is ready for it{lost}")
        run.request_interrupt_window = bool(self.pending)
        return done


_ERRNO = {EINVAL: "vector >= KVM_NR_INTERRUPTS", ENXIO: "the 8259 is in the kernel (full irqchip)",
          EEXIST: "the split irqchip holds a vector already"}


def _added_nmis(before: KvmVcpuEvents, crafted: KvmVcpuEvents, covered: bool) -> int:
    """The bare-metal counterpart of an accepted crafted state: NMIs arriving, or a limit for
    a change that neither they nor crafted_states() (`covered`) stand for."""
    changed = [f for f in EVENT_FIELDS if getattr(before, f) != getattr(crafted, f)]
    dropped_flags = before.flags & ~crafted.flags
    for name in changed:
        if name == "flags" and not (dropped_flags & VcpuEventsFlag.VALID_PAYLOAD
                                    or crafted.flags & ~before.flags):
            continue  # leaving NMI_PENDING/SHADOW/SMM/TRIPLE_FAULT out keeps KVM's own
        if (name == "nmi_pending" and crafted.flags & VcpuEventsFlag.VALID_NMI_PENDING
                and crafted.nmi_pending > before.nmi_pending):
            continue
        if name in _STATE_FIELDS and covered:
            continue
        if name in _IGNORED_FIELDS:
            continue
        raise ModelLimit(f"KVM_SET_VCPU_EVENTS with {name} = {getattr(crafted, name):#x} (was "
                         f"{getattr(before, name):#x}) was accepted, but the model has no "
                         "bare-metal counterpart for that change")
    if crafted.flags & VcpuEventsFlag.VALID_NMI_PENDING:
        return max(0, crafted.nmi_pending - before.nmi_pending)
    return 0


# Fields crafted_states() turns into a state, and fields with no effect once applied
# (as_applied() cleared them, or KVM keeps nothing of them: sipi_vector needs an INIT).
_STATE_FIELDS = frozenset({
    "exception_injected", "exception_pending", "exception_nr", "exception_has_error_code",
    "exception_error_code", "exception_has_payload", "exception_payload", "interrupt_injected",
    "interrupt_nr", "interrupt_soft", "interrupt_shadow", "nmi_injected", "nmi_masked",
    "triple_fault_pending"})
_IGNORED_FIELDS = frozenset({"sipi_vector", "nmi_pad", "smi_latched_init"})


def as_applied(ev: KvmVcpuEvents) -> KvmVcpuEvents:
    """The state KVM keeps of an accepted struct, by the ABI (api.rst KVM_SET_VCPU_EVENTS;
    kvm_vcpu_ioctl_x86_set_vcpu_events()): without KVM_VCPUEVENT_VALID_PAYLOAD no exception
    is pending and none has a payload; with it, a pending exception is not injected and
    only a pending one keeps its payload; the shadow needs VALID_SHADOW."""
    out = replace(ev)
    if ev.flags & VcpuEventsFlag.VALID_PAYLOAD:
        if ev.exception_pending:
            out.exception_injected = 0
        else:
            out.exception_has_payload = out.exception_payload = 0
    else:
        out.exception_pending = 0
        out.exception_has_payload = out.exception_payload = 0
    if not ev.flags & VcpuEventsFlag.VALID_SHADOW:
        out.interrupt_shadow = 0
    if not (out.exception_injected or out.exception_pending):
        out.exception_nr = out.exception_has_error_code = out.exception_error_code = 0
    if not out.interrupt_injected:
        out.interrupt_nr = out.interrupt_soft = 0
    return out


def crafted_states(vcpu: Vcpu, before: KvmVcpuEvents, after: KvmVcpuEvents,
                   flying: bool) -> tuple[Forced, ...] | None:
    """What an accepted crafted event state stands for on bare metal, at the boundary where
    the guest stands: "a crafted legal state must be delivered as the state says" (issue 19).

    - nmi.masked: NMIs blocked as inside an NMI handler, until the next IRET (SDM 6.7.1), or
      unblocked as after it;
    - interrupt.shadow: this boundary in an STI shadow (KVM_X86_SHADOW_INT_STI) or a MOV SS
      shadow (MOV_SS only), SDM 6.8.3;
    - an exception pending or injected: delivered here with its error code, a pending fault
      with RF set as KVM sets it at injection (kvm_check_and_inject_events()), a pending #PF's
      payload in CR2 first (kvm_deliver_exception_payload());
    - nmi.injected: an NMI delivered here; interrupt.injected (hard): its vector delivered
      as an external interrupt from outside the local APIC (an 8259 in ExtINT mode: no ISR);
    - interrupt.injected (soft) where the guest stands at that very INT n: nothing, the CPU
      runs it;
    - triple_fault.pending set: a shutdown here (in L2, L1's VM exit if it asks for one);
    - in L2, a pending exception is raised where L2 stands, so L1's intercepts see it (KVM
      morphs it into L1's VM exit, exception_from_userspace); an injected one is past them.
    None: no such change. Anything else is a ModelLimit naming what the oracle lacks.
    """
    state = Forced()
    if after.triple_fault_pending and not before.triple_fault_pending:
        return (Forced(shutdown=True),)
    if before.triple_fault_pending and not after.triple_fault_pending:
        raise ModelLimit("KVM_SET_VCPU_EVENTS cleared a pending triple fault: bare metal has no "
                         "counterpart for a shutdown called off")
    if_set = bool(vcpu.ops.get_rflags() & IF)
    if after.interrupt_shadow & ShadowBits.STI and not before.interrupt_shadow and not if_set:
        raise ModelLimit("a crafted STI shadow with RFLAGS.IF=0: no state bare metal can be in "
                         "(only an STI that sets IF opens one, SDM Vol.2 STI)")
    if after.nmi_masked != before.nmi_masked:
        state = replace(state, nmi_blocked=bool(after.nmi_masked))
    if after.interrupt_shadow != before.interrupt_shadow:
        state = replace(state, shadow=_shadow_of(after.interrupt_shadow))
    event, cr2, soft = _crafted_event(vcpu, before, after)
    if event is not None and state.shadow not in (None, Shadow.NONE):
        raise ModelLimit("KVM_SET_VCPU_EVENTS with an event to inject and an interrupt shadow: "
                         "VM entry's checks on that pair (SDM 26.3.1.5) are not modelled")
    if event is not None and vcpu.mp_state is MpState.HALTED:
        raise ModelLimit("a crafted event for a halted vCPU: KVM wakes it for a pending exception "
                         "only (kvm_vcpu_has_events()), and a VMM says which with "
                         "KVM_SET_MP_STATE, which is not modelled")
    state = replace(state, event=event, cr2=cr2, raised=bool(after.exception_pending))
    if state == Forced() or state == Forced(raised=True):
        return () if soft else None
    if flying:
        raise ModelLimit("KVM_SET_VCPU_EVENTS crafted a new event state while an event was in "
                         "flight (its delivery cut short): the model has no bare-metal "
                         "counterpart for replacing it")
    return (state,)


def _shadow_of(bits: int) -> Shadow:
    if bits & ShadowBits.STI:
        return Shadow.STI
    return Shadow.MOV_SS if bits & ShadowBits.MOV_SS else Shadow.NONE


def _crafted_event(vcpu: Vcpu, before: KvmVcpuEvents,
                   after: KvmVcpuEvents) -> tuple[Event | None, int | None, bool]:
    """The event a crafted state injects, as bare metal delivers it, CR2 before it, and
    whether it was a soft interrupt the guest's own INT n stands for."""
    exception = _exception_of(after)
    irq = (after.interrupt_injected, after.interrupt_nr, after.interrupt_soft)
    fresh = (exception is not None and exception != _exception_of(before),
             bool(after.nmi_injected and not before.nmi_injected),
             bool(after.interrupt_injected) and irq != (
                 before.interrupt_injected, before.interrupt_nr, before.interrupt_soft))
    if not any(fresh):
        return None, None, False
    if (exception is not None) + after.nmi_injected + after.interrupt_injected > 1:
        raise ModelLimit("KVM_SET_VCPU_EVENTS with more than one of an exception, an NMI and an "
                         "interrupt to inject: KVM injects one per entry and the oracle has no "
                         "counterpart for the others")
    new = fresh
    if new[0]:
        return *_exception_event(after), False
    if new[1]:
        return Event(Vec.NMI, EventType.NMI, 0), None, False
    if new[2]:
        if after.interrupt_soft:
            _check_at_int_n(vcpu, after.interrupt_nr)
            return None, None, True
        if not vcpu.ops.get_rflags() & IF or after.interrupt_shadow:
            raise ModelLimit("a crafted external interrupt with RFLAGS.IF=0 or in a shadow: bare "
                             "metal never takes one there (SDM 6.8.1, 6.8.3)")
        return Event(after.interrupt_nr, EventType.EXT_INT, 0), None, False
    return None, None, False


def _exception_of(ev: KvmVcpuEvents) -> tuple | None:
    if not (ev.exception_injected or ev.exception_pending):
        return None
    return (ev.exception_pending, ev.exception_nr, ev.exception_has_error_code,
            ev.exception_error_code, ev.exception_has_payload, ev.exception_payload)


def _exception_event(ev: KvmVcpuEvents) -> tuple[Event, int | None]:
    vector = ev.exception_nr
    info = VECTORS[vector]
    if vector in (Vec.BP, Vec.OF):
        raise ModelLimit(f"a crafted {info.name}: KVM injects it as a software exception with an "
                         "instruction length the uAPI does not carry (kvm_exception_is_soft())")
    if vector == Vec.DB:
        raise ModelLimit("a crafted #DB: KVM's DR6/DR7 updates at its injection (payload, "
                         "DR7.GD) have no bare-metal counterpart in the model")
    if bool(ev.exception_has_error_code) != info.error_code:
        raise ModelLimit(f"a crafted {info.name} {'with' if ev.exception_has_error_code else 'without'}"
                         " an error code: bare metal never delivers it so (SDM 6.3.1 Table 6-1)")
    cr2 = ev.exception_payload if (vector == Vec.PF and ev.exception_pending
                                   and ev.exception_has_payload) else None
    fault = exception_type(vector) is ExceptionType.FAULT
    return Event(vector, EventType.HW_EXCEPTION, 0,
                 error_code=ev.exception_error_code if info.error_code else None,
                 push_rf=bool(ev.exception_pending) and fault), cr2


def _check_at_int_n(vcpu: Vcpu, vector: int) -> None:
    """A soft interrupt KVM injects returns past the instruction at RIP (SVM decodes it, VMX
    uses the last exit's length): bare metal does the same only if that is INT n itself."""
    cpu = vcpu.cpu
    at = cpu.linear(vcpu.ops.rip_read())
    if bytes(cpu.mem[at:at + 2]) != bytes((0xCD, vector)):
        raise ModelLimit(f"a crafted soft interrupt {vector:#x} where the guest is not at an "
                         f"INT {vector:#x}: the uAPI carries no instruction length, so bare metal "
                         "has no counterpart")


@dataclass(frozen=True, slots=True)
class EnableExceptionPayload:
    """KVM_ENABLE_CAP(KVM_CAP_EXCEPTION_PAYLOAD) with args[0] = `enable`: whether GET reports
    pending exceptions and their payload (and the payload is not delivered early for
    userspace, kvm_handle_exception_payload_quirk()). Nothing the guest can see."""

    enable: bool

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        return Performed(vcpu.enable_exception_payload(self.enable), 0,
                         f"exception_payload_enabled={int(self.enable)}")


def _get(vcpu: Vcpu, which: str):
    """KVM_GET_REGS / KVM_GET_SREGS / KVM_GET_DEBUGREGS / KVM_GET_VCPU_EVENTS."""
    return {"regs": vcpu.get_regs, "sregs": vcpu.get_sregs, "debugregs": vcpu.get_debugregs,
            "events": vcpu.get_vcpu_events}[which]()


def _set(vcpu: Vcpu, which: str, value) -> None:
    if which == "events":
        vcpu.set_vcpu_events(KvmVcpuEvents.unpack(value.pack()))
        return
    {"regs": vcpu.set_regs, "sregs": vcpu.set_sregs, "debugregs": vcpu.set_debugregs}[which](value)


@dataclass(frozen=True, slots=True)
class RegistersRoundTrip:
    """KVM_GET_REGS/SREGS/DEBUGREGS, then the SET of it with `changes` made (debug registers
    only: a crafted SET the validation refuses). A round trip stands for nothing on bare metal;
    a crafted value KVM accepts has no counterpart in the model (a limit)."""

    call: str
    changes: tuple[tuple[str, int], ...] = ()

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        which = {KVM_SET_REGS: "regs", KVM_SET_SREGS: "sregs", KVM_SET_DEBUGREGS: "debugregs"}[
            self.call]
        try:
            value = _get(vcpu, which)
            crafted = replace(value, **dict(self.changes))
            _set(vcpu, which, crafted)
        except InvalidArgument as e:
            return Performed(e.errno, 0, str(e))
        if crafted != value:
            raise ModelLimit(f"{self.call} with {dict(self.changes)} was accepted, but the model "
                             "has no bare-metal counterpart for register writes from outside")
        return Performed(0, 0)


# The order of the ioctls in a VMM's save (get) and restore (put) of a vCPU; the parts the
# model has (no FPU, XSAVE, MSRs, MP state, LAPIC).
ORDERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # QEMU 9.2 target/i386/kvm/kvm.c: kvm_arch_get_registers() reads the events first (then
    # MP state, regs, xsave, xcrs, sregs, MSRs, LAPIC, debugregs, nested state);
    # kvm_arch_put_registers(): sregs (before the nested state), regs, xsave, xcrs, MSRs,
    # events, MP state, debugregs.
    GET_PUT_QEMU: (("events", "regs", "sregs", "debugregs"),
                   ("sregs", "regs", "events", "debugregs")),
    # Older QEMU: registers, then the events, then debugregs, both ways (put as in QEMU 2.x
    # kvm_arch_put_registers(); the get order is UNVERIFIED, taken to mirror it).
    GET_PUT_QEMU_OLD: (("regs", "sregs", "events", "debugregs"),
                       ("regs", "sregs", "events", "debugregs")),
    # A VMM that saves every register before the events ("registers before events": the
    # order the payload quirk fix names, KVM_GET_SREGS / KVM_GET_DEBUGREGS first).
    GET_PUT_REGISTERS_FIRST: (("regs", "sregs", "debugregs", "events"),
                              ("regs", "sregs", "debugregs", "events")),
}


@dataclass(frozen=True, slots=True)
class StateRoundTrip:
    """A VMM's save then restore of the vCPU's state on the same vCPU, in `order` (ORDERS):
    every GET, then every SET of what it read. It must change nothing the guest can see; the
    first failing ioctl ends it, as QEMU stops there."""

    order: str

    def perform(self, vcpu: Vcpu, pic: Pic | None = None) -> Performed:
        gets, puts = ORDERS[self.order]
        try:
            saved = {which: _get(vcpu, which) for which in gets}
            for which in puts:
                _set(vcpu, which, saved[which])
        except InvalidArgument as e:
            return Performed(e.errno, 0, str(e))
        return Performed(0, 0, "get " + ", ".join(gets) + "; put " + ", ".join(puts))


VmmAction = (KvmNmi | SetVcpuEvents | ImmediateExit | EnableExceptionPayload | RegistersRoundTrip
             | StateRoundTrip | KvmInterrupt | InterruptWindow | SetGuestDebug | EnableNotifyCap
             | NestedStateRoundTrip | VcpuSnapshotTake | VcpuRollback)


def action(call: str, args: tuple[tuple[str, int], ...] = ()) -> VmmAction:
    """The action a [[vmm]] step or an explored choice names (validated by the loader)."""
    if call == KVM_NMI:
        return KvmNmi()
    if call == IMMEDIATE_EXIT:
        return ImmediateExit()
    if call in REGISTER_CALLS:
        return RegistersRoundTrip(call, args)
    if call == KVM_ENABLE_CAP_EXCEPTION_PAYLOAD:
        return EnableExceptionPayload(bool(dict(args).get("enable", 1)))
    if call in STATE_ORDERS:
        return StateRoundTrip(call)
    if call == KVM_INTERRUPT:
        return KvmInterrupt(dict(args)["vector"])
    if call == IRQ_WINDOW:
        return InterruptWindow(dict(args)["vector"])
    named = dict(args)
    if call == KVM_SET_GUEST_DEBUG:
        return SetGuestDebug(named.get("control", 0))
    if call == KVM_ENABLE_CAP:
        return EnableNotifyCap(named.get("flags", 0), named.get("window", 0))
    if call == KVM_SET_NESTED_STATE:
        return NestedStateRoundTrip(bool(named.get("events_first", 0)))
    if call == VCPU_SNAPSHOT:
        return VcpuSnapshotTake(named.get("slot", 0))
    if call == VCPU_ROLLBACK:
        return VcpuRollback(named.get("slot", 0), bool(named.get("events", 0)))
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
    # Register round trips alone and in a VMM's order with the events; the payload cap.
    "payload_cap_off": (KVM_ENABLE_CAP_EXCEPTION_PAYLOAD, (("enable", 0),)),
    "regs_same_vcpu": (KVM_SET_REGS, ()),
    "sregs_same_vcpu": (KVM_SET_SREGS, ()),
    "debugregs_same_vcpu": (KVM_SET_DEBUGREGS, ()),
    "get_put_qemu": (GET_PUT_QEMU, ()),
    "get_put_qemu_old": (GET_PUT_QEMU_OLD, ()),
    "get_put_registers_first": (GET_PUT_REGISTERS_FIRST, ()),
    "reject_debugregs_flags": (KVM_SET_DEBUGREGS, (("flags", 1),)),
    "reject_dr7_high": (KVM_SET_DEBUGREGS, (("dr7", 1 << 32 | 0x400),)),
    "reject_smm": (KVM_SET_VCPU_EVENTS, (("smi_smm", 1),)),
    # Crafted legal event states, each delivered as it says (crafted_states()).
    "nmi_masked": (KVM_SET_VCPU_EVENTS, (("nmi_masked", 1),)),
    "sti_shadow": (KVM_SET_VCPU_EVENTS, (("interrupt_shadow", int(ShadowBits.STI)),)),
    "inject_ud": (KVM_SET_VCPU_EVENTS, (("exception_injected", 1), ("exception_nr", Vec.UD))),
    "pending_gp": (KVM_SET_VCPU_EVENTS, (("exception_pending", 1), ("exception_nr", Vec.GP),
                                         ("exception_has_error_code", 1),
                                         ("exception_error_code", 0))),
    "inject_irq_0x30": (KVM_SET_VCPU_EVENTS, (("interrupt_injected", 1), ("interrupt_nr", 0x30))),
    # A userspace or split irqchip's interrupt: by the protocol, and with no regard for it.
    "irq_window": (IRQ_WINDOW, (("vector", 0x30),)),
    "kvm_interrupt": (KVM_INTERRUPT, (("vector", 0x30),)),
    "reject_vector_256": (KVM_INTERRUPT, (("vector", 0x100),)),  # -EINVAL
    # KVM_SET_GUEST_DEBUG: a #DB from the debugger; an unknown control bit (-EINVAL)
    "inject_db": (KVM_SET_GUEST_DEBUG, (("control", int(GuestDebug.INJECT_DB)),)),
    "reject_guest_debug": (KVM_SET_GUEST_DEBUG, (("control", 1 << 3),)),
    # KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT) once the vCPU exists: -EINVAL
    "notify_cap_late": (KVM_ENABLE_CAP, (("flags", int(NotifyFlag.ENABLED)),)),
    # KVM_GET/SET_NESTED_STATE with the events on the same vCPU, in QEMU's order and reversed
    "nested_same_vcpu": (KVM_SET_NESTED_STATE, ()),
    "nested_events_first": (KVM_SET_NESTED_STATE, (("events_first", 1),)),
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
