"""kvm_amd: the SVM vendor code."""
