"""Several CPUs on one memory (arch/machine.py): IPIs, INIT/SIPI, cross-modifying code, and the
interleavings the explorer runs (check/interleave.py)."""

import pytest

from kvmodel.arch.apic import IcrDeliveryMode, Ipi, Shorthand
from kvmodel.arch.machine import Switch
from kvmodel.check.interleave import explore_interleavings
from kvmodel.errors import ScenarioError
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import run, run_machine

HANDLERS = '''
count_handler:
    incq count
    mov $0x80b, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    iretq
.data
.balign 64
count: .quad 0
'''


def scenario(code: str, cpus: str = 'count = 2\nentry = ["start", "ap_start"]', extra: str = ""):
    return parse(f"""
[cpus]
{cpus}

[guest]
code = '''
{code}
{HANDLERS}
'''

[idt]
0x40 = "count_handler"
{extra}
""")


def test_icr_targets_by_shorthand_and_destination():
    ids = range(3)
    assert Ipi(0x40, IcrDeliveryMode.FIXED, Shorthand.SELF, 2).targets(1, ids) == [1]
    assert Ipi(0x40, IcrDeliveryMode.FIXED, Shorthand.ALL_INCLUDING_SELF, 0).targets(1, ids) == [0, 1, 2]
    assert Ipi(0x40, IcrDeliveryMode.FIXED, Shorthand.ALL_EXCLUDING_SELF, 0).targets(1, ids) == [0, 2]
    assert Ipi(0x40, IcrDeliveryMode.FIXED, Shorthand.NONE, 0xFFFF_FFFF).targets(1, ids) == [0, 1, 2]
    assert Ipi(0x40, IcrDeliveryMode.FIXED, Shorthand.NONE, 7).targets(1, ids) == []  # no such APIC
    assert Ipi.from_icr(1 << 32 | 0x4600 | 0x11) == Ipi(0x11, IcrDeliveryMode.STARTUP, Shorthand.NONE, 1)
    assert Ipi.from_icr(0x100) is None  # lowest priority: not carried


def test_one_cpu_still_faults_on_an_ipi_to_another_apic():
    s = parse("""
[guest]
code = '''
start:
    mov $0x830, %ecx
    mov $1, %edx
    mov $0x40, %eax
    wrmsr
    hlt
gp:
    hlt
'''
[idt]
"#GP" = "gp"
""")
    result = run(s)
    assert [d.vector for d in result.deliveries] == [13]
    assert result.cpu_of == ()  # one CPU: the trace is as before


def test_broadcast_including_self_reaches_every_cpu():
    s = scenario('''
start:
    mov $0x830, %ecx
    xor %edx, %edx
    mov $(0x40 | (2 << 18)), %eax   # fixed, all including self
    sti
    wrmsr
    hlt
ap_start:
    sti
    hlt
    hlt
''')
    result = run_machine(s)
    assert result.limit is None
    delivered = [(cpu, o.vector) for o, cpu in zip(result.trace, result.cpu_of, strict=True)
                 if o.kind == "delivery"]
    assert sorted(delivered) == [(0, 0x40), (1, 0x40)]
    count = dict(result.program.symbols)["count"]
    assert int.from_bytes(result.memory[count:count + 8], "little") == 2


def test_init_of_the_bootstrap_cpu_is_a_model_limit():
    s = scenario('''
start:
    hlt
ap_start:
    mov $0x830, %ecx
    xor %edx, %edx
    mov $0x4500, %eax      # INIT to CPU 0
    wrmsr
    hlt
''')
    result = run_machine(s)
    assert "INIT of the bootstrap CPU" in result.limit


def test_sipi_to_a_running_cpu_is_ignored_and_init_then_sipi_restarts_it():
    s = scenario('''
start:
    mov $0x830, %ecx
    mov $1, %edx
    mov $0x4611, %eax      # SIPI, vector 0x11: CPU 1 runs, so it is ignored
    wrmsr
    mov $0x4500, %eax      # INIT: CPU 1 waits for a SIPI
    wrmsr
    mov $0x4611, %eax      # SIPI: CPU 1 starts at 0x11000
    wrmsr
    hlt
ap_start:
    pause
    jmp ap_start
.balign 4096
ap_page:
    incq count
    hlt
''')
    result = run_machine(s)
    arrivals = [(o.event, o.fate.name) for o, cpu in zip(result.trace, result.cpu_of, strict=True)
                if cpu == 1 and o.kind == "arrival"]
    assert arrivals == [("sipi", "DROPPED"), ("init", "PENDING"), ("sipi", "PENDING")]
    ap, symbols = result.smp.finals[1], dict(result.program.symbols)
    assert symbols["ap_page"] == 0x11000
    assert ap.halted and 0x11000 < ap.rip < 0x11010  # at the HLT after incq count
    assert dict(ap.registers)["rsp"] == 0  # INIT cleared the registers (SDM 9.1.1)
    count = symbols["count"]
    assert int.from_bytes(result.memory[count:count + 8], "little") == 1


def test_cpus_table_is_checked():
    with pytest.raises(ScenarioError, match="more than count"):
        scenario("start:\n    hlt\nap_start:\n    hlt",
                 cpus='count = 2\nentry = ["start", "ap_start", "start"]')
    with pytest.raises(ScenarioError, match="there is one CPU"):
        parse("""
[guest]
code = "start: hlt"
[[expect.delivery]]
vector = 0x40
cpu = 1
""")


