"""The differential check: the bare-metal model beside QEMU running the exported scenario.

QEMU's CPU (TCG here, or real KVM under `--accel kvm`) is a second opinion
written by other people. What is compared, in order: every delivery the
logging stubs saw (vector, RSP after the push, the pushed frame) and every byte
the guest wrote to port 0xE9; how the run stopped; the final registers when
both halted; guest memory. What is not: retired-instruction counts (the
logging stubs run instructions of their own), IRET and HLT records (seeing
them would mean changing the guest's code, and so its addresses).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kvmodel.arch.cpu import External
from kvmodel.arch.events import Vec
from kvmodel.arch.observe import Arrival, Delivery, Halt, Output, Retire
from kvmodel.arch.regs import TF, Mode
from kvmodel.check.qemu_compare import Difference, StubMap, differences, memory_difference
from kvmodel.errors import ModelLimit
from kvmodel.export.boot import FRAME_WORDS
from kvmodel.export.image import Image, build_image
from kvmodel.export.qemu import Arrive, QemuFailed, QemuRun, run_image
from kvmodel.export.reproducers import reproducers_for
from kvmodel.export.reproducers import write as write_reproducers
from kvmodel.export.reset import PAGE, ResetState, reset_state
from kvmodel.guest.layout import gate_size
from kvmodel.kvm.vcpu import Vendor
from kvmodel.scenario.runner import RunResult, prepare, run
from kvmodel.scenario.schema import QemuDifference, Scenario

HOST_SAVE_AREA = "svm_hsave"  # VM_HSAVE_PA's page, as svm.s SVM_START sets it
CONVENTIONAL_MEMORY = 0xA0000  # above it the PC has its VGA and BIOS hole (not RAM)


class Verdict(Enum):
    AGREE = "agree"  # nothing differs, or only declared differences after which all agrees
    DECLARED = "declared"  # a declared difference ends the comparison (the rest follows from it)
    DISAGREE = "disagree"
    NOT_REALIZABLE = "not realizable"
    QEMU_FAILED = "QEMU failed"  # QEMU crashed or refused the image: nothing to compare


@dataclass(frozen=True, slots=True)
class Differential:
    scenario: Scenario
    verdict: Verdict
    reason: str = ""  # why it is not realizable, what QEMU failed with, where comparing ended
    difference: Difference | None = None  # the first one not declared
    declared: tuple[tuple[Difference, QemuDifference], ...] = ()  # seen and declared
    unseen: tuple[QemuDifference, ...] = ()  # declared for this accel, not seen
    model: RunResult | None = None
    qemu: QemuRun | None = None


def differential(scenario: Scenario, out: Path, *, accel: str = "tcg",
                 timeout: float = 10.0) -> Differential:
    """Export `scenario` into `out`, run it in QEMU and compare with the bare-metal model."""
    reason = static_limit(scenario, accel)
    if reason is not None:
        return Differential(scenario, Verdict.NOT_REALIZABLE, reason)
    model = run(scenario, vendor=Vendor.BARE, record_instructions=True, expectations=False)
    if model.limit is not None:
        return Differential(scenario, Verdict.NOT_REALIZABLE, f"model limit: {model.limit}",
                            model=model)
    cpu, program = prepare(scenario)
    state = reset_state(cpu)
    reason = _run_limit(state, model)
    arrivals = _arrivals(model, scenario.cs_base)
    if reason is None and isinstance(arrivals, str):
        reason = arrivals
    if reason is not None:
        return Differential(scenario, Verdict.NOT_REALIZABLE, reason, model=model)
    declared = [d for d in scenario.qemu if accel in d.accels]
    image = build_image(state, out)
    try:
        qemu = run_image(image, state.mode, len(state.memory), accel=accel, timeout=timeout,
                         arrivals=arrivals, cs_base=scenario.cs_base)
    except QemuFailed as e:
        crash = next((d for d in declared if "crash" in d.fields), None)
        if crash is None:
            return Differential(scenario, Verdict.QEMU_FAILED, str(e), model=model)
        return Differential(scenario, Verdict.DECLARED, f"{e} (declared)", model=model,
                            unseen=tuple(d for d in declared if d is not crash))
    if qemu.unrealized:
        return Differential(scenario, Verdict.NOT_REALIZABLE, qemu.unrealized, model=model,
                            qemu=qemu)
    if not qemu.x2apic and model.apic_used:
        return Differential(scenario, Verdict.NOT_REALIZABLE,
                            f"the guest uses the x2APIC and {qemu.version}'s CPU has none "
                            "(CPUID.01H:ECX[21] = 0)", model=model, qemu=qemu)
    return _verdict(scenario, model, qemu, StubMap(image, state), declared,
                    _left_out(state, model))


def _left_out(state: ResetState, model: RunResult) -> tuple[range, ...]:
    """Guest memory the comparison leaves out: the guest's IDT when the logging entries are
    patched into it (boot.py), and the SVM host save area, whose format is the CPU's own
    (APM 15.30.4: software must not rely on its contents; the model keeps L1's state apart)."""
    out = []
    if state.idt_in_place:
        out.append(range(state.idtr_base, state.idtr_base + state.idtr_limit + 1))
    try:
        hsave = model.program.symbol(HOST_SAVE_AREA)
    except LookupError:
        hsave = None
    if hsave is not None:
        out.append(range(hsave, hsave + PAGE))
    return tuple(out)


def _verdict(scenario: Scenario, model: RunResult, qemu: QemuRun, stub: StubMap,
             declared: list[QemuDifference], left_out: tuple[range, ...] = ()) -> Differential:
    """The first difference no declaration covers; or agreement, with the declared ones."""
    accepted: list[tuple[Difference, QemuDifference]] = []

    def judged(difference: Difference) -> Differential | None:
        declaration = next((d for d in declared if covers(d, difference)), None)
        if declaration is None:
            return Differential(scenario, Verdict.DISAGREE, "", difference, tuple(accepted),
                                _unseen(declared, accepted), model, qemu)
        accepted.append((difference, declaration))
        if not difference.paired:
            return Differential(scenario, Verdict.DECLARED,
                                f"compared up to {difference.where}; the rest follows from it",
                                None, tuple(accepted), _unseen(declared, accepted), model, qemu)
        return None

    for difference in differences(model, qemu, stub):
        result = judged(difference)
        if result is not None:
            return result
    if model.final is not None and model.final.stop != "budget":
        seen = [o for o in model.trace if isinstance(o, Delivery | Output)]
        excused = [seen[d.entry - 1] for d, _ in accepted if 0 < d.entry <= len(seen)]
        memory = memory_difference(model, qemu, [d for d in excused if isinstance(d, Delivery)],
                                   left_out)
        result = judged(memory) if memory is not None else None
        if result is not None:
            return result
    return Differential(scenario, Verdict.AGREE, "", None, tuple(accepted),
                        _unseen(declared, accepted), model, qemu)


def covers(declaration: QemuDifference, difference: Difference) -> bool:
    """The declaration names this entry and field, and (with a mask) only masked bits differ."""
    if declaration.entry != difference.entry or difference.field not in declaration.fields:
        return False
    if declaration.mask is None:
        return True
    return difference.bits is not None and difference.bits & ~declaration.mask == 0


def _unseen(declared: list[QemuDifference],
            accepted: list[tuple[Difference, QemuDifference]]) -> tuple[QemuDifference, ...]:
    used = [d for _, d in accepted]
    return tuple(d for d in declared if not any(d is u for u in used))


@dataclass(frozen=True, slots=True)
class Exported:
    """What `kvmodel export` wrote: the image, or why not, and the selftest reproducers."""

    image: Image | None
    not_exported: str | None  # why there is no image
    reproducers: tuple[Path, ...]  # selftest sources and their README (export/reproducers.py)


def export(scenario: Scenario, out: Path) -> Exported:
    """The image and its run script (`kvmodel export`), and the selftests for its findings.

    A scenario that cannot boot as an image (happenings, an L1 VMX hypervisor,
    ...) still gets its reproducers; with neither, it is a model limit.
    """
    written = write_reproducers(reproducers_for(scenario.path), out)
    reason = static_limit(scenario)
    if reason is not None:
        if not written:
            raise ModelLimit(f"{scenario.path} cannot be exported: {reason}")
        return Exported(None, reason, written)
    return Exported(build_image(reset_state(prepare(scenario)[0]), out), None, written)


def static_limit(scenario: Scenario, accel: str = "tcg") -> str | None:
    """What keeps the scenario from booting as the model starts it, known before running."""
    reason = _happenings_limit(scenario, accel)
    if reason is not None:
        return reason
    if scenario.vmm:
        return ("a VMM script ([[vmm]]): userspace calls such as KVM_NMI need a hypervisor; the "
                "image runs the guest alone")
    if scenario.cpus is not None:
        return ("several CPUs ([cpus]): the boot stub starts one (the APs' start, and the model's "
                "64-bit SIPI entry, are not exported yet)")
    if scenario.fred is not None:
        return "FRED: QEMU's CPU model has no FRED"
    if scenario.vmx:
        return "an L1 VMX hypervisor: QEMU's TCG has no VMX"
    if dict(scenario.kvm_params).get("force_emulation_prefix") and accel == "tcg":
        return ("the forced emulation prefix (ud2; .ascii \"kvm\"): KVM's, a #UD in QEMU's TCG")
    if dict(scenario.kvm_params).get("sev_es"):
        return "an SEV-ES guest: its GHCB requests (NMI_COMPLETE) need a hypervisor to answer them"
    if any(g.task is not None for g in scenario.gates):
        return ("a task gate: the stub logs a delivery by redirecting the gate's offset to a "
                "logging entry, and a task gate has none (the new task's TSS EIP would need it, and "
                "its CR3 field the stub's page tables, where the model's CR3 is 0; not exported yet)")
    if scenario.memory_size > CONVENTIONAL_MEMORY:
        return (f"guest memory above {CONVENTIONAL_MEMORY:#x}: a PC has its VGA and BIOS hole "
                "there, not RAM")
    if scenario.mode is Mode.REAL16:
        return "real mode: the boot stub enters protected mode only"
    if scenario.cr3 is not None:
        return ("guest page tables ([memory] cr3): the boot stub runs on its own identity map and "
                "does not load the guest's CR3 (not exported yet)")
    if scenario.mode is Mode.PROTECTED32 and scenario.rflags & TF:
        return "TF set at reset in 32-bit mode: the stub has no way in that leaves the stack alone"
    return None


# What the hypervisor alone sees: on bare metal (and in QEMU's CPU) these do not exist.
_HOST_SIDE = (External.HOST_INTERRUPT, External.HOST_NMI, External.NOTIFY_TIMER)


def _happenings_limit(scenario: Scenario, accel: str) -> str | None:
    """Host-side happenings are nothing to QEMU's CPU; real KVM cannot be made to take
    them at a chosen boundary."""
    host_side = scenario.host or any(h.event in _HOST_SIDE for h in scenario.happenings)
    if host_side and accel != "tcg":
        return ("a host-side happening (a host interrupt, NMI, fault or save/restore): "
                "real KVM cannot be made to take one at a chosen boundary")
    return None


def _debug_exception_at_an_arrival(trace: tuple) -> bool:
    """A #DB whose frame returns to an arrival's place: a trap held for that boundary goes
    before the event (SDM 6.9 Table 6-2), and the gdbstub cannot stop between them; a
    code breakpoint there shares QEMU's breakpoint list with the gdbstub's, and TCG then
    raises it again and again, whatever RF says. (A fault of the event's own delivery,
    #NP or #GP, starts from the label, as in QEMU.)"""
    places = {r.rip for r in trace if isinstance(r, Arrival)}
    return any(isinstance(o, Delivery) and o.vector == Vec.DB and o.return_rip in places
               for o in trace)


def _arrivals(model: RunResult, cs_base: int) -> tuple[Arrive, ...] | str:
    """Where the model's NMIs and interrupts from outside arrived, as "before the instruction
    at this address, the k-th time execution reaches it" (a gdbstub breakpoint counts the
    reaches), or "while halted there"; or why that cannot say it. A label and a
    retired-instruction count become the same kind of place."""
    reached: dict[int, int] = {}
    returned_to: set[int] = set()
    arrivals: dict[tuple[int, int], Arrive] = {}
    halted = False
    for record in model.trace:
        if isinstance(record, Retire):
            reached[record.rip] = reached.get(record.rip, 0) + 1
        elif isinstance(record, Delivery):
            returned_to.add(record.return_rip)
        if isinstance(record, Halt | Retire | Delivery):
            halted = isinstance(record, Halt)
        if not (isinstance(record, Arrival) and record.event in ("nmi", "interrupt")):
            continue
        reason = _unplaceable(record, halted, returned_to, arrivals)
        if reason:
            return reason
        place = (record.rip + cs_base, reached.get(record.rip, 0) + 1)
        if place in arrivals:
            return ("two events at one place: QEMU merges NMIs requested together, and the "
                    "self-IPI's code would run with the NMI pending")
        vector = None if record.event == "nmi" else record.vector
        arrivals[place] = Arrive(place[0], vector, place[1], halted)
    addresses = [address for address, _ in arrivals]
    if len(set(addresses)) != len(addresses):
        return ("two arrivals at one address: the breakpoint is gone once the first event "
                "is raised there")
    return tuple(arrivals.values())


def _unplaceable(arrival: Arrival, halted: bool, returned_to: set[int],
                 before: dict[tuple[int, int], Arrive]) -> str:
    if halted and arrival.event == "interrupt":
        return ("an interrupt arrives while the CPU is halted: the self-IPI's code cannot run "
                "on a halted CPU")
    if halted and any(a.halted for a in before.values()):
        return "two NMIs while halted: QEMU cannot tell the halts apart"
    if not halted and any(a.halted for a in before.values()):
        return "an event at a breakpoint after an NMI while halted: they are raised in that order"
    if not halted and arrival.rip in returned_to:
        return (f"an event arrives at {arrival.rip:#x} after a delivery returned there: "
                "a breakpoint cannot tell a resumed instruction from a new one")
    return ""


def _run_limit(state: ResetState, model: RunResult) -> str | None:
    """What the model's run shows the logging copy of the IDT cannot follow."""
    if any(isinstance(o, Retire) and o.text.split()[0] in ("lidt", "sidt") for o in model.trace):
        return "the guest loads or stores IDTR: deliveries go around the logging stubs"
    if _debug_exception_at_an_arrival(model.trace):
        return ("a #DB returns to the place where an NMI or interrupt arrives: the gdbstub "
                "breakpoint that holds the guest there cannot be told apart from the guest's "
                "own debug trap or code breakpoint")
    if any(isinstance(o, Retire) and _writes_cr3(o.text) for o in model.trace):
        return ("the guest writes CR3: the stub's page tables are not the model's (reading it is "
                "fine: the model's CR3 is the stub's paging root, arch/regs.py BOOT_CR3)")
    reason = _logger_reads_absent_page(state, model)
    if reason is not None:
        return reason
    start, end = state.idtr_base, state.idtr_base + 256 * gate_size(state.mode)
    if any(start // PAGE <= page <= (end - 1) // PAGE for page in state.not_present):
        return "the IDT is on a page the scenario marks not present: the logging copy is not"
    if bytes(model.memory[start:end]) != state.memory[start:end]:
        return "the guest rewrites its IDT: the logging copy would go stale"
    return None


def _writes_cr3(text: str) -> bool:
    """MOV to CR3, in the trace's AT&T syntax (`mov %rax,%cr3`)."""
    return text.startswith("mov ") and text.endswith(",%cr3")


def _logger_reads_absent_page(state: ResetState, model: RunResult) -> str | None:
    """The logging stub reads FRAME_WORDS words from RSP up, whatever the frame's size."""
    present = len(state.memory) // PAGE
    for d in model.trace:
        if isinstance(d, Delivery):
            end = d.rsp + FRAME_WORDS * state.word - 1
            pages = range(d.rsp // PAGE, end // PAGE + 1)
            if any(page in state.not_present or page >= present for page in pages):
                return (f"the logging stub reads {FRAME_WORDS} words above RSP {d.rsp:#x}, on a "
                        "page that is not present: it would fault where the guest does not")
    return None


def show(result: Differential) -> list[str]:
    """Lines for the text report of one scenario."""
    head = f"{result.scenario.path}: {result.verdict.value}"
    if result.verdict in (Verdict.NOT_REALIZABLE, Verdict.QEMU_FAILED):
        return [f"{head} ({result.reason})"]
    if result.declared:
        head += f" ({len(result.declared)} declared QEMU differences)"
    lines = [head]
    if result.verdict is Verdict.DECLARED:
        lines.append(f"    {result.reason}")
    if result.difference is not None:
        d = result.difference
        lines += [f"    {d.where}", f"      model: {d.model}", f"      QEMU:  {d.qemu}"]
    lines += [f"    note: the QEMU difference declared at line {d.line} did not show"
              for d in result.unseen]
    return lines
