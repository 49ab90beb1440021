"""The model's clock: a fixed cost per retired instruction and per event delivery.

Real costs depend on the microarchitecture. The model needs cycles for one
thing: the Notify VM exit fires when the guest goes `NOTIFY_WINDOW` cycles
without an *event window*, a point where the CPU could recognise an NMI,
SMI or interrupt (KVM "Enable Notify VM exit", kvm-upstream.md 3.7). Every
instruction boundary without a pending debug trap is such a point; back-to-
back deliveries (a #DB whose own frame hits a data breakpoint, CVE-2015-8104)
are not. So only the length of a run of deliveries matters, and these round
numbers are enough: an IDT delivery costs about ten simple instructions.
"""

INSTRUCTION_CYCLES = 1
DELIVERY_CYCLES = 10
