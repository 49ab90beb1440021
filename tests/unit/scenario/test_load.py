"""Scenario files: what is accepted, and errors that name file:line and what is allowed."""

import re

import pytest

from kvmodel.arch.cpu import External
from kvmodel.errors import ScenarioError
from kvmodel.scenario.load import load, parse

MINIMAL = """\
title = "t"

[guest]
code = '''
start:
    hlt
'''
"""


def error_of(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse(text, "s.toml")
    return info.value


def test_minimal_scenario_defaults():
    s = parse(MINIMAL, "s.toml")
    assert s.mode.name == "LONG64" and s.entry == "start" and s.rflags == 0x2
    assert s.deliveries is None and s.happenings == ()
    assert s.code_line == 4  # guest line 1 ("start:") is file line 5


def test_toml_syntax_error_has_line():
    e = error_of(MINIMAL + "\n[idt\n")
    assert e.line == 9 and re.match(r"^s\.toml:9: not valid TOML", str(e))


def test_unknown_top_key_suggests_the_right_one():
    e = error_of('titel = "x"\n' + MINIMAL)
    assert e.line == 1
    assert str(e) == 's.toml:1: unknown key "titel" in the top level (did you mean "title"?)'


def test_bad_mode_lists_the_choices():
    e = error_of(MINIMAL.replace("[guest]\n", '[guest]\nmode = "long32"\n'))
    assert e.line == 4
    assert 'mode = \'long32\' is not one of "long64", "protected32"' in str(e)


def test_happening_needs_exactly_one_trigger():
    text = MINIMAL + '\n[[happen]]\nevent = "nmi"\n\n[[happen]]\nevent = "nmi"\nafter = 1\nat = "x"\n'
    e = error_of(text)
    assert e.line == 9 and "exactly one trigger" in str(e)


def test_interrupt_vector_must_be_legal_for_the_apic():
    e = error_of(MINIMAL + '\n[[happen]]\nevent = "interrupt"\nvector = 3\nafter = 1\n')
    assert e.line == 11 and "illegal for the local APIC" in str(e)


def test_vector_names_and_gate_tables():
    s = parse(MINIMAL + '\n[idt]\nNMI = "h"\n"#PF" = { handler = "p", ist = 2, gate = "trap" }\n',
              "s.toml")
    assert [(g.vector, g.ist, g.kind) for g in s.gates] == [(2, 0, 0xE), (14, 2, 0xF)]


def test_bad_vector_name():
    e = error_of(MINIMAL + '\n[idt]\n"#XX" = "h"\n')
    assert e.line == 10 and "vector 0-255" in str(e)


def test_expectations_are_parsed_with_lines():
    text = MINIMAL + '''
[[happen]]
event = "interrupt"
vector = 0x30
at = "start"

[[expect.delivery]]
vector = 0x30
type = "ext_int"
return = "start+1"

[expect.final]
halted = true
rax = 5
'''
    s = parse(text, "s.toml")
    assert s.happenings[0].event is External.INTERRUPT and s.happenings[0].at == "start"
    d = s.deliveries[0]
    assert (d.vector, d.return_rip, d.line) == (0x30, "start+1", 14)
    assert dict(s.final)["rax"].line == 21


def test_unknown_final_key():
    e = error_of(MINIMAL + "\n[expect.final]\nraxx = 1\n")
    assert e.line == 10 and 'did you mean "rax"?' in str(e)


def test_missing_file():
    with pytest.raises(ScenarioError, match=r"^nope\.toml: cannot read scenario"):
        load("nope.toml")


def test_notify_window_needs_notify_vmexit():
    e = error_of(MINIMAL + "\n[kvm]\nnotify_window = 5\n")
    assert e.line == 10 and 'needs notify_vmexit = "run" or "internal-error"' in str(e)


def test_notify_vmexit_modes_are_qemus():
    e = error_of(MINIMAL + '\n[kvm]\nnotify_vmexit = "internal_error"\n')
    assert 'did you mean "internal-error"?' in str(e)
    s = parse(MINIMAL + '\n[kvm]\nnotify_vmexit = "run"\nnotify_window = 7\n', "s.toml")
    assert dict(s.kvm_params) == {"notify_vmexit": "run", "notify_window": 7}


def test_context_invalid_belongs_to_notify():
    e = error_of(MINIMAL + '\n[[happen]]\nevent = "nmi"\nafter = 1\ncontext_invalid = true\n')
    assert e.line == 12 and "context_invalid belongs to" in str(e)
    s = parse(MINIMAL + '\n[[happen]]\nevent = "notify"\nat = "start"\ncontext_invalid = true\n',
              "s.toml")
    assert [(h.event, h.vector) for h in s.happenings] == [(External.NOTIFY_TIMER, 1)]


def test_only_the_last_expected_delivery_repeats():
    text = MINIMAL + ('\n[[expect.delivery]]\nvector = "#DB"\nrepeats = true\n'
                      '\n[[expect.delivery]]\nvector = "#DB"\n')
    e = error_of(text)
    assert e.line == 11 and "only the last" in str(e)


def test_idt_base_must_be_aligned_and_clear_of_the_tss():
    e = error_of(MINIMAL + "\n[cpu]\nidt_base = 0x1ff4\n")
    assert e.line == 10 and "idt_base 0x1ff4 is not 8-byte aligned" in str(e)
    e = error_of(MINIMAL + "\n[cpu]\nidt_base = 0x2010\n")  # 4 KiB of 64-bit gates reach the TSS
    assert "idt_base must be an integer in [0x0, 0x2000]" in str(e)


@pytest.mark.parametrize("key", ["cs_base = 0x8000", "idt_base = 0x1ff0"])
def test_based_segments_and_moved_idts_are_refused_with_an_l1_hypervisor(key):
    text = MINIMAL.replace("[guest]\n", "[guest]\nmode = \"protected32\"\n")
    text += f"\n[cpu]\nsvm = true\n{key}\n"
    e = error_of(text)
    assert e.line == 12 and "is not modelled with an L1 hypervisor" in str(e)


def test_an_expected_return_of_a_double_fault_is_refused():
    # SDM 6.15 Interrupt 8: a #DF's saved CS:EIP are undefined, so no run is judged on them.
    text = MINIMAL + '\n[[expect.delivery]]\nvector = "#DF"\nerror_code = 0\nreturn = "start"\n'
    e = error_of(text)
    assert e.line == 12 and re.match(r"^s\.toml:12: the return address of a #DF is undefined", str(e))
    assert 'type = "sw_int"' in e.hint
    hw = text.replace('vector = "#DF"', 'vector = "#DF"\ntype = "hw_exception"')
    assert error_of(hw).line == 13
    int8 = parse(text.replace('vector = "#DF"\nerror_code = 0', 'vector = 8\ntype = "sw_int"'), "s.toml")
    assert int8.deliveries[0].return_rip is not None
    no_return = parse(text.replace('return = "start"\n', ""), "s.toml")
    assert no_return.deliveries[0].error_code == 0
