# FRED helpers for scenarios: `.include "fred.s"`. GNU as before 2.41 has no
# FRED mnemonics, so these emit the bytes (Linux asm/fred.h).

# ERETS: return from a FRED frame to CPL 0.
.macro ERETS
    .byte 0xf2, 0x0f, 0x01, 0xca
.endm

# ERETU: return to CPL 3 (not modelled: the model stays at CPL 0).
.macro ERETU
    .byte 0xf3, 0x0f, 0x01, 0xca
.endm

# FRED frame offsets, from RSP at the handler's first instruction.
.set FRED_ERROR, 0
.set FRED_RIP, 8
.set FRED_CS, 16
.set FRED_RFLAGS, 24
.set FRED_RSP, 32
.set FRED_SS, 40
.set FRED_DATA, 48
