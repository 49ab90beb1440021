"""The VMM's side of a run under KVM: its KVM_RUN loop and what it does in between.

KVM_RUN until the guest halts for good, shuts down, or the budget ends (or KVM
hits a BUG_ON); when KVM_RUN returns, userspace does what the scenario and the
explorer's schedule ask: save/restores, the VMM's calls, its 8259's
KVM_INTERRUPT once the guest is ready for it.

A session keeps everything it needs in attributes, never in the frames of a
running call: where KVM looks whether userspace wants control after an exit
(`watch`, Vcpu.run()'s `at_exit`), a copy of the session (kvmodel._util.snapshot) can be
resumed with resume(). check/resume.py branches the explorer's runs there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from kvmodel.arch.cost import DELIVERY_CYCLES
from kvmodel.arch.cpu import Cpu, External, Forced, Scheduled
from kvmodel.arch.events import Event, EventType
from kvmodel.arch.observe import Shutdown
from kvmodel.guest.layout import PAGE
from kvmodel.hw.vmx.cpu import NOTIFY_THRESHOLD
from kvmodel.kvm.migrate import save_restore
from kvmodel.kvm.svm.svm import SvmParams
from kvmodel.kvm.uapi import KVM_NOTIFY_CONTEXT_INVALID, KvmExit
from kvmodel.kvm.vcpu import Vendor, create_vcpu, create_vm
from kvmodel.kvm.vm import Cap, IrqChip, NotifyFlag, Vm
from kvmodel.kvm.vmx.vmx import VmxParams
from kvmodel.kvm.x86 import HostBug, Stats, UserspaceExit, Vcpu
from kvmodel.scenario.schema import Happening, HostEvent, Scenario, VmmStep
from kvmodel.scenario.vmm import KVM_ENABLE_CAP, KVM_INTERRUPT, Performed, Pic, VmmRecord, action, in_flight

if TYPE_CHECKING:
    from kvmodel.scenario.runner import Resolver

SessionResult = tuple[Cpu, "str | None", "tuple[Stats, ...]", "str | None", "tuple[str, ...]", "HostTime"]


@dataclass(frozen=True, slots=True)
class HostTime:
    """The host's side of the run: can it always take the CPU back?"""

    longest_windowless: int  # cycles the guest held the CPU with no event window, at most
    notify_limit: int | None  # with Notify VM exits on: the window, the threshold, one delivery
    problems: tuple[str, ...] = ()  # the host's dispatch of its own NMIs and IRQs went wrong

    @property
    def starved(self) -> bool:
        return self.notify_limit is not None and self.longest_windowless > self.notify_limit


@dataclass(frozen=True, slots=True)
class VmmStop:
    """KVM_RUN returned an exit the VMM does not resume from (trace only)."""

    kind: ClassVar[str] = "vmm_stop"
    reason: str
    flags: int
    retired: int
    why: str


@dataclass(slots=True)
class VmmLog:
    """What the VMM's calls in a run under KVM stand for on bare metal, and how it ended."""

    nmis: list[tuple[int, int]] = field(default_factory=list)
    happenings: list[Happening] = field(default_factory=list)
    host_bug: str | None = None


@dataclass(slots=True)
class UserspaceStop:
    """Something userspace does when KVM_RUN returns to it: a save/restore or a VMM call,
    after VM exit `exit` or, `marker` set, at the first exit once the guest reached a label
    (the marker, a host interrupt placed there, has arrived: a signal kicked the vCPU out)."""

    exit: int | None
    marker: Scheduled | None
    call: VmmStep | None  # None: a save/restore

    def due(self, exits: int, cpu: Cpu) -> bool:
        if self.marker is not None:
            return self.marker not in cpu.scheduled
        return self.exit == exits


