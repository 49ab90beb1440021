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


@pytest.mark.parametrize("extension, vendor", [("svm", "vmx"), ("vmx", "svm")])
def test_an_l1_hypervisor_for_the_other_vendor_is_refused(extension, vendor):
    e = error_of(MINIMAL + f'\n[cpu]\n{extension} = true\nvendor = "{vendor}"\n')
    assert e.line == 11 and f"an {extension.upper()} L1 hypervisor does not run on" in str(e)


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


# -- every bad input is a ScenarioError naming file:line (issue 23) ---------------------------

def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.replace('"t"', '"caf\xe9"').encode("latin-1"))
    with pytest.raises(ScenarioError) as info:
        load(path)
    assert info.value.line == 1 and "not UTF-8: byte 0xe9" in info.value.message


@pytest.mark.parametrize("value", ["[" * 500 + "]" * 500, "{a=" * 500 + "1" + "}" * 500])
def test_deep_nesting_is_refused_with_its_line(value):
    e = error_of(MINIMAL + f"\n[cpu]\nrflags = {value}\n")
    assert e.line == 10 and "nested too deeply" in e.message


def test_nesting_inside_strings_and_comments_does_not_count():
    s = parse(MINIMAL.replace('"t"', '"' + "[" * 100 + '" # ' + "{" * 100), "s.toml")
    assert s.title == "[" * 100


@pytest.mark.parametrize("text,line,message", [
    ('[happen]\nevent = "nmi"\nafter = 1\n', 9, "happen must be an array of tables: [[happen]]"),
    ('[expect.delivery]\nvector = 2\n', 9,
     "delivery must be an array of tables: [[expect.delivery]]"),
    ('[[expect.final]]\nrax = 1\n', 9, "final must be a table"),
    ('[[expect.memory]]\n"start" = 1\n', 9, "memory must be a table"),
    ('[expect.divergence]\nvendor = "any"\n', 9,
     "divergence must be an array of tables: [[expect.divergence]]"),
    ('[expect.stats]\nvendor = "svm"\n', 9, "stats must be an array of tables: [[expect.stats]]"),
    ('[explore.known]\nvendor = "any"\n', 9,
     "known must be an array of tables: [[explore.known]]"),
    ("[[guest.x]]\n", 9, 'unknown key "x" in [guest]'),
    ("happen = 5\n", 1, "happen must be an array of tables"),
    ("expect = []\n", 1, "expect must be a table"),
    ("[expect]\nfinal = [1]\n", 10, "final must be a table"),
    ("[expect]\ndelivery = 3\n", 10, "delivery must be an array of tables"),
    ("[memory]\nnot_present = 5\n", 10, "not_present must be a list"),
    ("[explore]\ninterrupts = 48\n", 10, "interrupts must be a list"),
    ('[[explore.known]]\nvendor = "any"\ninvolves = 5\nwhy = "w"\n', 11, "involves must be a list"),
])
def test_a_table_where_an_array_is_wanted_and_back(text, line, message):
    head, _, tail = text.partition("\n")
    whole = (head + "\n" + MINIMAL + tail) if line == 1 else MINIMAL + "\n" + text
    e = error_of(whole)
    assert e.line == line and message in e.message, (e.line, str(e))


@pytest.mark.parametrize("key,value", [("mode", "[]"), ("mode", "{}"), ("entry", "[]")])
def test_unhashable_values_where_a_choice_is_wanted(key, value):
    e = error_of(MINIMAL.replace("[guest]\n", f"[guest]\n{key} = {value}\n"))
    assert e.line == 4 and e.message.startswith(f"{key} ")


def test_an_unhashable_event_is_refused():
    e = error_of(MINIMAL + "\n[[happen]]\nevent = []\nafter = 1\n")
    assert e.line == 10 and "event = [] is not one of" in e.message


