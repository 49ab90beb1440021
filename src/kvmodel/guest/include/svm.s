# An L1 hypervisor's SVM helpers for scenarios: `.include "svm.s"` (64-bit; [cpu] svm = true).
# VMCB offsets: AMD APM Vol.2 Appendix B (Linux struct vmcb_control_area, vmcb_save_area).

.set VMCB_INTERCEPT_EXCEPTIONS, 0x008
.set VMCB_INTERCEPT_WORD3, 0x00c
.set VMCB_INTERCEPT_WORD4, 0x010
.set VMCB_IOPM_BASE_PA, 0x040
.set VMCB_MSRPM_BASE_PA, 0x048
.set VMCB_ASID, 0x058
.set VMCB_INT_CTL, 0x060
.set VMCB_INT_VECTOR, 0x064
.set VMCB_INT_STATE, 0x068
.set VMCB_EXIT_CODE, 0x070
.set VMCB_EXIT_INFO_1, 0x078
.set VMCB_EXIT_INFO_2, 0x080
.set VMCB_EXIT_INT_INFO, 0x088
.set VMCB_EXIT_INT_INFO_ERR, 0x08c
.set VMCB_EVENT_INJ, 0x0a8
.set VMCB_EVENT_INJ_ERR, 0x0ac
.set VMCB_NEXT_RIP, 0x0c8
.set VMCB_ES, 0x400                 # a segment: selector (+0), attrib (+2), limit (+4), base (+8)
.set VMCB_CS, 0x410
.set VMCB_SS, 0x420
.set VMCB_DS, 0x430
.set VMCB_GDTR_LIMIT, 0x464
.set VMCB_GDTR_BASE, 0x468
.set VMCB_IDTR_LIMIT, 0x484
.set VMCB_IDTR_BASE, 0x488
.set VMCB_EFER, 0x4d0
.set VMCB_CR4, 0x548
.set VMCB_CR3, 0x550
.set VMCB_CR0, 0x558
.set VMCB_DR7, 0x560
.set VMCB_DR6, 0x568
.set VMCB_RFLAGS, 0x570
.set VMCB_RIP, 0x578
.set VMCB_RSP, 0x5d8
.set VMCB_RAX, 0x5f8
.set VMCB_CR2, 0x640
.set VMCB_G_PAT, 0x668

# VMCB segment attributes (APM 15.5.1 "Segment state"; kvm-unit-tests x86/svm.c vmcb_ident()):
# type in 3:0, S 4, DPL 6:5, P 7, L 9, D/B 10, G 11
.set SEG_ATTR_CODE64, 0xa9a          # execute/read code, S, P, L, G
.set SEG_ATTR_DATA, 0xc92            # read/write data, S, P, D/B, G
.set PAT_RESET, 0x0007040600070406   # IA32_PAT at reset (SDM 11.12.4); used with nested paging only
.set DR6_RESET, 0xffff0ff0

# intercept word 3 (0x00c) and word 4 (0x010) bits
.set INTERCEPT_INTR, 1 << 0
.set INTERCEPT_NMI, 1 << 1
.set INTERCEPT_VINTR, 1 << 4
.set INTERCEPT_CPUID, 1 << 18
.set INTERCEPT_HLT, 1 << 24
.set INTERCEPT_IOIO_PROT, 1 << 27
.set INTERCEPT_MSR_PROT, 1 << 28
.set INTERCEPT_SHUTDOWN, 1 << 31
.set INTERCEPT_VMRUN, 1 << 0
.set INTERCEPT_VMMCALL, 1 << 1

.set V_IRQ, 1 << 8
.set V_INTR_PRIO_SHIFT, 16
.set V_IGN_TPR, 1 << 20
.set V_INTR_MASKING, 1 << 24
.set EVTINJ_VALID, 0x80000000
.set EVTINJ_VALID_ERR, 0x800
.set EVTINJ_TYPE_INTR, 0x000
.set EVTINJ_TYPE_NMI, 0x200
.set EVTINJ_TYPE_EXEPT, 0x300
.set EVTINJ_TYPE_SOFT, 0x400

.set SVM_EXIT_EXCP_BASE, 0x40
.set SVM_EXIT_INTR, 0x60
.set SVM_EXIT_NMI, 0x61
.set SVM_EXIT_CPUID, 0x72
.set SVM_EXIT_HLT, 0x78
.set SVM_EXIT_IOIO, 0x7b
.set SVM_EXIT_MSR, 0x7c
.set SVM_EXIT_VMMCALL, 0x81
.set MSR_VM_HSAVE_PA, 0xc0010117

