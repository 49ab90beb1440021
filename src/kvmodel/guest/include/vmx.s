# An L1 hypervisor's VMX helpers for scenarios: `.include "vmx.s"` (64-bit; [cpu] vmx = true).
# Field encodings: SDM Appendix B (Linux asm/vmx.h enum vmcs_field).

.set VMCS_IO_BITMAP_A, 0x2000
.set VMCS_IO_BITMAP_B, 0x2002
.set VMCS_MSR_BITMAP, 0x2004
.set VMCS_PIN_BASED, 0x4000
.set VMCS_PROC_BASED, 0x4002
.set VMCS_EXCEPTION_BITMAP, 0x4004
.set VMCS_SECONDARY, 0x401e
.set VMCS_ENTRY_INTR_INFO, 0x4016
.set VMCS_ENTRY_ERROR_CODE, 0x4018
.set VMCS_ENTRY_INSTRUCTION_LEN, 0x401a
.set VMCS_INSTRUCTION_ERROR, 0x4400
.set VMCS_EXIT_REASON, 0x4402
.set VMCS_EXIT_INTR_INFO, 0x4404
.set VMCS_EXIT_INTR_ERROR_CODE, 0x4406
.set VMCS_IDT_VECTORING_INFO, 0x4408
.set VMCS_IDT_VECTORING_ERROR_CODE, 0x440a
.set VMCS_EXIT_INSTRUCTION_LEN, 0x440c
.set VMCS_GUEST_CS_SELECTOR, 0x0802
.set VMCS_GUEST_IDTR_LIMIT, 0x4812
.set VMCS_GUEST_INTERRUPTIBILITY, 0x4824
.set VMCS_GUEST_ACTIVITY_STATE, 0x4826
.set VMCS_EXIT_QUALIFICATION, 0x6400
.set VMCS_GUEST_CR0, 0x6800
.set VMCS_GUEST_CS_BASE, 0x6808
.set VMCS_GUEST_IDTR_BASE, 0x6818
.set VMCS_GUEST_RSP, 0x681c
.set VMCS_GUEST_RIP, 0x681e
.set VMCS_GUEST_RFLAGS, 0x6820
.set VMCS_GUEST_PENDING_DBG_EXCEPTIONS, 0x6822
.set VMCS_HOST_RSP, 0x6c14
.set VMCS_HOST_RIP, 0x6c16

.set PIN_EXT_INTR_EXITING, 0x1
.set PIN_NMI_EXITING, 0x8
.set PIN_VIRTUAL_NMIS, 0x20
.set PROC_HLT_EXITING, 0x80
.set PROC_UNCOND_IO_EXITING, 1 << 24
.set PROC_USE_IO_BITMAPS, 1 << 25
.set PROC_MONITOR_TRAP_FLAG, 1 << 27
.set PROC_USE_MSR_BITMAPS, 1 << 28
.set PROC_ACTIVATE_SECONDARY, 1 << 31
.set SECONDARY_UNRESTRICTED_GUEST, 1 << 7

# basic exit reasons (SDM Appendix C)
.set EXIT_REASON_EXCEPTION_NMI, 0
.set EXIT_REASON_VMCALL, 18
.set EXIT_REASON_IO_INSTRUCTION, 30
.set EXIT_REASON_MSR_READ, 31
.set EXIT_REASON_MSR_WRITE, 32
.set EXIT_REASON_MONITOR_TRAP_FLAG, 37

# VMX_START vmxon_region, vmcs_region, scratch: VMXON, VMCLEAR and VMPTRLD; `scratch`
# is 16 bytes that hold the two region addresses. Clobbers RAX.
.macro VMX_START vmxon, vmcs, scratch
    lea \vmxon(%rip), %rax
    mov %rax, \scratch(%rip)
    lea \vmcs(%rip), %rax
    mov %rax, \scratch+8(%rip)
    vmxon \scratch(%rip)
    vmclear \scratch+8(%rip)
    vmptrld \scratch+8(%rip)
.endm

# VMWRITE_ field, value: value is an immediate ($...) or a register. Clobbers RAX, RDX.
.macro VMWRITE_ field, value
    mov \value, %rax
    mov $\field, %rdx
    vmwrite %rax, %rdx
.endm

# VMREAD_ field, reg. Clobbers RDX.
.macro VMREAD_ field, reg
    mov $\field, %rdx
    vmread %rdx, \reg
.endm

# L2_SETUP entry, stack, host_rip: the guest and host state an L2 on this model needs
# (flat segments, the shared IDT at 0x1000, virtual NMIs, both pin exits, HLT exiting).
.macro L2_SETUP entry, stack, host_rip
    VMWRITE_ VMCS_PIN_BASED, $(PIN_EXT_INTR_EXITING | PIN_NMI_EXITING | PIN_VIRTUAL_NMIS)
    VMWRITE_ VMCS_PROC_BASED, $PROC_HLT_EXITING
    VMWRITE_ VMCS_GUEST_RIP, $\entry
    VMWRITE_ VMCS_GUEST_RSP, $\stack
    VMWRITE_ VMCS_GUEST_RFLAGS, $0x2
    VMWRITE_ VMCS_GUEST_IDTR_BASE, $0x1000
    VMWRITE_ VMCS_GUEST_IDTR_LIMIT, $0xfff
    VMWRITE_ VMCS_HOST_RIP, $\host_rip
    VMWRITE_ VMCS_HOST_RSP, %rsp
.endm

# L2_REAL_MODE entry, cs: L2 in real-address mode under unrestricted guest (guest CR0.PE=PG=0,
# NE and ET set) with CS = cs (base cs * 16); `entry` is the label of `.code16` code in the CS
# segment. L2's SS, DS and ES are 0 on the model: pass a stack below 64 KiB with VMWRITE_
# VMCS_GUEST_RSP, and set PROC_ACTIVATE_SECONDARY in VMCS_PROC_BASED, as a CPU needs (the
# model does not check it). Clobbers RAX, RDX.
.macro L2_REAL_MODE entry, cs
    VMWRITE_ VMCS_SECONDARY, $SECONDARY_UNRESTRICTED_GUEST
    VMWRITE_ VMCS_GUEST_CR0, $0x30
    VMWRITE_ VMCS_GUEST_CS_SELECTOR, $\cs
    VMWRITE_ VMCS_GUEST_CS_BASE, $(\cs << 4)
    VMWRITE_ VMCS_GUEST_RIP, $(\entry - (\cs << 4))
.endm
