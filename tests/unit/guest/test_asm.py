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


# -- no host file reaches guest memory; images are bounded (issue 23) ----------------------

def scenario_in(folder, code: str, memory_kib: int | None = None):
    """A scenario file in `folder` whose guest is `code` (guest line 1 is file line 4)."""
    from kvmodel.scenario.load import load

    cpu = f"\n[cpu]\nmemory_kib = {memory_kib}\n" if memory_kib else ""
    path = folder / "s.toml"
    path.write_text(f"title = 't'\n[guest]\ncode = '''\n{code}\n'''\n{cpu}")
    return load(path)


def assembled(scenario):
    from kvmodel.scenario.runner import prepare

    return prepare(scenario)[1]


@pytest.mark.parametrize("directive", [
    '.incbin "/etc/passwd"', '.incbin "/proc/self/environ"', '.include "/dev/stdin"',
    '.incbin "../../../../../../../../etc/hostname"', ".INCBIN '/etc/passwd'",
])
def test_host_files_outside_the_folder_and_the_library_are_refused(tmp_path, directive):
    s = scenario_in(tmp_path, f"start:\n hlt\n{directive}\n")
    with pytest.raises(ScenarioError) as e:
        assembled(s)
    assert e.value.file == str(tmp_path / "s.toml") and e.value.line == 6
    assert "outside the scenario's folder" in e.value.message or "double quotes" in e.value.message


@pytest.mark.parametrize("code", [
    # directives built by macros are found in the list of files `as` opened
    '.macro m a\n.inc\\a "/etc/hostname"\n.endm\nm bin',
    '.irp f, hostname\n.inc\\()bin "/etc/\\f"\n.endr',
])
def test_directives_built_by_macros_are_refused_after_assembly(tmp_path, code):
    with pytest.raises(ScenarioError, match="outside the scenario's folder") as e:
        assembled(scenario_in(tmp_path, f"start:\n hlt\n{code}\n"))
    assert e.value.line is not None


def test_a_symbolic_link_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "passwd.s").symlink_to("/etc/passwd")
    with pytest.raises(ScenarioError, match='"passwd.s" is outside') as e:
        assembled(scenario_in(tmp_path, 'start:\n .incbin "passwd.s"\n'))
    assert e.value.line == 5


def test_files_of_the_folder_and_the_library_are_included_and_the_cache_sees_them_change(tmp_path):
    part = tmp_path / "part.s"
    part.write_text("mov $1, %eax\n")
    code = 'start:\n .include "part.s"\n .include "sev_es.s"\n hlt\n'
    assert assembled(scenario_in(tmp_path, code)).image[:5] == bytes.fromhex("b801000000")
    part.write_text("mov $2, %eax\n")  # the source is the same: only the include changed
    assert assembled(scenario_in(tmp_path, code)).image[:5] == bytes.fromhex("b802000000")


@pytest.mark.parametrize("directive", [
    ".space 0x10000000000", ".align 1<<30", ".org 0x100000000", ".fill 0x7fffffff, 8, 0",
    ".bss\n.space 0x10000000",
])
def test_images_beyond_the_memory_are_refused_without_writing_them(tmp_path, monkeypatch,
                                                                   directive):
    monkeypatch.setenv("KVMODEL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ScenarioError) as e:
        assembled(scenario_in(tmp_path, f"start:\n hlt\n{directive}\n"))
    assert e.value.line is not None and "memory" in e.value.message + (e.value.hint or "")
    assert not list((tmp_path / "cache").glob("*.json"))


def test_the_image_may_use_the_memory_the_scenario_gives(tmp_path):
    code = "start:\n hlt\n.space 0x40000\n"
    with pytest.raises(ScenarioError, match="outside the 0x30000 bytes of memory"):
        assembled(scenario_in(tmp_path, code))
    assert len(assembled(scenario_in(tmp_path, code, memory_kib=512)).image) == 0x40001


def test_the_assembler_has_a_wall_clock_limit(tmp_path, monkeypatch):
    from kvmodel.guest import asm

    monkeypatch.setattr(asm, "SECONDS", 0.2)
    with pytest.raises(ScenarioError, match=r"as did not finish within 0.2 s") as e:
        assembled(scenario_in(tmp_path, "start:\n.rept 20000000\nnop\n.endr\n", memory_kib=65536))
    assert e.value.line == 4


def test_labels_plus_offsets_beyond_the_mode_are_refused_when_resolved(tmp_path):
    from kvmodel.scenario.load import load
    from kvmodel.scenario.runner import prepare

    path = tmp_path / "s.toml"
    path.write_text("title = 't'\n[guest]\ncode = '''\nstart:\n hlt\n'''\n[registers]\n"
                    'rax = "start+0xffffffffffffffff"\nrbx = "start-0x20000"\n')
    with pytest.raises(ScenarioError, match=r"start\+0xffffffffffffffff is 0x1000000000000ffff, "
                                            r"outside \[0, 0xffffffffffffffff\]") as e:
        prepare(load(path))
    assert e.value.line == 8


def test_the_in_process_cache_keeps_the_recent_programs_only(monkeypatch):
    from kvmodel.guest import asm

    monkeypatch.setattr(asm, "MEMORY_CACHE_ENTRIES", 3)
    asm._memory_cache.clear()
    for n in range(5):
        assemble(f"start:\n .quad {n}\n", Bits.B64, 0x10000)
    assemble("start:\n .quad 2\n", Bits.B64, 0x10000)  # used again: the newest
    assert len(asm._memory_cache) == 3
    assert [p.image[0] for p in asm._memory_cache.values()] == [3, 4, 2]


def test_directives_named_in_comments_are_not_directives(tmp_path):
    code = 'start:  # never .incbin "/etc/passwd", nor .include of anything\n hlt\n.ascii "#"  # .include\n'
    assert assembled(scenario_in(tmp_path, code)).image[0] == 0xF4
