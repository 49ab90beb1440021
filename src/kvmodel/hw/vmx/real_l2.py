"""A real-mode L2 under VMX's unrestricted guest: the core's mode for the time L2 runs.

The model fixes one mode for L1 (the scenario's); an L2 whose vmcs12 guest CR0
has PE=0 runs in real-address mode and the VM exit brings L1's mode back.
One source for the hardware model as L1's CPU (hw/vmx/root.py) and for nested
KVM, which loads vmcs12's guest state into the vCPU (prepare_vmcs02()) and
L1's host state at the exit (load_vmcs12_host_state()).

SDM 26.3.2.1: VM entry loads CR0 from the guest-state area and IA32_EFER.LMA from
the "IA-32e mode guest" control, which must be 0 with CR0.PG=0 (26.3.1.1); 26.3.2.2:
the segment registers; 27.3.2: the exit saves them; 27.5.1, 27.5.2: it loads the
host's. Modelled of the guest-state area: CR0 and the CS selector and base. Not
modelled (a real-mode L2 gets the model's real-mode values): GUEST_CR4 (0), SS,
DS and ES (selector and base 0, so L2's stack and data lie in the first 64 KiB),
the segment access rights and limits (not checked, SDM 26.3.1.2), "load IA32_EFER"
(EFER.LME stays L1's), "IA-32e mode guest" (taken as 0). Model limits: a CS base
other than selector * 16, L1 with its own page tables or FRED.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmodel.arch.cpu import Cpu
from kvmodel.arch.regs import CR0_PE, REAL_ADDR_MASK, Mode, real_base
from kvmodel.errors import ModelLimit
from kvmodel.hw.vmx.vmcs import Vmcs

EFER_LMA = 1 << 10


@dataclass(frozen=True, slots=True)
class HostMode:
    """L1's mode state that a real-mode L2 replaces: what the VM exit loads back (SDM 27.5.1,
    27.5.2; the model's L1 keeps one mode, so its host-state fields are these values)."""

    mode: Mode
    addr_mask: int
    cr0: int
    cr4: int
    efer: int
    cs: int
    cs_base: int
    ss: int


def enters_real_mode(vmcs: Vmcs) -> bool:
    """Does VM entry with this VMCS put the guest in real-address mode (guest CR0.PE=0)?"""
    return not vmcs.guest_cr0 & CR0_PE


def load_real_mode(cpu: Cpu, vmcs: Vmcs, rip: int) -> HostMode:
    """VM entry into a real-mode guest: CR0, EFER.LMA=0, CS from the VMCS, SS = 0; L1's
    mode state returned for the exit. `rip`: L1's VMLAUNCH/VMRESUME, for a model limit."""
    selector, base = vmcs.guest_cs_selector & 0xFFFF, vmcs.guest_cs_base
    if base != real_base(selector):
        raise ModelLimit(f"a real-mode L2 whose CS base {base:#x} is not its selector "
                         f"{selector:#x} * 16 is not modelled", rip)
    if cpu.paging is not None or cpu.fred is not None:
        raise ModelLimit("a real-mode L2 under an L1 with its own page tables or FRED is "
                         "not modelled", rip)
    host = HostMode(cpu.mode, cpu.addr_mask, cpu.cr0, cpu.cr4, cpu.efer, cpu.cs, cpu.cs_base, cpu.ss)
    cpu.mode, cpu.addr_mask = Mode.REAL16, REAL_ADDR_MASK
    cpu.cr0, cpu.cr4, cpu.efer = vmcs.guest_cr0, 0, cpu.efer & ~EFER_LMA
    cpu.ss = 0
    cpu.load_real_cs(selector)  # model limit for a selector that is not a multiple of 4
    _forget_code(cpu)
    return host


def save_real_mode(cpu: Cpu, vmcs: Vmcs) -> None:
    """The VM exit saves L2's CS (SDM 27.3.2): an IVT delivery or IRET may have moved it.
    CR0 is unchanged (the model's real mode has no MOV to CR0.PE)."""
    vmcs.guest_cs_selector, vmcs.guest_cs_base = cpu.cs, cpu.cs_base


def restore_host_mode(cpu: Cpu, host: HostMode) -> None:
    """The VM exit loads L1's mode back (SDM 27.5.1, 27.5.2)."""
    cpu.mode, cpu.addr_mask = host.mode, host.addr_mask
    cpu.cr0, cpu.cr4, cpu.efer = host.cr0, host.cr4, host.efer
    cpu.cs, cpu.cs_base, cpu.ss = host.cs, host.cs_base, host.ss
    _forget_code(cpu)


def _forget_code(cpu: Cpu) -> None:
    """Decoded instructions are keyed by RIP and decoded for one mode; code breakpoints are
    keyed by the offset in CS."""
    cpu.icache.clear()
    cpu.code_lines.clear()
    if cpu.dr7 & 0xFF:
        cpu.update_breakpoints()
