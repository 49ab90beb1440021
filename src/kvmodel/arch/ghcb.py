"""The GHCB protocol as an SEV-ES guest sees it: the part about events.

An SEV-ES guest talks to its hypervisor through the Guest-Hypervisor
Communication Block (AMD "SEV-ES Guest-Hypervisor Communication Block
Standardization", the GHCB specification): it writes the page's guest-
physical address to the GHCB MSR, fills in a request and executes VMGEXIT.
For the oracle, the platform answers as the specification says. The one
request modelled is NMI_COMPLETE (GHCB spec 4.1.3, "NMI Complete"): the
guest's NMI handler is ready for the next NMI, so NMI blocking ends there,
whatever IRET does later.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

from kvmodel.arch.events import Vec
from kvmodel.arch.faults import Fault
from kvmodel.errors import ModelLimit

if TYPE_CHECKING:
    from kvmodel.arch.cpu import Cpu

MSR_AMD64_SEV_ES_GHCB = 0xC0010130
SW_EXIT_CODE = 0x390  # GHCB save-area offsets (GHCB spec Table 1)
SW_EXIT_INFO_1 = 0x398
SW_EXIT_INFO_2 = 0x3A0
GHCB_MSR_INFO_MASK = 0xFFF  # low bits != 0: the GHCB MSR protocol, not a page address


class GhcbExit(IntEnum):
    """sw_exit_code values (GHCB spec Table 7, SVM_VMGEXIT_* in KVM)."""

    NMI_COMPLETE = 0x80000003


def request(cpu: Cpu) -> int:
    """The sw_exit_code the guest put in its GHCB before VMGEXIT."""
    gpa = cpu.ghcb_msr
    if gpa == 0:
        raise Fault(Vec.UD)  # no GHCB: VMGEXIT is VMMCALL with REP, #UD outside a guest
    if gpa & GHCB_MSR_INFO_MASK:
        raise ModelLimit(f"the GHCB MSR protocol (GHCB MSR {gpa:#x}) is not modelled", cpu.rip)
    return cpu.read(gpa + SW_EXIT_CODE, 8)


def vmgexit(cpu: Cpu) -> None:
    """What the GHCB specification promises for the request (the bare-metal oracle)."""
    code = request(cpu)
    if code != GhcbExit.NMI_COMPLETE:
        raise ModelLimit(f"GHCB request {code:#x} is not modelled", cpu.rip)
    cpu.nmi_blocked = False
    cpu.attn = True
