"""AMD SVM: the VMCB, VMRUN and #VMEXIT (APM Vol.2 ch. 15)."""
