"""The vendor-neutral half of KVM's event handling (arch/x86/kvm/x86.c).

One `Vcpu` holds what `struct kvm_vcpu_arch` holds for events: the queued
exception (pending vs injected, with payload), the queued interrupt, NMIs
queued / pending / injected, requests, the in-kernel local APIC, stats.
Vendor code (svm/svm.py, vmx/vmx.py) implements `VendorOps`, the
`kvm_x86_ops` subset events need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import ClassVar, Protocol

from kvmodel import _faults
from kvmodel.arch.cpu import Cpu, External
from kvmodel.arch.decode import Decoded, Exiting, decode
from kvmodel.arch.events import EventType, Vec, has_error_code
from kvmodel.arch.faults import Fault
from kvmodel.arch.observe import NO_VECTOR, Halt, Retire, Shutdown
from kvmodel.arch.regs import CR0_PE, DR6_BS, DR7_GD, IF, RF, RSP, TF, cpl_of
from kvmodel.errors import KvmodelError, ModelLimit
from kvmodel.kvm import lapic
from kvmodel.kvm.uapi import (
    EEXIST,
    EINTR,
    EINVAL,
    ENXIO,
    GUESTDBG_VALID_MASK,
    KVM_NR_INTERRUPTS,
    Busy,
    GuestDebug,
    InvalidArgument,
    KvmDebugregs,
    KvmExit,
    KvmRegs,
    KvmRun,
    KvmSregs,
    KvmVcpuEvents,
    ShadowBits,
    VcpuEventsFlag,
)
from kvmodel.kvm.vm import IrqChip, Vm

DR_TRAP_BITS = 0xF
DR6_ACTIVE_LOW = 0xFFFF0FF0
DR6_RTM = 1 << 16
EBUSY = -16  # *_allowed(): "cannot decide yet, exit at once and retry"


class HostBug(KvmodelError):
    """KVM reached a BUG_ON(): the host kernel oopses, and the vCPU's run ends there."""


class Request(IntEnum):
    """Bits of vcpu->requests. An IntEnum, whose | & ~ are int's own: IntFlag's operators
    cost a microsecond each, and vcpu_enter_guest() tests these on every entry."""

    EVENT = 1  # KVM_REQ_EVENT: re-run kvm_check_and_inject_events()
    NMI = 2  # KVM_REQ_NMI: run process_nmi()
    TRIPLE_FAULT = 4


