"""Run one scenario on the bare-metal model and judge it against its expectations."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from kvmodel._util.records import replacer
from kvmodel.arch.apic import IcrDeliveryMode
from kvmodel.arch.cpu import Cpu, External, Scheduled, Stop
from kvmodel.arch.events import EventType, Vec, vector_name
from kvmodel.arch.fred import FredMsrs
from kvmodel.arch.machine import ChoicePoint, Interleaving, Machine, Position
from kvmodel.arch.observe import ArrivalFate, Delivery, Observation
from kvmodel.arch.regs import BOOT_CR3, GPR32, GPR64, RSP, Mode
from kvmodel.errors import ModelLimit, ScenarioError
from kvmodel.guest.asm import Bits, Program, assemble
from kvmodel.guest.layout import CODE_BASE, PAGE, STACK_TOP, Gate, build_cpu, copier
from kvmodel.guest.layout import Machine as Layout
from kvmodel.hw.svm.root import SvmRoot
from kvmodel.hw.vmx.root import VmxRoot
from kvmodel.kvm import lapic
from kvmodel.kvm.uapi import KvmExit
from kvmodel.kvm.vcpu import Vendor, create_vcpu, create_vm
from kvmodel.kvm.x86 import MpState, Stats, UserspaceExit, Vcpu
from kvmodel.scenario.schema import (
    Expected,
    ExpectedDelivery,
    Expr,
    Happening,
    HostEvent,
    Scenario,
    word,
)
from kvmodel.scenario.session import (
    HostTime,
    KvmSession,
    SessionResult,
    VmmLog,
    enable_caps,
    vendor_params,
)

_EXPR = re.compile(r"^([A-Za-z_.$][\w.$]*)(?:([+-])(0x[0-9a-fA-F]+|\d+))?$")


@dataclass(frozen=True, slots=True)
class Final:
    """Architectural state when the run stopped."""

    registers: tuple[tuple[str, int], ...]
    rip: int
    rflags: int
    cr2: int
    dr6: int
    dr7: int
    retired: int
    halted: bool
    shutdown: bool
    nmi_blocked: bool
    stop: str

    def value(self, key: str) -> int | bool | str:
        return dict(self.registers).get(key, getattr(self, key, None))


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One expectation that does not hold, with the line that stated it."""

    line: int
    message: str


@dataclass(frozen=True, slots=True)
class RunResult:
    scenario: Scenario
    program: Program
    trace: tuple[Observation, ...]
    final: Final | None
    mismatches: tuple[Mismatch, ...]
    limit: str | None  # the model stopped: the guest left what it covers
    vendor: Vendor = Vendor.BARE
    memory: bytes | bytearray = b""  # the guest's memory at the end (the run's own, not a copy)
    stats: tuple[Stats, ...] = ()  # one per vCPU (a save/restore makes a new one)
    hypervisor_error: str | None = None  # KVM gave up: failed entry, internal error
    warnings: tuple[str, ...] = ()  # KVM WARN_ON()s reached
    host: HostTime | None = None  # how long the guest held the CPU (under a hypervisor)
    apic_used: bool = False  # the guest used the x2APIC's MSRs
    vmm_nmis: tuple[tuple[int, int], ...] = ()  # (retired, delivered) of each NMI the VMM made
    # bare metal's counterparts of the VMM's calls other than NMIs: crafted event states and
    # a debugger's #DB/#BP (External.STATE) and the 8259's vectors on INTR (External.EXTINT)
    vmm_happenings: tuple[Happening, ...] = ()
    host_bug: str | None = None  # KVM reached a BUG_ON(): the host died, the run ended there
    cpu_of: tuple[int, ...] = ()  # several CPUs: the CPU of each trace entry (empty: one CPU)
    smp: SmpRun | None = None  # several CPUs: how the run was interleaved

    @property
    def passed(self) -> bool:
        return (not self.mismatches and self.limit is None and self.hypervisor_error is None
                and self.host_bug is None)

    @property
    def deliveries(self) -> tuple[Delivery, ...]:
        return tuple(o for o in self.trace if isinstance(o, Delivery))


