"""KVM's MMU for a guest with its own page tables (arch/paging.py), vendor-neutral.

With TDP (EPT/NPT, `[kvm] tdp = true`, the default) the CPU walks the guest's
tables itself and KVM only fills the second level (the EPT violation / #NPF
handlers). With shadow paging (`[kvm] tdp = false`: kvm_intel.ept=0,
kvm_amd.npt=0) the CPU walks KVM's shadow tables, so KVM intercepts #PF and
INVLPG (vmx_update_exception_bitmap(), init_vmcs(); init_vmcb()) and keeps the
shadow in step with the guest's tables:

- kvm_handle_page_fault() -> kvm_mmu_page_fault() -> paging64_page_fault():
  walk the guest's tables as the CPU would (FNAME(walk_addr_generic), which
  sets the accessed and dirty flags once the access is allowed); a walk that
  fails is the guest's own #PF, injected with the walker's error code and the
  address as payload (kvm_inject_emulated_page_fault() -> kvm_inject_page_fault());
  one that succeeds maps the page in the shadow and the instruction, or the
  event delivery KVM re-injects (vmx/svm_complete_interrupts()), runs again.
- kvm_mmu_invlpg(): the shadow entry for the page is zapped and the CPU's TLB
  entry flushed (kvm_x86_ops.flush_tlb_gva), then the INVLPG is skipped.

The shadow is the set of linear pages it lacks (Paging.shadow_missing): at the
start the scenario's `host_fault` pages (the pages "not yet shadowed" the
explorer varies), then what INVLPG zaps. Model simplifications, invisible to
the guest: a MOV to CR3 is not intercepted and the shadow keeps its entries
(as if KVM found the new root cached, fast_pgd_switch()); KVM's write
protection of guest page tables and unsync shadow pages are not modelled (a
guest that changes a live entry without INVLPG stops with a model limit on
bare metal already, arch/paging.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmodel.arch.events import Vec
from kvmodel.arch.faults import Access
from kvmodel.arch.paging import PAGE_SHIFT, PfCode, accessed_dirty, error_code, permitted, walk
from kvmodel.arch.regs import CR0_WP, EFER_NXE

if TYPE_CHECKING:
    from kvmodel.kvm.x86 import Vcpu


def _access_of(code: int) -> Access:
    """The access a hardware #PF error code describes (PFERR_WRITE_MASK, PFERR_FETCH_MASK)."""
    if code & PfCode.W:
        return Access.WRITE
    if code & PfCode.ID:
        return Access.FETCH
    return Access.READ


def handle_page_fault(vcpu: Vcpu, fault_address: int, code: int) -> None:
    """kvm_handle_page_fault() for a #PF exit under shadow paging (see the module's text)."""
    cpu = vcpu.cpu
    paging = cpu.paging
    if paging is None or paging.shadow_missing is None:
        vcpu.bug_on(True, "a #PF exit without shadow paging")
        return
    access, user_mode = _access_of(code), bool(code & PfCode.U)
    nxe = bool(cpu.efer & EFER_NXE)

    def read_guest(address: int) -> int:  # kvm_vcpu_read_guest_page()
        return int.from_bytes(cpu.mem[address:address + 8], "little")

    done = walk(read_guest, cpu.cr3, fault_address, nxe)
    if isinstance(done, PfCode):
        fault = error_code(access, user_mode, nxe, done)
    elif not permitted(done.translation, access, user_mode, bool(cpu.cr0 & CR0_WP), nxe):
        fault = error_code(access, user_mode, nxe)
    else:
        for address, value in accessed_dirty(done.entries, access is Access.WRITE):
            cpu.mem[address:address + 8] = value.to_bytes(8, "little")
        paging.shadow_missing.discard(fault_address >> PAGE_SHIFT)  # mapped: RET_PF_RETRY
        vcpu.stats.pf_fixed += 1
        return
    paging.invalidate(fault_address)
    vcpu.stats.pf_guest += 1
    vcpu.queue_exception(Vec.PF, fault, payload=fault_address)  # kvm_inject_page_fault()


def invlpg(vcpu: Vcpu, linear: int) -> None:
    """kvm_mmu_invlpg(): zap the shadow entry and flush the CPU's TLB entry for `linear`."""
    paging = vcpu.cpu.paging
    if paging is None:
        return
    if paging.shadow_missing is not None:
        paging.shadow_missing.add(linear >> PAGE_SHIFT)
    paging.invalidate(linear)
