"""A vCPU of each vendor on a two-instruction guest, for unit tests of KVM and the VMM actor."""

import pytest

from kvmodel.kvm.vcpu import Vendor, create_vcpu
from kvmodel.scenario.load import parse
from kvmodel.scenario.runner import prepare

GUEST = '''
[guest]
code = """
start:
    nop
    hlt
"""
'''


@pytest.fixture(params=[Vendor.SVM, Vendor.VMX], ids=lambda v: v.value)
def vendor(request):
    return request.param


@pytest.fixture
def new_vcpu(vendor):
    def make():
        cpu, _ = prepare(parse(GUEST, "unit.toml"))
        return create_vcpu(cpu, vendor)
    return make


@pytest.fixture
def vcpu(new_vcpu):
    return new_vcpu()
