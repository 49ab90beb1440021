"""The `kvmodel` command: exit codes, messages, JSON."""

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from kvmodel.bugs.catalogue import CATALOGUE
from kvmodel.cli import Exit, main
from kvmodel.report.json import json_schema

ARCH = Path(__file__).parents[2] / "scenarios" / "arch"
EXAMPLE = ARCH / "nmi_latched_until_iret.toml"


def test_shipped_example_passes_and_prints_its_trace(capsys):
    assert main(["run", str(EXAMPLE)]) == Exit.OK
    out = capsys.readouterr().out
    assert "NMI delivered (nmi) -> nmi_handler" in out
    assert "NMI arrives: dropped" in out
    assert "PASS" in out


def test_all_arch_scenarios_exit_zero(capsys):
    assert main(["run", *map(str, sorted(ARCH.glob("*.toml")))]) == Exit.OK


def test_broken_expectation_exits_one_naming_the_delivery(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    text = EXAMPLE.read_text().replace('return = "main+1"\nretired = 6', 'return = "main+1"\nretired = 7')
    assert text != EXAMPLE.read_text()
    broken.write_text(text)
    assert main(["run", str(broken)]) == Exit.FAILED
    out = capsys.readouterr().out
    line = text.splitlines().index('retired = 7') - 3  # the [[expect.delivery]] header
    assert re.search(rf"FAIL {re.escape(str(broken))}:{line}: delivery 2: expected after 7 "
                     r"retired, got 6 \(got NMI \(nmi\) returning to main\+0x1", out)


def test_malformed_file_exits_two_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('[idt]\nNMI = "nmi_handler"', '[idt]\nNMI = 5 5'))
    assert main(["run", str(bad)]) == Exit.BAD_INPUT
    assert re.search(rf"error: {re.escape(str(bad))}:\d+: not valid TOML", capsys.readouterr().err)


def test_unknown_label_exits_two(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('NMI = "nmi_handler"', 'NMI = "nmi_handlr"'))
    assert main(["run", str(bad)]) == Exit.BAD_INPUT
    out = capsys.readouterr().err
    assert 'unknown label "nmi_handlr"' in out and "nmi_handler" in out


def test_instruction_outside_the_subset_is_named_with_its_address(tmp_path, capsys):
    text = EXAMPLE.read_text().replace("    mov $0, %rbx\n", "    mov $0, %rbx\n    cmc\n")
    bad = tmp_path / "cmc.toml"
    bad.write_text(text)
    assert main(["run", str(bad)]) == Exit.BAD_INPUT
    assert "MODEL LIMIT instruction outside the modelled subset: 'cmc' at 0x10007" in (
        capsys.readouterr().out)


def test_json_document(capsys):
    assert main(["run", "--json", str(EXAMPLE)]) == Exit.OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == 1
    result = doc["results"][0]
    assert result["verdict"] == {"passed": True, "mismatches": [], "model_limit": None}
    deliveries = [e for e in result["trace"] if e["kind"] == "delivery"]
    assert [(d["vector"], d["type"], d["error_code"], d["return_where"], d["retired"])
            for d in deliveries] == [(2, "nmi", None, "main+0x1", 2), (2, "nmi", None, "main+0x1", 6)]
    assert result["final"]["rbx"] == 2 and result["final"]["halted"] is True


def test_instructions_flag_lists_retired_instructions(capsys):
    main(["run", "--instructions", str(EXAMPLE)])
    assert "inc %rbx" in capsys.readouterr().out


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out and "SCENARIO" in out


