# SEV-ES guest helpers for scenarios: `.include "sev_es.s"` (64-bit guests).
# The GHCB layout and request codes are the GHCB specification's (arch/ghcb.py).

# GHCB_SETUP page: tell the platform where the GHCB is (WRMSR to the GHCB MSR).
# The page is guest memory, below 4 GiB. Clobbers RAX, RCX, RDX.
.macro GHCB_SETUP page
    lea \page(%rip), %rax
    xor %edx, %edx
    mov $0xc0010130, %ecx
    wrmsr
.endm

# NMI_COMPLETE page: the NMI handler is ready for the next NMI (sw_exit_code
# 0x80000003), then VMGEXIT. Clobbers nothing but the GHCB.
.macro NMI_COMPLETE page
    movl $0x80000003, \page+0x390(%rip)
    movl $0, \page+0x394(%rip)
    movq $0, \page+0x398(%rip)
    movq $0, \page+0x3a0(%rip)
    .byte 0xf3, 0x0f, 0x01, 0xd9    # VMGEXIT (REP VMMCALL; older GNU as lacks the mnemonic)
.endm
