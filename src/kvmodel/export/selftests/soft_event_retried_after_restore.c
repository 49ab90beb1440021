// SPDX-License-Identifier: GPL-2.0-only
/*
 * soft_event_retried_after_restore: KVM_GET_VCPU_EVENTS hides an INT3 or
 * INT n whose delivery was cut short by an exit, so after
 * KVM_SET_VCPU_EVENTS the instruction runs again and a code breakpoint on it
 * fires a second time.
 *
 * Written by kvmodel (an executable model of KVM's event injection) as a
 * reproducer for a candidate upstream finding; NOT compiled or run by its
 * authors (no kernel tree, no hardware here).  See README.md beside it.
 *
 * Scenarios (each with an [[explore.known]] save_restore finding):
 * softint/int3_code_breakpoint, softint/int_n_code_breakpoint,
 * softint/int3_without_nrips, softint/int_n_without_nrips (load kvm_amd with
 * nrips=0 for these two), virt/int3_code_breakpoint_host_fault, and
 * softint/into_code_breakpoint in spirit (INTO is #UD in 64-bit mode, and
 * selftests guests are 64-bit: not reproduced here).
 *
 *   The INT3's (INT n's) frame push exits (EPT violation / #NPF); the
 *   vendor code requeues it as a soft exception (soft interrupt) with RIP
 *   still on the instruction.  kvm_vcpu_ioctl_x86_get_vcpu_events() does not
 *   report soft exceptions or soft interrupts (the ABI has no instruction
 *   length; "we should expect to encounter the exception again"), so
 *   KVM_SET_VCPU_EVENTS clears them and the instruction executes again.  A
 *   code breakpoint on it fires again: the guest sees two #DBs for one
 *   INT3.  Upstream 6ef88d6e36c2 stopped this retry for re-injection; a
 *   save/restore still does it.  Whether the retried instruction runs with
 *   RF=0 (so that the breakpoint fires again) is the model's reading of
 *   SDM 27.3.3 and 17.3.1.1 (UNVERIFIED on hardware).
 *
 * Bare metal: one #DB (the code breakpoint, a fault; the handler sets RF in
 * the frame, SDM 17.3.1.1), then one #BP (or the INT n's vector).
 *
 * The #DB handler also moves the frame's RSP onto a stack page whose host
 * memory is registered with userfaultfd and missing, so that the INT3's
 * delivery faults there; a helper thread that sees the fault sends SIGUSR1
 * to the vCPU thread and KVM_RUN returns -EINTR with KVM_EXIT_INTR after
 * the vendor code has requeued the event (needs a kernel whose x86 fault-in
 * uses FOLL_INTERRUPTIBLE, v6.2 or later).  The round trip is on the same
 * vCPU, which is all the uAPI part of a save/restore does to events.
 * Phase 0 stalls and resumes without touching events (the control), phase 1
 * does the round trip while stalled; each phase runs INT3, then INT $0x81.
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

#include "kvm_util.h"
#include "processor.h"

#define INT_N_VECTOR	0x81
#define RFLAGS_RF	(1ul << 16)
#define DR7_G0		(1ul << 1)	/* DR0 enabled; RW0 = LEN0 = 0: instruction breakpoint */

/* One stack page per (phase, instruction): 2 phases x {INT3, INT n}. */
#define STALL_SLOT	10
#define STALL_GPA	0xc0000000ul
#define STALL_PAGES	4

extern char bp_int3[], bp_int_n[];

static volatile int db_count, trap_count;
static volatile uint64_t stall_top;

static void guest_db_handler(struct ex_regs *regs)
{
	/*
	 * ex_regs ends with the frame's RIP, CS and RFLAGS (lib/x86/handlers.S);
	 * the frame's RSP and SS follow it on the stack.
	 */
	uint64_t *frame_rsp = (uint64_t *)(regs + 1);

	db_count++;
	regs->rflags |= RFLAGS_RF;	/* resume without the breakpoint firing again */
	*frame_rsp = stall_top;		/* and deliver the INT3 / INT n on the stall page */
}

static void guest_trap_handler(struct ex_regs *regs)
{
	trap_count++;
}

static void set_breakpoint(void *insn)
{
	asm volatile("mov %0, %%dr0" : : "r"(insn));
	asm volatile("mov %0, %%dr7" : : "r"(DR7_G0 | 0x400ul));
}

static void clear_breakpoint(void)
{
	asm volatile("mov %0, %%dr7" : : "r"(0x400ul));
}

/* One asm label each, so never inlined (a copy would define the label twice). */
static __attribute__((noinline)) void guest_int3(void)
{
	asm volatile("mov %%rsp, %%rbx\n\t"
		     "bp_int3: int3\n\t"
		     "mov %%rbx, %%rsp\n\t"
		     : : : "rbx", "memory");
}

static __attribute__((noinline)) void guest_int_n(void)
{
	asm volatile("mov %%rsp, %%rbx\n\t"
		     "bp_int_n: int $0x81\n\t"	/* INT_N_VECTOR */
		     "mov %%rbx, %%rsp\n\t"
		     : : : "rbx", "memory");
}

static void guest_code(uint64_t stall_gva)
{
	int page;

	for (page = 0; page < STALL_PAGES; page++) {
		bool int3 = !(page & 1);

		GUEST_SYNC(page);
		stall_top = stall_gva + (page + 1) * PAGE_SIZE;
		db_count = trap_count = 0;
		set_breakpoint(int3 ? bp_int3 : bp_int_n);
		if (int3)
			guest_int3();
		else
			guest_int_n();
		clear_breakpoint();
		__GUEST_ASSERT(db_count == 1 && trap_count == 1,
			       "%s, %s: %d #DB and %d %s; bare metal: one of each",
			       page < 2 ? "control" : "after KVM_GET/SET_VCPU_EVENTS",
			       int3 ? "INT3" : "INT $0x81", db_count, trap_count,
			       int3 ? "#BP" : "INT $0x81 deliveries");
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
	pr_info("KVM_GET_VCPU_EVENTS: exception.injected = %u nr = %u, interrupt.injected = %u "
		"nr = 0x%x soft = %u\n", events.exception.injected, events.exception.nr,
		events.interrupt.injected, events.interrupt.nr, events.interrupt.soft);
	vcpu_events_set(vcpu, &events);
}

int main(int argc, char *argv[])
{
	struct kvm_vcpu *vcpu;
	struct stall stall;
	struct kvm_vm *vm;
	struct ucall uc;
	uint64_t page;

	if (host_cpu_is_amd)
		pr_info("kvm_amd.nrips = %d\n", get_kvm_amd_param_bool("nrips"));

	vm = vm_create_with_one_vcpu(&vcpu, guest_code);
	vm_install_exception_handler(vm, DB_VECTOR, guest_db_handler);
	vm_install_exception_handler(vm, BP_VECTOR, guest_trap_handler);
	vm_install_exception_handler(vm, INT_N_VECTOR, guest_trap_handler);
	stall_setup(vm, &stall);
	vcpu_args_set(vcpu, 1, (uint64_t)STALL_GPA);

	for (;;) {
		vcpu_run(vcpu);
		TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_IO);

		switch (get_ucall(vcpu, &uc)) {
		case UCALL_SYNC:
			page = uc.args[1];
			run_until_stalled(vcpu, &stall);
			if (page >= 2)
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