def test_missing_gnu_as_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("KVMODEL_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert shutil.which("as") is None
    text = EXAMPLE.read_text().replace("nop\n    nop\n    iretq", "nop\n    nop\n    nop\n    iretq")
    fresh = tmp_path / "fresh.toml"
    fresh.write_text(text)
    assert main(["run", str(fresh)]) == Exit.BAD_INPUT
    assert "apt-get install binutils" in capsys.readouterr().err


VIRT = ARCH.parent / "virt"


@pytest.mark.parametrize("vendor", ["svm", "vmx"])
def test_every_shipped_scenario_exits_zero_under_kvm(vendor, capsys):
    paths = sorted(map(str, ARCH.parent.glob("*/*.toml")))
    assert main(["run", "--vendor", vendor, *paths]) == Exit.OK
    out = capsys.readouterr().out
    assert f"{len(paths)}/{len(paths)} scenarios pass" in out


def test_vendor_run_shows_exits_injections_and_the_verdict(capsys):
    assert main(["run", "--vendor", "svm", str(VIRT / "host_fault_idt_during_nmi.toml")]) == Exit.OK
    out = capsys.readouterr().out
    assert "VM exit NPF exit_int_info vector 2 nmi" in out
    assert "KVM re-injects nmi NMI" in out
    assert "SAME AS BARE METAL" in out


def test_undeclared_divergence_exits_one_and_names_both_sides(tmp_path, capsys):
    source = ARCH / "two_nmis_in_mov_ss_shadow.toml"
    text = source.read_text().split("# Under KVM both NMIs")[0]
    copy = tmp_path / "two_nmis.toml"
    copy.write_text(text)
    assert main(["run", "--vendor", "vmx", str(copy)]) == Exit.FAILED
    out = capsys.readouterr().out
    assert "DIVERGENCE at guest-observable entry 3" in out
    assert re.search(r"bare metal: .*HLT: halted", out)
    assert re.search(r"under KVM: .*NMI delivered", out)


def test_declared_divergence_that_does_not_happen_fails(tmp_path, capsys):
    copy = tmp_path / "declared.toml"
    copy.write_text(EXAMPLE.read_text() + '\n[[expect.divergence]]\nvendor = "vmx"\nentry = 1\n'
                    'why = "a test"\n')
    assert main(["run", "--vendor", "vmx", str(copy)]) == Exit.FAILED
    assert "the declared divergence did not happen" in capsys.readouterr().out


def test_vendor_json_has_exits_and_comparison(capsys):
    assert main(["run", "--json", "--vendor", "vmx",
                 str(VIRT / "host_fault_stack_during_int_n.toml")]) == Exit.OK
    doc = json.loads(capsys.readouterr().out)
    result = doc["results"][0]
    assert result["vendor"] == "vmx"
    kinds = [e["kind"] for e in result["trace"]]
    assert "vmexit" in kinds and "inject" in kinds
    exits = [e for e in result["trace"] if e["kind"] == "vmexit"]
    assert any(e["reason"] == "EPT_VIOLATION" and "sw_int" in e["detail"] for e in exits)
    assert result["comparison"] == {"passed": True, "hypervisor_error": None, "divergence": None,
                                    "declared": None, "problems": []}
    assert result["kvm_stats"][0]["irq_injections"] == 1


EXPLORE = VIRT / "explore_nmi_with_host_faults.toml"


def test_explore_without_findings_exits_zero_with_a_summary(tmp_path, capsys):
    code = main(["explore", "--vendor", "vmx", "--max-async", "1", "--out", str(tmp_path),
                 str(EXPLORE), str(VIRT / "host_fault_idt_during_nmi.toml")])
    out = capsys.readouterr().out
    assert code == Exit.OK, out
    assert "exploration" in out
    assert re.search(r"no counterexample within the bounds \(up to 1 asynchronous and 2 host "
                     r"happenings per schedule\): [\d,]+ schedules, [\d,]+ distinct outcomes", out)
    assert not list(tmp_path.iterdir())


def test_explore_with_a_bug_exits_one_and_writes_a_replay_that_reproduces(tmp_path, capsys):
    code = main(["explore", "--vendor", "svm", "--bug", "no_reinjection", "--out", str(tmp_path),
                 str(EXPLORE)])
    out = capsys.readouterr().out
    assert code == Exit.FAILED
    assert "FINDING" in out and "kvmodel replay" in out
    replays = sorted(tmp_path.glob("*.json"))
    assert len(replays) == 1
    assert main(["replay", str(replays[0])]) == Exit.FAILED
    out = capsys.readouterr().out
    assert "side by side" in out and "<<" in out and "DIVERGENCE" in out


def test_explore_known_writes_replays_of_declared_findings_and_still_passes(tmp_path, capsys):
    scenario = VIRT.parent / "nested" / "svm_l1_nmi_while_l2_runs.toml"
    code = main(["explore", "--vendor", "svm", "--known", "--out", str(tmp_path), str(scenario)])
    out = capsys.readouterr().out
    assert code == Exit.OK, out  # declared findings do not fail the run
    assert "KNOWN" in out and "FINDING" not in out
    replays = sorted(tmp_path.glob("*.json"))
    assert len(replays) == 1
    assert main(["replay", str(replays[0])]) == Exit.FAILED  # it does reproduce the divergence
    assert "DIVERGENCE" in capsys.readouterr().out


def test_explore_json(tmp_path, capsys):
    assert main(["explore", "--json", "--vendor", "both", "--max-host", "1", "--out", str(tmp_path),
                 str(VIRT / "nmi_wakes_hlt.toml")]) == Exit.OK
    doc = json.loads(capsys.readouterr().out)
    Draft202012Validator(json_schema("explore")).validate(doc)
    assert doc["schema_version"] == 1 and doc["complete"] is True and doc["interrupted"] is None
    assert [e["vendor"] for e in doc["explored"]] == ["svm", "vmx"]
    assert all(e["schedules"] > 10 and e["findings"] == [] for e in doc["explored"])


def test_explore_json_of_several_cpus_meets_the_schema(tmp_path, capsys):
    # [cpus] scenarios add the bare-metal interleaving counts, which the schema once refused
    assert main(["explore", "--json", "--vendor", "vmx", "--out", str(tmp_path),
                 str(VIRT.parent / "smp" / "apic_nmi_never_in_sti_shadow.toml")]) == Exit.OK
    doc = json.loads(capsys.readouterr().out)
    Draft202012Validator(json_schema("explore")).validate(doc)
    interleavings = doc["explored"][0]["interleavings"]
    assert interleavings["explored"] > 1 and interleavings["naive"] >= interleavings["explored"]


def test_unknown_bug_is_bad_input(capsys):
    assert main(["explore", "--bug", "no_such_bug", str(EXPLORE)]) == Exit.BAD_INPUT
    assert "no catalogued bug named 'no_such_bug'" in capsys.readouterr().err


def test_bugs_list_and_check(tmp_path, capsys):
    assert main(["bugs", "list"]) == Exit.OK
    out = capsys.readouterr().out
    assert "svm_retry_soft_exception" in out and "6ef88d6e36c2" in out
    assert main(["bugs", "check", "--out", str(tmp_path)]) == Exit.OK
    out = capsys.readouterr().out
    expected = sum(len(bug.vendors) for bug in CATALOGUE)
    assert out.count("yes") == expected >= 7 and "NO" not in out
    # The replays it writes render, one of each finding kind: text, JSON and SVG.
    kinds = {}
    for replay in sorted(tmp_path.glob("*.json")):
        kinds.setdefault(replay.stem.rsplit("-", 2)[1], replay)
    assert {"divergence", "warn", "hypervisor_error", "host", "liveness", "starvation"} <= set(kinds)
    for replay in kinds.values():
        assert main(["replay", "--json", "--svg", str(tmp_path / "r.svg"), str(replay)]) == Exit.FAILED
        assert json.loads(capsys.readouterr().out)["results"][0]["comparison"]["passed"] is False
        ET.fromstring((tmp_path / "r.svg").read_text())
        assert main(["replay", str(replay)]) == Exit.FAILED
        assert "side by side" in capsys.readouterr().out


@pytest.mark.slow
def test_explore_every_shipped_scenario_on_both_vendors(tmp_path, capsys):
    code = main(["explore", "--vendor", "both", "--workers", "2", "--out", str(tmp_path),
                 str(ARCH.parent)])
    assert code == Exit.OK, capsys.readouterr().out


NOTIFY = ARCH.parent / "notify" / "db_storm_notify_exits.toml"


def test_run_ending_in_a_hypervisor_error_says_what_kvm_returned_and_after_which_exit(capsys):
    # With notify_kills_guest, handle_notify() returns KVM_EXIT_INTERNAL_ERROR at the first
    # notify exit: the VMM cannot resume, so the run has no final state to print.
    code = main(["run", "--vendor", "vmx", "--bug", "notify_kills_guest", str(NOTIFY)])
    out = capsys.readouterr().out
    assert code == Exit.FAILED, out
    assert ("HYPERVISOR ERROR KVM_RUN returned KVM_EXIT_INTERNAL_ERROR: "
            "KVM_INTERNAL_ERROR_NO_EVENT_WINDOW") in out
    assert re.search(r"after VM exit NOTIFY at db_handler, 5 retired \(info - idt_vectoring "
                     r"vector 1 hw_exception\)", out)
    assert "the VMM cannot resume the guest: no final state" in out
    assert out.count("HYPERVISOR ERROR") == 1
    assert "FAIL KVM gave up where bare metal went on (stop: budget)" in out
    assert main(["run", "--json", "--vendor", "vmx", "--bug", "notify_kills_guest",
                 str(NOTIFY)]) == Exit.FAILED
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["comparison"]["hypervisor_error"] == (
        "KVM_RUN returned KVM_EXIT_INTERNAL_ERROR: KVM_INTERNAL_ERROR_NO_EVENT_WINDOW")


def test_replay_of_a_hypervisor_error_prints_it(tmp_path, capsys):
    assert main(["explore", "--vendor", "vmx", "--bug", "notify_kills_guest", "--max-host", "0",
                 "--max-async", "0", "--out", str(tmp_path), str(NOTIFY)]) == Exit.FAILED
    capsys.readouterr()
    replay, = tmp_path.glob("*hypervisor_error*.json")
    assert main(["replay", str(replay)]) == Exit.FAILED
    out = capsys.readouterr().out
    assert "HYPERVISOR ERROR KVM_RUN returned KVM_EXIT_INTERNAL_ERROR" in out
    assert "side by side" in out


def test_run_with_an_unknown_ghcb_request_prints_the_error_under_kvm(tmp_path, capsys):
    # Bare metal stops at a model limit (the GHCB request is not modelled) and KVM answers
    # it with KVM_EXIT_INTERNAL_ERROR: bad input, and both said plainly.
    source = ARCH.parent / "sev_es" / "nmi_complete_unmasks_at_once.toml"
    text = source.read_text().replace("    NMI_COMPLETE ghcb ",
                                      "    movl $0x72, ghcb+0x390(%rip)\n"
                                      "    .byte 0xf3, 0x0f, 0x01, 0xd9 ")
    assert text != source.read_text()
    copy = tmp_path / "ghcb.toml"
    copy.write_text(text)
    assert main(["run", "--vendor", "svm", str(copy)]) == Exit.BAD_INPUT
    out = capsys.readouterr().out
    assert re.search(r"HYPERVISOR ERROR KVM_RUN returned KVM_EXIT_INTERNAL_ERROR: GHCB request "
                     r"0x72 not modelled\s+after VM exit VMGEXIT at after_complete", out)
    assert re.search(r"MODEL LIMIT on bare metal: GHCB request 0x72 is not modelled at 0x[0-9a-f]+: "
                     r"nothing to compare with", out)
    assert "SAME AS BARE METAL" not in out


OUTSIDE_THE_SUBSET = """title = "cmc is outside the instruction subset"
[guest]
code = '''
start:
    cmc
    hlt
'''
"""
VMGEXIT_OUTSIDE_SEV_ES = """title = "VMGEXIT outside SEV-ES: #UD on bare metal and VMX, a model limit on SVM"
[guest]
code = '''
start:
    .byte 0xf3, 0x0f, 0x01, 0xd9
    hlt
ud_handler:
    hlt
'''
[idt]
"#UD" = "ud_handler"
"""


def test_explore_of_a_scenario_at_a_model_limit_says_what_it_could_not_explore(tmp_path, capsys):
    cmc = tmp_path / "cmc.toml"
    cmc.write_text(OUTSIDE_THE_SUBSET)
    code = main(["explore", "--vendor", "both", "--out", str(tmp_path / "out"), str(cmc)])
    out = capsys.readouterr().out
    assert code == Exit.BAD_INPUT, out
    for vendor in ("svm", "vmx"):
        assert (f"MODEL LIMIT {cmc} [{vendor}]: not explored: on bare metal: instruction outside "
                f"the modelled subset: 'cmc' at 0x10000") in out
    assert "2 of 2 explorations (scenario and vendor) met a model limit" in out
    assert "no counterexample" not in out


def test_explore_with_a_model_limit_on_one_vendor_explores_the_rest(tmp_path, capsys):
    vmgexit = tmp_path / "vmgexit.toml"
    vmgexit.write_text(VMGEXIT_OUTSIDE_SEV_ES)
    code = main(["explore", "--vendor", "both", "--out", str(tmp_path / "out"), str(vmgexit),
                 str(VIRT / "nmi_wakes_hlt.toml")])
    out = capsys.readouterr().out
    assert code == Exit.BAD_INPUT, out
    assert re.search(rf"MODEL LIMIT {re.escape(str(vmgexit))} \[svm\]: \d+ of \d+ schedules not "
                     r"explored: under KVM on SVM: VMMCALL outside an SEV-ES guest \(a hypercall\) "
                     r"is not modelled at 0x10000 \(first in: no happenings\)", out)
    assert len(re.findall(r"^MODEL LIMIT ", out, re.M)) == 1  # not on VMX, nor nmi_wakes_hlt
    assert "1 of 4 explorations (scenario and vendor) met a model limit" in out
    assert main(["explore", "--json", "--vendor", "both", "--out", str(tmp_path / "out"),
                 str(vmgexit), str(VIRT / "nmi_wakes_hlt.toml")]) == Exit.BAD_INPUT
    explored = json.loads(capsys.readouterr().out)["explored"]
    assert main(["run", "--vendor", "svm", str(vmgexit)]) == Exit.BAD_INPUT
    out = capsys.readouterr().out
    assert "MODEL LIMIT VMMCALL outside an SEV-ES guest" in out and "SAME AS BARE METAL" not in out
    assert "NOT COMPARED the run under KVM stopped at the model limit above" in out
    assert [(e["vendor"], e["model_limit"] is not None) for e in explored] == [
        ("svm", True), ("vmx", False), ("svm", False), ("vmx", False)]
    assert explored[0]["model_limit"].startswith("under KVM on SVM: VMMCALL")
    assert all(e["schedules"] > 0 and e["distinct_outcomes"] > 0 for e in explored[1:])


@pytest.mark.parametrize("steps", ["0", "-5", "10000001", "many"])
def test_max_steps_option_has_the_scenarios_range(steps, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--max-steps", steps, str(EXAMPLE)])
    assert e.value.code == Exit.BAD_INPUT
    assert "--max-steps" in capsys.readouterr().err