@dataclass(frozen=True, slots=True)
class SmpRun:
    """How the CPUs of a several-CPU run were interleaved (arch/machine.py)."""

    points: tuple[ChoicePoint, ...]  # where the schedule could have switched
    steps: int  # steps of all CPUs
    shared: frozenset[int]  # cache lines one CPU wrote and another touched
    finals: tuple[Final, ...] = ()  # every CPU's final state, CPU 0 first
    ahead: frozenset[Position] = frozenset()  # positions on a CPU's way to an IPI (machine.py)


class Resolver:
    """Turns the scenario's address expressions into numbers with the assembled labels.

    A label is an offset in the code segment (what RIP holds and the guest's
    `$label` gives), also in [registers]; `linear()` is for the places that
    name memory: pages and memory expectations. They differ by `[cpu] cs_base`
    only.
    """

    def __init__(self, scenario: Scenario, program: Program):
        self.scenario = scenario
        self.program = program
        self.labels = dict(program.symbols)
        self.highest = word(scenario.mode)

    def __call__(self, expr: Expr, line: int) -> int:
        if isinstance(expr, int):
            return expr
        m = _EXPR.match(expr)
        if m is None or m.group(1) not in self.labels:
            name = m.group(1) if m else expr
            close = [s for s in self.labels if s.lower() == name.lower()]
            hint = f'did you mean "{close[0]}"?' if close else "labels: " + ", ".join(
                sorted(self.labels)[:12])
            raise ScenarioError(self.scenario.path, line, f'unknown label "{name}"', hint)
        offset = int(m.group(3), 0) if m.group(3) else 0
        value = self.labels[m.group(1)] + (-offset if m.group(2) == "-" else offset)
        if not 0 <= value <= self.highest:
            raise ScenarioError(self.scenario.path, line, f"{expr} is {value:#x}, outside "
                                f"[0, {self.highest:#x}] ({self.scenario.mode.name.lower()})")
        return value

    def linear(self, expr: Expr, line: int) -> int:
        """The linear address of a number (as is) or a label (in the code segment)."""
        return expr if isinstance(expr, int) else self.scenario.cs_base + self(expr, line)


def prepare(scenario: Scenario, *, record_instructions: bool = False) -> tuple[Cpu, Program]:
    """Assemble the guest and build the CPU at its entry point, events scheduled."""
    cpu, program, resolve = _build(scenario, record_instructions)
    _schedule(cpu, scenario, resolve)
    return cpu, program


class Prepared:
    """A scenario's CPU at reset, built once and copied for each run of its schedules.

    Every run given to it must be of the same scenario, up to its happenings
    and host events (what check/schedule.py's apply() changes). A run's memory
    handed back with recycle() is reused by a later copy.
    """

    def __init__(self, scenario: Scenario):
        self.cpu, self.program, self.resolve = _build(scenario, False, roots=False)
        self.copy = copier(self.cpu)
        self.spare: list[bytearray] = []

    def prepare(self, scenario: Scenario) -> tuple[Cpu, Program]:
        if self.copy is None:
            return prepare(scenario)
        cpu = self.copy(self.spare.pop() if self.spare else None)
        _attach_roots(cpu, scenario)  # a root refers to its CPU: made afresh for each copy
        _schedule(cpu, scenario, self.resolve)
        return cpu, self.program

    def recycle(self, memory: bytes | bytearray) -> None:
        """A finished run's memory, which nothing refers to any more."""
        if isinstance(memory, bytearray) and len(memory) == len(self.cpu.mem) and len(self.spare) < 2:
            self.spare.append(memory)


