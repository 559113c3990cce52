"""Memory slots: RAM, read-only regions (writes become MMIO exits), removal, dirty logging."""

from __future__ import annotations

import errno

import pytest
from kvm_testlib import DONE_PORT

from vmmkit.errors import HypervisorError
from vmmkit.memory import GuestMemory, MemoryRange

pytestmark = pytest.mark.requires_kvm

DONE = f"out %al, ${DONE_PORT:#x}\n hlt\n"
EXTRA = 0x40_0000  # 4 MiB, above the test RAM


@pytest.fixture
def extra_memory():
    memory = GuestMemory.allocate([MemoryRange(EXTRA, 0x4000)])
    yield memory
    memory.close()


def test_read_only_region_reads_memory_and_turns_writes_into_mmio(make_guest, extra_memory) -> None:
    guest = make_guest(
        f"""
        mov ${EXTRA:#x}, %rdi
        mov (%rdi), %eax
        mov %eax, 0x3000
        movl $0x55, 0x10(%rdi)
        movb $0x66, 0x2001(%rdi)
        """ + DONE
    )
    extra_memory.write(EXTRA, b"\xde\xad\xbe\xef")
    guest.vm.add_memory_region(1, EXTRA, 0x4000, extra_memory.host_address(EXTRA, 0x4000), readonly=True)
    guest.run_to_done()
    assert guest.memory.read_u32(0x3000) == 0xEFBEADDE
    assert guest.ops.of("mmio_write") == [(EXTRA + 0x10, b"\x55\x00\x00\x00"), (EXTRA + 0x2001, b"\x66")]
    assert extra_memory.read(EXTRA + 0x10, 4) == bytes(4)  # the write never reached memory
    assert guest.ops.of("mmio_read") == []


def test_removed_region_becomes_mmio(make_guest, extra_memory) -> None:
    guest = make_guest(f"mov ${EXTRA:#x}, %rdi\n mov (%rdi), %eax\n mov %eax, 0x3000\n" + DONE)
    guest.vm.add_memory_region(1, EXTRA, 0x4000, extra_memory.host_address(EXTRA, 0x4000))
    guest.vm.remove_memory_region(1)
    guest.run_to_done()
    assert guest.ops.of("mmio_read") == [(EXTRA, b"\xff\xff\xff\xff")]
    assert guest.memory.read_u32(0x3000) == 0xFFFFFFFF


def test_dirty_log_reports_written_pages_once(make_guest, extra_memory) -> None:
    guest = make_guest(
        f"""
        mov ${EXTRA:#x}, %rdi
        movb $1, (%rdi)
        movb $2, 0x2000(%rdi)
        """ + DONE
    )
    guest.vm.add_memory_region(1, EXTRA, 0x4000, extra_memory.host_address(EXTRA, 0x4000), log_dirty=True)
    assert guest.vm.get_dirty_log(1) == bytes(8)
    guest.run_to_done()
    log = guest.vm.get_dirty_log(1)
    assert len(log) == 8 and log[0] == 0b0101
    assert guest.vm.get_dirty_log(1) == bytes(8)
    assert extra_memory.read(EXTRA + 0x2000, 1) == b"\x02"


def test_overlapping_slot_raises_hypervisor_error(make_guest, extra_memory) -> None:
    guest = make_guest("hlt")
    with pytest.raises(HypervisorError) as info:
        guest.vm.add_memory_region(1, 0x1000, 0x4000, extra_memory.host_address(EXTRA, 0x4000))
    assert info.value.call == "KVM_SET_USER_MEMORY_REGION"
    assert info.value.errno == errno.EEXIST


def test_misaligned_region_is_rejected_before_the_ioctl(make_guest, extra_memory) -> None:
    guest = make_guest("hlt")
    host = extra_memory.host_address(EXTRA, 0x4000)
    for args in [(1, EXTRA + 1, 0x1000, host), (1, EXTRA, 0x1001, host), (1, EXTRA, 0x1000, host + 8),
                 (0x8000, EXTRA, 0x1000, host), (1, EXTRA, 0x1000, 0)]:
        with pytest.raises(ValueError):
            guest.vm.add_memory_region(*args)
    with pytest.raises(ValueError):
        guest.vm.remove_memory_region(7)
