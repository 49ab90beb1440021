"""struct kvm_vcpu_events is packed byte for byte as include/uapi/asm/kvm.h lays it out."""

import struct
from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmodel.kvm.uapi import SIZE, InvalidArgument, KvmVcpuEvents

# (field, offset, size) from the uapi header: exception at 0, interrupt at 8, nmi at 12,
# sipi_vector 16, flags 20, smi 24, triple_fault 28, reserved[26] 29..54, payload 55/56.
LAYOUT = [
    ("exception_injected", 0, 1), ("exception_nr", 1, 1), ("exception_has_error_code", 2, 1),
    ("exception_pending", 3, 1), ("exception_error_code", 4, 4),
    ("interrupt_injected", 8, 1), ("interrupt_nr", 9, 1), ("interrupt_soft", 10, 1),
    ("interrupt_shadow", 11, 1),
    ("nmi_injected", 12, 1), ("nmi_pending", 13, 1), ("nmi_masked", 14, 1), ("nmi_pad", 15, 1),
    ("sipi_vector", 16, 4), ("flags", 20, 4),
    ("smi_smm", 24, 1), ("smi_pending", 25, 1), ("smi_smm_inside_nmi", 26, 1),
    ("smi_latched_init", 27, 1), ("triple_fault_pending", 28, 1),
    ("exception_has_payload", 55, 1), ("exception_payload", 56, 8),
]


def test_every_field_is_in_the_layout_once():
    assert [name for name, _, _ in LAYOUT] == [f.name for f in fields(KvmVcpuEvents)]


@pytest.mark.parametrize("name,offset,size", LAYOUT, ids=[n for n, _, _ in LAYOUT])
def test_field_lands_at_its_offset(name, offset, size):
    value = int.from_bytes(bytes(range(0xA1, 0xA1 + size)), "little")
    buf = KvmVcpuEvents(**{name: value}).pack()
    assert len(buf) == SIZE == 64
    assert buf[offset:offset + size] == value.to_bytes(size, "little")
    assert buf[:offset] == bytes(offset) and buf[offset + size:] == bytes(SIZE - offset - size)
    assert getattr(KvmVcpuEvents.unpack(buf), name) == value


def test_reserved_bytes_stay_zero_and_are_ignored():
    buf = bytearray(KvmVcpuEvents(flags=0x3F, exception_payload=2**64 - 1).pack())
    assert buf[29:55] == bytes(26)
    buf[30] = 0xFF
    assert KvmVcpuEvents.unpack(bytes(buf)) == KvmVcpuEvents(flags=0x3F,
                                                              exception_payload=2**64 - 1)


@given(st.binary(min_size=64, max_size=64))
def test_unpack_pack_keeps_every_meaningful_byte(buf):
    again = KvmVcpuEvents.unpack(buf).pack()
    mask = [i for i in range(64) if not 29 <= i < 55]
    assert [again[i] for i in mask] == [buf[i] for i in mask]


def test_wrong_size_is_einval():
    with pytest.raises(InvalidArgument, match="64 bytes"):
        KvmVcpuEvents.unpack(bytes(63))


def test_header_format_is_little_endian_naturally_aligned():
    # struct kvm_vcpu_events is naturally aligned: the u64 payload sits at 56.
    assert struct.calcsize("<4BI4B4BII4BB26xBQ") == 64
