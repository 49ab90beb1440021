// SPDX-License-Identifier: GPL-2.0-only
/*
 * mov_ss_pending_db_lost: a data breakpoint hit by MOV SS is held until the
 * next instruction completes; a save/restore at that boundary loses it,
 * because struct kvm_vcpu_events has no field for a pending debug trap.
 *
 * Written by kvmodel (an executable model of KVM's event injection) as a
 * reproducer for a candidate upstream finding; NOT compiled or run by its
 * authors (no kernel tree, no hardware here).  See README.md beside it.
 *
 * Scenarios (their [[explore.known]] save_restore findings):
 * arch/mov_ss_then_int3_db_in_handler,
 * arch/mov_ss_data_breakpoint_then_int_1 and
 * arch/debug_mov_ss_watchpoint_prefixed_int3.  Those scenarios follow the MOV SS
 * with INT3 / INT1; here the instruction after it is an OUT to a port no
 * device claims, which gives userspace an exit at exactly that boundary.
 *
 *   VMX keeps the held trap in GUEST_PENDING_DBG_EXCEPTIONS (SDM 27.3.4),
 *   SVM has no such field; KVM_GET_VCPU_EVENTS / KVM_GET_DEBUGREGS report
 *   neither, so the vCPU restored in a new VM never takes the #DB.
 *
 * Bare metal (SDM 6.8.3, 17.3.1.2): the #DB is delivered after the OUT
 * completes, with DR6.B0 set and the return address after the OUT.
 *
 * Phase 0 exits at the OUT and resumes in the same VM (the control: one #DB;
 * if this fails the #DB is lost without any save/restore, which is another
 * finding).  Phase 1 saves the vCPU at the OUT, restores it in a new VM as
 * state_test.c does, and resumes there.
 */
#include <stdio.h>
#include <string.h>

#include "kvm_util.h"
#include "processor.h"

#define MOV_SS_PORT	0x444
/* DR0 enabled (L0), RW0 = 11 (data read or write), LEN0 = 01 (two bytes). */
#define DR7_DATA_BP0	(1ul | (3ul << 16) | (1ul << 18) | 0x400ul)
#define DR6_B0		1ul

extern char mov_ss_after_out[];

static volatile uint16_t ss_selector __attribute__((aligned(2)));
static volatile int db_count;
static volatile uint64_t db_rip, db_dr6;

static void guest_db_handler(struct ex_regs *regs)
{
	uint64_t dr6;

	asm volatile("mov %%dr6, %0" : "=r"(dr6));
	asm volatile("mov %0, %%dr6" : : "r"(0xffff0ff0ul));
	db_count++;
	db_rip = regs->rip;
	db_dr6 = dr6;
}

static __attribute__((noinline)) void guest_mov_ss_then_out(void)
{
	asm volatile("mov %[sel], %%ss\n\t"	/* reads ss_selector: DR0 hits, held by MOV SS */
		     "out %%al, %%dx\n\t"	/* exits to userspace inside the MOV SS shadow */
		     "mov_ss_after_out:\n\t"
		     : : [sel] "m"(ss_selector), "a"(0), "d"(MOV_SS_PORT) : "memory");
}

static void guest_code(void)
{
	int phase;

	for (phase = 0; phase < 2; phase++) {
		ss_selector = get_ss();
		db_count = 0;
		asm volatile("mov %0, %%dr0" : : "r"(&ss_selector));
		asm volatile("mov %0, %%dr7" : : "r"(DR7_DATA_BP0));
		guest_mov_ss_then_out();
		asm volatile("mov %0, %%dr7" : : "r"(0x400ul));
		__GUEST_ASSERT(db_count == 1 && db_rip == (uint64_t)mov_ss_after_out &&
			       (db_dr6 & DR6_B0),
			       "%s: %d #DB (last at 0x%lx, DR6 0x%lx); bare metal: one #DB after "
			       "the OUT (0x%lx) with DR6.B0",
			       phase ? "after save/restore" : "control", db_count, db_rip, db_dr6,
			       (uint64_t)mov_ss_after_out);
	}
	GUEST_DONE();
}

static struct kvm_vcpu *save_restore_in_new_vm(struct kvm_vm *vm, struct kvm_vcpu *vcpu)
{
	struct kvm_x86_state *state;

	state = vcpu_save_state(vcpu);	/* completes the OUT first (vcpu_run_complete_io) */
	pr_info("KVM_GET_VCPU_EVENTS at the boundary after the OUT: exception.injected = %u "
		"pending = %u, interrupt.shadow = %u\n", state->events.exception.injected,
		state->events.exception.pending, state->events.interrupt.shadow);
	kvm_vm_release(vm);
	vcpu = vm_recreate_with_one_vcpu(vm);
	vcpu_load_state(vcpu, state);
	kvm_x86_state_cleanup(state);
	return vcpu;
}

int main(int argc, char *argv[])
{
	struct kvm_vcpu *vcpu;
	struct kvm_vm *vm;
	struct ucall uc;
	int outs = 0;

	vm = vm_create_with_one_vcpu(&vcpu, guest_code);
	vm_install_exception_handler(vm, DB_VECTOR, guest_db_handler);

	for (;;) {
		vcpu_run(vcpu);
		TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_IO);

		if (vcpu->run->io.port == MOV_SS_PORT) {
			TEST_ASSERT(vcpu->run->io.direction == KVM_EXIT_IO_OUT, "OUT expected");
			if (outs++ == 1)
				vcpu = save_restore_in_new_vm(vm, vcpu);
			continue;
		}

		switch (get_ucall(vcpu, &uc)) {
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
