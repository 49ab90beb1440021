"""The boot stub and the logging stubs of an exported scenario, as GNU as text.

QEMU's multiboot loader (`-kernel`) enters `kv_start` in flat 32-bit protected
mode with paging off (Multiboot specification 0.6.96, 3.2 "Machine state").
The stub then reproduces the model's CPU at reset (`reset.py`):

- guest memory 0 .. memory_size is copied from the image byte for byte, so the
  guest's code, data, IDT and TSS are where the model has them;
- paging as the model's CR0/CR4/EFER say (4-level in long mode, 32-bit paging
  otherwise), identity-mapped, with the scenario's not-present pages absent;
- a GDT with the model's selectors (CODE_SELECTOR with CS.base, DATA_SELECTOR),
  the IDTR limit and the TSS for IST stacks, DR0-DR7, every general register,
  RFLAGS and RIP, loaded last by IRETQ (long mode) or a far jump (32-bit).

The GDT and the paging root are at the addresses the model's GDTR and CR3
hold (arch/regs.py BOOT_GDT_BASE, BOOT_CR3), so that an L1 hypervisor's SGDT
and MOV from CR3 read the same values here as on the model.

Observation: IDTR points at a copy of the guest's IDT in which every present
gate enters a logging stub instead of the handler (`kv_vec_N`). For an L1
hypervisor the guest's own IDT is patched in place instead: its L2 loads
IDTR from the VMCB (the guest's IDT address), and its deliveries must be
logged too; the memory comparison leaves those IDT bytes out
(check/qemu_compare.py). The stub saves
what it touches in memory of its own (never on the guest's stack), switches
DR7 off while it reads the frame, writes one record to the debug port and
jumps to the guest's handler with every register, flag and the stack as the
delivery left them; RFLAGS is kept with PUSHF/POPF on a stack of the stub's own.

Record on port 0xE9: MAGIC, b"D", the vector, then RSP, DR6, CR2 and six stack
words from RSP up, each a little-endian word of the mode's width.

Interrupts from outside: QEMU has no way to raise a chosen vector at a chosen
boundary, so the runner stops the guest at the boundary (a gdbstub
breakpoint) and sends it through `kv_raise`, which writes a fixed self-IPI to
the local APIC's ICR (SDM 10.6.1) and jumps back. The IPI is then pending in
the IRR at that boundary, as the model's arrival is. The APIC is software-enabled
at boot as the model's is (SVR = 0x1FF) and its page is mapped uncached.
"""

from __future__ import annotations

from kvmodel.arch.regs import CODE_SELECTOR, DATA_SELECTOR, GPR32, GPR64, Mode
from kvmodel.export.reset import PAGE, ResetState
from kvmodel.guest.layout import gate_size

STUB_BASE = 0x1000000  # 16 MiB: above any guest memory the scenarios may ask for
MAGIC = b"\xfeKV"
DELIVERY = b"D"
NO_X2APIC = b"N"  # the CPU offers no x2APIC: the model's APIC is not there
FRAME_WORDS = 6  # stack words logged per delivery: the longest frame (SDM 6.14.2)
SLOTS = 3 + FRAME_WORDS  # RSP, DR6, CR2, frame words
DEBUG_PORT = 0xE9
STUB_CODE32 = 0x20  # a flat code selector for the stub's own 32-bit code
TSS_SELECTOR = 0x18
MULTIBOOT_MAGIC = 0x1BADB002  # Multiboot 0.6.96, 3.1.2
APIC_BASE = 0xFEE00000  # IA32_APIC_BASE at reset (SDM 10.4.4)
APIC_SVR = APIC_BASE + 0xF0  # xAPIC register offsets, SDM 10.4.1 Table 10-1
APIC_ICR_LOW = APIC_BASE + 0x300
SVR_AT_MODEL_RESET = 0x1FF  # APIC software-enabled, spurious vector 0xFF (arch/apic.py)
_UNCACHED = 0x18  # PWT | PCD in a paging entry: the APIC page is memory-mapped I/O
ICR_FIXED_TO_SELF = 1 << 18  # delivery mode fixed, destination shorthand self (SDM 10.6.1)


