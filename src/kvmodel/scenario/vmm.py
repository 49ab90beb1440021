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
- a rejected call: nothing.

A crafted state that changes anything else (NMI masking, an exception or
interrupt to inject, a shadow) has no bare-metal counterpart in the model
yet: performing one stops the run with a model limit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

from kvmodel.arch.events import Vec
from kvmodel.errors import ModelLimit
from kvmodel.kvm.uapi import Busy, GuestDebug, InvalidArgument, KvmVcpuEvents, VcpuEventsFlag
from kvmodel.kvm.vm import Cap, NotifyFlag, Vm
from kvmodel.kvm.x86 import Vcpu

KVM_NMI = "KVM_NMI"
KVM_SET_VCPU_EVENTS = "KVM_SET_VCPU_EVENTS"
IMMEDIATE_EXIT = "immediate_exit"
KVM_SET_GUEST_DEBUG = "KVM_SET_GUEST_DEBUG"
KVM_ENABLE_CAP = "KVM_ENABLE_CAP"  # KVM_CAP_X86_NOTIFY_VMEXIT; exit = 0: before KVM_CREATE_VCPU
KVM_SET_NESTED_STATE = "KVM_SET_NESTED_STATE"  # GET_NESTED_STATE and the events, SET them back
CALLS = (KVM_NMI, KVM_SET_VCPU_EVENTS, IMMEDIATE_EXIT, KVM_SET_GUEST_DEBUG, KVM_ENABLE_CAP,
         KVM_SET_NESTED_STATE)
# The arguments each call of those takes in a [[vmm]] step (KVM_SET_VCPU_EVENTS: EVENT_FIELDS)
GUEST_DEBUG_ARGS = ("control",)  # struct kvm_guest_debug.control
ENABLE_CAP_ARGS = ("flags", "window")  # args[0] bits 31:0 and 63:32
NESTED_STATE_ARGS = ("events_first",)  # 1: the events are put back before the nested state
EVENT_FIELDS = tuple(f.name for f in fields(KvmVcpuEvents))


@dataclass(frozen=True, slots=True)
class Performed:
    result: int  # what the ioctl returned: 0, or a negative errno
    nmis: int  # NMIs the bare-metal counterpart receives at this boundary
    detail: str = ""
    exceptions: tuple[int, ...] = ()  # vectors delivered there on bare metal, in order
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

    def perform(self, vcpu: Vcpu) -> Performed:
        vcpu.inject_nmi()
        return Performed(0, 1)


@dataclass(frozen=True, slots=True)
class SetVcpuEvents:
    """KVM_GET_VCPU_EVENTS, then KVM_SET_VCPU_EVENTS of it with `changes` made, same vCPU.

    No changes: the round trip QEMU makes at reset and loadvm (kvm_arch_put_registers()
    after kvm_arch_get_registers()), which must change nothing the guest can see.
    """

    changes: tuple[tuple[str, int], ...] = ()

    def perform(self, vcpu: Vcpu) -> Performed:
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

    def perform(self, vcpu: Vcpu) -> Performed:
        return Performed(vcpu.run_immediate_exit(), 0)


# -- KVM_SET_GUEST_DEBUG, KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT), KVM_SET_NESTED_STATE ----

@dataclass(frozen=True, slots=True)
class SetGuestDebug:
    """KVM_SET_GUEST_DEBUG with struct kvm_guest_debug.control = `control` (no debug registers).

    Bare-metal counterpart: KVM_GUESTDBG_INJECT_DB (INJECT_BP) is a #DB (#BP) delivered at
    this boundary, as a hardware debugger would raise it; ENABLE alone or 0 (debugging off)
    is nothing. Single-step and breakpoints are the host's and must stay invisible to the
    guest: not modelled yet (kvm/x86.py stops the run with a model limit)."""

    control: int

    def perform(self, vcpu: Vcpu) -> Performed:
        try:
            vcpu.set_guest_debug(self.control)
        except (InvalidArgument, Busy) as e:
            return Performed(e.errno, 0, str(e))
        injects = self.control & (GuestDebug.INJECT_DB | GuestDebug.INJECT_BP)
        vector = Vec.DB if self.control & GuestDebug.INJECT_DB else Vec.BP
        return Performed(0, 0, f"control={self.control:#x}", (vector,) if injects else ())


@dataclass(frozen=True, slots=True)
class EnableNotifyCap:
    """KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT) on the VM, args[0] = window << 32 | flags.

    The VMM checks the result against the documented ABI (api.rst "KVM_CAP_X86_NOTIFY_VMEXIT"
    and kvm_vm_ioctl_enable_cap(), written down here apart from kvm/vm.py): only ENABLED and
    USER are flags, ENABLED must be among them, the CPU must have Notify VM exits, and no
    vCPU may exist yet. A result that differs is a finding. Bare-metal counterpart: nothing."""

    flags: int
    window: int = 0

    def perform(self, vcpu: Vcpu) -> Performed:
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

    def perform(self, vcpu: Vcpu) -> Performed:
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


VmmAction = (KvmNmi | SetVcpuEvents | ImmediateExit | SetGuestDebug | EnableNotifyCap
             | NestedStateRoundTrip)


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
    named = dict(args)
    if call == KVM_SET_GUEST_DEBUG:
        return SetGuestDebug(named.get("control", 0))
    if call == KVM_ENABLE_CAP:
        return EnableNotifyCap(named.get("flags", 0), named.get("window", 0))
    if call == KVM_SET_NESTED_STATE:
        return NestedStateRoundTrip(bool(named.get("events_first", 0)))
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


def in_flight(vcpu: Vcpu) -> bool:
    """An event KVM will deliver before anything that arrives now: one whose delivery an exit
    cut short, or an exception an emulated instruction raised (kvm_event_needs_reinjection(),
    exception.pending). Its delivery is part of the boundary the VMM acted at."""
    return vcpu.event_needs_reinjection() or vcpu.exception.pending
