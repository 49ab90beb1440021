from kvmodel.arch.apic import Apic, WriteResult, X2ApicMsr


def test_priority_by_class_and_eoi():
    apic = Apic()
    apic.request(0x31)
    apic.request(0x45)
    assert apic.pending_vector() == 0x45
    assert apic.acknowledge() == 0x45
    # 0x31 is in a lower class than the in-service 0x45: it waits for EOI (SDM 10.8.3.1).
    assert apic.pending_vector() is None
    assert apic.write_msr(X2ApicMsr.EOI, 0) is WriteResult.DONE
    assert apic.pending_vector() == 0x31


def test_tpr_masks_lower_classes():
    apic = Apic()
    apic.request(0x35)
    apic.write_msr(X2ApicMsr.TPR, 0x40)
    assert apic.pending_vector() is None
    apic.write_msr(X2ApicMsr.TPR, 0x20)
    assert apic.pending_vector() == 0x35


def test_self_ipi_icr_nmi_and_bad_writes():
    apic = Apic()
    assert apic.write_msr(X2ApicMsr.SELF_IPI, 0x40) is WriteResult.DONE
    assert apic.read_msr(X2ApicMsr.IRR0 + 2) == 1  # vector 0x40 is bit 0 of IRR2
    assert apic.write_msr(X2ApicMsr.ICR, (1 << 18) | (4 << 8)) is WriteResult.SELF_NMI
    assert apic.write_msr(X2ApicMsr.EOI, 1) is WriteResult.GP  # EOI takes 0 only
    assert apic.write_msr(X2ApicMsr.ID, 0) is WriteResult.GP  # read-only