def boot_source(state: ResetState) -> str:
    """The whole stub: multiboot header, boot code, logging stubs, tables, the guest's memory."""
    parts = [_header(), _boot32(state)]
    parts.append(_enter_long(state) if state.mode is Mode.LONG64 else _enter_protected(state))
    parts += [_logger(state), _raise_interrupt(state), _tables(state), _data(state)]
    return "\n".join(parts) + "\n"


def _header() -> str:
    return f"""\
.section .multiboot, "a"
.balign 4
.long {MULTIBOOT_MAGIC:#x}, 0, {-MULTIBOOT_MAGIC & 0xFFFFFFFF:#x}
.text
"""


def _boot32(state: ResetState) -> str:
    """Common to both modes: legacy IRQs off, guest memory in place, the GDT loaded."""
    return f"""\
.code32
.globl kv_start
kv_start:
    cli
    cld
    mov $0xff, %al              # mask both 8259s: no legacy IRQ (PIT) reaches the guest
    out %al, $0x21
    out %al, $0xa1
    movl ${SVR_AT_MODEL_RESET:#x}, {APIC_SVR:#x}   # xAPIC: paging is still off here
    mov $kv_memory, %esi
    xor %edi, %edi
    mov ${len(state.memory)}, %ecx
    rep movsb
{_patch_idt(state)}
    lgdt kv_gdtr
"""


def _enter_long(state: ResetState) -> str:
    regs = [f"    movabs ${value:#x}, %{name}" for name, value in
            zip(GPR64, state.regs, strict=True) if name != "rsp"]
    return f"""\
    mov $kv_pml4, %eax
    mov %eax, %cr3
    mov ${state.cr4:#x}, %eax
    mov %eax, %cr4
    mov $0xc0000080, %ecx       # IA32_EFER: LME (LMA follows with CR0.PG)
    mov ${state.efer & ~0x400:#x}, %eax
    xor %edx, %edx
    wrmsr
    mov ${state.cr0:#x}, %eax
    mov %eax, %cr0
    ljmp ${CODE_SELECTOR:#x}, $kv_long
.code64
kv_long:
    mov ${DATA_SELECTOR:#x}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    mov %eax, %ss
    lidt kv_idtr
    mov ${TSS_SELECTOR:#x}, %eax
    ltr %ax
{_x2apic()}
{_debug_registers(state)}
    mov $kv_boot_stack_top, %rsp
    pushq ${DATA_SELECTOR:#x}
    movabs ${state.regs[4]:#x}, %rax
    push %rax
    movabs ${state.rflags:#x}, %rax
    push %rax
    pushq ${CODE_SELECTOR:#x}
    movabs ${state.rip:#x}, %rax
    push %rax
{chr(10).join(regs)}
    iretq                       # RSP, RFLAGS (TF, IF) and RIP at once, as at the model's reset
"""


def _enter_protected(state: ResetState) -> str:
    regs = [f"    mov ${value:#x}, %{name}" for name, value in zip(GPR32, state.regs, strict=True)
            if name != "esp"]
    return f"""\
    mov $kv_pd, %eax
    mov %eax, %cr3
    mov ${state.cr4:#x}, %eax
    mov %eax, %cr4
    mov ${state.cr0:#x}, %eax
    mov %eax, %cr0
    ljmp ${STUB_CODE32:#x}, $kv_protected
kv_protected:
    mov ${DATA_SELECTOR:#x}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    mov %eax, %ss
    lidt kv_idtr
    mov ${TSS_SELECTOR:#x}, %eax
    ltr %ax
{_x2apic()}
{_debug_registers(state)}
    mov $kv_boot_stack_top, %esp
    pushl ${state.rflags:#x}
    popf                        # TF is clear (export refuses it): no trap on the way in
{chr(10).join(regs)}
    mov ${state.regs[4]:#x}, %esp
    ljmp ${CODE_SELECTOR:#x}, ${state.rip:#x}
"""


def _x2apic() -> str:
    """The model's local APIC starts enabled in x2APIC mode (arch/apic.py); SDM 10.12.1."""
    return f"""\
    mov $1, %eax
    cpuid
    bt $21, %ecx                # CPUID.01H:ECX.x2APIC
    jc 1f
{_record(NO_X2APIC)}
    jmp 2f
1:  mov $0x1b, %ecx             # IA32_APIC_BASE: EN | EXTD
    rdmsr
    or $0xc00, %eax
    wrmsr
2:"""


