"""KVM selftest reproducers for the candidate upstream findings scenarios declare.

A finding that userspace ioctls drive (KVM_NMI, KVM_GET/SET_VCPU_EVENTS, a
save/restore) can be shown on a real machine by a KVM selftest. The C sources
ship in `selftests/` (package data) with a README on building them in a kernel
tree; this table says which scenarios' findings each one reproduces.

The link lives here, keyed by the scenario's folder and stem
(`softint/int_n_in_sti_shadow_interrupt_pending`, the name test ids use), not
in the scenario files: one selftest covers a class of findings several
scenarios declare, and the scenario format stays as it is. Scenarios whose
userspace-driven finding has no selftest are listed in `NOT_REPRODUCED` with
the reason, so that the tests can check every declared finding is one or the
other.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Reproducer:
    """One selftest source (`selftests/<name>.c`) and the findings it shows."""

    name: str
    finding: str
    scenarios: tuple[str, ...]  # folder/stem of every scenario whose finding it shows


REPRODUCERS = (
    Reproducer(
        "vnmi_set_events_extra_nmi",
        "KVM_SET_VCPU_EVENTS on a vCPU whose NMI waits in V_NMI_PENDING queues it again: one NMI "
        "more (tests/contract/test_kvm_invariants.py xfail; the scenarios where the model's "
        "round trip shows it)",
        ("vnmi/host_fault_idt_during_nmi", "vnmi/host_fault_stack_during_nmi",
         "vnmi/nmi_and_interrupt_together", "vnmi/nmi_wakes_hlt", "vnmi/save_restore_nmi_injected",
         "nested/svm_clgi_holds_nmi_until_stgi", "nested/svm_l1_nmi_held_by_clgi_across_vmrun"),
    ),
    Reproducer(
        "int_n_sti_shadow_save_restore",
        "INT n in an STI shadow with an interrupt pending: a save/restore between the exit during "
        "its delivery and its re-injection lets the interrupt in first",
        ("softint/int_n_in_sti_shadow_interrupt_pending",
         "virt/eventinj_sti_int_n_before_pending_irq"),
    ),
    Reproducer(
        "soft_event_retried_after_restore",
        "KVM_GET_VCPU_EVENTS hides a soft exception or soft interrupt cut short by an exit: after "
        "restore the instruction runs again and its code breakpoint fires twice",
        ("softint/int3_code_breakpoint", "softint/int3_without_nrips",
         "softint/int_n_code_breakpoint", "softint/int_n_without_nrips",
         "softint/into_code_breakpoint", "virt/int3_code_breakpoint_host_fault"),
    ),
    Reproducer(
        "mov_ss_pending_db_lost",
        "a debug trap held back by a MOV SS shadow has no field in struct kvm_vcpu_events: a "
        "save/restore at that boundary loses it",
        ("arch/mov_ss_then_int3_db_in_handler", "arch/mov_ss_data_breakpoint_then_int_1",
         "arch/debug_mov_ss_watchpoint_prefixed_int3"),
    ),
    Reproducer(
        "masked_nmi_wakes_hlt",
        "KVM_NMI or KVM_SET_VCPU_EVENTS with a pending NMI while NMIs are masked wakes a halted "
        "vCPU (KVM_REQ_NMI counts as an event whether or not NMIs are masked)",
        ("virt/masked_nmi_wakes_hlt", "nested/vmx_l1_nmi_while_l2_runs"),
    ),
)

_NESTED_INJECTION = (
    "needs an L1 hypervisor in the selftest (svm_util.h / vmx.h) that injects the event into L2, "
    "with L2's stack stalled by userfaultfd as in soft_event_retried_after_restore.c; "
    "x86/svm_nested_soft_inject_test.c is the starting point; not written yet")
_FRED = ("needs a FRED guest and KVM's FRED virtualization, which is not upstream (the KVM FRED "
         "series, v9); no selftest framework support for FRED guests yet")

# Scenarios declaring a userspace-driven finding that no selftest here reproduces, and why.
NOT_REPRODUCED: dict[str, str] = {
    "arch/mov_ss_chain_one_shadow": (
        "needs a userspace exit between two MOV SS of a chain, which no instruction of the chain "
        "gives; the model's reading of SVM's single int_state bit is itself UNVERIFIED"),
    "fred/nested_page_fault_reinjected": _FRED,
    "fred/page_fault_event_data": _FRED,
    "nested/svm_l1_injects_int3_without_instruction": _NESTED_INJECTION,
    "nested/svm_l1_injects_soft_int": _NESTED_INJECTION,
    "nested/selftest_svm_nested_soft_inject_int": _NESTED_INJECTION,
    "nested/vmx_l1_injects_int3_without_instruction": _NESTED_INJECTION,
    "nested/svm_l1_injects_nmi": _NESTED_INJECTION,
    "virt/nmi_in_sti_shadow_before_int_n": (
        "the NMI twin of int_n_sti_shadow_save_restore.c (an NMI from KVM_NMI in place of the "
        "pending interrupt, which the lost STI shadow lets in before the INT n); that selftest "
        "with KVM_NMI is the way, not written yet"),
    "vmm/kvm_interrupt_split_irqchip": (
        "a split irqchip's vector held in pending_external_vector is lost by a save/restore, which "
        "KVM_GET_VCPU_EVENTS has no field for; only a VMM that calls KVM_INTERRUPT before "
        "ready_for_interrupt_injection gets there, and no selftest is written for it yet"),
}


def scenario_key(path: str | Path) -> str:
    """`softint/int3_code_breakpoint` for `.../scenarios/softint/int3_code_breakpoint.toml`."""
    path = Path(path)
    return f"{path.parent.name}/{path.stem}"


def reproducers_for(path: str | Path) -> tuple[Reproducer, ...]:
    """The selftests that reproduce the findings the scenario at `path` declares."""
    key = scenario_key(path)
    return tuple(r for r in REPRODUCERS if key in r.scenarios)


def source(name: str) -> str:
    """The text of `selftests/<name>.c` or of `selftests/README.md`."""
    return resources.files(__package__).joinpath("selftests", name).read_text()


def write(found: tuple[Reproducer, ...], out: Path) -> tuple[Path, ...]:
    """Write each selftest source and the README on building them into `out`."""
    if not found:
        return ()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in [f"{r.name}.c" for r in found] + ["README.md"]:
        (out / name).write_text(source(name))
        written.append(out / name)
    return tuple(written)
