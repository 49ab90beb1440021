"""Known-wrong behaviours of KVM that kvmodel can switch on by name (`--bug NAME`).

Each entry names the fault point the model reads (kvmodel._faults), where the
wrong behaviour comes from, and a shipped scenario whose exploration finds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmodel.errors import KvmodelError


@dataclass(frozen=True, slots=True)
class Bug:
    name: str
    summary: str
    reference: str
    vendors: tuple[str, ...]
    scenario: str  # a shipped scenario whose exploration shows it


CATALOGUE: tuple[Bug, ...] = (
    Bug("no_reinjection",
        "vendor completion clears the event queues but never re-queues the event from EXITINTINFO / "
        "IDT-vectoring info, so an NMI or interrupt whose delivery was cut short is lost",
        "the re-injection KVM does in svm_complete_interrupts() / __vmx_complete_interrupts(); "
        "SDM 27.2.3, APM 15.7.2",
        ("svm", "vmx"), "scenarios/virt/explore_nmi_with_host_faults.toml"),
    Bug("no_req_event_on_window",
        "an interrupt-window, NMI-window or IRET exit does not raise KVM_REQ_EVENT, so the event that "
        "waited for the window is not injected until some other request comes",
        "KVM_REQ_EVENT in handle_interrupt_window(), handle_nmi_window(), "
        "interrupt_window_interception(), iret_interception() (arch/x86/kvm)",
        ("svm", "vmx"), "scenarios/virt/explore_nmi_with_host_faults.toml"),
    Bug("svm_retry_soft_exception",
        "SVM drops an INT3/INTO whose delivery was cut short and re-executes the instruction instead of "
        "re-injecting it: a code breakpoint on the INT3 fires twice",
        "[PATCH 5/8] KVM: SVM: Re-inject INT3/INTO instead of retrying the instruction "
        "(Sean Christopherson, April 2022; upstream 6ef88d6e36c2); seed 003",
        ("svm",), "scenarios/virt/int3_code_breakpoint_host_fault.toml"),
    Bug("svm_retry_soft_interrupt",
        "SVM drops an INT n whose delivery was cut short and re-executes it: a code breakpoint on the "
        "INT n fires twice",
        "KVM: SVM: Re-inject INTn instead of retrying the insn on \"failure\" (upstream 7e5b5ef8dca3)",
        ("svm",), "scenarios/softint/int_n_code_breakpoint.toml"),
    Bug("svm_no_rip_unwind",
        "without NRIPS, KVM advances RIP itself to inject INT n / INT3 / INTO and does not move it back "
        "when the delivery is cut short: the re-injection starts from the next instruction",
        "KVM: SVM: Unwind \"speculative\" RIP advancement if INTn injection \"fails\" (Sean "
        "Christopherson, 2022)",
        ("svm",), "scenarios/softint/int_n_without_nrips.toml"),
    Bug("svm_soft_int_rip_without_csbase",
        "a mutation, not a shipped bug: the linear-RIP match that decides whether the guest is still "
        "at the injected soft event compares CS.base + RIP with the RIP KVM saved, leaving out the "
        "CS.base it snapshotted; with a based code segment it never matches, so RIP is not unwound "
        "(nor next_rip restored)",
        "soft_int_csbase in KVM: SVM: Re-inject INT3/INTO instead of retrying the instruction "
        "(6ef88d6e36c2; seed 003). The shipped CS.base bug was nested: nested_vmcb02_prepare_control() "
        "read the stale save.cs.base, fixed by KVM: nSVM: Pull CS.Base from actual VMCB12 for soft "
        "int/ex re-injection (Maciej S. Szmigiero, 2022-07-18); not modelled, as a based CS with "
        "nesting is a model limit",
        ("svm",), "scenarios/softint/int_n_cs_base_without_nrips.toml"),
    Bug("process_nmi_no_req_event",
        "process_nmi() leaves an NMI pending without raising KVM_REQ_EVENT: nothing injects it until "
        "some other request comes",
        "KVM: x86: Raise an event request when processing NMIs if an NMI is pending (2cb9317377ca); "
        "the vNMI v2 review (seed 000, Sean Christopherson, 2023-02-01)",
        ("svm", "vmx"), "scenarios/virt/explore_nmi_with_host_faults.toml"),
    Bug("vnmi_warn_outside_masked",
        "svm_enable_nmi_window() WARNs whenever vNMI is on, also when the NMI is only held by an STI "
        "shadow (or GIF=0): a guest can make the host WARN, and panic with panic_on_warn",
        "KVM: SVM: WARN on vNMI + NMI window iff NMIs are outright masked (CVE-2024-39483, Fixes "
        "fa4c027a7956); seed 000",
        ("svm",), "scenarios/vnmi/two_nmis_in_sti_shadow.toml"),
    Bug("notify_kills_guest",
        "handle_notify() ends the run with KVM_EXIT_INTERNAL_ERROR (KVM_INTERNAL_ERROR_NO_EVENT_WINDOW) "
        "on every notify exit, where the guest could simply be resumed: a guest that merely kept the "
        "CPU busy is killed",
        "[PATCH v2] KVM: VMX: Enable Notify VM exit (Tao Xu, May 2021) and Sean Christopherson's "
        "review (seed 002); the final design resumes the guest (upstream 2f4073e08f4c)",
        ("vmx",), "scenarios/notify/db_storm_notify_exits.toml"),
    Bug("notify_no_nmi_reblock",
        "handle_notify() ignores exit qualification bit 12: after a notify exit inside IRET the "
        "re-executed IRET runs with NMIs unblocked, so a held NMI lands inside the first handler",
        "handle_notify() in the Notify VM exit series (seed 002; SDM 27.2.3 bit 12); the same rule "
        "as handle_ept_violation()",
        ("vmx",), "scenarios/notify/nmi_iret_interrupted.toml"),
    Bug("sev_es_nmi_unmask_late",
        "an SEV-ES guest's NMI_COMPLETE only marks the IRET as awaiting completion, and NMIs are "
        "unmasked at the next VM exit: with a tickless host and a busy-waiting guest, never",
        "[PATCH v5 28/34] KVM: SVM: Add NMI support for an SEV-ES guest (Tom Lendacky, 2020); "
        "seed 001 (Sean Christopherson, 2023-06-13: \"there's a real bug here\")",
        ("svm",), "scenarios/sev_es/nmi_complete_busy_wait.toml"),
    Bug("sev_es_nmi_singlestep",
        "svm_enable_nmi_window() sets TF/RF to single-step an SEV-ES guest, whose RFLAGS live in the "
        "encrypted VMSA: dead writes, and an NMI single-step that never ends (reported as a model "
        "check)",
        "seed 001 (Sean Christopherson, 2023-06-13: \"KVM can't actually single-step an SEV-ES "
        "guest, but tries to set RFLAGS.TF anyways\")",
        ("svm",), "scenarios/sev_es/nmi_in_sti_shadow.toml"),
    Bug("fred_no_event_data_reinjection",
        "an exit during FRED delivery re-injects the event without its event data (ORIGINAL_EVENT_DATA "
        "is not carried to INJECTED_EVENT_DATA): a re-delivered #PF's frame says address 0",
        "KVM FRED series (Xin Li): \"KVM: VMX: Handle FRED event data\"; reference x86-arch.md 7.x "
        "(injected-event data 0x2052, original-event data 0x2404)",
        ("vmx",), "scenarios/fred/page_fault_event_data.toml"),
    Bug("fred_nmi_bit_in_cs",
        "the FRED frame KVM builds for a host NMI has the NMI bit next to CS (the May 2022 spec) "
        "instead of in the SS word: ERETS leaves host NMIs blocked and the next one is lost",
        "seed 004 (Sean Christopherson, 2023-08-01: \"The spec I have from May 2022 says the NMI "
        "bit colocated with CS, not SS\"); Linux struct fred_ss",
        ("vmx",), "scenarios/fred/host_nmi_and_irq_exits_fred_host.toml"),
    Bug("fred_nmi_return_without_erets",
        "KVM's FRED dispatch of a host NMI returns with a plain RET, as for IRQs: NMI blocking left "
        "by the NMI exit is never ended",
        "seed 004 (\"only NMI handling does an ERETS to the target! IRQ handling doesn't need to "
        "unmask NMIs and so simply uses CALL+RET\")",
        ("vmx",), "scenarios/fred/host_nmi_and_irq_exits_fred_host.toml"),
    Bug("fred_event_type_zero",
        "KVM builds the host's FRED frame with event type 0 for every event, so an NMI reaches the "
        "host as external interrupt 2",
        "seed 004 (\"what event type is 0? ... vmx_do_fred_interrupt_irqoff((EVENT_TYPE_HWINT << "
        "16) | vector)\")",
        ("vmx",), "scenarios/fred/host_nmi_and_irq_exits_fred_host.toml"),
    Bug("fred_no_nested_reinjection",
        "an exit during the FRED delivery of a nested exception re-injects it without the nested "
        "flag (interruption-information bit 13): the guest's frame loses SS bit 58",
        "KVM FRED series v9 13/22 (Xin Li, 2025: the nested flag of a queued exception); Bochs "
        "vmx.cc",
        ("vmx",), "scenarios/fred/nested_page_fault_reinjected.toml"),
    Bug("notify_window_not_in_vmcs02",
        "the notify window and control are set in vmcs01 only: L1 runs its CPU-hogging loop in an "
        "L2 and the host never gets the CPU back",
        "seed 002 (Sean Christopherson, 2021-07-30: \"this patch absolutely needs to apply KVM's "
        "notify_window to vmcs02\"); KVM prepare_vmcs02_constant_state()",
        ("vmx",), "scenarios/nested/notify_window_in_vmcs02.toml"),
    Bug("notify_reflected_to_l1",
        "a notify exit from L2 is reflected into L1, which never enabled notify exits and cannot get "
        "one on hardware",
        "Notify VM exit review (kvm-upstream.md B7: reflecting Notify to an L1 never offered it could "
        "crash L1); KVM nested_vmx_l1_wants_exit() returns false for EXIT_REASON_NOTIFY",
        ("vmx",), "scenarios/nested/notify_window_in_vmcs02.toml"),
    Bug("nested_nmi_exit_leaves_nmis_unblocked",
        "an NMI for L1 that becomes a VM exit from L2 is consumed but does not block NMIs, as the "
        "hardware's NMI-caused exit does: L1 runs its exit handler open to another NMI",
        "KVM vmx_check_nested_events(): \"The NMI-triggered VM exit counts as injection: clear this "
        "one and block further NMIs\"; SDM 27.5.5",
        ("vmx",), "scenarios/nested/vmx_l1_nmi_while_l2_runs.toml"),
    Bug("nested_irq_injected_into_l2",
        "an interrupt for L1, which exits on external interrupts, is injected into L2 instead of "
        "ending L2's turn: L2 runs L1's interrupt handler",
        "KVM vmx_interrupt_allowed(): \"An IRQ must not be injected into L2 if it's supposed to "
        "VM-Exit\"; vmx_check_nested_events()",
        ("vmx",), "scenarios/nested/vmx_l1_interrupt_while_l2_runs.toml"),
    Bug("nested_svm_next_rip_not_synced",
        "vmcb02's next_rip is not taken from vmcb12, so a soft interrupt or INT3 that L1 injects "
        "into L2 returns to a stale or zero address",
        "KVM: nSVM: Sync next_rip field from vmcb12 to vmcb02 (Maciej S. Szmigiero, 00f08d99dd7d); "
        "kvm-upstream.md B9; APM 15.7.1",
        ("svm",), "scenarios/nested/svm_l1_injects_int3_without_instruction.toml"),
    Bug("nested_svm_soft_int_not_tracked",
        "a soft event L1 injects into L2 is not recorded in soft_int_*: when its delivery is cut short "
        "by an exit L0 handles, next_rip is not put back and KVM decodes L2's code to find the "
        "return address, though no instruction stands behind the event",
        "the soft_int_* tracking of vmcb12's EVENTINJ in nested_vmcb02_prepare_control() (KVM: SVM: "
        "Re-inject INT3/INTO instead of retrying the instruction, 6ef88d6e36c2; seed 003)",
        ("svm",), "scenarios/nested/svm_l1_injects_int3_without_instruction.toml"),
    Bug("nested_svm_nmi_l1_to_l2_untracked",
        "an NMI L1 injected into L2, re-injected by L0 after an exit during its delivery, is treated "
        "as KVM's own: L1's NMIs are marked masked (nmi_masked, IRET intercept) and counted",
        "KVM: nSVM: Transparently handle L1 -> L2 NMI re-injection (Maciej S. Szmigiero, "
        "159fc6fa3b7d): nmi_l1_to_l2 in svm_inject_nmi()",
        ("svm",), "scenarios/nested/svm_l1_injects_nmi.toml"),
    Bug("nested_vnmi_pending_adds_bit",
        "at nested VMRUN, L1's NMI waiting in vmcb01's V_NMI_PENDING is moved to nmi_pending by "
        "adding the bit's value (2048) instead of 1: process_nmi() clamps it to two, one NMI too many",
        "Sean Christopherson's review of \"[PATCH v2 10/11] KVM: SVM: implement support for vNMI\" "
        "(2023-02-01); kvm-upstream.md B1",
        ("svm",), "scenarios/nested/svm_l1_nmi_held_by_clgi_across_vmrun.toml"),
    Bug("svm_gif_instructions_without_svme",
        "with vGIF, STGI and CLGI are left unintercepted while the guest's EFER.SVME is clear; the CPU, "
        "which sees SVME set in the VMCB, executes them instead of raising #UD",
        "Kevin Cheng, 2026, svm_recalc_instruction_intercepts(): \"Intercept instructions that #UD "
        "if EFER.SVME=0, as SVME must be set even when running the guest\"; APM 15.4, 15.5.1",
        ("svm",), "scenarios/virt/clgi_without_svm_is_ud.toml"),
    Bug("get_vcpu_events_nmi_pending_bool",
        "KVM_GET_VCPU_EVENTS reports nmi.pending as 0 or 1: with two NMIs pending (one to deliver, "
        "one held), a same-vCPU GET/SET round trip or a migration loses the second",
        "KVM: x86: Save/restore all NMIs when multiple NMIs are pending (Sean Christopherson, "
        "upstream ab2ee212a57b; Fixes 7460fb4a3400 \"KVM: Fix simultaneous NMIs\")",
        ("svm", "vmx"), "scenarios/vmm/explore_vmm_calls.toml"),
    Bug("set_vcpu_events_nmi_unclamped",
        "KVM_SET_VCPU_EVENTS stores nmi.pending as is, with no KVM_REQ_NMI: process_nmi()'s limit "
        "(two, one while NMIs are masked) never sees the NMIs userspace set, and each is delivered",
        "KVM: x86: Save/restore all NMIs when multiple NMIs are pending (ab2ee212a57b: \"allows "
        "userspace to restore 255 pending NMIs\", adds KVM_REQ_NMI) and KVM: x86: Route pending NMIs "
        "from userspace through process_nmi() (upstream bdedff263132)",
        ("svm", "vmx"), "scenarios/vmm/explore_vmm_calls.toml"),
    Bug("nested_triple_fault_kills_l1",
        "KVM_REQ_TRIPLE_FAULT raised while L2 runs (a fault KVM merges onto a #DF it re-queued, e.g. "
        "an L0-intercepted #GP while delivering L2's #DF) ends KVM_RUN with KVM_EXIT_SHUTDOWN: the "
        "VMM kills L1, where the CPU would have given L1 a TRIPLE_FAULT (VMX) or SHUTDOWN (SVM) exit",
        "KVM: x86: Handle triple fault in L2 without killing L1 (Sean Christopherson, upstream "
        "cb6a32c2b877): nested_ops->triple_fault(), nested_vmx_triple_fault(), "
        "nested_svm_triple_fault(); the SVM twin is nested/svm_l2_gp_during_injected_df_shutdown_exit",
        ("vmx",), "scenarios/nested/vmx_l2_gp_during_injected_df_triple_fault_exit.toml"),
    Bug("exception_morph_at_injection",
        "an exception KVM queues for L2 is checked against L1's intercepts only when it is about to "
        "be injected: before that it merges with what L2 has queued, so an L1-intercepted #GP on "
        "the delivery of an injected #DE becomes a #DF in L2 (and a shutdown), and its payload "
        "(CR2, DR6) reaches L2's registers before the exit to L1",
        "KVM: x86: Morph pending exceptions to pending VM-Exits at queue time (Sean Christopherson, "
        "upstream 7709aba8f716); the payload half, as the 2026 \"Defer non-architectural deliver of "
        "exception payload\" patch describes da998b46d244's time; the VMX twin (DR6 written before "
        "the #DB exit) is nested/vmx_l2_single_step_over_emulated_cr8_write",
        ("svm",), "scenarios/nested/svm_l1_intercepts_gp_during_injected_de.toml"),
    Bug("nested_exception_blocked_by_injected_event",
        "an exception L1 intercepts is held back (-EBUSY) while L0 re-injects an event into L2; "
        "the re-injection is dropped for the pending exception, and the next completion clears both: "
        "L1 never gets the exception's exit, nor the event in its EXITINTINFO",
        "KVM: x86: pending exceptions must not be blocked by an injected event (Maxim Levitsky, "
        "upstream 4020da3b9f0c): block only on nested_run_pending in svm_check_nested_events() and "
        "vmx_check_nested_events()",
        ("svm",), "scenarios/nested/svm_l1_intercepts_gp_during_nmi_delivery.toml"),
    Bug("nested_svm_exitintinfo_from_vmcb02",
        "nested_svm_vmexit() copies vmcb02's EXITINTINFO and clears only the exception and interrupt "
        "queues, and svm_complete_interrupts() runs only for exits L0 keeps: an NMI L0 re-injected "
        "into L2 (an L1-injected NMI retried after an NPF) stays nmi_injected across a #VMEXIT to L1 "
        "and is injected into L1, while vmcb12 never reflects what L0 had queued for L2",
        "KVM: nSVM: synthesize correct EXITINTINFO on vmexit (Paolo Bonzini, 2020, [PATCH 21/30] of "
        "the nested SVM rework; upstream hash not found here): nested_vmcb_save_pending_event(), "
        "svm_complete_interrupts() moved before the nested exit; APM 15.7.2",
        ("svm",), "scenarios/nested/svm_l1_intercepts_pf_during_reinjected_nmi.toml"),
    Bug("nested_svm_vmexit_cr2_from_vmcb02",
        "nested_svm_vmexit() writes vmcb12's CR2 from vmcb02's save area, which svm_vcpu_run() "
        "syncs with vcpu->arch.cr2 only around a run of L2: a #VMEXIT KVM synthesizes before L2 "
        "runs again (after a restore, whose KVM_SET_SREGS put CR2 in vcpu->arch.cr2 only, or "
        "after KVM injected a #PF into L2) hands L1 a stale CR2, which its next VMRUN loads into L2",
        "KVM: nSVM: Use vcpu->arch.cr2 when updating vmcb12 on nested #VMEXIT (Yosry Ahmed, "
        "2026, upstream 5c247d08bc81, Cc: stable); APM 15.5.1 and 15.6",
        ("svm",), "scenarios/nested/svm_l2_cr2_saved_at_exit_after_restore.toml"),
    Bug("nested_svm_vmexit_no_vmrun_single_step",
        "nested_svm_vmexit() queues no #DB when L1 single-stepped its VMRUN: L1's trap, which the CPU "
        "takes right after the #VMEXIT, comes one instruction late, from the single-step of the "
        "instruction after VMRUN (the trap of VMRUN itself is lost); put back on today's "
        "nested_svm_vmrun(), which no longer single-steps VMRUN itself",
        "KVM: nSVM: If VMRUN is single-stepped, queue the #DB intercept in nested_svm_vmexit() "
        "(Krish Sadhukhan, 2021, upstream 9a7de6ecc3ed); kvm-unit-tests svm host_rflags",
        ("svm",), "scenarios/nested/svm_vmrun_single_step_traps_after_vmexit.toml"),
    Bug("payload_quirk_events_only",
        "without KVM_CAP_EXCEPTION_PAYLOAD, only KVM_GET_VCPU_EVENTS delivers a pending exception's "
        "payload for userspace: a VMM that reads KVM_GET_SREGS / KVM_GET_DEBUGREGS before the events "
        "saves CR2/DR6 without it and puts the stale value back, so the guest's #DB handler sees DR6 "
        "without BS (the model has no early delivery at queue time, which upstream did outside L2: "
        "this is the behaviour upstream had for an exception queued in L2, shown on L1)",
        "KVM: x86: Defer non-architectural deliver of exception payload to userspace read (Sean "
        "Christopherson, 2026-02-18, lore 20260218005438.2619063-1-seanjc@google.com; Cc stable): "
        "\"the quirked behavior ... only works if userspace does KVM_GET_VCPU_EVENTS *before* CR2 "
        "or DR6 is saved, i.e. before KVM_GET_SREGS{,2} and KVM_GET_DEBUGREGS\"",
        ("svm", "vmx"), "scenarios/vmm/explore_register_orders.toml"),
    Bug("interrupt_window_with_event_in_flight",
        "kvm_vcpu_ready_for_interrupt_injection() ignores an exception pending or an event to "
        "re-inject: with a userspace irqchip the VMM, told the guest is ready, KVM_INTERRUPTs while a "
        "#UD is queued, and its interrupt is dropped when the #UD's delivery completes",
        "KVM: x86: accept userspace interrupt only if no event is injected (Paolo Bonzini, 2021, "
        "upstream fa7a549d321a; Fixes 71cc849b7093 \"KVM: x86: Fix split-irqchip vs interrupt injection "
        "window request\"; reported by Stas Sergeev for DOSEMU)",
        ("svm", "vmx"), "scenarios/vmm/interrupt_window_waits_for_pending_exception.toml"),
    Bug("svm_bug_on_irq_with_gif_clear",
        "svm_inject_irq() has BUG_ON(!gif_set(svm)): a VMM that KVM_INTERRUPTs (userspace irqchip) "
        "while the guest has run CLGI makes the host oops",
        "KVM: SVM: Don't BUG if userspace injects an interrupt with GIF=0 (Maciej S. Szmigiero and Sean "
        "Christopherson, 2022, upstream f17c31c48e5c; Fixes 219b65dcf6c0 \"KVM: SVM: Improve nested "
        "interrupt injection\")",
        ("svm",), "scenarios/vmm/kvm_interrupt_with_gif_clear.toml"),
    Bug("nested_mtf_no_event_request",
        "after L0 emulates an instruction of L2 that L1 single-steps with the monitor trap flag, "
        "mtf_pending is set without KVM_REQ_EVENT: vmx_check_nested_events() does not run before "
        "the next entry, L2 executes one more instruction, and L1's MTF VM exit comes one "
        "instruction late (before the fix, kvm_vcpu_running()'s call to kvm_check_nested_events(), "
        "removed in the same series and absent from the model, hid it)",
        "KVM: nVMX: Make an event request when pending an MTF nested VM-Exit (Sean "
        "Christopherson, [PATCH v4 02/12], Sep 2022; Fixes 5ef8acbdd687 \"KVM: nVMX: Emulate MTF "
        "when performing instruction emulation\"); vmx_update_emulated_instruction()",
        ("vmx",), "scenarios/nested/vmx_l2_mtf_after_io_l0_emulates.toml"),
    Bug("notify_cap_precedence",
        "KVM_ENABLE_CAP(KVM_CAP_X86_NOTIFY_VMEXIT) tests `!(u32)args[0] & ENABLED`, i.e. !flags: "
        "only flags == 0 is refused, and KVM_X86_NOTIFY_VMEXIT_USER without ENABLED is taken "
        "(returns 0, stores the window and USER, enables nothing)",
        "[PATCH v6 3/3] KVM: VMX: Enable Notify VM exit (Chenyi Qiang, 2022-04-21) and Sean "
        "Christopherson's review (2022-05-19); upstream kvm_vm_ioctl_enable_cap() tests "
        "`!((u32)cap->args[0] & KVM_X86_NOTIFY_VMEXIT_ENABLED)`",
        ("vmx",), "scenarios/vmm/notify_cap_every_flags_value.toml"),
    Bug("guest_debug_inject_over_injected",
        "KVM_SET_GUEST_DEBUG with KVM_GUESTDBG_INJECT_DB/BP checks only for a pending exception: "
        "over an injected one (its delivery cut short by an exit) kvm_multiple_exception() "
        "merges the #DB into it, replacing it (benign) or making a triple fault (after #DF)",
        "KVM: x86: Check for injected exceptions before queuing a debug exception (Yosry Ahmed, "
        "upstream e907b4e72488; the check dates from 4f926bf29186, 2009)",
        ("svm", "vmx"), "scenarios/vmm/guest_debug_inject_db_over_injected_exception.toml"),
    Bug("emulator_code_db_in_mov_ss_shadow",
        "kvm_vcpu_check_code_breakpoint() inhibits a code #DB on an emulated instruction only for "
        "RF=1: a breakpoint on the instruction right after MOV SS / POP SS fires although an Intel "
        "CPU suppresses it \"as if EFLAGS.RF were 1\" (SDM Vol.2 MOV, POP; 6.8.3)",
        "KVM: x86: Suppress code #DBs on Intel if MOV/POP SS blocking is active (Sean "
        "Christopherson, upstream baf67ca8e545); kvm_is_code_breakpoint_inhibited()",
        ("svm", "vmx"), "scenarios/virt/fep_code_breakpoint_after_mov_ss_suppressed.toml"),
    Bug("emulator_pop_ss_no_shadow",
        "the emulator's POP SS looks for the segment in the ModR/M reg field, which POP SS (0x17) "
        "does not have, so it never asks for the MOV SS shadow: an NMI or interrupt is taken "
        "right after an emulated POP SS, before the instruction the shadow protects",
        "KVM: x86/emulator: Fix handing of POP SS to correctly set interruptibility (Michal "
        "Luczaj, upstream 6aa5c47c351b); em_pop_sreg()",
        ("svm", "vmx"), "scenarios/virt/fep_pop_ss_shadow_holds_nmi.toml"),
    Bug("real_mode_error_code_at_queue",
        "whether an exception has an error code is decided when it is queued "
        "(kvm_multiple_exception() drops it outside protected mode), not when it is injected: an "
        "exception that reaches the queue another way, here a #GP with an error code that "
        "KVM_SET_VCPU_EVENTS stuffs into a real-mode vCPU, is injected with DELIVER_CODE set, and "
        "VM entry fails (SDM 26.2.1.3: the bit must be 0 with CR0.PE=0)",
        "KVM: x86: determine if an exception has an error code only when injecting it. (Maxim "
        "Levitsky, 2021, upstream b97f07458373; stable 5.10.55): the mode may change between "
        "queueing and injection, and an intercepted #PF from AMD's paged real mode has an error code",
        ("vmx",), "scenarios/vmm/real16_crafted_gp_with_error_code.toml"),
    Bug("real_mode_clears_error_code_value",
        "kvm_inject_exception() suppresses a real-mode exception's error code by clearing "
        "error_code instead of has_error_code: a #GP KVM queues for a real-mode guest (RDMSR of an "
        "unknown MSR) is injected with DELIVER_CODE set and VM entry fails",
        "KVM: x86: Clear \"has_error_code\", not \"error_code\", for RM exception injection (Sean "
        "Christopherson, 2023-03-22, upstream 6c41468c7c12; Fixes b97f07458373; Cc stable)",
        ("vmx",), "scenarios/virt/real16_rdmsr_gp_no_error_code.toml"),
    Bug("svm_skip_replaced_soft_int",
        "re-injecting an INT3/INTO/INT n whose delivery an exit cut short (no next_rip: a #NPF), "
        "SVM decodes whatever is at RIP now and skips it: if another vCPU has meanwhile written "
        "the real instruction over the INT3 (text_poke), KVM skips that unrelated instruction "
        "and injects a #BP whose return address is past it",
        "KVM: SVM: Don't skip unrelated instruction if INT3/INTO is replaced (Omar Sandoval, "
        "2025, upstream 4da3768e1820; Fixes 6ef88d6e36c2); svm_update_soft_interrupt_rip(), "
        "is_soft_int_instruction()",
        ("svm",), "scenarios/smp/text_poke_replaces_int3_during_reinjection.toml"),
    Bug("nmi_window_race",
        "an NMI IPI from another vCPU sets nmi_pending directly (with KVM_REQ_EVENT): landing "
        "between \"inject an NMI if allowed\" and \"request an NMI window\", it makes KVM request "
        "a window with NMIs unmasked, which on SVM single-steps the guest (TF|RF in the VMCB); "
        "the IPI's request cancels the entry, the NMI is injected with KVM's TF in the frame it "
        "pushes (svm_vcpu_run() of the time had no guard against that), and the guest sees TF "
        "set in code it never single-stepped",
        "KVM: Fix race between nmi injection and enabling nmi window (Avi Kivity, 2011, upstream "
        "f86368493ec0): nmi_pending made synchronous through vcpu->requests; today "
        "kvm_inject_nmi() queues (nmi_queued, KVM_REQ_NMI) and process_nmi() (7460fb4a3400)",
        ("svm",), "scenarios/smp/nmi_ipi_between_injection_and_nmi_window.toml"),
    Bug("nested_sipi_in_l2_skips_events",
        "vmx_check_nested_events() drops a SIPI that arrives while the vCPU runs L2 outside "
        "wait-for-SIPI, as it should, but then returns at once instead of looking at the other "
        "events: an interrupt L1 exits on that came with it is not turned into a VM exit while "
        "L2 is halted in vcpu_block(), the vCPU becomes runnable first, and vmcs12 reports the "
        "later exit with activity state ACTIVE after L2's HLT",
        "KVM: nVMX: Ignore SIPI that arrives in L2 when vCPU is not in WFS (Sean Christopherson, "
        "2022, upstream c2086eca8658; Fixes bf0cd88ce363)",
        ("vmx",), "scenarios/smp/vmx_sipi_to_halted_l2_with_interrupt.toml"),
    Bug("nested_exit_keeps_queued_events",
        "nested_vmx_vmexit() purges what was queued or injected for L2 only on a VM exit that "
        "fills vmcs12 (prepare_vmcs12()), not on a late VM-Fail or a forced exit: a VMM that rolls "
        "the vCPU back to a snapshot of L1 with KVM_SET_NESTED_STATE (vmx_leave_nested()) while "
        "L2's #UD waits for re-injection, and leaves KVM_SET_VCPU_EVENTS out (the snapshot holds "
        "no events), gets L2's #UD injected into L1",
        "KVM: nVMX: Unconditionally purge queued/injected events on nested \"exit\" (Sean "
        "Christopherson, 2022, upstream d953540430c5): \"Forced exit is definitely buggy, but has "
        "likely gone unnoticed because userspace probably follows the forced exit with "
        "KVM_SET_VCPU_EVENTS\"",
        ("vmx",), "scenarios/nested/vmx_rollback_purges_l2_reinjected_exception.toml"),
    Bug("nested_mtf_pending_survives_exit",
        "mtf_pending is cleared only by a vmx_check_nested_events() that nothing blocks, not on "
        "every nested VM exit: a VMM that rolls the vCPU back to a snapshot of L1 "
        "(KVM_SET_NESTED_STATE, vmx_leave_nested()) while L0 owes L1 an MTF VM exit for an "
        "instruction of L2 it emulated leaves it pending, and L1's next VMLAUNCH, without MTF, "
        "exits with MONITOR_TRAP_FLAG before L2 ran an instruction",
        "KVM: nVMX: Unconditionally clear mtf_pending on nested VM-Exit (Sean Christopherson, "
        "2022, upstream 593a5c2e3c12); SDM Vol.3 25.5.2",
        ("vmx",), "scenarios/nested/vmx_rollback_discards_pending_mtf.toml"),
    Bug("nested_gd_db_as_trap",
        "vmx_get_pending_dbg_trap() takes any #DB queued for L2 as a debug trap, a "
        "general-detect one (payload DR6.BD, from the #DB intercept or handle_dr(), RIP still at "
        "the MOV DR) too: an INIT that lands while it is queued makes vmx_check_nested_events() "
        "save BD (bit 13, reserved in that field, SDM 24.4.2) as the INIT_SIGNAL exit's pending "
        "debug exceptions in vmcs12, where hardware, whose INIT exits at a boundary with no "
        "debug exception pending, saves 0",
        "KVM: nVMX: Treat General Detect #DB (DR7.GD=1) as fault-like (Sean Christopherson, "
        "2022, upstream 8d178f460772; Fixes 684c0422da71 \"KVM: nVMX: Handle pending #DB when "
        "injecting INIT VM-exit\")",
        ("vmx",), "scenarios/smp/vmx_init_exits_l2_with_general_detect_db_queued.toml"),
    Bug("nested_exit_error_code_in_real_mode",
        "nested_vmx_inject_exception_vmexit() reports an error code (bit 11 of the VM-exit "
        "interruption information, and the error-code field) whenever the exception has one in "
        "protected mode: a #GP L0 queues for a real-mode L2 (RDMSR of an MSR no one has) that L1 "
        "intercepts reaches L1 with DELIVER_CODE set, where the CPU never sets it from real mode "
        "(SDM 27.2.2)",
        "KVM: nVMX: Do not report error code when synthesizing VM-Exit from Real Mode (Sean "
        "Christopherson, 2023-03-22, upstream 80962ec912db; Fixes b97f07458373, which moved the "
        "real-mode suppression from queueing to injection and missed this path)",
        ("vmx",), "scenarios/nested/vmx_l2_real_mode_gp_exit_no_error_code.toml"),
)

BY_NAME = {bug.name: bug for bug in CATALOGUE}


def lookup(name: str) -> Bug:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KvmodelError(f"no catalogued bug named {name!r}; "
                           f"known: {', '.join(BY_NAME)} (kvmodel bugs list)") from None