class PreparedMachine:
    """A [cpus] scenario's CPUs at reset, built once and copied for each interleaving run
    (Prepared for several CPUs: they share one memory). Every run given to it must be of
    the same scenario; a CPU that is not plain data (an L1's root) is built afresh instead."""

    def __init__(self, scenario: Scenario):
        self.cpus, self.program, self.resolve = _build_machine(scenario, False)
        copiers = [copier(cpu) for cpu in self.cpus]
        self.copiers = None if any(c is None for c in copiers) else copiers

    @property
    def memory(self) -> bytearray:
        """The memory at reset."""
        return self.cpus[0].mem

    def machine(self, scenario: Scenario) -> list[Cpu]:
        """Fresh CPUs at reset for one run of `scenario`, on a fresh copy of the memory."""
        if self.copiers is None:
            return _build_machine(scenario, False)[0]
        first = self.copiers[0]()
        return [first] + [copy(first.mem) for copy in self.copiers[1:]]


def _build(scenario: Scenario, record_instructions: bool,
           roots: bool = True) -> tuple[Cpu, Program, Resolver]:
    program = assemble(scenario.code, Bits(scenario.mode.value), CODE_BASE - scenario.cs_base,
                       filename=scenario.path, line_offset=scenario.code_line,
                       defines=(("CS_BASE", scenario.cs_base), ("BOOT_CR3", BOOT_CR3)),
                       folder=scenario.folder,
                       max_image=max(scenario.memory_size - CODE_BASE, 0))
    resolve = Resolver(scenario, program)
    names = GPR64 if scenario.mode is Mode.LONG64 else GPR32
    machine = Layout(
        mode=scenario.mode,
        image=program.image,
        base=CODE_BASE,
        cs_base=scenario.cs_base,
        entry=resolve(scenario.entry, scenario.code_line),
        gates=tuple((g.vector, Gate(resolve(g.handler, g.line), g.kind, g.ist, g.present,
                                    g.selector, g.dpl)) for g in scenario.gates),
        ist=tuple((k, resolve(top, line)) for k, top, line in scenario.ist),
        registers=tuple((names.index(n), resolve(v, line)) for n, v, line in scenario.registers),
        rflags=scenario.rflags,
        idt_limit=scenario.idt_limit,
        idt_base=scenario.idt_base,
        memory_size=scenario.memory_size,
        not_present=frozenset(resolve.linear(p, line) // PAGE for p, line in scenario.not_present),
        sti_blocks_nmi=scenario.sti_blocks_nmi,
        fred=_fred_msrs(scenario, resolve),
        tasks=tuple({g.selector: resolve(g.task, g.line) for g in scenario.gates
                     if g.task is not None}.items()),
    )
    if CODE_BASE + len(program.image) > scenario.memory_size:
        raise ScenarioError(scenario.path, scenario.code_line,
                            "the guest does not fit in memory", "raise [cpu] memory_kib")
    cpu = build_cpu(machine, record_instructions=record_instructions)
    if scenario.cr3 is not None:
        cpu.enable_paging(resolve(*scenario.cr3))
    if roots:
        _attach_roots(cpu, scenario)
    return cpu, program, resolve


def _attach_roots(cpu: Cpu, scenario: Scenario) -> None:
    if scenario.vmx:
        VmxRoot(cpu)  # L1 runs its VMX instructions on the hardware model
    if scenario.svm:
        SvmRoot(cpu)  # L1 runs VMRUN on the hardware model


def _schedule(cpu: Cpu, scenario: Scenario, resolve: Resolver) -> None:
    cpu.schedule([Scheduled(h.event, h.vector, h.after,
                            resolve(h.at, h.line) if h.at is not None else None, h.delivered,
                            h.state)
                  for h in scenario.happenings])


def _fred_msrs(scenario: Scenario, resolve: Resolver) -> FredMsrs | None:
    spec = scenario.fred
    if spec is None:
        return None
    entry = resolve(spec.entry, spec.line)
    if entry & 0xFFF:
        raise ScenarioError(scenario.path, spec.line, f"[fred] entry {entry:#x} is not 4 KiB "
                            "aligned (IA32_FRED_CONFIG bits 11:0 are not the entry point)",
                            "put `.balign 4096` before the label")
    config = entry | (spec.interrupt_level << 9) | (spec.redzone << 6)
    stklvls = sum(level << (2 * vector) for vector, level in spec.stack_levels)
    rsp = dict((k, resolve(top, spec.line)) for k, top in spec.rsp)
    return FredMsrs(config, stklvls, (0, rsp.get(1, 0), rsp.get(2, 0), rsp.get(3, 0)))


def run(scenario: Scenario, *, vendor: Vendor | None = None, record_instructions: bool = False,
        max_steps: int | None = None, prepared: Prepared | None = None,
        expectations: bool = True, amd: bool = False,
        watch: Callable[[KvmSession], None] | None = None) -> RunResult:
    """Run on bare metal, or under KVM on SVM or VMX; judge the file's expectations.

    `prepared`: the scenario's CPU at reset, built before (not with record_instructions).
    `expectations`: False leaves `mismatches` empty (the explorer judges against bare metal).
    `amd`: bare metal is an AMD CPU (the counterpart of a run under KVM on SVM; also with
    `[cpu] vendor = "svm"` or `svm = true`), for what differs by vendor (deliver.ext_bit()).
    `watch`: under KVM, the session's (scenario/session.py).
    """
    vendor = vendor or Vendor(scenario.vendor)
    if scenario.cpus is not None:
        return run_machine(scenario, vendor=vendor, record_instructions=record_instructions,
                           max_steps=max_steps, expectations=expectations)
    if vendor is Vendor.BARE and scenario.vmm:
        # Bare metal has no VMM: it gets the counterpart of the script, from where the
        # VMM acted in a run under the scenario's hypervisor.
        virt = run(scenario, vendor=vmm_host(scenario), max_steps=max_steps, expectations=False)
        scenario = bare_counterpart(scenario, virt.vmm_nmis, virt.vmm_happenings)
    if prepared is not None and not record_instructions:
        cpu, program = prepared.prepare(scenario)
    else:
        cpu, program = prepare(scenario, record_instructions=record_instructions)
    steps = max_steps or scenario.max_steps
    if vendor is not Vendor.BARE:
        log = VmmLog()

        def go() -> SessionResult:
            session = KvmSession(scenario, Resolver(scenario, program), cpu, vendor, steps, log)
            session.watch = watch
            return session.run()

        return _under_kvm(scenario, program, cpu, vendor, log, expectations, go)
    limit = None
    # bare metal has no forced emulation prefix: it runs the instruction behind it
    cpu.fep_is_prefix = dict(scenario.kvm_params).get("force_emulation_prefix", False)
    cpu.amd_ext = scenario.svm or (  # a VMX L1 runs on an Intel CPU only
        (amd or scenario.vendor == "svm") and not scenario.vmx)
    try:
        stop = _run_bare(cpu, scenario, steps).name.lower()
    except ModelLimit as e:
        limit, stop = str(e), None
    return _result(scenario, program, cpu, stop, limit, expectations)


def resume(session: KvmSession, scenario: Scenario, program: Program) -> RunResult:
    """The run of `scenario` under KVM, from a copy of another run's session taken where the
    two cannot yet differ (check/resume.py); judged against bare metal only."""
    session.scenario = scenario
    return _under_kvm(scenario, program, session.first_cpu, session.vendor, session.log, False,
                      session.resume)


def _under_kvm(scenario: Scenario, program: Program, cpu: Cpu, vendor: Vendor, log: VmmLog,
               expectations: bool, go: Callable[[], SessionResult]) -> RunResult:
    """`go` runs the session; `cpu` is what a model limit reports (the first vCPU's)."""
    try:
        cpu, stop, stats, error, warnings, host = go()
    except ModelLimit as e:
        return _result(scenario, program, cpu, None, str(e), expectations, vendor, log=log)
    return _result(scenario, program, cpu, stop, None, expectations, vendor, stats, error,
                   warnings, host, log, log.host_bug)


def _result(scenario: Scenario, program: Program, cpu: Cpu, stop: str | None, limit: str | None,
            expectations: bool, vendor: Vendor = Vendor.BARE, stats: tuple[Stats, ...] = (),
            error: str | None = None, warnings: tuple[str, ...] = (), host: HostTime | None = None,
            log: VmmLog | None = None, bug: str | None = None) -> RunResult:
    final = _final(cpu, stop, scenario.mode) if stop is not None else None
    mismatches = []
    if final is not None and expectations:
        mismatches = judge(scenario, program, cpu, final) + _judge_stats(scenario, vendor, stats)
    nmis, happenings = (tuple(log.nmis), tuple(log.happenings)) if log is not None else ((), ())
    return RunResult(scenario, program, tuple(cpu.trace), final, tuple(mismatches), limit,
                     vendor, cpu.mem, stats, error, warnings, host, cpu.apic.used,
                     nmis, happenings, bug)


def run_machine(scenario: Scenario, *, vendor: Vendor = Vendor.BARE, record_instructions: bool = False,
                max_steps: int | None = None, expectations: bool = True,
                schedule: Interleaving = (), shared: frozenset[int] = frozenset(),
                ahead: frozenset[Position] = frozenset(), reduce: bool = True,
                prepared: PreparedMachine | None = None) -> RunResult:
    """Several CPUs ([cpus]) on bare metal, or as vCPUs under KVM, interleaved by `schedule`
    (arch/machine.py);
    `shared`: the cache lines earlier runs found shared, where the schedule may switch;
    `ahead`: the positions earlier runs found on a CPU's way to an IPI (likewise);
    `reduce`: False switches anywhere (arch/machine.py);
    `prepared`: the scenario's CPUs at reset, built before (not with record_instructions)."""
    if prepared is not None and not record_instructions:
        cpus, program, resolve = prepared.machine(scenario), prepared.program, prepared.resolve
    else:
        cpus, program, resolve = _build_machine(scenario, record_instructions)
    cpu = cpus[0]
    _schedule(cpu, scenario, resolve)  # external events reach the bootstrap CPU
    limit = error = None
    final = None
    machine = None
    stats: tuple[Stats, ...] = ()
    warnings: tuple[str, ...] = ()
    steps = max_steps or scenario.max_steps
    try:
        if vendor is Vendor.BARE:
            machine = Machine(cpus, shared=shared, ahead=ahead, schedule=schedule, reduce=reduce,
                              step=lambda core: _run_bare(core, scenario, 1))
            stop = machine.run(steps).name.lower()
        else:
            vcpus = _create_vcpus(scenario, cpus, vendor, resolve)
            machine = Machine(cpus, shared=shared, ahead=ahead, schedule=schedule,
                              reduce=reduce)
            stop, error = _run_vcpus(machine, vcpus, steps)
            stats = tuple(v.stats for v in vcpus)
            warnings = tuple(w for v in vcpus for w in v.warnings)
        if stop is not None:
            final = _final(cpu, stop, scenario.mode)
    except ModelLimit as e:
        limit = str(e)
    mismatches = []
    if final is not None and expectations:
        mismatches = judge(scenario, program, cpu, final, others=tuple(cpus[1:]))
        mismatches += _judge_stats(scenario, vendor, stats)
    trace, cpu_of, smp = tuple(cpu.trace), (), None
    if machine is not None:
        trace, cpu_of = tuple(machine.trace), tuple(machine.cpu_of)
        finals = tuple(_final(c, final.stop, scenario.mode) for c in cpus) if final else ()
        smp = SmpRun(tuple(machine.points), machine.steps, machine.discovered(), finals,
                     frozenset(machine.ahead_found))
    return RunResult(scenario, program, trace, final, tuple(mismatches), limit, vendor, cpu.mem,
                     stats, error, warnings, apic_used=any(c.apic.used for c in cpus),
                     cpu_of=cpu_of, smp=smp)


def _create_vcpus(scenario: Scenario, cpus: list[Cpu], vendor: Vendor,
                  resolve: Resolver) -> list[Vcpu]:
    """One VM, a vCPU per CPU (KVM_CREATE_VCPU in CPU order), set up as for one vCPU.

    Pages missing from EPT/NPT (host_fault) are missing for every vCPU; each vCPU faults
    a page in on its own first touch (the model keeps the map per vCPU: a second fault is
    host time only, nothing the guest sees)."""
    other_host = [h for h in scenario.host if h.event is not HostEvent.FAULT]
    if other_host or scenario.vmm or scenario.svm:
        raise ModelLimit("several vCPUs with host interrupts, NMIs or save/restores, a VMM "
                         "script or nested SVM are not modelled yet", cpus[0].rip)
    unmapped = {resolve.linear(h.page, h.line) // PAGE for h in scenario.host}
    for core in cpus:
        core.set_host_unmapped(set(unmapped))
    params, svm, vmx = vendor_params(scenario)
    vm = create_vm(vendor)
    enable_caps(vm, params)
    vcpus = [create_vcpu(core, vendor, svm=svm, vmx=vmx, vm=vm) for core in cpus]
    for n, vcpu in enumerate(vcpus):
        vcpu.bsp = n == 0
        if vcpu.cpu.wait_for_sipi:  # an AP as QEMU creates it: waiting for INIT (kvm/lapic.py)
            vcpu.cpu.wait_for_sipi = False
            vcpu.mp_state = MpState.UNINITIALIZED
    return vcpus


def _run_vcpus(machine: Machine, vcpus: list[Vcpu], steps: int) -> tuple[str | None, str | None]:
    """Each vCPU's KVM_RUN loop in a thread of the machine's (arch/machine.py run_threads()):
    a halted vCPU blocks in vcpu_block() until an IPI kicks it, or nothing can run."""
    outcomes: list[UserspaceExit | None] = [None] * len(vcpus)

    def body(n: int):
        def kvm_run() -> None:
            outcomes[n] = vcpus[n].run(steps)
        return kvm_run

    def can_run(vcpu: Vcpu):
        def runnable() -> bool:  # kvm_arch_vcpu_runnable()
            if vcpu.cpu.shutdown:
                return False
            if vcpu.mp_state is MpState.RUNNABLE:
                return True
            if lapic.has_pending_init_or_sipi(vcpu) and lapic.init_sipi_allowed(vcpu):
                return True  # kvm_vcpu_has_events()
            return vcpu.mp_state is MpState.HALTED and vcpu.has_events()
        return runnable

    def init_sipi(n: int, mode: IcrDeliveryMode, vector: int) -> ArrivalFate:
        if mode is IcrDeliveryMode.INIT:
            return lapic.accept_init(vcpus[n])
        return lapic.accept_sipi(vcpus[n], vector)

    machine.on_init_sipi = init_sipi
    stop = machine.run_threads([body(n) for n in range(len(vcpus))],
                               [can_run(v) for v in vcpus], steps)
    errors = []
    for vcpu, outcome in zip(vcpus, outcomes, strict=True):
        vcpu.ops.sync_guest_state_to_core()
        vcpu.cpu.nmi_blocked = vcpu.ops.get_nmi_mask()
        vcpu.cpu.halted = vcpu.mp_state is MpState.HALTED
        vcpu.cpu.wait_for_sipi = vcpu.mp_state in (MpState.UNINITIALIZED, MpState.INIT_RECEIVED)
        if outcome is not None and outcome.reason is KvmExit.SHUTDOWN:
            vcpu.cpu.shutdown = True
        elif outcome is not None and outcome.reason is not KvmExit.HLT:
            errors.append(f"KVM_RUN returned KVM_EXIT_{outcome.reason.name}: {outcome.detail}")
    if errors:
        return None, errors[0]
    return stop.name.lower(), None


def _build_machine(scenario: Scenario, record_instructions: bool
                   ) -> tuple[list[Cpu], Program, Resolver]:
    """CPU 0 as for one CPU; the others on its memory, at their entries or waiting for a SIPI."""
    spec = scenario.cpus
    cpu, program, resolve = _build(scenario, record_instructions)
    cpus = [cpu]
    entries = [resolve(e, spec.line) for e in spec.entries]
    stacks = [resolve(r, spec.line) for r in spec.rsp]
    for n in range(1, spec.count):
        other = replace(scenario, entry=spec.entries[n] if n < len(entries) else scenario.entry,
                        cpus=None)
        core, _, _ = _build(other, record_instructions)
        core.mem = cpu.mem
        if n >= len(entries):
            core.wait_for_sipi = True  # started by INIT and SIPI (arch/machine.py)
        cpus.append(core)
    if entries:
        cpu.rip = entries[0]
    for n, core in enumerate(cpus):
        core.regs[RSP] = stacks[n] if n < len(stacks) else cpu_stack_top(n)
    return cpus, program, resolve


def cpu_stack_top(n: int) -> int:
    """CPU n's initial stack top without `[cpus] rsp`: 8 KiB below the one before."""
    return STACK_TOP - n * 0x2000


_for_bare_metal = replacer(Scenario, "happenings", "vmm")


def bare_counterpart(scenario: Scenario, nmis: tuple[tuple[int, int], ...],
                     happenings: tuple[Happening, ...] = ()) -> Scenario:
    """The scenario for bare metal: no VMM; the CPU put in each state a crafted
    KVM_SET_VCPU_EVENTS set and the 8259's vectors on INTR, where the VMM acted
    (`happenings`, first); and an NMI for each one the VMM's calls made arrive, after
    (retired, delivered) as the guest stood where the VMM acted."""
    if not (nmis or happenings or scenario.vmm):
        return scenario
    arrivals = tuple(Happening(External.NMI, Vec.NMI, after, None, 0, delivered)
                     for after, delivered in nmis)
    return _for_bare_metal(scenario, scenario.happenings + happenings + arrivals, ())


def _run_bare(cpu: Cpu, scenario: Scenario, steps: int) -> Stop:
    """An L1 hypervisor's VM exits return to it inside the root's run loop."""
    if scenario.vmx:
        return cpu.vmx.run(cpu, steps)
    if scenario.svm:
        return cpu.svm.run(cpu, steps)
    return cpu.run(steps)


def vmm_host(scenario: Scenario) -> Vendor:
    """The hypervisor whose VMM script bare metal mirrors: the one the scenario names, else
    the one its L1 or its guest needs (a VMX L1 or FRED: VMX), else SVM."""
    if scenario.vendor != "bare":
        return Vendor(scenario.vendor)
    return Vendor.VMX if scenario.vmx or scenario.fred is not None else Vendor.SVM


def _final(cpu: Cpu, stop: str, mode: Mode) -> Final:
    names = GPR64 if mode is Mode.LONG64 else GPR32
    return Final(
        registers=tuple(zip(names, cpu.regs, strict=True)),
        rip=cpu.rip, rflags=cpu.rflags, cr2=cpu.cr2, dr6=cpu.dr6, dr7=cpu.dr7,
        retired=cpu.retired, halted=cpu.halted, shutdown=cpu.shutdown,
        nmi_blocked=cpu.nmi_blocked, stop=stop,
    )


# -- judging ------------------------------------------------------------------------

def judge(scenario: Scenario, program: Program, cpu: Cpu, final: Final,
          others: tuple[Cpu, ...] = ()) -> list[Mismatch]:
    """`others`: CPUs 1.. of several ([cpus]); deliveries are judged per CPU."""
    resolve = Resolver(scenario, program)
    out: list[Mismatch] = []
    if scenario.deliveries is not None:
        # The type is what the core delivered; under KVM it is what KVM injected,
        # which the guest cannot see (INT1 comes back as a hardware #DB).
        bare = cpu.host is None
        for n, core in enumerate((cpu, *others)):
            deliveries = [o for o in core.trace if isinstance(o, Delivery)]
            expected = tuple(e for e in scenario.deliveries if e.cpu == n)
            found = _judge_deliveries(expected, deliveries, program, resolve, bare)
            out += [Mismatch(m.line, f"cpu {n}: {m.message}") for m in found] if others else found
    for key, expected in scenario.final:
        out += _judge_final(key, expected, final, resolve)
    size = 8 if scenario.mode is Mode.LONG64 else 4
    for where, expected in scenario.memory:
        addr = resolve.linear(where, expected.line)
        got = int.from_bytes(cpu.mem[addr:addr + size], "little")
        if got != expected.value:
            where = program.where(addr - scenario.cs_base)
            out.append(Mismatch(expected.line, f"memory at {where}: expected "
                                f"{expected.value:#x}, got {got:#x}"))
    return out


def describe(d: Delivery, program: Program) -> str:
    """"#PF (hw_exception, error code 0x2) returning to main+0x3 after 4 retired"."""
    parts = [d.type.name.lower()]
    if d.error_code is not None:
        parts.append(f"error code {d.error_code:#x}")
    undefined = " (undefined)" if d.return_undefined else ""
    return (f"{vector_name(d.vector)} ({', '.join(parts)}) returning to "
            f"{program.where(d.return_rip)}{undefined} after {d.retired} retired")


def _describe_expected(e: ExpectedDelivery, resolve: Resolver) -> str:
    parts = [vector_name(e.vector)]
    if e.type is not None:
        parts.append(f"type {e.type.name.lower()}")
    if e.error_code is not None:
        parts.append(f"error code {e.error_code:#x}")
    if e.return_rip is not None:
        parts.append(f"returning to {e.return_rip}")
    if e.retired is not None:
        parts.append(f"after {e.retired} retired")
    return " ".join(parts)


def _judge_stats(scenario: Scenario, vendor: Vendor, stats: tuple[Stats, ...]) -> list[Mismatch]:
    out = []
    for expected in scenario.stats:
        if expected.vendor != vendor.value:
            continue
        for name, want in expected.counts:
            got = sum(getattr(st, name) for st in stats)
            if got != want:
                out.append(Mismatch(expected.line, f"KVM stat {name} on {vendor.value}: "
                                    f"expected {want}, got {got}"))
    return out


def _judge_deliveries(expected: tuple[ExpectedDelivery, ...], got: list[Delivery],
                      program: Program, resolve: Resolver, check_type: bool) -> list[Mismatch]:
    out = []
    storm = bool(expected) and expected[-1].repeats
    for n in range(max(len(expected), len(got))):
        e = expected[n] if n < len(expected) else (expected[-1] if storm else None)
        d = got[n] if n < len(got) else None
        if e is None:
            line = expected[-1].line if expected else 1
            out.append(Mismatch(line, f"delivery {n + 1}: unexpected {describe(d, program)}"))
            continue
        if d is None:
            out.append(Mismatch(e.line, f"delivery {n + 1}: expected "
                                f"{_describe_expected(e, resolve)}, but there was none"))
            continue
        wrong = _delivery_differences(e, d, program, resolve, check_type)
        if wrong:
            out.append(Mismatch(e.line, f"delivery {n + 1}: {'; '.join(wrong)} "
                                f"(got {describe(d, program)})"))
    return out


def _delivery_differences(e: ExpectedDelivery, d: Delivery, program: Program,
                          resolve: Resolver, check_type: bool) -> list[str]:
    wrong = []
    if e.vector != d.vector:
        wrong.append(f"expected vector {vector_name(e.vector)}, got {vector_name(d.vector)}")
    if check_type and e.type is not None and e.type is not EventType(d.type):
        wrong.append(f"expected type {e.type.name.lower()}, got {d.type.name.lower()}")
    if e.error_code is not None and e.error_code != d.error_code:
        got = "none" if d.error_code is None else f"{d.error_code:#x}"
        wrong.append(f"expected error code {e.error_code:#x}, got {got}")
    if e.return_rip is not None and resolve(e.return_rip, e.line) != d.return_rip:
        wrong.append(f"expected return to {e.return_rip}, got {program.where(d.return_rip)}")
    if e.retired is not None and e.retired != d.retired:
        wrong.append(f"expected after {e.retired} retired, got {d.retired}")
    return wrong


def _judge_final(key: str, expected: Expected, final: Final, resolve: Resolver) -> list[Mismatch]:
    got = final.value(key)
    want = expected.value
    if isinstance(want, bool) or key == "stop":
        ok = got == want
    else:
        want = resolve(want, expected.line)
        ok = got == want
    if ok:
        return []
    show = (lambda v: f"{v:#x}") if isinstance(got, int) and not isinstance(got, bool) else repr
    return [Mismatch(expected.line, f"final {key}: expected {show(want)}, got {show(got)}")]
