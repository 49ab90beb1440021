# An L1 hypervisor's SVM helpers for scenarios: `.include "svm.s"` (64-bit; [cpu] svm = true).
# VMCB offsets: AMD APM Vol.2 Appendix B (Linux struct vmcb_control_area, vmcb_save_area).

.set VMCB_INTERCEPT_EXCEPTIONS, 0x008
.set VMCB_INTERCEPT_WORD3, 0x00c
.set VMCB_INTERCEPT_WORD4, 0x010
.set VMCB_IOPM_BASE_PA, 0x040
.set VMCB_MSRPM_BASE_PA, 0x048
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
.set VMCB_IDTR_LIMIT, 0x484
.set VMCB_IDTR_BASE, 0x488
.set VMCB_EFER, 0x4d0
.set VMCB_RFLAGS, 0x570
.set VMCB_RIP, 0x578
.set VMCB_RSP, 0x5d8
.set VMCB_RAX, 0x5f8

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

# SVM_START: EFER.SVME = 1, so that the SVM instructions exist (APM 15.4). Clobbers RAX, RCX, RDX.
.macro SVM_START
    mov $0xc0000080, %ecx
    rdmsr
    or $0x1000, %eax
    wrmsr
.endm

# VMCB_SETUP vmcb, entry, stack: what an L2 on this model needs (flat as L1, L1's EFER,
# the shared IDT at 0x1000; INTR, NMI, HLT, shutdown and VMRUN intercepts; V_INTR_MASKING).
# `vmcb` is a 4 KiB-aligned page of zeros. Clobbers RAX, RCX, RDX.
.macro VMCB_SETUP vmcb, entry, stack
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
