"""Live migration's dirty log on the MSHV backend, against the simulated /dev/mshv: a
**contract test** (no real /dev/mshv here). What it checks is the uAPI sequence Cloud
Hypervisor's ``MshvVm`` uses (``hypervisor/src/mshv/mod.rs``): GPA page access tracking turned
on with HvCallSetPartitionProperty while the VP exists, MSHV_GET_GPAP_ACCESS_BITMAP with
ACCESS_OP_CLEAR to fetch and clear, ACCESS_OP_SET on every slot before tracking goes off."""

from __future__ import annotations

from typing import Any

import pytest

from vmmkit.errors import HypervisorError
from vmmkit.hypervisor import ExitReason

from .test_mshv_backend import RAM, guest, run  # noqa: F401 (guest: the fixture)

SOURCE = """
    movl $1, 0x40000
    movl $1, 0x42000
    outb %al, $0xf4
    movl $2, 0x43000
    outb %al, $0xf4
1:  jmp 1b
"""


def pages(bitmap: bytes) -> set[int]:
    return {i for i in range(RAM // 0x1000) if bitmap[i // 8] >> (i % 8) & 1}


def test_logging_starts_and_stops_on_a_vm_whose_vp_exists(guest: Any) -> None:  # noqa: F811
    vm, vcpu, _, _, _ = guest(SOURCE)
    assert vm.supports_dirty_log
    with pytest.raises(HypervisorError, match="log_dirty"):
        vm.get_dirty_log(0)  # not logging yet
    vm.start_dirty_log()  # after the VP was created: the migration case
    assert pages(vm.get_dirty_log(0)) == set()  # starts empty
    assert run(vcpu).reason is ExitReason.INTERRUPTED
    assert {0x40, 0x42} <= pages(vm.get_dirty_log(0))
    assert 0x40 not in pages(vm.get_dirty_log(0))  # cleared by the read
    vm.stop_dirty_log()
    with pytest.raises(HypervisorError, match="log_dirty"):
        vm.get_dirty_log(0)
    assert run(vcpu).reason is ExitReason.INTERRUPTED  # the guest goes on without write hooks
    vm.start_dirty_log()
    assert pages(vm.get_dirty_log(0)) == set()  # what OP_SET marked was cleared by the start
