"""Several CPUs sharing one guest memory: IPIs, INIT and SIPI, and their interleaving.

Each CPU keeps its own registers, local APIC (x2APIC ID n for CPU n) and
decoded-instruction cache; the bytearray of guest memory is one. An x2APIC
ICR write that names another CPU comes here (SDM 10.6.1, 10.12.9): fixed
interrupts land in the target's IRR, NMIs on its NMI pin, INIT puts it in
wait-for-SIPI (SDM 10.4.7.3; in VMX operation it is held or a VM exit, SDM
24.8, 25.2: hw/vmx) and a SIPI starts a CPU waiting for one at the
vector's page (SDM 8.4.4.1, 10.6.1 "Start-Up"). A write by one CPU to code
another has decoded drops the other's decoded instructions: the other sees
the new bytes at its next fetch (cross-modifying code, SDM 8.1.3: without a
serializing instruction the other CPU may see either; the model picks one).

DEVIATION: a SIPI starts the CPU in the scenario's mode (64-bit or 32-bit
flat, paging as the bootstrap CPU's, IDTR the shared IDT) at RIP = vector << 12
(in the code segment), RFLAGS = 2 and every general register 0; real hardware
starts it in real mode at CS = vector << 8, IP = 0.

The interleaving. CPUs run one at a time, an instruction (with the
deliveries before it) per step. A step *interacts* when it writes the ICR
(an IPI), or touches a cache line that another CPU writes and this one
touches, or the other way round (fetches count as reads). Only after such a
step, at the start, or while another CPU is on its way to an ICR write may
the schedule switch to another CPU (a choice point): other steps interact
with nobody and commute, so the order among them cannot change any outcome.
Without a switch, the CPU goes on; a CPU that halts, waits for a SIPI or has
had QUANTUM steps in a row hands over round-robin (not a choice).

"On its way to an ICR write": its next instruction writes the ICR, or it is
at a position (`ahead`) from which, in an earlier run, it went on to write
the ICR without depending on another CPU in between (no interaction, no
IPI arrived). The IPI is dependent on every step of its targets (it may
reach them at any boundary), so a switch before any of their steps must be
open; and the switches are bounded, so waiting until the sender's next
instruction is the WRMSR is not enough: reaching "target at boundary i,
sender at its WRMSR" then costs two switches more than a schedule with a
choice point at every step spends (issue 22). This is the persistent-set
idea (Godefroid 1996, LNCS 1032, ch. 4) with the sender's whole way to its
IPI in the dependence, as preemption bounding needs (Coons, Musuvathi,
McKinley: "Bounded partial-order reduction", OOPSLA 2013): the running CPU's
own way counts only in a turn it got because the last one's QUANTUM ran out
(blocks that end by QUANTUM cannot be merged for free). The lines shared
(`shared`) and the positions on the way to an IPI (`ahead`) are learnt from
earlier runs: the explorer runs again with what a run discovered until
nothing new shows (check/interleave.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvmodel.arch.apic import IcrDeliveryMode, Ipi, X2ApicMsr
from kvmodel.arch.cpu import LINE_SHIFT, Cpu, External, Stop
from kvmodel.arch.events import Vec
from kvmodel.arch.faults import Access
from kvmodel.arch.observe import Arrival, ArrivalFate, Observation
from kvmodel.arch.regs import DR6_RESET, DR7_RESET, RCX, RFLAGS_FIXED, Shadow
from kvmodel.errors import ModelLimit

QUANTUM = 64  # steps a CPU runs without interacting before the next one gets a turn
MAX_CPUS = 4
WRMSR = b"\x0f\x30"
THREAD_TIMEOUT = 600.0  # seconds: a CPU's thread that is still alive then is a kvmodel bug


class _Stopped(BaseException):  # noqa: N818 - not an error: the machine stopped
    """Unwinds a CPU's thread when the machine stops (BaseException: no model code catches it)."""


@dataclass(frozen=True, slots=True, order=True)
class Switch:
    """After the `at`-th choice point (1-based), CPU `cpu` runs next."""

    at: int
    cpu: int


Interleaving = tuple[Switch, ...]
Position = tuple[int, int, bool]  # a CPU, its RIP, whether it is halted or has an event waiting


@dataclass(frozen=True, slots=True)
class ChoicePoint:
    """Where a schedule could switch: the CPU that just ran, the one that goes on without a
    switch, and who could run next."""

    ran: int
    default: int | None
    runnable: tuple[int, ...]


