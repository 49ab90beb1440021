import pytest

from kvmodel.errors import ScenarioError
from kvmodel.guest.asm import Bits, assemble


def test_bytes_at_base():
    p = assemble("start:\n mov $1, %eax\n hlt\n", Bits.B64, 0x10000)
    assert p.base == 0x10000
    assert p.image == bytes.fromhex("b801000000f4")
    assert p.symbol("start") == 0x10000


def test_absolute_references_are_linked_at_base():
    p = assemble("start:\n movabs $target, %rax\ntarget:\n .quad target\n", Bits.B64, 0x10000)
    target = p.symbol("target")
    assert target == 0x1000A
    assert p.image[2:10] == target.to_bytes(8, "little")
    assert p.image[10:18] == target.to_bytes(8, "little")


def test_intel_syntax():
    p = assemble(".intel_syntax noprefix\nstart:\n mov eax, 1\n", Bits.B64, 0x10000)
    assert p.image == bytes.fromhex("b801000000")


def test_into_assembles_in_32bit_and_is_rejected_in_64bit_with_the_file_line():
    assert assemble("into\n", Bits.B32, 0x10000).image == b"\xce"
    with pytest.raises(ScenarioError) as e:
        assemble("nop\ninto\n", Bits.B64, 0x10000, filename="s.toml", line_offset=10)
    assert e.value.file == "s.toml" and e.value.line == 12
    assert e.value.message.startswith("assembler: ")


def test_bss_lands_after_text_as_zeros():
    p = assemble("start:\n hlt\n.bss\nbuf:\n .space 16\n", Bits.B64, 0x10000)
    buf = p.symbol("buf")
    assert buf >= 0x10001 and len(p.image) >= buf - 0x10000 + 16
    assert p.image[buf - 0x10000:] == bytes(len(p.image) - (buf - 0x10000))


def test_line_map_and_where():
    p = assemble("start:\n nop\n mov $1, %eax\nnext:\n hlt\n", Bits.B64, 0x10000, line_offset=5)
    assert p.line_of(0x10000) == 7
    assert p.line_of(0x10003) == 8  # inside the mov
    assert p.line_of(0x10006) == 10
    assert p.where(0x10003) == "start+0x3" and p.where(0x10006) == "next"


def test_unknown_symbol_suggests_case_fix():
    p = assemble("Start:\n hlt\n", Bits.B64, 0x10000)
    with pytest.raises(LookupError, match='did you mean "Start"'):
        p.symbol("start")


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    from kvmodel.guest import asm

    monkeypatch.setenv("KVMODEL_CACHE_DIR", str(tmp_path))
    first = assemble("start:\n pause\n hlt\n", Bits.B64, 0x20000)
    assert list(tmp_path.glob("*.json"))
    asm._memory_cache.clear()
    assert assemble("start:\n pause\n hlt\n", Bits.B64, 0x20000) == first
