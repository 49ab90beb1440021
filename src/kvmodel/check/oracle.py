"""The correctness criterion: a virtualized run must show the guest what bare metal shows.

The guest-observable trace is every delivery (vector, error code, return
address, retired count, handler, stack pointer and the frame's words),
IRET, HLT, shutdown, debug-port output and (when recorded) retired
instruction, in order; then the final registers and memory. The event
*type* of a delivery is left out: a guest cannot see it, only its effects
(frame, DR6), and KVM legitimately injects INT1 as a hardware #DB. Nor is
whether an IRET ended NMI blocking: only the NMI deliveries that follow show it.
Nor what the architecture leaves undefined (a #DF's saved CS, RIP and RF): the
delivery record marks it, and a difference there is no divergence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmodel.arch.observe import Delivery, Halt, Iret, Observation, Output, Retire, Shutdown
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.runner import RunResult, bare_counterpart, run
from kvmodel.scenario.schema import KnownDivergence, Scenario

GUEST_OBSERVABLE = (Delivery, Iret, Halt, Shutdown, Output, Retire)
CUT_SHORT = ("budget", "vmm")
FINAL_FIELDS = ("rip", "rflags", "cr2", "dr6", "dr7", "retired", "halted", "shutdown")


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first thing the guest saw differently under the hypervisor."""

    index: int  # position in the guest-observable trace, or -1 for the final state
    bare: Observation | str | None
    virt: Observation | str | None
    virt_trace_index: int  # where in the full virtualized trace (exits included) it happened
    event_index: int  # `index` without recorded instructions: what a declaration's entry names


@dataclass(frozen=True, slots=True)
class Comparison:
    bare: RunResult
    virt: RunResult | None  # None: the scenario cannot be run under this hypervisor
    divergence: Divergence | None
    known: KnownDivergence | None = None  # the scenario's declaration for this vendor
    not_applicable: str | None = None

    @property
    def divergence_expected(self) -> bool:
        """The divergence found is the one the scenario declares."""
        d, k = self.divergence, self.known
        return d is not None and k is not None and d.event_index + 1 == k.entry

    @property
    def problems(self) -> list[str]:
        """Why this comparison fails, empty when it passes."""
        out = []
        if self.not_applicable is not None:
            return out
        if self.divergence is not None and not self.divergence_expected:
            out.append("the guest saw something bare metal would not have shown it")
        if self.virt.host_bug is not None:
            out.append(self.virt.host_bug)
        out += [f"KVM WARN_ON reached: {w}" for w in self.virt.warnings]
        bare_final, virt_final = self.bare.final, self.virt.final
        if (bare_final is not None and virt_final is not None and virt_final.stop == "budget"
                and bare_final.stop != "budget"):
            out.append(f"liveness: bare metal stops ({bare_final.stop}); under KVM the step "
                       "budget runs out")
        host = self.virt.host
        if host is not None:
            out += [f"host: {p}" for p in host.problems]
            if host.starved:
                out.append(f"host starved: {host.longest_windowless} cycles with no event window "
                           f"and no VM exit, with Notify VM exits on (limit {host.notify_limit})")
        if self.known is not None and self.divergence is None:
            out.append(f"line {self.known.line}: the declared divergence did not happen")
        if self.known is not None and self.divergence is not None and not self.divergence_expected:
            out.append(f"line {self.known.line}: declared divergence at entry {self.known.entry}, "
                       f"found one at entry {self.divergence.event_index + 1}")
        return out

    @property
    def passed(self) -> bool:
        return not self.problems and self.bare.passed and (
            self.virt is None or self.virt.passed or self.known is not None)


def guest_view(trace: tuple) -> list[tuple[int, object]]:
    """(index in the full trace, comparable entry) for what the guest can observe.

    Deliveries and IRETs become plain tuples without the fields the guest
    cannot see, and deliveries without what the architecture leaves undefined
    (Delivery.observable()); the rest stay as they are (frozen dataclasses
    compare by value).
    """
    out = []
    for n, obs in enumerate(trace):
        cls = type(obs)
        if cls is Delivery:
            out.append((n, obs.observable()))
        elif cls is Iret:
            out.append((n, ("iret", obs.rip, obs.to_rip, obs.retired)))
        elif cls in GUEST_OBSERVABLE:
            out.append((n, obs))
    return out


