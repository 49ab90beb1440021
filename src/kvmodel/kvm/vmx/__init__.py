"""kvm_intel: the VMX vendor code."""