class KvmSession:
    """One run under KVM, from the VMM's side (see the module's docstring)."""

    def __init__(self, scenario: Scenario, resolve: Resolver, cpu: Cpu, vendor: Vendor,
                 steps: int, log: VmmLog):
        self.scenario, self.vendor, self.steps, self.log = scenario, vendor, steps, log
        faults = {resolve.linear(h.page, h.line) // PAGE for h in scenario.host
                  if h.event is HostEvent.FAULT}
        if dict(scenario.kvm_params).get("tdp", True):
            cpu.set_host_unmapped(faults)  # guest-physical pages EPT/NPT lacks
        else:
            cpu.paging.shadow_missing = faults  # linear pages the shadow lacks (kvm/mmu.py)
        self.stops = _userspace_stops(scenario, cpu, resolve)
        self.first_cpu = cpu  # what a model limit reports (a save/restore makes another)
        self.vcpu = self.make(cpu)
        self.pic = Pic()  # the VMM's 8259 (a userspace or split irqchip): lives across save/restores
        self.done: list[Stats] = []  # the counters of the vCPUs save/restores replaced
        self.warnings: list[str] = []
        self.problems: list[str] = []
        self.windowless = 0
        self.start = cpu.work
        self.rounds = 0  # KVM_RUN calls: each costs the budget a step, so exits alone cannot loop forever
        self.outcome: UserspaceExit | None = None
        # called where KVM looks whether userspace wants control (Vcpu.run()'s `at_exit`):
        # check/resume.py copies the session there
        self.watch: Callable[[KvmSession], None] | None = None

    def make(self, core: Cpu) -> Vcpu:
        """A vCPU on `core`; a migration target is a new VM, set up the same way."""
        params, svm, vmx = vendor_params(self.scenario)
        vm = create_vm(self.vendor)
        vm.force_emulation_prefix = params.get("force_emulation_prefix", False)
        vm.fep_clear_rflags_rf = params.get("fep_clear_rflags_rf", False)
        enable_caps(vm, params)
        done = _before_vcpus(self.scenario, vm, core)
        new = create_vcpu(core, self.vendor, svm=svm, vmx=vmx, vm=vm)
        new.host_problems += [d.contract for d in done if d.contract]
        return new

    @property
    def earlier_exits(self) -> int:
        """VM exits of the vCPUs save/restores replaced."""
        return sum(s.exits for s in self.done)

    def run(self) -> SessionResult:
        while self._userspace_turn():
            pass
        return self._finish()

    def resume(self) -> SessionResult:
        """Go on from where `watch` was called, on a copy of the session."""
        if self._returned(self.vcpu.resume_run):
            while self._userspace_turn():
                pass
        return self._finish()

    def _userspace_turn(self) -> bool:
        """What userspace does before KVM_RUN, then KVM_RUN; False once the run is over."""
        vcpu = self.vcpu
        earlier = self.earlier_exits
        exits = earlier + vcpu.stats.exits
        for stop in [s for s in self.stops if s.due(exits, vcpu.cpu)]:
            self.stops.remove(stop)
            if stop.call is not None:
                _perform(stop.call, vcpu, self.log, self.pic)
                continue
            self._retire(vcpu)
            vcpu = self.vcpu = save_restore(vcpu, self.make)
            earlier = exits
        following = _next_exit(self.stops, exits)
        vcpu.stop_at_exit = following - earlier if following else 0
        injected = self.pic.pre_run(vcpu)
        if injected is not None:
            _record(vcpu, KVM_INTERRUPT, injected)
        self.rounds += 1
        budget = self.steps - (vcpu.cpu.work - self.start) - self.rounds
        return self._returned(lambda at_exit: vcpu.run(budget, at_exit))

    def _returned(self, kvm_run: Callable) -> bool:
        """KVM_RUN (`kvm_run(at_exit)`) returns: True if userspace goes on."""
        try:
            self.outcome = kvm_run(self._at_exit if self.watch is not None else None)
        except HostBug as e:
            self.log.host_bug, self.outcome = str(e), None
            return False
        outcome = self.outcome
        return outcome is not None and (outcome.reason is KvmExit.IRQ_WINDOW_OPEN
                                        or outcome.reason is KvmExit.INTR and bool(self.stops))

    def _at_exit(self) -> None:
        self.watch(self)

    def _retire(self, vcpu: Vcpu) -> None:
        """What the session keeps of a vCPU it is done with."""
        self.done.append(vcpu.stats)
        self.warnings += vcpu.warnings
        self.windowless = max(self.windowless, vcpu.ops.guest.longest_windowless)
        self.problems += vcpu.host_problems

    def _finish(self) -> SessionResult:
        vcpu = self.vcpu
        self._retire(vcpu)
        kvm = vcpu.kvm
        limit = kvm.notify_window + NOTIFY_THRESHOLD + DELIVERY_CYCLES if kvm.notify_enabled else None
        stop, error = _stop_of(vcpu, self.outcome) if self.log.host_bug is None else (None, None)
        return (vcpu.cpu, stop, tuple(self.done), error, tuple(self.warnings),
                HostTime(self.windowless, limit, tuple(self.problems)))