RACY = '''
start:
    mov $0x830, %ecx
    mov $1, %edx
    mov $0x400, %eax        # NMI to CPU 1
    wrmsr
    hlt
ap_start:
    nop
    nop
    hlt
nmi_handler:
    iretq
'''


def test_the_explorer_finds_where_an_nmi_ipi_lands_and_reduces():
    """The NMI may reach CPU 1 before, between or after its NOPs: the schedule decides, and
    a switch before CPU 0's ICR write lets CPU 1 run first. Fewer interleavings than the naive."""
    s = scenario(RACY, extra='NMI = "nmi_handler"')
    found = explore_interleavings(s, 2)
    assert found.failures == [] and found.limit is None
    assert len(found.outcomes) >= 3  # before, between and after the NOPs (and at the HLT)
    assert found.explored < explore_interleavings(s, 2, reduce=False).explored
    returns = set()
    for schedule in ((), (Switch(1, 1),)):  # CPU 0 first; CPU 1 first (at the start)
        r = run_machine(s, schedule=schedule)
        returns |= {o.return_rip for o, cpu in zip(r.trace, r.cpu_of, strict=True)
                    if cpu == 1 and o.kind == "delivery"}
    assert len(returns) == 2


def test_an_expectation_that_holds_in_one_interleaving_only_is_a_failure():
    s = scenario(RACY, extra='''NMI = "nmi_handler"
[[expect.delivery]]
cpu = 1
vector = "NMI"
return = "ap_start"
''')
    assert run_machine(s).passed  # the default interleaving: CPU 0 first
    found = explore_interleavings(s, 2)
    assert found.failures and "cpu 1: delivery 1" in found.failures[0][2]


def test_cross_modifying_code_drops_the_other_cpus_decoded_instruction():
    """CPU 1 decoded the INT3 at `site`; CPU 0's write of a NOP must reach CPU 1's next fetch."""
    s = scenario('''
start:
    sti
    hlt
    movb $0x90, site
    mov $0x830, %ecx
    mov $1, %edx
    mov $0x40, %eax
    wrmsr
    hlt
ap_start:
    call site_once
    mov $0x830, %ecx
    xor %edx, %edx
    mov $0x40, %eax
    wrmsr
    sti
    hlt
    call site_once
    hlt
site_once:
site:
    int3
    ret
bp:
    iretq
''', extra='"#BP" = "bp"')
    result = run_machine(s)
    assert result.limit is None
    bps = [o for o, cpu in zip(result.trace, result.cpu_of, strict=True)
           if cpu == 1 and o.kind == "delivery" and o.vector == 3]
    assert len(bps) == 1


@pytest.mark.parametrize("name", ["nmi_ipi_to_other_cpu", "cross_modifying_code_int3_to_nop"])
def test_the_reduction_loses_no_outcome(name):
    """With a choice point at every step, one switch: the same distinct outcomes as with the
    reduction, from fewer runs."""
    from pathlib import Path

    from kvmodel.scenario.load import load
    s = load(Path(__file__).parents[3] / "scenarios" / "smp" / f"{name}.toml")
    reduced = explore_interleavings(s, 1)
    naive = explore_interleavings(s, 1, reduce=False)
    assert reduced.outcomes == naive.outcomes
    assert reduced.explored <= naive.explored


def test_the_reduction_loses_no_outcome_of_a_race():
    s = scenario(RACY, extra='NMI = "nmi_handler"')
    reduced = explore_interleavings(s, 2)
    naive = explore_interleavings(s, 2, reduce=False)
    assert reduced.outcomes == naive.outcomes
    assert reduced.explored < naive.explored


def test_the_reduction_loses_no_outcome_of_nmi_ipis_into_a_loop():
    """kvm-unit-tests' test_sti_nmi with a real second CPU: each CPU's IPI follows steps that
    touch nothing shared (CPU 1's NMI handler before its ack, CPU 0's ack handler before the
    second NMI), and the other CPU's position when it lands must be reachable with as many
    switches as the naive search spends (issue 22: 20 of 63 outcomes at 2 switches before)."""
    from pathlib import Path

    from kvmodel.scenario.load import load
    s = load(Path(__file__).parents[3] / "scenarios" / "smp" / "apic_nmi_never_in_sti_shadow.toml")
    for bound in (1, 2):
        reduced = explore_interleavings(s, bound)
        naive = explore_interleavings(s, bound, reduce=False)
        assert not reduced.failures and not naive.failures
        assert reduced.outcomes == naive.outcomes
        assert reduced.explored < naive.explored


def test_the_reduction_loses_no_outcome_of_an_ipi_sent_across_quanta():
    """CPU 1 spins; with three switches the naive search lets CPU 1 run three QUANTUMs
    (round-robin hand-overs, not switches) while CPU 0 takes one step of its way to the ICR
    write in each: the IPI lands after 192 of CPU 1's steps. The reduced search needs the
    steps of a CPU on its way to an IPI to be choice points in a turn it got by a QUANTUM."""
    from pathlib import Path

    from kvmodel.scenario.load import load
    s = load(Path(__file__).parents[3] / "scenarios" / "smp" / "fixed_ipi_to_running_cpu.toml")
    reduced = explore_interleavings(s, 3)
    naive = explore_interleavings(s, 3, reduce=False)
    assert reduced.outcomes == naive.outcomes
    assert reduced.explored < naive.explored