@pytest.mark.parametrize("table,key,value,line", [
    ("guest", "entry", 1 << 64, 4),
    ("tss", "ist1", 1 << 64, 10),
    ("registers", "rax", 1 << 64, 10),
    ("registers", "rax", -1, 10),
    ("cpu", "rflags", 1 << 64, 10),
    ("cpu", "idt_limit", 0x10000, 10),  # IDTR.limit has 16 bits
    ("cpu", "memory_kib", 1 << 40, 10),
    ("cpu", "memory_kib", 4, 10),
    ("idt", "NMI", 1 << 64, 10),
    ("expect.final", "rip", 1 << 64, 10),
    ("expect.memory", '"start"', 1 << 64, 10),
])
def test_integers_that_do_not_fit_their_field_are_refused(table, key, value, line):
    text = (MINIMAL.replace("[guest]\n", f"[guest]\n{key} = {value}\n") if table == "guest"
            else MINIMAL + f"\n[{table}]\n{key} = {value}\n")
    e = error_of(text)
    assert e.line == line and "must be" in e.message, str(e)


def test_widths_follow_the_mode():
    protected = MINIMAL.replace("[guest]\n", '[guest]\nmode = "protected32"\n')
    e = error_of(protected + "\n[registers]\neax = 0x1_0000_0000\n")
    assert e.line == 11 and "up to 0xffffffff" in e.message
    e = error_of(protected + '\n[idt]\nNMI = "start+0x1_0000_0000"\n')  # a 32-bit gate's offset
    assert e.line == 11 and "NMI must be an address" in e.message
    assert dict((k, v) for k, v, _ in parse(
        MINIMAL + "\n[registers]\nrax = 0xffff_ffff_ffff_ffff\n", "s.toml").registers) == {
        "rax": 0xFFFF_FFFF_FFFF_FFFF}


@pytest.mark.parametrize("text,message", [
    ('\n[[happen]]\nevent = "interrupt"\nvector = 256\nafter = 1\n', "vector must be a vector 0-255"),
    ('\n[[expect.delivery]]\nvector = 0x1_0000_0000_0000_0000\n', "vector must be a vector 0-255"),
    ('\n[[expect.delivery]]\nvector = 2\nerror_code = 0x1_0000_0000\n', "error_code must be"),
    ("\n[kvm]\nnotify_window = 0x1_0000_0000\n", "notify_window must be"),
    ('\n[idt]\n"#PF" = { handler = "start", gate = 16 }\n', 'gate must be an integer in [0x0, 0xf]'),
    ('\n[idt]\n"#PF" = { handler = "start", selector = 0x10000 }\n', "selector must be"),
    ('\n[[happen]]\nevent = "save_restore"\nexit = -1\n', "exit must be"),
])
def test_more_numbers_beyond_their_field(text, message):
    assert message in error_of(MINIMAL + text).message


def test_max_steps_has_a_ceiling():
    from kvmodel.scenario.schema import MAX_STEPS
    e = error_of(f"max_steps = {MAX_STEPS + 1}\n" + MINIMAL)
    assert e.line == 1 and f"[0x1, {MAX_STEPS:#x}]" in e.message
    assert parse(f"max_steps = {MAX_STEPS}\n" + MINIMAL, "s.toml").max_steps == MAX_STEPS


def test_errors_inside_inline_tables_keep_their_did_you_mean():
    e = error_of(MINIMAL + '\n[idt]\n"#PF" = { handler = "start", gaet = "trap" }\n')
    assert e.line == 10 and 'unknown key "gaet" in [idt]' in e.message
    assert e.hint == 'did you mean "gate"?'
    e = error_of(MINIMAL + '\n[idt]\n"#PF" = { handler = "start", gate = "trapp" }\n')
    assert e.hint == 'did you mean "trap"?'


def test_a_key_of_another_event_names_it():
    e = error_of(MINIMAL + '\n[[happen]]\nevent = "host_fault"\npage = 0\nafter = 1\n')
    assert e.line == 12 and e.message == 'after belongs to event = "nmi"'