def _userspace_stops(scenario: Scenario, cpu: Cpu, resolve: Resolver) -> list[UserspaceStop]:
    """Save/restores first, then the VMM's calls in file order, sorted by exit."""
    stops = [UserspaceStop(h.exit, None, None) for h in scenario.host if h.event is HostEvent.SAVE_RESTORE]
    markers = []
    for step in scenario.vmm:
        if _on_the_vm(step):
            continue  # before KVM_CREATE_VCPU (_before_vcpus())
        marker = None
        if step.at is not None:
            marker = Scheduled(External.HOST_INTERRUPT, 0, None, resolve(step.at, step.line))
            markers.append(marker)
        stops.append(UserspaceStop(step.exit, marker, step))
    if markers:
        cpu.schedule(cpu.scheduled + markers)
    return sorted(stops, key=lambda s: s.exit if s.exit is not None else 0)


def _next_exit(stops: list[UserspaceStop], exits: int) -> int:
    """The VM exit after which KVM_RUN must return next (0: none)."""
    if any(s.marker is not None for s in stops):
        return exits + 1  # watching for the label: every exit returns to userspace
    later = [s.exit for s in stops if s.exit > exits]
    return min(later) if later else 0


def _perform(step: VmmStep, vcpu: Vcpu, log: VmmLog, pic: Pic) -> None:
    """One VMM call; the NMIs and INTR it makes arrive on bare metal where the guest stands
    now, and the states it sets hold there (before anything in flight, which a crafted state
    may not replace: scenario/vmm.py crafted_states()); the exceptions a debugger injects
    come after the event in flight. A result the documented uAPI does not allow is a host
    problem (a finding)."""
    cpu = vcpu.cpu
    here, flying = cpu.delivered, int(in_flight(vcpu))
    done = action(step.call, step.args).perform(vcpu, pic)
    log.happenings += [Happening(External.STATE, 0, cpu.retired, None, 0, here, state)
                       for state in done.states]
    log.happenings += [Happening(External.STATE, 0, cpu.retired, None, 0, here + flying,
                                 Forced(event=Event(vector, EventType.HW_EXCEPTION, 0)))
                       for vector in done.exceptions]
    if done.contract:
        vcpu.host_problems.append(done.contract)
    # After the call: a KVM_SET_VCPU_EVENTS drops a soft event in flight (GET hides it; the
    # instruction runs again), so the NMIs then come before it, as on bare metal.
    delivered = cpu.delivered + int(in_flight(vcpu))
    name = step.call + "".join(f" {k}={v:#x}" for k, v in step.args)
    _record(vcpu, name, done)
    log.nmis += [(cpu.retired, delivered)] * done.nmis
    log.happenings += [Happening(External.EXTINT, vector, cpu.retired, None, 0, delivered)
                       for vector in done.extints]


def _record(vcpu: Vcpu, name: str, done: Performed) -> None:
    cpu = vcpu.cpu
    cpu.trace.append(VmmRecord(name, done.result, cpu.retired, done.detail))


