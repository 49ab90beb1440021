"""Register names, RFLAGS and DR7 bits, CPU mode: the vocabulary of arch/."""

from __future__ import annotations

from enum import IntEnum


class Mode(IntEnum):
    """The modes kvmodel runs guests in; the value is the operand and offset width."""

    REAL16 = 16  # real-address mode, CR0.PE=0: segment*16 + offset (SDM 20.1)
    PROTECTED32 = 32  # 32-bit protected mode, flat segments, paging for not-present pages
    LONG64 = 64  # IA-32e 64-bit mode, flat, identity-mapped


GPR64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
GPR32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
RSP = 4
RCX = 1
RAX = 0
RDX = 2
RBX = 3

# RFLAGS bits (SDM Vol.1 3.4.3). Plain ints: they are used on the hot path.
CF = 1 << 0
PF = 1 << 2
AF = 1 << 4
ZF = 1 << 6
SF = 1 << 7
TF = 1 << 8
IF = 1 << 9
DF = 1 << 10
OF = 1 << 11
IOPL = 3 << 12
NT = 1 << 14
RF = 1 << 16
VM = 1 << 17
AC = 1 << 18
VIF = 1 << 19
VIP = 1 << 20
ID = 1 << 21
RFLAGS_FIXED = 1 << 1  # bit 1 always reads as 1
ARITH_FLAGS = CF | PF | AF | ZF | SF | OF

FLAG_NAMES = (("CF", CF), ("PF", PF), ("AF", AF), ("ZF", ZF), ("SF", SF), ("TF", TF),
              ("IF", IF), ("DF", DF), ("OF", OF), ("NT", NT), ("RF", RF), ("AC", AC))  # fmt: skip


def describe_rflags(value: int) -> str:
    """"0x10202 [IF RF]": the value with its set flags named."""
    names = " ".join(name for name, bit in FLAG_NAMES if value & bit)
    return f"{value:#x} [{names}]" if names else f"{value:#x}"


# DR6 condition bits (SDM 17.2.3).
DR6_B0_B3 = 0xF
DR6_BD = 1 << 13
DR6_BS = 1 << 14
DR6_BT = 1 << 15  # task switch into a TSS with the T flag (SDM 17.2.3, 17.3.1.5)
# What a #DB reports in DR6. A VMX pending-debug-exceptions field (hw/vmx) also holds bit 12,
# "enabled breakpoint" (SDM Table 24-4): bookkeeping of the field, reserved (0) in DR6.
DR6_CONDITIONS = DR6_B0_B3 | DR6_BD | DR6_BS
DR6_RESET = 0xFFFF0FF0  # reserved bits read as 1 (SDM 17.2.3)
EFER_SVME = 1 << 12  # the SVM instructions are enabled (APM 15.4)
DR7_RESET = 0x400
DR7_GD = 1 << 13


class BreakpointRw(IntEnum):
    """DR7 R/Wn field (SDM 17.2.4)."""

    EXECUTE = 0
    WRITE = 1
    IO = 2
    READ_WRITE = 3


# DR7 LENn field to byte length (SDM 17.2.5): 10b is 8 bytes in IA-32e mode.
BREAKPOINT_LEN = (1, 2, 8, 4)


class Shadow(IntEnum):
    """Interrupt shadow left by the previous instruction (SDM 6.8.3, STI)."""

    NONE = 0
    STI = 1
    MOV_SS = 2


# Flat segments kvmodel provides (DEVIATION: the GDT is part of the model,
# not of guest memory; these are the only valid selectors). The user segments
# are the same flat segments at DPL 3 (the user code segment has CODE_SELECTOR's
# base); the selectors carry RPL 3 and are Linux's __USER_DS and __USER_CS, in the
# order SYSRET needs (SS = STAR[63:48] + 8, CS = + 16). GDT index 3 (and 4 in long
# mode) is the TSS.
# The boot's GDT and paging root: outside guest memory, where the exported boot stub puts them
# (export/boot.py), so that SGDT and MOV from CR3 read the same in the model and in QEMU.
BOOT_GDT_BASE = 0x1001000
BOOT_GDT_LIMIT = 7 * 8 - 1  # null, code, data, TSS (two slots in long mode), user data and code
BOOT_CR3 = 0x1002000
CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
USER_DATA_SELECTOR = 0x2B  # GDT index 5, RPL 3
USER_CODE_SELECTOR = 0x33  # GDT index 6, RPL 3
RPL_MASK = 3


# Real mode (SDM 20.1.1): linear = segment * 16 + offset. With A20 enabled, as under KVM
# (no A20 gate), FFFF:FFFF reaches 10FFEFh; the mask covers it without wrapping.
# 64-bit mode: a linear address is canonical when bits 63:47 are all equal (48-bit linear
# addresses, no 5-level paging; SDM Vol.1 3.3.7.1)
_NONCANONICAL_LOW, _NONCANONICAL_HIGH = 1 << 47, (1 << 64) - (1 << 47)


def canonical(addr: int, size: int = 1) -> bool:
    """Every byte of the `size`-byte access at `addr` (a 64-bit linear address) is canonical."""
    last = (addr + size - 1) & ((1 << 64) - 1)
    return not (_NONCANONICAL_LOW <= addr < _NONCANONICAL_HIGH
                or _NONCANONICAL_LOW <= last < _NONCANONICAL_HIGH)


REAL_ADDR_MASK = 0x1FFFFF
REAL_OFFSET_MASK = 0xFFFF


def real_base(segment: int) -> int:
    """A real-mode segment's base (SDM 20.1.1)."""
    return (segment & 0xFFFF) << 4


def cpl_of(cs: int) -> int:
    """CPL is CS.RPL in protected and IA-32e mode (SDM 5.5)."""
    return cs & RPL_MASK


# TSS fields the model reads (SDM 7.2.1 Figure 7-2, 7.7 Figure 7-11).
TSS_RSP0 = 0x04  # 64-bit TSS: RSP0; 32-bit TSS: ESP0
TSS_SS0 = 0x08  # 32-bit TSS only

# CR0 and CR4 bits event delivery depends on (SDM 2.5).
CR0_PE = 1 << 0  # protected mode; clear: real-address mode (SDM 2.5)
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_WP = 1 << 16  # supervisor writes obey R/W (SDM 4.6.1)
CR0_PG = 1 << 31
CR4_DE = 1 << 3
EFER_NXE = 1 << 11
EFER_SCE = 1 << 0  # SYSCALL/SYSRET enabled