class _Fetches(dict):
    """A CPU's decoded instructions that tell the machine of every fetch."""

    __slots__ = ("machine", "index")

    def get(self, rip, default=None):
        self.machine.fetched(self.index, rip)
        return dict.get(self, rip, default)


class Machine:
    """CPUs 0..n-1 on one memory; CPU 0 is the bootstrap processor."""

    def __init__(self, cpus: list[Cpu], *, shared: frozenset[int] = frozenset(),
                 ahead: frozenset[Position] = frozenset(),
                 schedule: Interleaving = (), reduce: bool = True,
                 step: Callable[[Cpu], object] | None = None):
        """`ahead`: the positions earlier runs found on a CPU's way to an IPI (run_up);
        `reduce`: False makes every step a choice point (the naive interleaving, to measure
        the reduction against); `step`: how a CPU takes one step on bare metal (default
        cpu.run(1); an L1 hypervisor's CPU goes through its VMX or SVM root's run loop, which
        turns L2's VM exits back into L1 execution)."""
        if not 1 < len(cpus) <= MAX_CPUS:
            raise ValueError(f"a machine has 2..{MAX_CPUS} CPUs")
        self.cpus = cpus
        self.trace: list[Observation] = []  # every CPU's observations, in the order they happened
        self.cpu_of: list[int] = []  # which CPU each trace entry belongs to
        self.shared = set(shared)
        self.ahead = set(ahead)
        # Each CPU's positions since its last dependent step (an interaction, an IPI's
        # arrival); those before an ICR write go into `ahead_found`.
        # (a set: a CPU spinning without interacting revisits the same few positions)
        self.run_up: list[set[Position]] = [set() for _ in cpus]
        self.ahead_found: set[Position] = set()
        self.quantum_turn = False  # the running CPU got its turn because the last one's QUANTUM ran out
        self.reads: list[set[int]] = [set() for _ in cpus]
        self.writes: list[set[int]] = [set() for _ in cpus]
        self.switches = {s.at: s.cpu for s in schedule}
        self.points: list[ChoicePoint] = []
        self.steps = 0  # steps taken by all CPUs
        self.merged = [0] * len(cpus)  # how much of each CPU's trace is in `trace`
        self.interacted = False
        self.reduce = reduce
        self.step = step or (lambda cpu: cpu.run(1))
        # Threaded (run_threads()): each CPU's own run loop (a vCPU's KVM_RUN) in a thread
        # of its own; one runs at a time, handing over at its fetches.
        self.can_run: list[Callable[[], bool]] | None = None
        # INIT and SIPI for CPU n, when a hypervisor's local APIC takes them: (n, mode, vector)
        self.on_init_sipi: Callable[[int, IcrDeliveryMode, int], ArrivalFate] | None = None
        self.done = [False] * len(cpus)
        self.wake: list[threading.Semaphore] = []
        self.finished = False
        self.stop = Stop.HALTED
        self.error: BaseException | None = None
        self.max_steps = 0
        self.since = 0  # steps of the running CPU since it got its turn (threaded)
        for n, cpu in enumerate(cpus):
            cpu.machine = self
            cpu.apic.id = n
            cpu._update_slow_mem()  # every access goes past touched()
            fetches = _Fetches(cpu.icache)
            fetches.machine, fetches.index = self, n
            cpu.icache = fetches

    # -- what the CPUs tell the machine --------------------------------------------

    def index(self, cpu: Cpu) -> int:
        return cpu.apic.id

    def touched(self, cpu: Cpu, addr: int, end: int, access: Access) -> None:
        """A data access (or a delivery's push or gate read) of [addr, end)."""
        n = self.index(cpu)
        lines = range(addr >> LINE_SHIFT, ((end - 1) >> LINE_SHIFT) + 1)
        if access is Access.WRITE:
            self.writes[n].update(lines)
            for other in self.cpus:
                if other is not cpu and any(line in other.code_lines for line in lines):
                    other._forget_code(addr, end)  # cross-modifying code (SDM 8.1.3)
        else:
            self.reads[n].update(lines)
        if not self.interacted and any(line in self.shared for line in lines):
            self.interacted = True

    def fetched(self, n: int, rip: int) -> None:
        if self.can_run is not None:
            self._step_ends(n)
            self._note(n)
        line = self.cpus[n].linear(rip) >> LINE_SHIFT
        self.reads[n].add(line)
        if line in self.shared:
            self.interacted = True

    def discovered(self) -> frozenset[int]:
        """Lines one CPU wrote and another touched in this run."""
        out = set()
        for n, written in enumerate(self.writes):
            for m in range(len(self.cpus)):
                if m != n:
                    out |= written & (self.reads[m] | self.writes[m])
        return frozenset(out)

    # -- IPIs ----------------------------------------------------------------------

    def send_ipi(self, sender: Cpu, icr: int) -> bool:
        """An ICR write naming other CPUs (SDM 10.6.1); False: a mode the model lacks (#GP)."""
        ipi = Ipi.from_icr(icr)
        if ipi is None:
            return False
        self.interacted = True
        me = self.index(sender)
        self.ahead_found.update(self.run_up[me])
        for target in ipi.targets(me, range(len(self.cpus))):
            self._accept(self.cpus[target], ipi, sender)
            self.run_up[target] = set()  # what it does next depends on the arrival
        return True

    def _accept(self, cpu: Cpu, ipi: Ipi, sender: Cpu) -> None:
        mode = ipi.mode
        init_sipi = mode in (IcrDeliveryMode.INIT, IcrDeliveryMode.STARTUP)
        if init_sipi and mode is IcrDeliveryMode.INIT and self.index(cpu) == 0:
            raise ModelLimit("INIT of the bootstrap CPU (a restart at the reset vector) is not "
                             "modelled", sender.rip)
        if init_sipi and self.on_init_sipi is not None:
            # Under a hypervisor: its local APIC takes them (kvm/lapic.py)
            fate = self.on_init_sipi(self.index(cpu), mode, ipi.vector)
            name = "init" if mode is IcrDeliveryMode.INIT else "sipi"
        elif mode is IcrDeliveryMode.FIXED and cpu.host is not None:
            # Under KVM: __apic_accept_irq() sets the IRR, KVM_REQ_EVENT, kvm_vcpu_kick()
            fate, name = cpu.host.external(cpu, External.INTERRUPT, ipi.vector), "ipi"
        elif mode is IcrDeliveryMode.FIXED:
            fate, name = cpu.raise_interrupt(ipi.vector), "ipi"
        elif mode is IcrDeliveryMode.NMI:
            fate, name = cpu.nmi_from_apic(), "nmi_ipi"
        elif mode is IcrDeliveryMode.INIT:
            fate, name = self._init(cpu, sender), "init"
        else:
            fate, name = self._sipi(cpu, ipi.vector), "sipi"
        cpu.trace.append(Arrival(name, ipi.vector if mode is not IcrDeliveryMode.NMI else Vec.NMI,
                                 cpu.retired, cpu.rip, fate))

    def _init(self, cpu: Cpu, sender: Cpu) -> ArrivalFate:
        """INIT: the CPU resets and waits for a SIPI (SDM 10.4.7.3; 9.1.1 Table 9-1); in VMX
        operation it is held (root) or a VM exit (non-root), the VMX model's to say."""
        if cpu.vmx is not None and cpu.vmx.vmxon_region is not None:
            return cpu.vmx.init_signal(cpu)  # held in root operation, a VM exit in non-root
        if cpu.host is not None:
            raise ModelLimit("INIT for a CPU in SVM guest mode (the INIT intercept, APM 15.13) is "
                             "not modelled", sender.rip)
        cpu.regs[:] = [0] * len(cpu.regs)
        cpu.rflags = RFLAGS_FIXED
        cpu.cr2 = 0
        cpu.dr[:] = [0, 0, 0, 0]
        cpu.dr6, cpu.dr7 = DR6_RESET, DR7_RESET
        cpu.update_breakpoints()
        cpu.nmi_blocked = False
        cpu.nmi_pending = 0
        cpu.shadow = cpu.shadow_prev = Shadow.NONE
        cpu.pending_dbg = 0
        cpu.halted = False
        # The local APIC resets but keeps its ID (SDM 10.4.7.3).
        cpu.apic.irr = cpu.apic.isr = cpu.apic.tpr = 0
        cpu.wait_for_sipi = True
        cpu.attn = True
        return ArrivalFate.PENDING

    def _sipi(self, cpu: Cpu, vector: int) -> ArrivalFate:
        """A SIPI starts a CPU in wait-for-SIPI; any other CPU ignores it (SDM 8.4.4.1)."""
        if not cpu.wait_for_sipi:
            return ArrivalFate.DROPPED
        cpu.wait_for_sipi = False
        cpu.rip = ((vector << 12) - cpu.cs_base) & cpu.addr_mask  # DEVIATION: see the module
        cpu.attn = True
        return ArrivalFate.PENDING

    # -- running -------------------------------------------------------------------

    def runnable(self, n: int) -> bool:
        cpu = self.cpus[n]
        if cpu.shutdown or cpu.wait_for_sipi:
            return False
        if self.can_run is not None:
            return not self.done[n] and self.can_run[n]()
        if cpu.halted and cpu.host is not None and cpu.host.wakes(cpu):
            return True  # a VM exit to the L1 hypervisor ends its guest's HLT
        return not cpu.halted or cpu.pending_source() is not None

    def run(self, max_steps: int) -> Stop:
        """Run the CPUs by the schedule until none can run, or `max_steps` steps were taken."""
        since = 0  # steps of the current CPU since it got its turn
        current = self._first_runnable(0)
        if current is not None:
            current = self._choose(current, current)  # any CPU may go first
        while self.steps < max_steps:
            if current is None:
                current = self._time_passes()
                if current is None:
                    return Stop.SHUTDOWN if self.cpus[0].shutdown else Stop.HALTED
            cpu = self.cpus[current]
            self.interacted = False
            self._note(current)
            self.step(cpu)
            self.steps += 1
            self._merge(current)
            if self.interacted:
                self.run_up[current] = set()
            expired = since + 1 >= QUANTUM
            goes_on = self.runnable(current) and not expired
            nxt = current if goes_on else self._first_runnable(current + 1)
            if self.interacted or not self.reduce or self._ipi_next(current):
                nxt = self._choose(current, nxt)
            if nxt != current:
                self.quantum_turn = expired
            since = since + 1 if nxt == current else 0
            current = nxt
        return Stop.BUDGET

    def _ipi_next(self, ran: int) -> bool:
        """Some CPU is on its way to an ICR write (see the module): every step of the others is
        then dependent on that write, so each is a choice point. `ran`: the CPU that just took
        a step, whose own way counts only in a turn it got by a QUANTUM hand-over."""
        for n, cpu in enumerate(self.cpus):
            if not self.runnable(n):
                continue
            if (n != ran or self.quantum_turn) and self._position(n) in self.ahead:
                return True
            if (cpu.regs[RCX] & 0xFFFF_FFFF == X2ApicMsr.ICR
                    and cpu.fetch_bytes(cpu.linear(cpu.rip), 2) == WRMSR):
                return True
        return False

    def _position(self, n: int) -> Position:
        """Where CPU n is: with an event waiting or halted, the same RIP leads elsewhere."""
        cpu = self.cpus[n]
        return n, cpu.rip, bool(cpu.nmi_pending or cpu.apic.irr or cpu.extint or cpu.halted)

    def _note(self, n: int) -> None:
        """CPU n is about to take a step: its position joins its run-up to the next IPI."""
        if self.reduce:
            self.run_up[n].add(self._position(n))

    # -- threaded: CPUs that run their own loop -----------------------------------

    def run_threads(self, bodies: list[Callable[[], object]], can_run: list[Callable[[], bool]],
                    max_steps: int) -> Stop:
        """Run `bodies[n]` (CPU n's whole run, e.g. a vCPU's KVM_RUN loop) each in a thread,
        one at a time: a step of CPU n ends at its next instruction fetch (the core's or
        KVM's emulation) or when it blocks (block()); the schedule then picks who goes on,
        as run() does. `can_run[n]`: whether CPU n has something to do."""
        self.can_run = can_run
        self.max_steps = max_steps
        count = len(self.cpus)
        self.wake = [threading.Semaphore(0) for _ in range(count)]
        threads = [threading.Thread(target=self._thread, args=(n, bodies[n]), daemon=True)
                   for n in range(count)]
        for thread in threads:
            thread.start()
        first = self._first_runnable(0)
        if first is None:
            self._finish(Stop.HALTED)
        else:
            self.wake[self._choose(first, first)].release()  # any CPU may go first
        for thread in threads:
            thread.join(THREAD_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError("a CPU's thread did not end: the machine's hand-over is stuck")
        if self.error is not None:
            raise self.error
        return self.stop

    def host_step(self, cpu: Cpu) -> None:
        """The hypervisor of CPU `cpu` is at a point where another CPU's IPI may arrive
        (threaded): a choice point while another CPU is on its way to an ICR write. It is
        not a step: the quantum and the steps of a run without a switch stay as they were."""
        n = self.index(cpu)
        if self.can_run is None or self.finished or not (self._ipi_next(n) or not self.reduce):
            return
        nxt = self._choose(n, n)
        if nxt is None or nxt == n:
            return
        self._hand_over(n, nxt)

    def block(self, cpu: Cpu) -> None:
        """CPU `cpu` has nothing to do (a halted vCPU in vcpu_block()): another runs until
        something wakes this one (runnable again), or the machine stops (_Stopped)."""
        self._step_ends(self.index(cpu), blocked=True)

    def _thread(self, n: int, body: Callable[[], object]) -> None:
        self.wake[n].acquire()
        try:
            if not self.finished:
                body()
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller of run_threads()
            if self.error is None:
                self.error = e
            self._finish(Stop.HALTED)
        self.done[n] = True
        self._merge(n)
        if not self.finished:
            nxt = self._first_runnable(n + 1)
            if nxt is None:
                self._finish(Stop.SHUTDOWN if self.cpus[0].shutdown else Stop.HALTED)
            else:
                self.since = 0
                self.wake[nxt].release()

    def _step_ends(self, n: int, blocked: bool = False) -> None:
        """CPU n finished a step: the schedule decides who takes the next one."""
        if self.finished:
            raise _Stopped
        self.steps += 1
        self._merge(n)
        if self.steps >= self.max_steps:
            self._finish(Stop.BUDGET)
            raise _Stopped
        expired = self.since + 1 >= QUANTUM
        goes_on = not blocked and self.runnable(n) and not expired
        nxt = n if goes_on else self._first_runnable(n + 1)
        if self.interacted or not self.reduce or self._ipi_next(n):
            nxt = self._choose(n, nxt)
        if nxt != n:
            self.quantum_turn = expired
        if self.interacted:
            self.run_up[n] = set()
        self.interacted = False
        if nxt is None:
            self._finish(Stop.SHUTDOWN if self.cpus[0].shutdown else Stop.HALTED)
            raise _Stopped
        if nxt == n:
            self.since += 1
            return
        self._hand_over(n, nxt)

    def _hand_over(self, n: int, nxt: int) -> None:
        """CPU n's thread lets CPU nxt's run and waits for its own turn again."""
        self.since = 0
        self.wake[nxt].release()
        self.wake[n].acquire()
        if self.finished:
            raise _Stopped

    def _finish(self, stop: Stop) -> None:
        """No CPU goes on: every thread still waiting wakes to unwind."""
        if self.finished:
            return
        self.finished = True
        self.stop = stop
        for n, wake in enumerate(self.wake):
            if not self.done[n]:
                wake.release()

    def _time_passes(self) -> int | None:
        """Every CPU waits: the external events scheduled for a halted one arrive (cpu.py
        next_arrival()), as time passes on a lone halted CPU."""
        progressed = True
        while progressed:
            progressed = False
            for n, cpu in enumerate(self.cpus):
                waiting = cpu.halted and not cpu.shutdown and not cpu.wait_for_sipi
                if waiting and cpu.scheduled and cpu.next_arrival():
                    progressed = True
                    self._merge(n)
                    if self.runnable(n):
                        return n
        return None

    def _merge(self, first: int) -> None:
        """What the step added to the CPUs' traces: the CPU that ran first, then the IPIs'
        arrivals on the others."""
        count = len(self.cpus)
        for n in [first] + [m for m in range(count) if m != first]:
            trace = self.cpus[n].trace
            new = trace[self.merged[n]:]
            if new:
                self.merged[n] = len(trace)
                self.trace += new
                self.cpu_of += [n] * len(new)

    def _first_runnable(self, start: int) -> int | None:
        count = len(self.cpus)
        for k in range(count):
            n = (start + k) % count
            if self.runnable(n):
                return n
        return None

    def _choose(self, ran: int, default: int | None) -> int | None:
        """A choice point: the schedule's switch here, else `default` (the same CPU while its
        quantum lasts, then the next one round-robin)."""
        runnable = tuple(n for n in range(len(self.cpus)) if self.runnable(n))
        self.points.append(ChoicePoint(ran, default, runnable))
        wanted = self.switches.get(len(self.points))
        if wanted is not None and wanted in runnable:
            return wanted
        return default