def _record(kind: bytes) -> str:
    """Start a record on the debug port: MAGIC and its kind (leaves DX at the port)."""
    lines = [f"    mov ${DEBUG_PORT:#x}, %edx"]
    for byte in MAGIC + kind:
        lines += [f"    mov ${byte:#x}, %al", "    out %al, %dx"]
    return "\n".join(lines)


def _debug_registers(state: ResetState) -> str:
    lines = []
    for n, value in [*enumerate(state.dr), (6, state.dr6), (7, state.dr7)]:
        if state.mode is Mode.LONG64:
            lines += [f"    movabs ${value:#x}, %rax", f"    mov %rax, %dr{n}"]
        else:
            lines += [f"    mov ${value:#x}, %eax", f"    mov %eax, %dr{n}"]
    return "\n".join(lines)


def _logger(state: ResetState) -> str:
    """One entry per present gate, then the shared logging routine.

    It runs on a stack of its own, where PUSHF/POPF keep RFLAGS as the delivery
    left it (MOV to or from a debug or control register leaves the arithmetic
    flags undefined, SDM Vol.2 MOV-2 "Flags Affected"). Not re-entrant: an
    event delivered inside it would overwrite its save slots (none is realizable:
    NMIs arrive at guest labels only).
    """
    long = state.mode is Mode.LONG64
    ax, dx, sp, size = ("%rax", "%rdx", "%rsp", 8) if long else ("%eax", "%edx", "%esp", 4)
    out = []
    for gate in state.gates:
        out += [f"kv_vec_{gate.vector}:", f"    mov {ax}, kv_save_ax",
                f"    mov ${gate.vector}, %eax", "    jmp kv_log"]
    out += [
        "kv_log:",
        "    mov %eax, kv_vector",
        f"    mov {sp}, kv_save_sp",
        f"    mov $kv_log_stack_top, {sp}",
        "    pushf",
        f"    mov {dx}, kv_save_dx",
        f"    mov %dr7, {ax}",
        f"    mov {ax}, kv_save_dr7",
        "    mov $0x400, %eax            # DR7 at reset: the logger's reads hit no breakpoint",
        f"    mov {ax}, %dr7",
        f"    mov kv_save_sp, {dx}",
        f"    mov {dx}, kv_slots",
        f"    mov %dr6, {ax}",
        f"    mov {ax}, kv_slots+{size}",
        f"    mov %cr2, {ax}",
        f"    mov {ax}, kv_slots+{2 * size}",
    ]
    for k in range(FRAME_WORDS):
        out += [f"    mov {k * size}({dx}), {ax}", f"    mov {ax}, kv_slots+{(3 + k) * size}"]
    out.append(_record(DELIVERY))
    out += ["    mov kv_vector, %al", "    out %al, %dx"]
    for k in range(SLOTS * size):
        out += [f"    mov kv_slots+{k}, %al", "    out %al, %dx"]
    out += [
        "    mov kv_vector, %eax",
        f"    mov kv_handlers(,{ax},{size}), {ax}",
        f"    mov {ax}, kv_target",
        f"    mov kv_save_dr7, {ax}",
        f"    mov {ax}, %dr7",
        "    popf",
        f"    mov kv_save_sp, {sp}",
        f"    mov kv_save_dx, {dx}",
        f"    mov kv_save_ax, {ax}",
        "    jmp *kv_target",
    ]
    return "\n".join(out)


def _raise_interrupt(state: ResetState) -> str:
    """`kv_raise` (guest IF=0) and `kv_raise_if` (IF=1): write `kv_raise_icr` to the ICR and
    jump to `kv_raise_return`, changing no register or flag the guest can see.

    With IF=1 the IPI must not be taken inside the stub: CLI holds it, and STI's shadow
    (SDM 6.8.3) covers the jump, so it is recognized at the guest's boundary and nowhere
    before. Only the runner enters here, at a stop it has checked has no shadow and no TF.
    """
    long = state.mode is Mode.LONG64
    ax = "%rax" if long else "%eax"
    store = "movabs" if long else "mov"  # a 64-bit absolute address needs the moffs form
    body = [f"    mov {ax}, kv_raise_ax", "    mov kv_raise_icr, %eax",
            f"    {store} %eax, {APIC_ICR_LOW:#x}", f"    mov kv_raise_ax, {ax}"]
    return "\n".join(["kv_raise_if:", "    cli", *body, "    sti",
                      "    jmp *kv_raise_return",
                      "kv_raise:", *body, "    jmp *kv_raise_return"])


