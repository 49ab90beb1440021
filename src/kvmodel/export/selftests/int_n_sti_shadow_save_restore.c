// SPDX-License-Identifier: GPL-2.0-only
/*
 * int_n_sti_shadow_save_restore: an INT n in an STI shadow, an interrupt
 * pending, and a KVM_GET_VCPU_EVENTS -> KVM_SET_VCPU_EVENTS between the exit
 * during the INT n's delivery and its re-injection: the interrupt goes in
 * first.
 *
 * Written by kvmodel (an executable model of KVM's event injection) as a
 * reproducer for a candidate upstream finding; NOT compiled or run by its
 * authors (no kernel tree, no hardware here).  See README.md beside it.
 *
 * Scenario: softint/int_n_in_sti_shadow_interrupt_pending (its
 * [[explore.known]] save_restore finding); the same finding in
 * virt/eventinj_sti_int_n_before_pending_irq (kvm-unit-tests eventinj).
 *
 *   The INT n's frame push exits (EPT violation / #NPF).  An exit during
 *   delivery leaves no STI blocking (SDM 27.1), so the STI shadow over the
 *   INT n is gone from the saved interruptibility state.
 *   __vmx_complete_interrupts() / svm_complete_interrupts() requeue the INT n
 *   as a soft interrupt with RIP still on it, and re-injecting it keeps the
 *   order.  But kvm_vcpu_ioctl_x86_get_vcpu_events() hides a soft interrupt
 *   (interrupt.injected && !interrupt.soft) and reports interrupt.shadow = 0;
 *   after KVM_SET_VCPU_EVENTS the vCPU has IF=1, no shadow and the interrupt
 *   pending, so kvm_check_and_inject_events() injects the interrupt at the
 *   INT n, which runs after the interrupt handler's IRET.
 *
 * Bare metal: the STI shadow covers the INT n (SDM 6.8.3), so the INT n's
 * handler runs first (an interrupt gate: IF=0) and the interrupt comes after
 * its IRET.
 *
 * How the exit during delivery is made to reach userspace: the INT n runs on
 * a stack page whose host memory is registered with userfaultfd and missing.
 * KVM's page fault blocks in the userfault; a helper thread that sees the
 * fault sends SIGUSR1 to the vCPU thread, and KVM's fault-in returns
 * KVM_PFN_ERR_SIGPENDING: KVM_RUN returns -EINTR with KVM_EXIT_INTR after
 * the vendor code has requeued the INT n (needs a kernel whose x86 fault-in
 * uses FOLL_INTERRUPTIBLE, v6.2 or later).  The round trip is on the same
 * vCPU, which is all the uAPI part of a save/restore does to events.
 *
 * Phase 0 stalls and resumes without touching events (the control: INT n
 * first); phase 1 does the round trip while stalled.
 */
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/userfaultfd.h>

#include "apic.h"
#include "kvm_util.h"
#include "processor.h"

#define IRQ_VECTOR	0x40
#define INT_N_VECTOR	0x80

/* Stack pages the guest switches to just before the INT n, one per phase. */
#define STALL_SLOT	10
#define STALL_GPA	0xc0000000ul
#define STALL_PAGES	2

static volatile uint8_t order[STALL_PAGES][2];
static volatile int taken[STALL_PAGES];
static volatile int phase;

static void record(uint8_t vector)
{
	if (taken[phase] < 2)
		order[phase][taken[phase]] = vector;
	taken[phase]++;
}

static void guest_int_n_handler(struct ex_regs *regs)
{
	record(INT_N_VECTOR);
}

static void guest_irq_handler(struct ex_regs *regs)
{
	record(IRQ_VECTOR);
	x2apic_write_reg(APIC_EOI, 0);
}

static __attribute__((noinline)) void guest_int_n_in_sti_shadow(uint64_t stack_top)
{
	/* IF=0 here (RFLAGS=0x2 at reset): the self-IPI waits in IRR. */
	x2apic_write_reg(APIC_ICR, APIC_DEST_SELF | APIC_INT_ASSERT | APIC_DM_FIXED | IRQ_VECTOR);
	asm volatile("mov %%rsp, %%rbx\n\t"
		     "mov %[top], %%rsp\n\t"
		     "sti\n\t"
		     "int $0x80\n\t"		/* INT_N_VECTOR, in the STI shadow */
		     "cli\n\t"
		     "mov %%rbx, %%rsp\n\t"
		     : : [top] "r"(stack_top) : "rbx", "memory");
}

static void guest_code(uint64_t stall_gva)
{
	x2apic_enable();
	for (phase = 0; phase < STALL_PAGES; phase++) {
		GUEST_SYNC(phase);
		guest_int_n_in_sti_shadow(stall_gva + (phase + 1) * PAGE_SIZE);
		__GUEST_ASSERT(taken[phase] == 2 && order[phase][0] == INT_N_VECTOR &&
			       order[phase][1] == IRQ_VECTOR,
			       "%s: vector 0x%x first, then 0x%x (%d deliveries); bare metal: "
			       "INT 0x80 first (the STI shadow covers it, SDM 6.8.3), then 0x40 "
			       "after its IRET",
			       phase ? "after KVM_GET/SET_VCPU_EVENTS" : "control",
			       order[phase][0], order[phase][1], taken[phase]);
	}
	GUEST_DONE();
}