def test_toml_error_at_the_end_of_the_document_has_a_line():
    e = error_of(MINIMAL + "x = '''\nnever closed\n")
    assert e.line == 10 and "not valid TOML" in e.message


def test_values_in_messages_are_cut_short():
    e = error_of(MINIMAL + f'\n[cpu]\nrflags = "{"A" * 100_000}"\n')
    assert len(str(e)) < 200


def test_many_happenings_load_in_linear_time_up_to_the_limit():
    from kvmodel.scenario.schema import MAX_HAPPENINGS
    one = '\n[[happen]]\nevent = "nmi"\nafter = 1\n'
    s = parse(MINIMAL + one * MAX_HAPPENINGS, "s.toml")
    assert len(s.happenings) == MAX_HAPPENINGS and s.happenings[-1].line == 9 + 4 * (MAX_HAPPENINGS - 1)
    e = error_of(MINIMAL + one * (MAX_HAPPENINGS + 1))
    assert e.line == 9 and f"more than the {MAX_HAPPENINGS}" in e.message


def test_the_locator_indexes_headers_once():
    """Looking up the n-th [[happen]] does not rescan the headers (it was quadratic)."""
    from kvmodel.scenario.locate import Locator
    loc = Locator(MINIMAL + '\n[[happen]]\nevent = "nmi"\n' * 3)
    assert [loc.table("happen", n) for n in range(3)] == [9, 12, 15]
    assert loc.key("happen", "event", 2) == 16 and loc.defines("happen")


def test_an_endless_file_is_refused():
    with pytest.raises(ScenarioError, match=r"^/dev/zero: larger than 16 MiB: not a scenario"):
        load("/dev/zero")


def test_task_gates_get_one_tss_selector_per_label():
    text = MINIMAL.replace("[guest]\n", '[guest]\nmode = "protected32"\n') + (
        '\n[idt]\n"#DF" = { task = "df_tss" }\nNMI = { task = "nmi_tss", dpl = 3 }\n'
        '"#TS" = { task = "df_tss" }\n')
    s = parse(text, "s.toml")
    assert [(g.vector, g.kind, g.selector, g.task, g.dpl) for g in s.gates] == [
        (2, 5, 0x40, "nmi_tss", 3), (8, 5, 0x38, "df_tss", 0), (10, 5, 0x38, "df_tss", 0)]


def test_task_gate_needs_protected_mode_and_no_handler():
    e = error_of(MINIMAL + '\n[idt]\n"#DF" = { task = "df_tss" }\n')
    assert e.line == 10 and "IA-32e mode has no task switching" in str(e)
    protected = MINIMAL.replace("[guest]\n", '[guest]\nmode = "protected32"\n')
    e = error_of(protected + '\n[idt]\n"#DF" = { task = "t", handler = "h" }\n')
    assert "a task gate has no handler" in str(e)
    e = error_of(protected + '\n[idt]\n"#DF" = { dpl = 0 }\n')
    assert 'a gate needs handler = "label"' in str(e)


KNOWN_WITHOUT_HAPPENINGS = '\n[[explore.known]]\nvendor = "any"\ninvolves = []\nwhy = "w"\n'


def test_a_known_finding_without_happenings_only_for_several_cpus():
    # One CPU: it would explain every finding. [cpus]: it is how an interleaving is declared.
    e = error_of(MINIMAL + KNOWN_WITHOUT_HAPPENINGS)
    assert "names at least one happening kind" in e.message
    cpus = (MINIMAL.replace("    hlt\n", "    hlt\nap:\n    hlt\n")
            + '\n[cpus]\ncount = 2\nentry = ["start", "ap"]\n')
    s = parse(cpus + KNOWN_WITHOUT_HAPPENINGS, "s.toml")
    assert s.known_findings[0].involves == ()
