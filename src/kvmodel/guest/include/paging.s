# The guest's own page tables for scenarios with `[memory] cr3 = "pml4"` (arch/paging.py):
# `.include "paging.s"` as the FIRST line of the guest code, so `image_base` is the first
# byte of the image (0x10000); execution starts at the entry label, after the tables.
#
# IDENTITY_TABLES emits pml4, pdpt, pd and pt (4 KiB aligned, 16 KiB): 4-level paging that
# maps the first 2 MiB to itself with 4 KiB pages, every entry P|R/W|U/S (flags 7).
# SET_PTE page, flags[, high]: at run time, give the page at label `page` the identity PTE
# with `flags` (bits 31:0 beyond the frame) and `high` (bits 63:32, e.g. 0x80000000 = XD).
# MAP_PTE page, frame, flags: the same with another frame (a label).
# The PTE of the page at label `page` is at pt + ((page - image_base) >> 9) + 0x80.

image_base:

.macro IDENTITY_TABLES flags=7
    .balign 4096
pml4:   .quad pdpt + \flags
        .fill 511, 8, 0
pdpt:   .quad pd + \flags
        .fill 511, 8, 0
pd:     .quad pt + \flags
        .fill 511, 8, 0
pt:
    .set .Lpaging_frame, 0
    .rept 512
        .quad .Lpaging_frame + \flags
        .set .Lpaging_frame, .Lpaging_frame + 0x1000
    .endr
.endm

# MAP_PTE page, frame, flags: at run time, map the page at label `page` to the frame at label
# `frame` (bits 63:32 of the entry cleared).
.macro MAP_PTE page, frame, flags
    movl $(\frame + \flags), pt + ((\page - image_base) >> 9) + 0x80
    movl $0, pt + ((\page - image_base) >> 9) + 0x84
.endm

.macro SET_PTE page, flags, high=0
    movl $(\page + \flags), pt + ((\page - image_base) >> 9) + 0x80
    movl $\high, pt + ((\page - image_base) >> 9) + 0x84
.endm