def _tables(state: ResetState) -> str:
    """GDT, the logging copy of the IDT, the handlers' addresses and the page tables."""
    word = ".quad" if state.mode is Mode.LONG64 else ".long"
    handlers = {g.vector: g.handler for g in state.gates}
    idt = f"{state.idtr_base:#x}" if state.idt_in_place else "kv_idt"
    root, tables = _page_tables(state)
    lines = ['.section .kv_fixed, "aw"', "kv_gdt:", *_gdt(state), "kv_gdt_end:",
             ".balign 4096", "kv_root:", *root,
             ".data", ".balign 16",
             "kv_gdtr:", "    .word kv_gdt_end - kv_gdt - 1", "    .quad kv_gdt",
             ".balign 16", "kv_idtr:", f"    .word {state.idtr_limit:#x}", f"    .quad {idt}",
             ".balign 16", "kv_handlers:"]
    lines += [f"    {word} {handlers.get(v, 0):#x}" for v in range(256)]
    lines += [".balign 16", "kv_idt:", *_logging_idt(state)]
    lines += [".balign 4096", *tables]
    return "\n".join(lines)


def _gdt(state: ResetState) -> list[str]:
    """Flat descriptors at the model's selectors (SDM 3.4.5, 7.2.3 for the 64-bit TSS)."""
    long = state.mode is Mode.LONG64
    code = _segment(state.cs_base, 0xFFFFF if not long else 0, 0x9B, 0xA if long else 0xC)
    data = _segment(0, 0xFFFFF, 0x93, 0xC)
    stub = _segment(0, 0xFFFFF, 0x9B, 0xC)
    tss_low = _segment(state.tr_base, 0x67, 0x89, 0)
    # USER_DATA_SELECTOR and USER_CODE_SELECTOR (index 5 and 6): the same segments at DPL 3
    user = (f"{_segment(0, 0xFFFFF, 0xF3, 0xC):#x}, "
            f"{_segment(state.cs_base, 0xFFFFF if not long else 0, 0xFB, 0xA if long else 0xC):#x}")
    if long:
        return [f"    .quad 0, {code:#x}, {data:#x}, {tss_low:#x}, {state.tr_base >> 32:#x}, {user}"]
    return [f"    .quad 0, {code:#x}, {data:#x}, {tss_low:#x}, {stub:#x}, {user}"]


