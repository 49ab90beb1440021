// SPDX-License-Identifier: GPL-2.0-only
/*
 * vnmi_set_events_extra_nmi: KVM_GET_VCPU_EVENTS -> KVM_SET_VCPU_EVENTS on a
 * vCPU whose NMI waits in V_NMI_PENDING (AMD vNMI) makes the guest take that
 * NMI twice.
 *
 * Written by kvmodel (an executable model of KVM's event injection) as a
 * reproducer for a candidate upstream finding; NOT compiled or run by its
 * authors (no kernel tree, no vNMI hardware).  See README.md beside it.
 *
 * Finding (kvmodel: tests/contract/test_kvm_invariants.py, the round trip
 * xfailed for every scenario with [kvm] vnmi = true; shown by
 * vnmi/host_fault_idt_during_nmi, vnmi/host_fault_stack_during_nmi,
 * vnmi/nmi_and_interrupt_together, vnmi/nmi_wakes_hlt,
 * vnmi/save_restore_nmi_injected, nested/svm_clgi_holds_nmi_until_stgi,
 * nested/svm_l1_nmi_held_by_clgi_across_vmrun):
 *
 *   KVM_GET_VCPU_EVENTS runs process_nmi(), which hands a queued NMI to the
 *   CPU (svm_set_vnmi_pending(): V_NMI_PENDING=1), and reports
 *   nmi.pending = kvm_get_nr_pending_nmis() = 1.  KVM_SET_VCPU_EVENTS with
 *   the same struct sets nmi_pending = 0 and nmi_queued = 1 but leaves
 *   V_NMI_PENDING set.  The next process_nmi() keeps the queued NMI
 *   (limit 2, minus 1 for the pending vNMI, NMIs unmasked), cannot pend it
 *   in hardware (already pending) and injects it through EVENTINJ: the one
 *   NMI userspace asked for arrives twice.
 *
 * Bare metal (and KVM without vNMI): one NMI per KVM_NMI, whatever
 * userspace reads and writes back in between (a GET/SET round trip must
 * change nothing).
 *
 * The test queues one NMI with KVM_NMI twice: first without a round trip
 * (the control: exactly one NMI), then with KVM_GET_VCPU_EVENTS ->
 * KVM_SET_VCPU_EVENTS in between.
 */
#include <stdio.h>
#include <string.h>

#include "kvm_util.h"
#include "processor.h"

/* CPUID Fn8000_000A_EDX[25] (APM Vol.2 15.21.10 "NMI Virtualization"). */
#ifndef X86_FEATURE_VNMI
#define X86_FEATURE_VNMI	KVM_X86_CPU_FEATURE(0x8000000A, 0, EDX, 25)
#endif

static volatile uint32_t nmis;

static void guest_nmi_handler(struct ex_regs *regs)
{
	nmis++;
}

/* A few exits (CPUID always exits): any chance KVM has to inject an NMI. */
static void guest_let_kvm_inject(void)
{
	uint32_t eax, ebx, ecx, edx;
	int i;

	for (i = 0; i < 8; i++)
		cpuid(0, &eax, &ebx, &ecx, &edx);
}

static void guest_code(void)
{
	GUEST_SYNC(1);		/* host: KVM_NMI */
	guest_let_kvm_inject();
	__GUEST_ASSERT(nmis == 1, "control: one KVM_NMI gave %u NMIs", nmis);

	GUEST_SYNC(2);		/* host: KVM_NMI, then GET -> SET_VCPU_EVENTS */
	guest_let_kvm_inject();
	__GUEST_ASSERT(nmis == 2,
		       "a KVM_GET/SET_VCPU_EVENTS round trip turned one KVM_NMI into %u NMIs "
		       "(bare metal: 1)", nmis - 1);
	GUEST_DONE();
}

static void events_round_trip(struct kvm_vcpu *vcpu)
{
	struct kvm_vcpu_events events;

	vcpu_events_get(vcpu, &events);
	pr_info("KVM_GET_VCPU_EVENTS: nmi.pending = %u, nmi.masked = %u, nmi.injected = %u\n",
		events.nmi.pending, events.nmi.masked, events.nmi.injected);
	TEST_ASSERT(events.nmi.pending == 1 && !events.nmi.masked,
		    "expected one NMI pending and NMIs unmasked, got pending %u masked %u",
		    events.nmi.pending, events.nmi.masked);
	vcpu_events_set(vcpu, &events);
}

int main(int argc, char *argv[])
{
	struct kvm_vcpu *vcpu;
	struct kvm_vm *vm;
	struct ucall uc;

	TEST_REQUIRE(host_cpu_is_amd);
	TEST_REQUIRE(this_cpu_has(X86_FEATURE_VNMI));
	TEST_REQUIRE(get_kvm_amd_param_bool("vnmi"));

	vm = vm_create_with_one_vcpu(&vcpu, guest_code);
	vm_install_exception_handler(vm, NMI_VECTOR, guest_nmi_handler);

	for (;;) {
		vcpu_run(vcpu);
		TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_IO);

		switch (get_ucall(vcpu, &uc)) {
		case UCALL_SYNC:
			/* Finish the ucall's OUT first, as a VMM saving state would. */
			vcpu_run_complete_io(vcpu);
			vcpu_ioctl(vcpu, KVM_NMI, NULL);
			if (uc.args[1] == 2)
				events_round_trip(vcpu);
			break;
		case UCALL_ABORT:
			REPORT_GUEST_ASSERT(uc);
			/* NOT REACHED */
		case UCALL_DONE:
			goto done;
		default:
			TEST_FAIL("Unknown ucall %lu", uc.cmd);
		}
	}

done:
	kvm_vm_free(vm);
	return 0;
}
