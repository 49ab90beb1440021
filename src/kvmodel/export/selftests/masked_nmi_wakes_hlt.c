// SPDX-License-Identifier: GPL-2.0-only
/*
 * masked_nmi_wakes_hlt: a vCPU halted inside its NMI handler (NMIs blocked
 * until IRET, IF=0) leaves HLT when a second NMI is queued by KVM_NMI, or
 * restored as pending by KVM_SET_VCPU_EVENTS.
 *
 * Written by kvmodel (an executable model of KVM's event injection) as a
 * reproducer for a candidate upstream finding; NOT compiled or run by its
 * authors (no kernel tree, no hardware here).  See README.md beside it.
 *
 * Scenarios: virt/masked_nmi_wakes_hlt (its declared [[expect.divergence]])
 * and, nested, nested/vmx_l1_nmi_while_l2_runs (its [[explore.known]]
 * save_restore finding: the same wakeup after KVM_SET_VCPU_EVENTS).
 *
 *   kvm_inject_nmi() (KVM_NMI) and KVM_SET_VCPU_EVENTS with nmi.pending
 *   raise KVM_REQ_NMI; kvm_vcpu_has_events() counts a pending KVM_REQ_NMI as
 *   a wake event whether or not NMIs are masked, so vcpu_block() makes the
 *   vCPU runnable; process_nmi() then keeps the NMI pending (masked) and the
 *   guest resumes after its HLT.
 *
 * Bare metal (SDM 6.7.1, Vol.2 HLT): the second NMI is held until the
 * handler's IRET; with IF=0 nothing else can end the HLT, so the CPU stays
 * halted.
 *
 * The test halts the guest inside the handler of a first KVM_NMI, checks
 * KVM_GET_MP_STATE says HALTED (KVM_RUN is ended by SIGALRM), queues the
 * second NMI, and runs again for a second: the vCPU must still be halted.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "kvm_util.h"
#include "processor.h"

enum { STAGE_READY = 1, STAGE_WOKE = 2 };

static int nmis;

static void guest_nmi_handler(struct ex_regs *regs)
{
	nmis++;
	if (nmis == 1) {
		/* NMIs blocked until this handler's IRET, IF=0: nothing may end this HLT. */
		asm volatile("hlt");
		GUEST_SYNC(STAGE_WOKE);
	}
}

static void guest_code(void)
{
	GUEST_SYNC(STAGE_READY);
	for (;;)
		cpu_relax();
}

static void sig_noop(int sig)
{
}

/* KVM_RUN for about a second; true if it was the alarm that ended it. */
static bool run_for_a_second(struct kvm_vcpu *vcpu)
{
	int r;

	alarm(1);
	r = __vcpu_run(vcpu);
	alarm(0);
	if (r == -1 && errno == EINTR) {
		TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_INTR);
		return true;
	}
	TEST_ASSERT(!r, "KVM_RUN failed: %d (errno %d)", r, errno);
	return false;
}

static void assert_halted(struct kvm_vcpu *vcpu, const char *when)
{
	struct kvm_mp_state mp_state;

	vcpu_mp_state_get(vcpu, &mp_state);
	TEST_ASSERT(mp_state.mp_state == KVM_MP_STATE_HALTED,
		    "%s: mp_state %u, wanted KVM_MP_STATE_HALTED", when, mp_state.mp_state);
}

static void run_test(bool set_events)
{
	struct kvm_vcpu_events events;
	struct kvm_vcpu *vcpu;
	struct kvm_vm *vm;
	struct ucall uc;

	pr_info("Second NMI through %s\n", set_events ? "KVM_SET_VCPU_EVENTS" : "KVM_NMI");
	vm = vm_create_with_one_vcpu(&vcpu, guest_code);
	vm_install_exception_handler(vm, NMI_VECTOR, guest_nmi_handler);

	vcpu_run(vcpu);
	TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_IO);
	TEST_ASSERT(get_ucall(vcpu, &uc) == UCALL_SYNC && uc.args[1] == STAGE_READY,
		    "guest did not reach STAGE_READY");

	vcpu_ioctl(vcpu, KVM_NMI, NULL);
	TEST_ASSERT(run_for_a_second(vcpu), "the first NMI's handler did not halt");
	assert_halted(vcpu, "in the first NMI's handler");
	TEST_ASSERT(SYNC_FROM_GUEST_AND_READ(vm, nmis) == 1, "one NMI expected so far");

	if (set_events) {
		vcpu_events_get(vcpu, &events);
		TEST_ASSERT(events.nmi.masked && !events.nmi.pending,
			    "in the handler: masked %u pending %u", events.nmi.masked,
			    events.nmi.pending);
		events.nmi.pending = 1;		/* an NMI latched while blocked, as restored */
		events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
		vcpu_events_set(vcpu, &events);
	} else {
		vcpu_ioctl(vcpu, KVM_NMI, NULL);
	}

	if (!run_for_a_second(vcpu)) {
		TEST_ASSERT(get_ucall(vcpu, &uc) == UCALL_SYNC && uc.args[1] == STAGE_WOKE,
			    "unexpected exit");
		TEST_FAIL("the guest left HLT inside its NMI handler (NMIs masked, IF=0) after a "
			  "second NMI was %s; bare metal holds the NMI and stays halted",
			  set_events ? "restored by KVM_SET_VCPU_EVENTS" : "queued by KVM_NMI");
	}
	assert_halted(vcpu, "after the second NMI");
	kvm_vm_free(vm);
}

int main(int argc, char *argv[])
{
	struct sigaction sa = { .sa_handler = sig_noop };

	sigemptyset(&sa.sa_mask);
	TEST_ASSERT(!sigaction(SIGALRM, &sa, NULL), "sigaction(SIGALRM) failed");

	run_test(false);
	run_test(true);
	return 0;
}