def _segment(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor (SDM 3.4.5 Figure 3-8)."""
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | access << 40
            | ((limit >> 16) & 0xF) << 48 | flags << 52 | ((base >> 24) & 0xFF) << 56)


def _logging_idt(state: ResetState) -> list[str]:
    """The guest's IDT bytes as they are in memory; `_patch_idt()` redirects the gates at boot."""
    size = gate_size(state.mode)
    count = min(256, (state.idtr_limit + size) // size)
    raw = state.memory[state.idtr_base:state.idtr_base + count * size].ljust(count * size, b"\0")
    return [f"    .quad {int.from_bytes(raw[i:i + 8], 'little'):#x}" for i in range(0, len(raw), 8)]


def _patch_idt(state: ResetState) -> str:
    """Each present gate's offset becomes its logging entry, relative to CS.base (SDM 6.14.1), in
    the copy or, for an L1 hypervisor, in the guest's IDT just copied into place."""
    size = gate_size(state.mode)
    idt = f"{state.idtr_base:#x}" if state.idt_in_place else "kv_idt"
    lines = []
    for gate in state.gates:
        at = f"{idt} + {gate.vector * size}"
        lines += [f"    mov $kv_vec_{gate.vector} - {state.cs_base:#x}, %eax",
                  f"    mov %ax, {at}", "    shr $16, %eax", f"    mov %ax, {at} + 6"]
        if size == 16:
            lines.append(f"    movl $0, {at} + 8")
    return "\n".join(lines)


def _page_tables(state: ResetState) -> tuple[list[str], list[str]]:
    """The scenario's absent pages, and every page from the end of guest memory up to the
    stub: the model's memory ends there, and an access beyond it faults (arch/cpu.py).
    The root table (CR3's page) apart from the others."""
    holes = state.not_present | frozenset(range(len(state.memory) // PAGE, STUB_BASE // PAGE))
    if state.mode is Mode.LONG64:
        return _paging_long(holes)
    return _paging_32(holes)


def _paging_long(holes: frozenset[int]) -> tuple[list[str], list[str]]:
    """Identity map of the first GiB: 2 MiB pages, 4 KiB tables where a page is absent; every
    level user-accessible (U/S=1), as the model's pages are to CPL 3."""
    split = {page >> 9 for page in holes if page < 1 << 18}
    absent = {region for region in split if all(p in holes for p in range(region << 9,
                                                                          (region + 1) << 9))}
    split = sorted(split - absent)
    apic_gib, apic_region = APIC_BASE >> 30, (APIC_BASE >> 21) & 511
    root = ["kv_pml4:", "    .quad kv_pdpt + 7", "    .fill 511, 8, 0"]
    lines = ["kv_pdpt:", "    .quad kv_pd + 7", f"    .fill {apic_gib - 1}, 8, 0",
             "    .quad kv_pd_apic + 3", f"    .fill {511 - apic_gib}, 8, 0",
             "kv_pd_apic:", f"    .fill {apic_region}, 8, 0",
             f"    .quad {APIC_BASE | _UNCACHED | 0x83:#x}", f"    .fill {511 - apic_region}, 8, 0",
             "kv_pd:"]
    for region in range(512):
        if region in absent:
            lines.append("    .quad 0")
        elif region in split:
            lines.append(f"    .quad kv_pt{region} + 7")
        else:
            lines.append(f"    .quad {(region << 21) | 0x87:#x}")
    for region in split:
        lines.append(f"kv_pt{region}:")
        lines += [f"    .quad {_pte(page, holes):#x}" for page in range(region << 9,
                                                                       (region + 1) << 9)]
    return root, lines


def _paging_32(holes: frozenset[int]) -> tuple[list[str], list[str]]:
    """32-bit paging without PSE (the model's CR4 is 0): 4 KiB pages up to 32 MiB."""
    tables = (STUB_BASE * 2) >> 22
    apic_table, apic_page = APIC_BASE >> 22, (APIC_BASE >> 12) & 1023
    root = ["kv_pd:"]
    root += [f"    .long kv_pt{t} + 7" for t in range(tables)]
    root += [f"    .fill {apic_table - tables}, 4, 0", "    .long kv_pt_apic + 3",
             f"    .fill {1023 - apic_table}, 4, 0"]
    lines = ["kv_pt_apic:", f"    .fill {apic_page}, 4, 0",
              f"    .long {APIC_BASE | _UNCACHED | 3:#x}", f"    .fill {1023 - apic_page}, 4, 0"]
    for t in range(tables):
        lines.append(f"kv_pt{t}:")
        lines += [f"    .long {_pte(page, holes):#x}" for page in range(t << 10, (t + 1) << 10)]
    return root, lines


def _pte(page: int, holes: frozenset[int]) -> int:
    return 0 if page in holes else page * PAGE | 7  # P, R/W, U/S: CPL 3 may touch every page


def _data(state: ResetState) -> str:
    size = state.word
    return f"""\
.balign 16
kv_memory:
    .incbin "memory.bin"
.bss
.balign 16
kv_save_ax: .skip {size}
kv_save_sp: .skip {size}
kv_save_dx: .skip {size}
kv_save_dr7: .skip {size}
kv_target: .skip {size}
kv_vector: .skip 4
kv_raise_ax: .skip 8
kv_raise_return: .skip 8
kv_raise_icr: .skip 4
kv_slots: .skip {SLOTS * size}
.balign 16
kv_boot_stack: .skip 256
kv_boot_stack_top:
kv_log_stack: .skip 64
kv_log_stack_top:
"""


