"""kvm_amd's SEV-ES event code (arch/x86/kvm/svm/sev.c), over hw/svm's SEV-ES mode.

The guest's registers live in the encrypted VMSA: KVM cannot read or write
RIP or RFLAGS (so no single-step for an NMI window), sees RFLAGS.IF only
through int_state, never intercepts IRET, and learns that the guest's NMI
handler is ready for the next NMI from the GHCB request NMI_COMPLETE.
GIF is always 1: the GHCB protocol has no CLGI or STGI.
Not modelled: the rest of the GHCB protocol (MSR, I/O, CPUID requests; the
guest gets #VC and the scenario must not need them), EFER.SVME hiding,
SEV-SNP, migration of an SEV-ES guest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmodel import _faults
from kvmodel.arch.events import Vec
from kvmodel.arch.ghcb import SW_EXIT_CODE, GhcbExit
from kvmodel.hw.svm.vmcb import SEV_FEATURE_DEBUG_SWAP, Intercept
from kvmodel.kvm.uapi import KvmExit
from kvmodel.kvm.x86 import Request, UserspaceExit

if TYPE_CHECKING:
    from kvmodel.kvm.svm.svm import Svm


def init_vmcb(svm: Svm, debug_swap: bool) -> None:
    """sev_es_init_vmcb(): no #UD/#GP intercepts; DebugSwap hands DR0-3/DR7 and #DB to the guest."""
    vmcb = svm.vmcb
    vmcb.sev_es = True
    vmcb.exception_intercepts &= ~((1 << Vec.UD) | (1 << Vec.GP))
    if debug_swap:
        # The CPU ignores nested data breakpoints (X86_FEATURE_NO_NESTED_DATA_BP), so a
        # #DB storm (CVE-2015-8104) cannot happen without the intercept.
        vmcb.sev_features |= SEV_FEATURE_DEBUG_SWAP
        vmcb.exception_intercepts &= ~(1 << Vec.DB)
    else:
        vmcb.intercepts.add(Intercept.DR7_WRITE)  # a non-automatic exit: #VC in the guest


def handle_vmgexit(svm: Svm) -> UserspaceExit | None:
    """sev_handle_vmgexit(): read the request from the guest's (shared) GHCB page."""
    vcpu = svm.vcpu
    at = svm.vmcb.ghcb_gpa + SW_EXIT_CODE  # KVM maps the page: no #NPF from here
    code = int.from_bytes(vcpu.cpu.mem[at:at + 8], "little")
    if code != GhcbExit.NMI_COMPLETE:
        return UserspaceExit(KvmExit.INTERNAL_ERROR, f"GHCB request {code:#x} not modelled")
    if _faults.on("sev_es_nmi_unmask_late"):
        svm.iret_interception()  # the 2020 design: unmask at the *next* VM exit
        return None
    vcpu.stats.nmi_window_exits += 1
    svm.nmi_masked = False  # NMIs are unmasked now, not at the next exit
    vcpu.requests |= Request.EVENT
    return None