def _before_vcpus(scenario: Scenario, vm: Vm, cpu: Cpu) -> list[Performed]:
    """The VMM's calls on the VM before KVM_CREATE_VCPU ([[vmm]] with exit = 0)."""
    out = []
    for step in scenario.vmm:
        if _on_the_vm(step):
            done = action(step.call, step.args).perform_on_vm(vm)
            name = step.call + "".join(f" {k}={v:#x}" for k, v in step.args)
            cpu.trace.append(VmmRecord(name, done.result, cpu.retired, done.detail))
            out.append(done)
    return out


def _on_the_vm(step: VmmStep) -> bool:
    """KVM_ENABLE_CAP at exit 0 is made on the VM before KVM_CREATE_VCPU; any other call at
    exit 0 (an explored placement shrunk that far) before the first KVM_RUN."""
    return step.exit == 0 and step.call == KVM_ENABLE_CAP
def vendor_params(scenario: Scenario) -> tuple[dict, SvmParams, VmxParams]:
    """[kvm]: the module parameters and VM capabilities, as given."""
    params = dict(scenario.kvm_params)
    svm = SvmParams(nrips=params.get("nrips", True), vnmi=params.get("vnmi", False),
                    sev_es=params.get("sev_es", False), debug_swap=params.get("debug_swap", False),
                    vgif=params.get("vgif", True), nested=scenario.svm,
                    vmware_backdoor=params.get("vmware_backdoor", False),
                    npt=params.get("tdp", True))
    vmx = VmxParams(enable_vnmi=params.get("enable_vnmi", True),
                    intercept_db=params.get("intercept_db", True),
                    host_fred=params.get("host_fred", False), nested=scenario.vmx,
                    vmware_backdoor=params.get("vmware_backdoor", False),
                    ept=params.get("tdp", True))
    return params, svm, vmx


def enable_caps(vm: Vm, params: dict) -> None:
    """What QEMU does before KVM_CREATE_VCPU: the irqchip it asked for (KVM_CREATE_IRQCHIP,
    KVM_CAP_SPLIT_IRQCHIP, or none), notify exits if the host has them."""
    vm.irqchip = IrqChip(params.get("irqchip", IrqChip.KERNEL.value))
    mode = params.get("notify_vmexit", "disable")
    if mode == "disable" or not vm.has_notify_vmexit:  # KVM_CHECK_EXTENSION says no: skip
        return
    flags = NotifyFlag.ENABLED | (NotifyFlag.USER if mode == "internal-error" else 0)
    vm.enable_cap(Cap.X86_NOTIFY_VMEXIT, params.get("notify_window", 0) << 32 | flags)


def _stop_of(vcpu: Vcpu, outcome) -> tuple[str | None, str | None]:
    """Turn KVM_RUN's last exit into the bare-metal stop it stands for."""
    cpu = vcpu.cpu
    vcpu.ops.sync_guest_state_to_core()
    cpu.nmi_blocked = vcpu.ops.get_nmi_mask()
    if outcome is None:
        return "budget", None
    if outcome.reason is KvmExit.HLT:
        cpu.halted = True
        return "halted", None
    if outcome.reason is KvmExit.SHUTDOWN:
        if not cpu.shutdown:  # KVM merged a fault onto a queued #DF: no core-level record
            first, second = vcpu.triple_fault_cause
            cpu.trace.append(Shutdown(cpu.rip, cpu.retired, first, second))
            cpu.shutdown = True
        return "shutdown", None
    if outcome.reason is KvmExit.NOTIFY:
        # QEMU (kvm_arch_handle_exit) stops the VM on KVM_EXIT_NOTIFY: userspace asked
        # for it (notify-vmexit=internal-error) or the VM context is invalid.
        why = ("the VM context is invalid" if outcome.flags & KVM_NOTIFY_CONTEXT_INVALID
               else "notify-vmexit=internal-error")
        cpu.trace.append(VmmStop("KVM_EXIT_NOTIFY", outcome.flags, cpu.retired, why))
        return "vmm", None
    return None, f"KVM_RUN returned KVM_EXIT_{outcome.reason.name}: {outcome.detail}"
