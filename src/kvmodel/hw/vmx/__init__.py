"""Intel VMX: the VMCS and VM entry / VM exit (SDM Vol.3 ch. 24-27)."""