class MpState(IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1  # an AP that has had no INIT yet (kvm/lapic.py)
    INIT_RECEIVED = 2  # waiting for a SIPI
    HALTED = 3  # KVM_MP_STATE_HALTED


class ExceptionType(IntEnum):
    """exception_type(): decides RF at injection."""

    FAULT = 0
    TRAP = 1
    ABORT = 2
    DB = 4


def exception_type(vector: int) -> ExceptionType:
    """exception_type() in x86.c."""
    if vector == Vec.DB:
        return ExceptionType.DB
    if vector in (Vec.BP, Vec.OF):
        return ExceptionType.TRAP
    if vector in (Vec.DF, Vec.MC):
        return ExceptionType.ABORT
    return ExceptionType.FAULT


class ExceptionClass(IntEnum):
    BENIGN = 0
    CONTRIBUTORY = 1
    PF = 2


def exception_class(vector: int) -> ExceptionClass:
    """exception_class() in x86.c: the #DF rule as KVM applies it to queued exceptions."""
    if vector == Vec.PF:
        return ExceptionClass.PF
    if vector in (Vec.DE, Vec.TS, Vec.NP, Vec.SS, Vec.GP):
        return ExceptionClass.CONTRIBUTORY
    return ExceptionClass.BENIGN


def exception_is_soft(vector: int) -> bool:
    """kvm_exception_is_soft(): #BP and #OF come from INT3 and INTO."""
    return vector in (Vec.BP, Vec.OF)


@dataclass(slots=True)
class QueuedException:
    """struct kvm_queued_exception."""

    pending: bool = False
    injected: bool = False
    vector: int = 0
    has_error_code: bool = False
    error_code: int = 0
    has_payload: bool = False
    payload: int = 0
    event_data: int = 0  # FRED: the data an interrupted delivery carried (re-injected as is)
    nested: bool = False  # FRED: it arose during the delivery of another event


@dataclass(slots=True)
class QueuedInterrupt:
    """struct kvm_queued_interrupt."""

    injected: bool = False
    soft: bool = False
    nr: int = 0


@dataclass(slots=True)
class Stats:
    """The struct kvm_vcpu_stat counters events touch."""

    nmi_injections: int = 0
    irq_injections: int = 0
    nmi_window_exits: int = 0
    irq_window_exits: int = 0
    irq_exits: int = 0
    halt_exits: int = 0
    req_event: int = 0
    notify_window_exits: int = 0
    request_irq_exits: int = 0  # KVM_EXIT_IRQ_WINDOW_OPEN
    pf_fixed: int = 0  # shadow paging: a #PF exit fixed by mapping the page (kvm/mmu.py)
    pf_guest: int = 0  # shadow paging: a #PF exit that was the guest's, injected
    invlpg: int = 0  # shadow paging: an INVLPG exit
    exits: int = 0


@dataclass(frozen=True, slots=True)
class UserspaceExit:
    """KVM_RUN returned to userspace with this exit_reason."""

    reason: KvmExit
    detail: str = ""
    flags: int = 0  # kvm_run->notify.flags for KVM_EXIT_NOTIFY


BUDGET = UserspaceExit(KvmExit.INTR, "the step budget ran out")  # the model's, not KVM's


@dataclass(frozen=True, slots=True)
class InjectRecord:
    """What KVM programmed into the VMCS/VMCB for the next entry (trace only)."""

    kind: ClassVar[str] = "inject"
    what: str
    vector: int
    reinjected: bool
    retired: int


@dataclass(frozen=True, slots=True)
class NestedExitRecord:
    """L0 synthesized a VM exit for L1 and filled `control` (vmcs12/vmcb12); trace only."""

    kind: ClassVar[str] = "nested_vmexit"
    reason: str
    rip: int
    retired: int
    control: str


class VendorOps(Protocol):
    """The kvm_x86_ops subset used here, plus the vendor run loop."""

    def run(self, max_steps: int, immediate_exit: bool) -> UserspaceExit | None: ...
    def handle_exit(self) -> UserspaceExit | None: ...
    def inject_irq(self, reinjected: bool) -> None: ...
    def inject_nmi(self) -> str: ...
    def inject_exception(self) -> None: ...
    def cancel_injection(self) -> None: ...
    def nmi_allowed(self, for_injection: bool) -> int: ...
    def interrupt_allowed(self, for_injection: bool) -> int: ...
    def get_nmi_mask(self) -> bool: ...
    def set_nmi_mask(self, masked: bool) -> None: ...
    def get_interrupt_shadow(self) -> int: ...
    def set_interrupt_shadow(self, shadow: int) -> None: ...
    def enable_nmi_window(self) -> None: ...
    def enable_irq_window(self) -> None: ...
    def is_vnmi_pending(self) -> bool: ...
    def set_vnmi_pending(self) -> bool: ...
    def get_rflags(self) -> int: ...
    def set_rflags(self, rflags: int) -> None: ...
    def rsp_write(self, rsp: int) -> None: ...
    def rip_read(self) -> int: ...
    def rip_write(self, rip: int) -> None: ...
    def skip_emulated_instruction(self) -> bool: ...
    def kick(self) -> None: ...
    def sync_guest_state_to_core(self) -> None: ...
    def check_nested_events(self) -> int: ...
    def has_nested_events(self) -> bool: ...
    def apic_init_signal_blocked(self) -> bool: ...
    def is_exception_vmexit(self, vector: int, error_code: int | None) -> bool: ...
    def nested_triple_fault(self) -> None: ...
    @property
    def guest_state_protected(self) -> bool: ...
    @property
    def guest_mode(self) -> bool: ...  # is_guest_mode(): L1's L2 is what runs
    def get_nested_state(self) -> object | None: ...


@dataclass(slots=True)
class Vcpu:
    """struct kvm_vcpu_arch, the event part, with the guest's arch core and local APIC."""

    cpu: Cpu
    kvm: Vm = field(default_factory=Vm)
    ops: VendorOps = None  # set by the vendor constructor
    exception: QueuedException = field(default_factory=QueuedException)
    exception_vmexit: QueuedException = field(default_factory=QueuedException)  # one for L1
    exception_from_userspace: bool = False  # KVM_SET_VCPU_EVENTS stuffed a pending exception
    interrupt: QueuedInterrupt = field(default_factory=QueuedInterrupt)
    nmi_queued: int = 0
    nmi_pending: int = 0
    nmi_injected: bool = False
    event_exit_inst_len: int = 0
    requests: int = Request.EVENT
    mp_state: MpState = MpState.RUNNABLE
    in_guest_mode: bool = False
    exit_request: bool = False  # kicked while KVM prepared the entry: kvm_vcpu_exit_request()
    stats: Stats = field(default_factory=Stats)
    exception_payload_enabled: bool = True  # KVM_CAP_EXCEPTION_PAYLOAD
    stop_at_exit: int = 0  # userspace wants control after this many exits (0: never)
    # KVM_RUN's budget while it runs: cpu.work when it began, steps allowed, exits left
    run_start: int = 0
    run_budget: int = 0
    exits_left: int = 0
    warnings: list[str] = field(default_factory=list)  # KVM WARN_ON()s reached
    host_problems: list[str] = field(default_factory=list)  # the host's own event handling
    triple_fault_cause: tuple[int, int] = (0, 0)  # (first, second) when KVM merged into shutdown
    kvm_run: KvmRun = field(default_factory=KvmRun)  # the struct kvm_run fields shared with userspace
    pending_external_vector: int | None = None  # split irqchip: KVM_INTERRUPT's ExtINT vector
    guest_debug: int = 0  # vcpu->guest_debug: KVM_SET_GUEST_DEBUG's control (GuestDebug bits)
    # The local APIC's pending INIT and SIPI (apic->pending_events, apic->sipi_vector), and
    # whether this is the bootstrap vCPU (kvm_vcpu_is_bsp()): kvm/lapic.py
    apic_pending_init: bool = False
    apic_pending_sipi: bool = False
    sipi_vector: int = 0
    bsp: bool = True

    @property
    def lapic(self):
        return self.cpu.apic

    # -- arrivals from outside -------------------------------------------------

    def external(self, event: External, vector: int) -> None:
        if event is External.NMI:
            self.inject_nmi()
        else:
            self.apic_set_irq(vector)

    def inject_nmi(self) -> None:
        """kvm_inject_nmi(): count it, ask for process_nmi(), kick the vCPU. Only the vCPU
        itself turns queued NMIs into pending ones (process_nmi()), so nmi_pending cannot
        change between "inject if allowed" and "request a window" (f86368493ec0)."""
        if _faults.on("nmi_window_race"):
            # before f86368493ec0: the sender sets nmi_pending itself, with KVM_REQ_EVENT
            self.nmi_pending = max(self.nmi_pending, 1)
            self.requests |= Request.EVENT
        else:
            self.nmi_queued += 1
            self.requests |= Request.NMI
        self.kick()

    def apic_set_irq(self, vector: int) -> None:
        """__apic_accept_irq() for a fixed interrupt: set IRR, KVM_REQ_EVENT, kick."""
        self.lapic.request(vector)
        self.requests |= Request.EVENT
        self.kick()

    def kick(self) -> None:
        """kvm_vcpu_kick(): an IPI only matters while the vCPU is in guest mode; outside it,
        the request it came with cancels an entry KVM is preparing (kvm_vcpu_exit_request())."""
        if self.in_guest_mode:
            self.ops.kick()
        else:
            self.exit_request = True

    # -- NMIs, exceptions, interrupts ---------------------------------------

    def process_nmi(self) -> None:
        """process_nmi(): at most one NMI in service plus one latched; the rest are lost."""
        limit = 1 if self.ops.get_nmi_mask() or self.nmi_injected else 2
        if self.ops.is_vnmi_pending():
            limit -= 1
        self.nmi_pending = min(self.nmi_pending + self.nmi_queued, limit)
        self.nmi_queued = 0
        if self.nmi_pending and self.ops.set_vnmi_pending():
            self.nmi_pending -= 1
        if self.nmi_pending and not _faults.on("process_nmi_no_req_event"):
            self.requests |= Request.EVENT

    def nr_pending_nmis(self) -> int:
        """kvm_get_nr_pending_nmis()."""
        return self.nmi_pending + int(self.ops.is_vnmi_pending())

    def queue_exception(self, vector: int, error_code: int | None = None,
                        payload: int | None = None) -> None:
        """kvm_multiple_exception(): queue, or merge into #DF / triple fault (SDM Table 6-5).

        In L2, an exception L1 intercepts is no exception for L2 at all: it waits in
        exception_vmexit for the vendor's check_nested_events() to make it L1's VM exit,
        before any merging with what L2 has queued (kvm_queue_exception_vmexit())."""
        self.requests |= Request.EVENT
        if _faults.on("real_mode_error_code_at_queue") and not self.cpu.cr0 & CR0_PE:
            error_code = None  # before b97f07458373 the mode at queue time decided
        if _faults.on("exception_morph_at_injection"):
            self._queue_for_late_morph(vector, error_code, payload)
            return
        if self.ops.is_exception_vmexit(vector, error_code):
            self.exception_vmexit = _queued(vector, error_code, payload)
            return
        self._queue_or_merge(vector, error_code, payload)

    def _queue_or_merge(self, vector: int, error_code: int | None, payload: int | None) -> None:
        """kvm_multiple_exception() past the nested check: queue, or merge with what is queued."""
        exc = self.exception
        if not (exc.pending or exc.injected):
            self.exception = _queued(vector, error_code, payload)
            return
        prev = exc.vector
        if prev == Vec.DF:
            self.requests |= Request.TRIPLE_FAULT
            self.triple_fault_cause = (prev, vector)
            return
        first, second = exception_class(prev), exception_class(vector)
        if (first is ExceptionClass.CONTRIBUTORY and second is ExceptionClass.CONTRIBUTORY) or (
                first is ExceptionClass.PF and second is not ExceptionClass.BENIGN):
            self.exception = QueuedException()
            self.queue_exception(Vec.DF, 0)
            return
        # Otherwise the new exception replaces the old, which re-execution regenerates.
        self.exception = _queued(vector, error_code, payload)

    def _queue_for_late_morph(self, vector: int, error_code: int | None, payload: int | None) -> None:
        """The bug "exception_morph_at_injection": before 7709aba8f716 ("KVM: x86: Morph pending
        exceptions to pending VM-Exits at queue time") an exception for L2 was queued, and merged
        into #DF or a triple fault, as for any guest, with its payload (CR2, DR6) written at once
        as KVM did before payloads existed; whether L1 intercepts it was asked only when it was
        about to be injected (morph_pending_exception_late())."""
        self._queue_or_merge(vector, error_code, payload)
        if self.ops.guest_mode and self.exception.pending and self.exception.has_payload:
            self.deliver_exception_payload()

    def morph_pending_exception_late(self) -> None:
        """The other half of "exception_morph_at_injection": nested check_events() turns a pending
        exception L1 intercepts into L1's VM exit only now (nested_{svm,vmx}_check_exception())."""
        exc = self.exception
        if not (_faults.on("exception_morph_at_injection") and exc.pending):
            return
        error_code = exc.error_code if exc.has_error_code else None
        if self.ops.is_exception_vmexit(exc.vector, error_code):
            self.exception_vmexit = replace(exc)
            self.exception = QueuedException()

    def trace_l2_shutdown(self) -> None:
        """KVM_REQ_TRIPLE_FAULT in L2 becomes L1's VM exit: L2 shut down, as on a CPU (the
        Shutdown record the core writes when it triple-faults itself)."""
        first, second = self.triple_fault_cause
        self.ops.sync_guest_state_to_core()
        self.cpu.trace.append(Shutdown(self.cpu.rip, self.cpu.retired, first, second))

    def requeue_exception(self, vector: int, error_code: int | None, event_data: int = 0,
                          nested: bool = False) -> None:
        """kvm_requeue_exception(): an interrupted delivery; its payload was delivered already."""
        self.requests |= Request.EVENT
        self.exception = QueuedException(injected=True, vector=vector,
                                         has_error_code=error_code is not None,
                                         error_code=error_code or 0, event_data=event_data,
                                         nested=nested)

    def queue_interrupt(self, vector: int, soft: bool) -> None:
        """kvm_queue_interrupt()."""
        self.interrupt = QueuedInterrupt(True, soft, vector)

    def clear_event_queues(self) -> None:
        """What vendor complete_interrupts does first: forget what was injected.

        nmi_injected = false, kvm_clear_exception_queue(), kvm_clear_interrupt_queue().
        """
        self.nmi_injected = False
        self.exception.pending = False
        self.exception.injected = False
        self.exception_vmexit.pending = False
        self.interrupt.injected = False

    def exception_pending(self) -> bool:
        """kvm_is_exception_pending()."""
        return (self.exception.pending or self.exception_vmexit.pending
                or bool(self.requests & Request.TRIPLE_FAULT))

    def event_needs_reinjection(self) -> bool:
        """kvm_event_needs_reinjection()."""
        return self.exception.injected or self.interrupt.injected or self.nmi_injected

    def deliver_exception_payload(self, exc: QueuedException | None = None) -> None:
        """kvm_deliver_exception_payload(): CR2 for #PF, DR6 for #DB; of `exc`, by default the
        exception queued for the guest."""
        exc = exc if exc is not None else self.exception
        if not exc.has_payload:
            return
        cpu = self.cpu
        if exc.vector == Vec.PF:
            cpu.cr2 = exc.payload
        elif exc.vector == Vec.DB:
            dr6 = (cpu.dr6 & ~DR_TRAP_BITS) | DR6_ACTIVE_LOW | exc.payload
            dr6 ^= exc.payload & DR6_ACTIVE_LOW  # the payload has positive polarity
            cpu.dr6 = dr6 & ~(1 << 12)
        exc.event_data = exc.payload  # a FRED frame carries it as event data
        exc.has_payload = False
        exc.payload = 0

    def has_extint(self) -> bool:
        """kvm_cpu_has_extint(): an interrupt from outside the local APIC, not yet acknowledged.

        With a userspace irqchip it is the interrupt KVM_INTERRUPT queued (upstream's FIXME:
        interrupt.injected stands for it); with the split irqchip, KVM_INTERRUPT's vector,
        if LINT0 takes ExtINT (kvm_apic_accept_pic_intr(), always true here: the model's
        APIC has no LVT0, and firmware leaves the BSP in virtual-wire mode). The in-kernel
        8259 of a full irqchip is not modelled: its output is never raised."""
        chip = self.kvm.irqchip
        if chip is IrqChip.USERSPACE:
            return self.interrupt.injected
        return chip is IrqChip.SPLIT and self.pending_external_vector is not None

    def has_injectable_intr(self) -> bool:
        """kvm_cpu_has_injectable_intr(): an ExtINT, else the in-kernel local APIC's IRR."""
        if self.has_extint():
            return True
        return self.kvm.lapic_in_kernel and self.lapic.pending_vector() is not None

    def get_interrupt(self) -> int:
        """kvm_cpu_get_interrupt(): acknowledge the ExtINT first (kvm_cpu_get_extint()), else the
        local APIC's highest request (IRR to ISR)."""
        if self.has_extint():
            if self.kvm.irqchip is IrqChip.USERSPACE:
                return self.interrupt.nr
            vector, self.pending_external_vector = self.pending_external_vector, None
            return vector
        return self.lapic.acknowledge()

    # -- KVM_INTERRUPT and the interrupt window (userspace or split irqchip) ------

    def accept_dm_intr(self) -> bool:
        """kvm_cpu_accept_dm_intr(): room for one more vector from userspace's 8259 (none while
        one waits) and, with an in-kernel local APIC, LINT0 taking ExtINT (always, see
        has_extint())."""
        return not self.has_extint()

    def ready_for_interrupt_injection(self) -> bool:
        """kvm_vcpu_ready_for_interrupt_injection(): interrupts allowed, room for the vector, and
        nothing half-injected or pending, so that the window is an instruction boundary ("KVM:
        x86: accept userspace interrupt only if no event is injected", fa7a549d321a).

        kvm_arch_interrupt_allowed() is the vendor's interrupt_allowed(vcpu, false), whose
        -EBUSY counts as true in C."""
        ready = self.ops.interrupt_allowed(False) != 0 and self.accept_dm_intr()
        if _faults.on("interrupt_window_with_event_in_flight"):
            return ready  # before fa7a549d321a (71cc849b7093's test)
        return ready and not self.event_needs_reinjection() and not self.exception_pending()

    def dm_request_for_irq_injection(self) -> bool:
        """dm_request_for_irq_injection(): userspace waits for a window, and its 8259 is its own."""
        return self.kvm_run.request_interrupt_window and not self.kvm.pic_in_kernel

    def post_kvm_run_save(self) -> None:
        """post_kvm_run_save(): what KVM_RUN leaves in kvm_run for userspace (if_flag is
        get_if_flag(), RFLAGS.IF outside SEV-ES)."""
        self.kvm_run.if_flag = bool(self.ops.get_rflags() & IF)
        self.kvm_run.ready_for_interrupt_injection = (self.kvm.pic_in_kernel
                                                  or self.ready_for_interrupt_injection())

    def kvm_interrupt(self, vector: int) -> int:
        """KVM_INTERRUPT: kvm_vcpu_ioctl_interrupt(). 0, or a negative errno with nothing changed.

        A userspace irqchip's vector is queued as an interrupt to inject (kvm_queue_interrupt(),
        not soft); the split irqchip's waits as the ExtINT LINT0 will present, one at a time;
        with the 8259 in KVM the ioctl is not for userspace."""
        if not 0 <= vector < KVM_NR_INTERRUPTS:
            return EINVAL
        if self.kvm.irqchip is IrqChip.USERSPACE:
            self.queue_interrupt(vector, soft=False)
            self.requests |= Request.EVENT
            return 0
        if self.kvm.pic_in_kernel:
            return ENXIO
        if self.pending_external_vector is not None:
            return EEXIST
        self.pending_external_vector = vector
        self.requests |= Request.EVENT
        return 0

    # -- kvm_check_and_inject_events() ----------------------------------------

    def check_and_inject_events(self) -> bool:
        """kvm_check_and_inject_events(): returns whether an immediate exit is wanted."""
        ops = self.ops
        # kvm_check_nested_events() first: a VM exit to L1 supersedes re-injection into L2
        # (the event goes into vmcb12/vmcs12 then); -EBUSY: an immediate exit, and again.
        nested = ops.check_nested_events()
        if self.exception.injected:
            self._inject_exception(reinjected=True)
        elif self.exception_pending():
            pass  # a new exception wins over an interrupted NMI/IRQ, which is lost
        elif self.nmi_injected:
            self._record(ops.inject_nmi(), Vec.NMI, reinjected=True)
        elif self.interrupt.injected:
            ops.inject_irq(reinjected=True)
            self._record("soft-int" if self.interrupt.soft else "irq", self.interrupt.nr, True)
        self.warn_on(self.exception.injected and self.exception.pending,
                     "kvm_check_and_inject_events: exception both injected and pending")
        if nested < 0:
            return True
        self.warn_on(self.exception_vmexit.pending,
                     "kvm_check_and_inject_events: exception VM exit still pending")
        can_inject = not self.event_needs_reinjection()

        exc = self.exception
        if exc.pending:
            if exception_type(exc.vector) is ExceptionType.FAULT:
                ops.set_rflags(ops.get_rflags() | RF)
            if exc.vector == Vec.DB:
                self.deliver_exception_payload()
                self.cpu.dr7 &= ~DR7_GD
            self._inject_exception(reinjected=False)
            exc.pending = False
            exc.injected = True
            can_inject = False

        if self.nmi_pending:
            allowed = ops.nmi_allowed(True) if can_inject else EBUSY
            if allowed < 0:
                return True
            if allowed:
                self.nmi_pending -= 1
                self.nmi_injected = True
                self._record(ops.inject_nmi(), Vec.NMI, reinjected=False)
                can_inject = False
                self.warn_on(ops.nmi_allowed(True) < 0,
                             "kvm_check_and_inject_events: NMI injected, then not allowed")
        self.other_cpus_may_run()  # between "inject if allowed" and "request a window"
        if self.nmi_pending:
            ops.enable_nmi_window()

        if self.has_injectable_intr():
            allowed = ops.interrupt_allowed(True) if can_inject else EBUSY
            if allowed < 0:
                return True
            if allowed:
                self.queue_interrupt(self.get_interrupt(), soft=False)
                ops.inject_irq(reinjected=False)
                self._record("irq", self.interrupt.nr, reinjected=False)
            if self.has_injectable_intr():
                ops.enable_irq_window()
        self.warn_on(self.exception.pending, "kvm_check_and_inject_events: exception still pending")
        return False

    def other_cpus_may_run(self) -> None:
        """With several vCPUs, a point inside KVM where another vCPU's IPI may arrive (a step
        of the machine's interleaving, arch/machine.py)."""
        if self.cpu.machine is not None:
            self.cpu.machine.host_step(self.cpu)

    def bug_on(self, condition: bool, what: str) -> None:
        """BUG_ON(): the host oopses; nothing of this vCPU runs on."""
        if condition:
            raise HostBug(f"KVM BUG_ON reached: {what}")

    def warn_on(self, condition: bool, what: str) -> None:
        """WARN_ON_ONCE(): a condition KVM's authors say cannot happen; recorded, run goes on."""
        if condition and what not in self.warnings:
            self.warnings.append(what)

    def _inject_exception(self, reinjected: bool) -> None:
        """kvm_inject_exception(): a real-mode guest's exception has no error code (SDM 20.1.4),
        so it is stripped here, at injection, when the mode is known (b97f07458373, "KVM: x86:
        determine if an exception has an error code only when injecting it."; 6c41468c7c12
        clears has_error_code, not error_code). The flag stays with the queued exception
        until then: an intercepted #PF VM exit from AMD's paged real mode reports one."""
        exc = self.exception
        if not self.cpu.cr0 & CR0_PE and not _faults.on("real_mode_error_code_at_queue"):
            if _faults.on("real_mode_clears_error_code_value"):
                exc.error_code = 0  # the typo b97f07458373 shipped: the flag stays set
            else:
                exc.has_error_code = False
        self.ops.inject_exception()
        self._record("exception", self.exception.vector, reinjected)

    def _record(self, what: str, vector: int, reinjected: bool) -> None:
        self.cpu.trace.append(InjectRecord(what, vector, reinjected, self.cpu.retired))

    def trace_injection(self, what: str, vector: int) -> None:
        """Vendor code handing an event to hardware outside kvm_check_and_inject_events()."""
        self._record(what, vector, reinjected=False)

    # -- the run loop ----------------------------------------------------------

    def run(self, max_steps: int, at_exit: Callable[[], None] | None = None
            ) -> UserspaceExit | None:
        """KVM_RUN: enter and handle exits until userspace must act; None when the budget ends.

        `at_exit` is called after each exit KVM handled, where it looks whether userspace
        wants control: the explorer copies the run there, and resume_run() continues a copy."""
        self.run_start, self.run_budget, self.exits_left = self.cpu.work, max_steps, max_steps
        return self._run_loop(at_exit)

    def resume_run(self, at_exit: Callable[[], None] | None = None) -> UserspaceExit | None:
        """KVM_RUN, continued where `at_exit` was called (on a copy of the vCPU, with the
        exit after which userspace wants control set anew in stop_at_exit)."""
        if self.stats.exits == self.stop_at_exit:
            return self._to_userspace(UserspaceExit(KvmExit.INTR, "userspace asked for control"))
        return self._run_loop(at_exit)

    def _run_loop(self, at_exit: Callable[[], None] | None) -> UserspaceExit | None:
        while self.exits_left > 0:
            self.exits_left -= 1
            running = self.mp_state is MpState.RUNNABLE  # kvm_vcpu_running(); else vcpu_block()
            if running and (self.apic_pending_init or self.apic_pending_sipi):
                lapic.accept_events(self)  # vcpu_enter_guest(), on KVM_REQ_EVENT
            woke = self.mp_state is not MpState.RUNNABLE
            if woke:
                if not self._wait_for_events():
                    return self._to_userspace(UserspaceExit(KvmExit.HLT,
                                                            "halted with nothing left to wake it"))
            else:
                budget = self.run_budget - (self.cpu.work - self.run_start)
                if budget <= 0:
                    return self._to_userspace(None)
                outcome = self.enter_guest(budget)
                if outcome is BUDGET:
                    return self._to_userspace(None)
                if outcome is not None:
                    return self._to_userspace(outcome)
            # vcpu_run(): after each exit handled in the kernel (or a wake-up), the window
            # userspace asked for, once its interrupt can go in.
            if self.dm_request_for_irq_injection() and self.ready_for_interrupt_injection():
                self.stats.request_irq_exits += 1
                return self._to_userspace(UserspaceExit(KvmExit.IRQ_WINDOW_OPEN))
            if woke:
                continue
            if at_exit is not None:
                at_exit()
            if self.stats.exits == self.stop_at_exit:
                return self._to_userspace(UserspaceExit(KvmExit.INTR, "userspace asked for control"))
        return self._to_userspace(None)

    def _to_userspace(self, outcome: UserspaceExit | None) -> UserspaceExit | None:
        """KVM_RUN returns: kvm_arch_vcpu_ioctl_run()'s post_kvm_run_save()."""
        self.post_kvm_run_save()
        return outcome

    def run_immediate_exit(self) -> int:
        """KVM_RUN with kvm_run->immediate_exit set (vcpu->wants_to_run false): -EINTR at once.

        kvm_arch_vcpu_ioctl_run() morphs an exception userspace stuffed into L1's
        VM exit before it looks at wants_to_run; nothing else happens."""
        self._morph_userspace_exception()
        self.post_kvm_run_save()
        return EINTR

    def _morph_userspace_exception(self) -> None:
        """kvm_arch_vcpu_ioctl_run(): a pending exception KVM_SET_VCPU_EVENTS stuffed while L2
        is active becomes L1's exception VM exit if L1 intercepts it. Done at the next entry,
        which for a VMM is the same point: it can set events only between KVM_RUNs."""
        exc = self.exception
        error_code = exc.error_code if exc.has_error_code else None
        if self.exception_from_userspace and self.ops.is_exception_vmexit(exc.vector, error_code):
            # kvm_queue_exception_vmexit()
            self.exception_vmexit = _queued(exc.vector, error_code,
                                            exc.payload if exc.has_payload else None)
            exc.pending = exc.injected = False
        self.exception_from_userspace = False

    def _wait_for_events(self) -> bool:
        """vcpu_block(): wake on kvm_vcpu_has_events(); time passes while it waits.

        The core shows the guest's RIP meanwhile, so an event placed at the label
        the vCPU halted at arrives, as it would on a halted CPU. In guest mode the
        nested events are checked before the vCPU leaves HALTED, so an exit to L1
        records the HLT in vmcs12's activity state."""
        self.ops.sync_guest_state_to_core()
        while self.mp_state is not MpState.HALTED or not self.has_events():
            if lapic.has_pending_init_or_sipi(self) and lapic.init_sipi_allowed(self):
                in_l2 = self.ops.guest_mode
                lapic.accept_events(self)  # vcpu_block(): INIT, SIPI (kvm/lapic.py)
                if self.mp_state is MpState.RUNNABLE:
                    return True
                if in_l2 and not self.ops.guest_mode:
                    break  # the nested events it checked made a VM exit to L1: the HLT ends
                continue
            if self.cpu.next_arrival():
                continue
            if self.cpu.machine is None:
                return False
            # Several vCPUs: the others run until one of them kicks this one awake (an IPI:
            # kvm_vcpu_kick() -> kvm_vcpu_wake_up()), or none can run any more.
            self.cpu.machine.block(self.cpu)
        self.warn_on(self.ops.check_nested_events() == EBUSY,
                     "vcpu_block: kvm_check_nested_events() busy while halted")
        self.mp_state = MpState.RUNNABLE
        return True

    def has_events(self) -> bool:
        """kvm_vcpu_has_events(), the parts that can be true here."""
        if self.exception_pending() or self.requests & Request.NMI:
            return True
        if self.ops.has_nested_events():  # kvm_x86_ops.nested_ops->has_events()
            return True
        if self.nmi_pending and self.ops.nmi_allowed(False) > 0:
            return True
        return self.ops.interrupt_allowed(False) > 0 and self.has_injectable_intr()

    def enter_guest(self, max_steps: int) -> UserspaceExit | None:
        """vcpu_enter_guest(): requests, event injection, the vendor run, exit handling."""
        self.exit_request = False
        self._morph_userspace_exception()
        if self.requests & Request.TRIPLE_FAULT:
            if not _faults.on("nested_triple_fault_kills_l1"):
                self.ops.nested_triple_fault()  # in L2: L1's VM exit, if L1 asked for one
            if self.requests & Request.TRIPLE_FAULT:
                self.requests &= ~Request.TRIPLE_FAULT
                return UserspaceExit(KvmExit.SHUTDOWN, "KVM_REQ_TRIPLE_FAULT")
        if self.requests & Request.NMI:
            self.requests &= ~Request.NMI
            self.process_nmi()
        immediate_exit = False
        # userspace waits for a window and has room for its vector: open one (req_int_win)
        req_int_win = self.dm_request_for_irq_injection() and self.accept_dm_intr()
        if self.requests & Request.EVENT or req_int_win:
            self.requests &= ~Request.EVENT
            self.stats.req_event += 1
            immediate_exit = self.check_and_inject_events()
            if self.requests & Request.TRIPLE_FAULT:
                return self.enter_guest(max_steps)
            if req_int_win:
                self.ops.enable_irq_window()
        if self.exit_request:
            # kvm_vcpu_exit_request(): another vCPU's IPI came with a request while KVM was
            # injecting: cancel the injection and start again (the event goes back to the
            # queues, svm/vmx cancel_injection())
            self.ops.cancel_injection()
            if immediate_exit:
                self.requests |= Request.EVENT
            return self.enter_guest(max_steps)
        if immediate_exit:
            self.requests |= Request.EVENT
        self.in_guest_mode = True
        try:
            outcome = self.ops.run(max_steps, immediate_exit)
        finally:
            self.in_guest_mode = False
        if outcome is not None:
            return outcome
        self.stats.exits += 1
        return self.ops.handle_exit()

    # -- instruction emulation and skipping -----------------------------------

    def emulate(self) -> Decoded | None:
        """Perform the intercepted instruction at RIP with the SDM semantics of arch/.

        A #GP (e.g. an unknown MSR) is queued for the guest (kvm_inject_gp());
        returns None then, else the instruction, with RIP not yet advanced.
        """
        cpu = self.cpu
        rip = self.ops.rip_read()
        cpu.rip = rip
        cpu.rflags = self.ops.get_rflags()
        insn = cpu.icache.get(rip) or decode(cpu, rip)
        try:
            insn.semantics(cpu)
        except Fault as fault:
            cpu.rip = rip
            self.queue_exception(fault.vector, fault.error_code if has_error_code(
                fault.vector, EventType.HW_EXCEPTION) else None)
            return None
        cpu.rip = rip
        cpu.halted = False  # HLT: KVM, not the core, holds the halted state (mp_state)
        self.ops.set_rflags(cpu.rflags)  # e.g. VMX instructions report through CF/ZF
        return insn

    def skip_emulated_instruction(self, insn: Decoded, single_step: bool = True) -> None:
        """kvm_skip_emulated_instruction(): advance RIP; TF makes it a single-step (#DB, BS).
        `single_step` False: the vendor's skip alone (as nested_svm_vmrun() calls
        svm_skip_emulated_instruction()), which leaves TF's trap to the caller."""
        rflags, rip = self.ops.get_rflags(), self.ops.rip_read()
        self.ops.skip_emulated_instruction()
        self.retire(rip, insn)
        if single_step and rflags & TF:
            self.queue_exception(Vec.DB, payload=DR6_BS)  # kvm_vcpu_do_singlestep()

    def retire(self, rip: int, insn: Decoded) -> None:
        """The guest's instruction at `rip`, which KVM completed, counts as retired."""
        cpu = self.cpu
        cpu.retired += 1
        if cpu.record_instructions:
            cpu.trace.append(Retire(rip, insn.text, cpu.retired))

    def emulate_and_skip(self) -> None:
        insn = self.emulate()
        if insn is not None:
            self.skip_emulated_instruction(insn)
            if insn.exiting in (Exiting.WRMSR, Exiting.CR8_WRITE):
                self.requests |= Request.EVENT  # the local APIC may have something to deliver

    def emulate_halt(self) -> None:
        """kvm_emulate_halt(): skip the HLT, then block until an event can wake the vCPU.

        With guest state protected (SEV-ES) the CPU already completed the HLT."""
        if self.ops.guest_state_protected:
            self.stats.halt_exits += 1
            self.mp_state = MpState.HALTED
            return
        rip = self.ops.rip_read()
        insn = self.emulate()
        if insn is None:
            return
        self.skip_emulated_instruction(insn)
        self.stats.halt_exits += 1
        self.cpu.trace.append(Halt(rip, self.cpu.retired))
        self.mp_state = MpState.HALTED

    # -- KVM_GET_VCPU_EVENTS / KVM_SET_VCPU_EVENTS ----------------------------

    def get_vcpu_events(self) -> KvmVcpuEvents:
        """kvm_vcpu_ioctl_x86_get_vcpu_events()."""
        self.process_nmi()
        self._exception_payload_quirk()
        exc = self._exception_to_save()
        out = KvmVcpuEvents()
        if not exception_is_soft(exc.vector):  # soft exceptions re-execute after restore
            out.exception_injected = int(exc.injected)
            out.exception_pending = int(exc.pending)
            if not self.exception_payload_enabled:
                out.exception_injected |= out.exception_pending
                out.exception_pending = 0
        out.exception_nr = exc.vector
        out.exception_has_error_code = int(exc.has_error_code)
        out.exception_error_code = exc.error_code
        out.exception_has_payload = int(exc.has_payload)
        out.exception_payload = exc.payload
        out.interrupt_injected = int(self.interrupt.injected and not self.interrupt.soft)
        out.interrupt_nr = self.interrupt.nr
        out.interrupt_shadow = self.ops.get_interrupt_shadow()
        out.nmi_injected = int(self.nmi_injected)
        out.nmi_pending = self.nr_pending_nmis()
        if _faults.on("get_vcpu_events_nmi_pending_bool"):
            out.nmi_pending = int(out.nmi_pending != 0)  # before ab2ee212a57b: one NMI at most
        out.nmi_masked = int(self.ops.get_nmi_mask())
        out.triple_fault_pending = int(bool(self.requests & Request.TRIPLE_FAULT))
        out.flags = (VcpuEventsFlag.VALID_NMI_PENDING | VcpuEventsFlag.VALID_SHADOW
                     | VcpuEventsFlag.VALID_SMM | VcpuEventsFlag.VALID_TRIPLE_FAULT)
        if self.exception_payload_enabled:
            out.flags |= VcpuEventsFlag.VALID_PAYLOAD
        return out

    def set_vcpu_events(self, ev: KvmVcpuEvents) -> None:
        """kvm_vcpu_ioctl_x86_set_vcpu_events(): InvalidArgument (-EINVAL), before any change
        except for SMM state (below).

        The kernel works on its own copy of the struct (copy_from_user()), so the
        fields it forces to 0 are forced in a copy here too: the caller's is left as is."""
        ev = replace(ev)
        if ev.flags & ~int(_ALL_FLAGS):
            raise InvalidArgument(f"unknown kvm_vcpu_events flags {ev.flags:#x}")
        if ev.flags & VcpuEventsFlag.VALID_PAYLOAD:
            if not self.exception_payload_enabled:
                raise InvalidArgument("VALID_PAYLOAD without KVM_CAP_EXCEPTION_PAYLOAD")
            if ev.exception_pending:
                ev.exception_injected = 0
            else:
                ev.exception_has_payload = 0
        else:
            ev.exception_pending = 0
            ev.exception_has_payload = 0
        if (ev.exception_injected or ev.exception_pending) and (
                ev.exception_nr > 31 or ev.exception_nr == Vec.NMI):
            raise InvalidArgument(f"exception vector {ev.exception_nr}")
        self.process_nmi()
        self.exception = QueuedException(
            pending=bool(ev.exception_pending), injected=bool(ev.exception_injected),
            vector=ev.exception_nr, has_error_code=bool(ev.exception_has_error_code),
            error_code=ev.exception_error_code, has_payload=bool(ev.exception_has_payload),
            payload=ev.exception_payload)
        self.exception_vmexit = QueuedException()
        self.exception_from_userspace = bool(ev.exception_pending)  # morphed at KVM_RUN
        self.interrupt = QueuedInterrupt(bool(ev.interrupt_injected), bool(ev.interrupt_soft),
                                         ev.interrupt_nr)
        if ev.flags & VcpuEventsFlag.VALID_SHADOW:
            self.ops.set_interrupt_shadow(ev.interrupt_shadow & (ShadowBits.MOV_SS | ShadowBits.STI))
        self.nmi_injected = bool(ev.nmi_injected)
        if ev.flags & VcpuEventsFlag.VALID_NMI_PENDING:
            if _faults.on("set_vcpu_events_nmi_unclamped"):
                # Before ab2ee212a57b: stored as is and no KVM_REQ_NMI, so process_nmi()'s
                # limit never sees the NMIs userspace restored (up to 255, a u8).
                self.nmi_pending = ev.nmi_pending
            else:
                # "KVM: x86: Route pending NMIs from userspace through process_nmi()"
                # (bdedff263132): queued, so the next process_nmi() clamps them against
                # the mask restored below; KVM_REQ_NMI only when there are some (Fixes
                # bdedff263132: "KVM: x86: Make KVM_REQ_NMI request iff NMI pending for vcpu").
                self.nmi_pending = 0
                self.nmi_queued = ev.nmi_pending
                if ev.nmi_pending:
                    self.requests |= Request.NMI
        self.ops.set_nmi_mask(bool(ev.nmi_masked))
        if ev.flags & VcpuEventsFlag.VALID_SMM and (ev.smi_smm or ev.smi_pending
                                                    or ev.smi_smm_inside_nmi):
            # The model's KVM is built without CONFIG_KVM_SMM (SMM is not modelled), where
            # the ioctl refuses any SMM state, but only here: the exception, interrupt and
            # NMI state above is already written when it returns -EINVAL.
            raise InvalidArgument("SMM state without CONFIG_KVM_SMM (the events before it "
                                  "were applied)")
        if ev.flags & VcpuEventsFlag.VALID_TRIPLE_FAULT:
            if ev.triple_fault_pending:
                if not self.requests & Request.TRIPLE_FAULT:  # userspace's, not a merge
                    self.triple_fault_cause = (NO_VECTOR, NO_VECTOR)
                self.requests |= Request.TRIPLE_FAULT
            else:
                self.requests &= ~Request.TRIPLE_FAULT
        self.requests |= Request.EVENT

    # -- KVM_SET_GUEST_DEBUG ----------------------------------------------------

    def set_guest_debug(self, control: int) -> None:
        """kvm_arch_vcpu_ioctl_set_guest_debug(): InvalidArgument (-EINVAL) or Busy (-EBUSY)
        before any change.

        KVM_GUESTDBG_INJECT_DB/_BP queue a #DB (INJECT_DB wins if both are set) with no
        payload, enabled or not, and are refused while an exception is pending or, since
        "KVM: x86: Check for injected exceptions before queuing a debug exception"
        (e907b4e72488), injected: kvm_multiple_exception() would merge the two into #DF or
        a triple fault, or let the new one override the injected one."""
        if self.ops.guest_state_protected:
            raise InvalidArgument("KVM_SET_GUEST_DEBUG: the guest's state is protected (SEV-ES)")
        if control & ~GUESTDBG_VALID_MASK:
            raise InvalidArgument(f"KVM_SET_GUEST_DEBUG: unknown control bits "
                                  f"{control & ~GUESTDBG_VALID_MASK:#x}")
        host_side = GuestDebug.SINGLESTEP | GuestDebug.USE_SW_BP | GuestDebug.USE_HW_BP
        if control & GuestDebug.ENABLE and control & (host_side | GuestDebug.BLOCKIRQ):
            raise ModelLimit("KVM_SET_GUEST_DEBUG with single-step, breakpoints or BLOCKIRQ "
                             "(KVM_EXIT_DEBUG, the #DB/#BP intercepts, the hidden TF) is not "
                             "modelled")
        if control & (GuestDebug.INJECT_DB | GuestDebug.INJECT_BP):
            injected = self.exception.injected and not _faults.on("guest_debug_inject_over_injected")
            if self.exception_pending() or injected:
                raise Busy("KVM_SET_GUEST_DEBUG: an exception is already "
                           + ("pending" if self.exception_pending() else "injected"))
            self.queue_exception(Vec.DB if control & GuestDebug.INJECT_DB else Vec.BP)
        self.guest_debug = control if control & GuestDebug.ENABLE else 0


    # -- KVM_ENABLE_CAP(KVM_CAP_EXCEPTION_PAYLOAD) and the payload quirk --------

    def enable_exception_payload(self, enabled: bool) -> int:
        """KVM_ENABLE_CAP(KVM_CAP_EXCEPTION_PAYLOAD) on the VM: kvm_vm_ioctl_enable_cap() sets
        kvm->arch.exception_payload_enabled = args[0], on or off, at any time. Returns 0."""
        self.exception_payload_enabled = enabled
        return 0

    def _exception_to_save(self) -> QueuedException:
        """kvm_get_exception_to_save(): the ABI has room for one exception; an exiting one
        (exception_vmexit) goes when nothing is queued for the guest itself."""
        exc = self.exception
        if self.exception_vmexit.pending and not (exc.pending or exc.injected):
            return self.exception_vmexit
        return exc

    def _exception_payload_quirk(self) -> None:
        """kvm_handle_exception_payload_quirk(): without KVM_CAP_EXCEPTION_PAYLOAD userspace may
        not carry a payload across save/restore, so the pending exception's payload (CR2, DR6)
        is delivered before it reads any state a payload touches: vCPU events, sregs (CR2),
        debug registers (DR6). "KVM: x86: Defer non-architectural deliver of exception payload
        to userspace read" (Sean Christopherson, 2026)."""
        exc = self._exception_to_save()
        if not self.exception_payload_enabled and exc.pending and exc.has_payload:
            self.deliver_exception_payload(exc)

    def _payload_quirk_on_register_read(self) -> None:
        if not _faults.on("payload_quirk_events_only"):
            self._exception_payload_quirk()
        # Before that commit only KVM_GET_VCPU_EVENTS did it: a VMM reading sregs or debug
        # registers first saved CR2/DR6 without the payload, and put them back afterwards.

    # -- KVM_GET/SET_REGS, KVM_GET/SET_SREGS, KVM_GET/SET_DEBUGREGS --------------

    def _check_state_accessible(self) -> None:
        """A protected guest's registers are not KVM's to give (SEV-ES: "KVM: x86: Update
        __get_sregs() / __set_sregs() to support SEV-ES", kvm_arch_vcpu_ioctl_get_regs() etc.)."""
        if self.ops.guest_state_protected:
            raise InvalidArgument("the guest state is protected (SEV-ES)")

    def get_regs(self) -> KvmRegs:
        """KVM_GET_REGS: __get_regs()."""
        self._check_state_accessible()
        self.ops.sync_guest_state_to_core()
        return KvmRegs(tuple(self.cpu.regs), self.ops.rip_read(), self.ops.get_rflags())

    def set_regs(self, regs: KvmRegs) -> None:
        """KVM_SET_REGS: __set_regs() writes the registers, RIP and RFLAGS (kvm_set_rflags(),
        fixed bit 1 set), drops a *pending* exception (exception.pending and
        exception_vmexit.pending = false: it belonged to the old register state) and raises
        KVM_REQ_EVENT. An injected one stays."""
        self._check_state_accessible()
        if len(regs.gprs) != len(self.cpu.regs):
            raise InvalidArgument(f"struct kvm_regs with {len(regs.gprs)} registers")
        self.cpu.regs = list(regs.gprs)
        self.ops.rsp_write(regs.gprs[RSP])
        self.ops.rip_write(regs.rip)
        self.ops.set_rflags(regs.rflags | 0x2)
        self.exception.pending = False
        self.exception_vmexit.pending = False
        self.requests |= Request.EVENT

    def get_sregs(self) -> KvmSregs:
        """KVM_GET_SREGS: __get_sregs() (after the payload quirk); the injected hard interrupt
        goes in interrupt_bitmap."""
        self._check_state_accessible()
        self._payload_quirk_on_register_read()
        cpu, irq = self.cpu, self.interrupt
        pending = irq.nr if irq.injected and not irq.soft else None
        return KvmSregs(cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4, cpu.efer, cpu.idtr_base,
                        cpu.idtr_limit, pending)

    def set_sregs(self, sregs: KvmSregs) -> None:
        """KVM_SET_SREGS: kvm_is_valid_sregs() (-EINVAL), then __set_sregs(): the control
        registers, CR2, IDTR; a vector in interrupt_bitmap is queued again as an injected hard
        interrupt (kvm_queue_interrupt()); KVM_REQ_EVENT."""
        self._check_state_accessible()
        long_mode = sregs.efer & _EFER_LME and sregs.cr0 & _CR0_PG
        if long_mode and not (sregs.cr4 & _CR4_PAE and sregs.efer & _EFER_LMA):
            raise InvalidArgument("kvm_is_valid_sregs(): long mode without CR4.PAE or EFER.LMA")
        if not long_mode and sregs.efer & _EFER_LMA:
            raise InvalidArgument("kvm_is_valid_sregs(): EFER.LMA outside long mode")
        cpu = self.cpu
        if (sregs.cr0 ^ cpu.cr0) & CR0_PE:
            raise ModelLimit("KVM_SET_SREGS switching between real and protected mode (CR0.PE) "
                             "is not modelled: the core's mode is fixed for a run", cpu.rip)
        cpu.cr0, cpu.cr2, cpu.cr4, cpu.efer = sregs.cr0, sregs.cr2, sregs.cr4, sregs.efer
        cpu.load_cr3(sregs.cr3)  # with guest paging, a new MMU context: TLB flushed (kvm_mmu_reset_context())
        cpu.idtr_base, cpu.idtr_limit = sregs.idt_base, sregs.idt_limit
        if sregs.interrupt_bitmap is not None:
            self.queue_interrupt(sregs.interrupt_bitmap, soft=False)
        self.requests |= Request.EVENT

    def get_debugregs(self) -> KvmDebugregs:
        """KVM_GET_DEBUGREGS: kvm_vcpu_ioctl_x86_get_debugregs() (after the payload quirk)."""
        self._check_state_accessible()
        self._payload_quirk_on_register_read()
        cpu = self.cpu
        return KvmDebugregs(tuple(cpu.dr), cpu.dr6, cpu.dr7)

    def set_debugregs(self, regs: KvmDebugregs) -> None:
        """KVM_SET_DEBUGREGS: kvm_vcpu_ioctl_x86_set_debugregs(): -EINVAL for flags, or DR6/DR7
        bits above 31 (kvm_dr6_valid(), kvm_dr7_valid()); then DR0-3, DR6, DR7."""
        self._check_state_accessible()
        if regs.flags:
            raise InvalidArgument(f"struct kvm_debugregs flags {regs.flags:#x}")
        if regs.dr6 >> 32 or regs.dr7 >> 32:
            raise InvalidArgument(f"DR6 {regs.dr6:#x} / DR7 {regs.dr7:#x} has bits above 31")
        cpu = self.cpu
        cpu.dr, cpu.dr6, cpu.dr7 = list(regs.db), regs.dr6, regs.dr7
        cpu.update_breakpoints()  # kvm_update_dr0123(), kvm_update_dr7()


def _queued(vector: int, error_code: int | None, payload: int | None) -> QueuedException:
    """A newly pending exception, as kvm_multiple_exception() records it."""
    return QueuedException(pending=True, vector=vector, has_error_code=error_code is not None,
                           error_code=error_code or 0, has_payload=payload is not None,
                           payload=payload or 0)


_CR0_PG = 1 << 31
_CR4_PAE = 1 << 5
_EFER_LME = 1 << 8
_EFER_LMA = 1 << 10

_ALL_FLAGS = (VcpuEventsFlag.VALID_NMI_PENDING | VcpuEventsFlag.VALID_SIPI_VECTOR
              | VcpuEventsFlag.VALID_SHADOW | VcpuEventsFlag.VALID_SMM
              | VcpuEventsFlag.VALID_PAYLOAD | VcpuEventsFlag.VALID_TRIPLE_FAULT)


# The native hypercall patch_hypercall() writes over the other vendor's: VMMCALL on SVM
# (svm_patch_hypercall()), VMCALL on VMX (vmx_patch_hypercall()), by the instruction found
_NATIVE_HYPERCALL = {Exiting.VMCALL: b"\x0f\x01\xd9", Exiting.VMMCALL: b"\x0f\x01\xc1"}


def fix_hypercall(vcpu: Vcpu, rip: int, foreign: Exiting) -> bool:
    """handle_ud() emulating the other vendor's hypercall instruction (EmulateOnUD,
    em_hypercall()): with KVM_X86_QUIRK_FIX_HYPERCALL_INSN (on by default; the model has no
    way to turn it off) emulator_fix_hypercall() writes the native one over it in guest
    memory and the guest runs it again (a hypercall to KVM, or in L2 what L1's intercepts
    make of it). True: patched. False: not that instruction, or the emulator refuses it: in
    L2 on VMX, VMMCALL's intercept check (vmx_check_intercept() has no case for
    x86_intercept_vmmcall) is X86EMUL_UNHANDLEABLE, and handle_emulation_failure() queues a
    #UD for L2. Either way the caller queues the #UD."""
    cpu = vcpu.cpu
    try:
        insn = cpu.icache.get(rip) or decode(cpu, rip)
    except Fault:
        return False  # no instruction there (UD2's invalid opcode, say)
    if insn.exiting is not foreign:
        return False
    if vcpu.ops.guest_mode and foreign is Exiting.VMMCALL:
        return False
    if cpl_of(cpu.cs) != 0:
        raise ModelLimit(f"KVM's emulation of {insn.text!r} on #UD above CPL 0 (VMCALL is Priv in "
                         "the emulator's table: #GP) is not modelled", rip)
    try:
        for n, byte in enumerate(_NATIVE_HYPERCALL[foreign]):  # emulator_write_emulated()
            cpu.write(cpu.linear(rip) + n, 1, byte)
    except Fault as e:
        raise ModelLimit(f"emulator_fix_hypercall()'s write faulting ({e}) is not modelled", rip) from None
    return True