struct stall {
	int uffd;
	void *hva;
	pthread_t vcpu_thread;
	pthread_t waiter;
};

static void sig_noop(int sig)
{
}

static void stall_setup(struct kvm_vm *vm, struct stall *s)
{
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg = { .mode = UFFDIO_REGISTER_MODE_MISSING };
	struct sigaction sa = { .sa_handler = sig_noop };

	s->uffd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	__TEST_REQUIRE(s->uffd >= 0,
		       "userfaultfd() failed (needs root or vm.unprivileged_userfaultfd=1)");
	TEST_ASSERT(!ioctl(s->uffd, UFFDIO_API, &api), "UFFDIO_API failed");

	vm_userspace_mem_region_add(vm, VM_MEM_SRC_ANONYMOUS, STALL_GPA, STALL_SLOT,
				    STALL_PAGES, 0);
	virt_map(vm, STALL_GPA, STALL_GPA, STALL_PAGES);
	s->hva = addr_gpa2hva(vm, STALL_GPA);
	reg.range.start = (uint64_t)s->hva;
	reg.range.len = STALL_PAGES * PAGE_SIZE;
	TEST_ASSERT(!ioctl(s->uffd, UFFDIO_REGISTER, &reg), "UFFDIO_REGISTER failed");

	sigemptyset(&sa.sa_mask);
	TEST_ASSERT(!sigaction(SIGUSR1, &sa, NULL), "sigaction(SIGUSR1) failed");
	s->vcpu_thread = pthread_self();
}

/* Kick the vCPU thread out of KVM once its fault waits on the userfaultfd. */
static void *stall_waiter(void *arg)
{
	struct stall *s = arg;
	struct pollfd pfd = { .fd = s->uffd, .events = POLLIN };
	struct uffd_msg msg;

	TEST_ASSERT(poll(&pfd, 1, 10000) == 1, "the guest never touched its stall page");
	TEST_ASSERT(read(s->uffd, &msg, sizeof(msg)) == sizeof(msg), "read(userfaultfd) failed");
	TEST_ASSERT(msg.event == UFFD_EVENT_PAGEFAULT, "userfaultfd event %u", msg.event);
	pthread_kill(s->vcpu_thread, SIGUSR1);
	return NULL;
}

static void run_until_stalled(struct kvm_vcpu *vcpu, struct stall *s)
{
	int r;

	TEST_ASSERT(!pthread_create(&s->waiter, NULL, stall_waiter, s), "pthread_create");
	r = __vcpu_run(vcpu);
	TEST_ASSERT(r == -1 && errno == EINTR,
		    "KVM_RUN: wanted -EINTR from the stalled fault, got %d (errno %d)", r, errno);
	TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_INTR);
	pthread_join(s->waiter, NULL);
}

static void stall_release(struct stall *s, int page)
{
	struct uffdio_zeropage zero = {
		.range = { .start = (uint64_t)s->hva + page * PAGE_SIZE, .len = PAGE_SIZE },
	};

	TEST_ASSERT(!ioctl(s->uffd, UFFDIO_ZEROPAGE, &zero), "UFFDIO_ZEROPAGE failed");
}

static void events_round_trip(struct kvm_vcpu *vcpu)
{
	struct kvm_vcpu_events events;

	vcpu_events_get(vcpu, &events);
	pr_info("KVM_GET_VCPU_EVENTS: interrupt.injected = %u nr = 0x%x soft = %u shadow = %u\n",
		events.interrupt.injected, events.interrupt.nr, events.interrupt.soft,
		events.interrupt.shadow);
	vcpu_events_set(vcpu, &events);
}

int main(int argc, char *argv[])
{
	struct kvm_vcpu *vcpu;
	struct stall stall;
	struct kvm_vm *vm;
	struct ucall uc;
	uint64_t page;

	vm = vm_create_with_one_vcpu(&vcpu, guest_code);
	vm_install_exception_handler(vm, INT_N_VECTOR, guest_int_n_handler);
	vm_install_exception_handler(vm, IRQ_VECTOR, guest_irq_handler);
	stall_setup(vm, &stall);
	vcpu_args_set(vcpu, 1, (uint64_t)STALL_GPA);

	for (;;) {
		vcpu_run(vcpu);
		TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_IO);

		switch (get_ucall(vcpu, &uc)) {
		case UCALL_SYNC:
			page = uc.args[1];
			run_until_stalled(vcpu, &stall);
			if (page == 1)
				events_round_trip(vcpu);
			stall_release(&stall, page);
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