# SVM_START: EFER.SVME = 1, so that the SVM instructions exist (APM 15.4), and VM_HSAVE_PA at a
# page of its own (APM 15.30.4: VMRUN saves the host there, in a format of the CPU's own).
# Clobbers RAX, RCX, RDX.
.macro SVM_START
    mov $0xc0000080, %ecx
    rdmsr
    or $0x1000, %eax
    wrmsr
    mov $MSR_VM_HSAVE_PA, %ecx
    lea svm_hsave(%rip), %rax
    xor %edx, %edx
    wrmsr
    .pushsection .bss
    .balign 4096
svm_hsave:
    .skip 4096
    .popsection
.endm

# VMCB_SETUP vmcb, entry, stack: an L2 that runs as L1 does, as kvm-unit-tests' vmcb_ident()
# sets it up, so that real hardware and QEMU run it too: L1's CR0, CR3, CR4, EFER, DR7 and GDTR,
# flat CS, SS, DS, ES with L1's selectors (the model's CPL-0 CODE_SELECTOR and DATA_SELECTOR,
# written as constants: fewer instructions for the explorer to try events at), DR6 and G_PAT at
# their reset values, ASID 1, the shared IDT at 0x1000; INTR, NMI, HLT, shutdown and VMRUN
# intercepts; V_INTR_MASKING. `vmcb` is a 4 KiB-aligned page of zeros. Clobbers RAX, RCX, RDX.
.set VMCB_SEG_CODE, (0xffffffff << 32) | (SEG_ATTR_CODE64 << 16) | 0x08   # limit, attrib, selector
.set VMCB_SEG_DATA, (0xffffffff << 32) | (SEG_ATTR_DATA << 16) | 0x10

.macro VMCB_SETUP vmcb, entry, stack
    movl $1, \vmcb+VMCB_ASID(%rip)
    movabs $VMCB_SEG_CODE, %rax
    mov %rax, \vmcb+VMCB_CS(%rip)
    movabs $VMCB_SEG_DATA, %rax
    mov %rax, \vmcb+VMCB_ES(%rip)
    mov %rax, \vmcb+VMCB_SS(%rip)
    mov %rax, \vmcb+VMCB_DS(%rip)
    sgdt \vmcb+VMCB_GDTR_LIMIT+2(%rip)     # limit in the upper half of the field, base after it
    mov \vmcb+VMCB_GDTR_LIMIT+2(%rip), %ax
    mov %ax, \vmcb+VMCB_GDTR_LIMIT(%rip)
    movw $0, \vmcb+VMCB_GDTR_LIMIT+2(%rip)
    mov %cr0, %rax
    mov %rax, \vmcb+VMCB_CR0(%rip)
    mov %cr3, %rax
    mov %rax, \vmcb+VMCB_CR3(%rip)
    mov %cr4, %rax
    mov %rax, \vmcb+VMCB_CR4(%rip)
    mov %dr7, %rax
    mov %rax, \vmcb+VMCB_DR7(%rip)
    movl $DR6_RESET, \vmcb+VMCB_DR6(%rip)
    movabs $PAT_RESET, %rax
    mov %rax, \vmcb+VMCB_G_PAT(%rip)
    movl $(INTERCEPT_INTR | INTERCEPT_NMI | INTERCEPT_HLT | INTERCEPT_SHUTDOWN), \vmcb+VMCB_INTERCEPT_WORD3(%rip)
    movl $INTERCEPT_VMRUN, \vmcb+VMCB_INTERCEPT_WORD4(%rip)
    movl $V_INTR_MASKING, \vmcb+VMCB_INT_CTL(%rip)
    movq $\entry, \vmcb+VMCB_RIP(%rip)
    movq $\stack, \vmcb+VMCB_RSP(%rip)
    movq $0x2, \vmcb+VMCB_RFLAGS(%rip)
    movq $0x1000, \vmcb+VMCB_IDTR_BASE(%rip)
    movl $0xfff, \vmcb+VMCB_IDTR_LIMIT(%rip)
    mov $0xc0000080, %ecx
    rdmsr
    mov %rax, \vmcb+VMCB_EFER(%rip)
.endm

# RUN_L2 vmcb: VMRUN with GIF clear around it, as KVM does (CLGI; VMRUN; STGI); the #VMEXIT
# leaves GIF clear, and events held for L1 come in at the STGI. Clobbers RAX.
.macro RUN_L2 vmcb
    clgi
    lea \vmcb(%rip), %rax
    vmrun
    stgi
.endm