def not_applicable(scenario: Scenario, vendor: Vendor) -> str | None:
    """Why the scenario cannot run under this hypervisor, if it cannot."""
    if not scenario.sti_blocks_nmi:
        return ("sti_blocks_nmi = false: KVM's vCPU always holds NMIs in the STI shadow "
                "(vmx_nmi_blocked(), svm_nmi_blocked()), one of the two behaviours SDM 6.8.3 allows")
    if vendor is Vendor.VMX and dict(scenario.kvm_params).get("sev_es"):
        return "sev_es = true: SEV-ES is an AMD (SVM) guest type"
    if vendor is Vendor.SVM and scenario.vmx:
        return "[cpu] vmx = true: an Intel VMX L1 does not run on AMD SVM"
    if vendor is Vendor.VMX and scenario.svm:
        return "[cpu] svm = true: an AMD SVM L1 does not run on Intel VMX"
    if any(g.task is not None for g in scenario.gates):
        # VMX: task switches always exit (SDM 25.1.2, exit reason 9); SVM: KVM intercepts
        # TASK_SWITCH (0x7d); KVM emulates the switch (kvm_task_switch()), not modelled yet.
        return ("a task gate: KVM's task-switch emulation (the VM exit, kvm_task_switch(), "
                "emulator_task_switch()) is not modelled")
    if vendor is Vendor.SVM and scenario.fred is not None:
        return "[fred]: KVM runs FRED guests on VMX only (the model has no SVM FRED)"
    return None


def compare(scenario: Scenario, vendor: Vendor, *, record_instructions: bool = False,
            max_steps: int | None = None) -> Comparison:
    """Run bare metal and `vendor` with the same program and external events; compare.

    A VMM script runs under KVM first: bare metal gets its counterpart (the NMIs it
    made) where the guest stood when the VMM acted."""
    why = not_applicable(scenario, vendor)
    if scenario.cpus is not None and why is None:
        # several CPUs: check/interleave.py (imported here: it uses this module)
        from kvmodel.check.interleave import compare_cpus
        return compare_cpus(scenario, vendor, record_instructions=record_instructions,
                            max_steps=max_steps)
    virt = None
    if why is None:
        virt = run(scenario, vendor=vendor, record_instructions=record_instructions,
                   max_steps=max_steps)
    bare_scenario = scenario
    if virt is not None and scenario.vmm:
        bare_scenario = bare_counterpart(scenario, virt.vmm_nmis, virt.vmm_happenings)
    bare = run(bare_scenario, vendor=Vendor.BARE, record_instructions=record_instructions,
               max_steps=max_steps, amd=vendor is Vendor.SVM)
    if why is not None:
        return Comparison(bare, None, None, not_applicable=why)
    known = next((k for k in scenario.divergences if vendor.value in k.vendors), None)
    return Comparison(bare, virt, first_divergence(bare, virt), known)


MemoryDifference = Callable[[], tuple[int, int, int] | None]  # (address, bare byte, virt byte)


def first_divergence(bare: RunResult, virt: RunResult, views: tuple[list, list] | None = None,
                     memory_difference: MemoryDifference | None = None) -> Divergence | None:
    """`views`: guest_view() of both traces, when the caller has them already;
    `memory_difference`: the first byte where the final memories differ, when the
    caller keeps the bare run's memory in another form."""
    if bare.limit is not None or virt.limit is not None:
        return None  # nothing to compare: the model stopped
    b, v = views or (guest_view(bare.trace), guest_view(virt.trace))
    # A run cut short (step budget, or the VMM stopped the VM) says nothing about
    # what came next: only the common prefix is compared. Liveness is judged apart.
    cut = any(r.final is not None and r.final.stop in CUT_SHORT for r in (bare, virt))
    for n in range(min(len(b), len(v)) if cut else max(len(b), len(v))):
        be = b[n][1] if n < len(b) else None
        ve = v[n][1] if n < len(v) else None
        if be != ve:
            at = v[n][0] if n < len(v) else len(virt.trace)
            events = sum(type(entry) is not Retire for _, entry in b[:n])
            return Divergence(n, bare.trace[b[n][0]] if be else None,
                              virt.trace[v[n][0]] if ve else None, at, events)
    if cut or virt.final is None or bare.final is None:
        return None
    if bare.final.shutdown and virt.final.shutdown:
        return None  # nothing after a shutdown is observable
    for name in FINAL_FIELDS:
        if getattr(bare.final, name) != getattr(virt.final, name):
            return _final_divergence(name, getattr(bare.final, name), getattr(virt.final, name),
                                     len(virt.trace))
    for (name, bv), (_, vv) in zip(bare.final.registers, virt.final.registers, strict=True):
        if bv != vv:
            return _final_divergence(name, bv, vv, len(virt.trace))
    diff = memory_difference() if memory_difference else _memory_difference(bare.memory, virt.memory)
    if diff is not None:
        addr, bare_byte, virt_byte = diff
        return _final_divergence(f"memory byte {addr:#x}", bare_byte, virt_byte, len(virt.trace))
    return None


def _memory_difference(bare: bytes | bytearray, virt: bytes | bytearray) -> tuple[int, int, int] | None:
    if bare == virt:
        return None
    addr = next(i for i, (x, y) in enumerate(zip(bare, virt, strict=True)) if x != y)
    return addr, bare[addr], virt[addr]


def _final_divergence(name: str, bare, virt, at: int) -> Divergence:
    show = (lambda x: f"{x:#x}") if isinstance(bare, int) and not isinstance(bare, bool) else str
    return Divergence(-1, f"final {name} = {show(bare)}", f"final {name} = {show(virt)}", at, -1)
