"""The simulated /dev/mshv checks what the kernel checks, with the kernel's errnos
(drivers/hv/mshv_root_main.c, mshv_eventfd.c), and the backend's bindings turn them into
errors that name the ioctl. CONTRACT TESTS: the simulator stands in for the kernel."""

from __future__ import annotations

import errno
import mmap
import os
import struct

import pytest

pytest.importorskip("vmmkit_emu", reason="the simulated /dev/mshv runs on the vmmkit-emu plugin's engine")

from vmmkit_mshv.bindings import Hvcall, MshvDevice, MshvError, PartitionFd, VpFd, VpState  # noqa: E402
from vmmkit_mshv.simulator import SimulatedKernel, abi  # noqa: E402


@pytest.fixture
def kernel() -> SimulatedKernel:
    return SimulatedKernel()


@pytest.fixture
def partition(kernel: SimulatedKernel) -> PartitionFd:
    device = MshvDevice.open(kernel)
    fd = device.create_partition()
    device.close()
    part = PartitionFd(kernel, fd)
    yield part
    part.close()


@pytest.fixture
def ram() -> mmap.mmap:
    area = mmap.mmap(-1, 0x10000)
    yield area
    area.close()


def _addr(area: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(area))


def _raw(kernel: SimulatedKernel, fd: int, request: int, payload: bytes) -> int:
    import ctypes

    buf = ctypes.create_string_buffer(payload, len(payload))
    return kernel.ioctl(fd, request, ctypes.addressof(buf))


def test_only_the_device_path_opens(kernel: SimulatedKernel) -> None:
    with pytest.raises(MshvError, match=r"open\(/dev/kvm\).*errno 2"):
        MshvDevice.open(kernel, "/dev/kvm")


def test_unknown_partition_flags_and_isolation_are_einval(kernel: SimulatedKernel) -> None:
    device = MshvDevice.open(kernel)
    for flags, isolation in ((1 << 3, 0), (0, 1)):
        with pytest.raises(OSError) as info:
            _raw(kernel, device.fd, abi.MSHV_CREATE_PARTITION, abi.CREATE_PARTITION.pack(flags, isolation))
        assert info.value.errno == errno.EINVAL
    device.close()


def test_a_partition_fd_rejects_other_fds_ioctls(kernel: SimulatedKernel, partition: PartitionFd) -> None:
    with pytest.raises(OSError) as info:
        _raw(kernel, partition.fd, abi.MSHV_RUN_VP, bytes(256))
    assert info.value.errno == errno.ENOTTY


def test_guest_memory_checks_alignment_flags_and_reserved_bytes(kernel: SimulatedKernel, partition: PartitionFd,
                                                                 ram: mmap.mmap) -> None:
    host = _addr(ram)
    bad = [
        abi.USER_MEM_REGION.pack(0, 0, host, 1, bytes(7)),  # empty
        abi.USER_MEM_REGION.pack(0x1800, 0, host, 1, bytes(7)),  # size not page aligned
        abi.USER_MEM_REGION.pack(0x1000, 0, host + 8, 1, bytes(7)),  # user address not aligned
        abi.USER_MEM_REGION.pack(0x1000, 0, host, 1 << 3, bytes(7)),  # unknown flag
        abi.USER_MEM_REGION.pack(0x1000, 0, host, 1, b"\1" + bytes(6)),  # rsvd not zero
    ]
    for payload in bad:
        with pytest.raises(OSError) as info:
            _raw(kernel, partition.fd, abi.MSHV_SET_GUEST_MEMORY, payload)
        assert info.value.errno == errno.EINVAL


def test_overlapping_regions_are_eexist_and_unmap_must_match(partition: PartitionFd, ram: mmap.mmap) -> None:
    host = _addr(ram)
    partition.set_guest_memory(0x10_0000, 0x8000, host)
    with pytest.raises(MshvError, match="MSHV_SET_GUEST_MEMORY.*errno 17"):
        partition.set_guest_memory(0x10_4000, 0x1000, host + 0x8000)  # guest frames overlap
    with pytest.raises(MshvError, match="errno 17"):
        partition.set_guest_memory(0x20_0000, 0x1000, host + 0x4000)  # user memory overlaps
    with pytest.raises(MshvError, match="errno 22"):
        partition.set_guest_memory(0x10_0000, 0x4000, host, unmap=True)  # not the mapped size
    partition.set_guest_memory(0x10_0000, 0x8000, host, unmap=True)
    partition.set_guest_memory(0x10_4000, 0x1000, host + 0x8000)  # free again


def test_vps_are_unique_and_below_the_limit(partition: PartitionFd) -> None:
    partition.initialize()
    vp = VpFd(partition.kernel, partition.create_vp(0), 0)
    with pytest.raises(MshvError, match="MSHV_CREATE_VP.*errno 17"):
        partition.create_vp(0)
    with pytest.raises(OSError) as info:
        _raw(partition.kernel, partition.fd, abi.MSHV_CREATE_VP, abi.CREATE_VP.pack(256))  # type: ignore[arg-type]
    assert info.value.errno == errno.EINVAL
    vp.close()


def test_hvcalls_outside_the_allow_list_or_with_bad_sizes_are_einval(kernel: SimulatedKernel,
                                                                      partition: PartitionFd) -> None:
    import ctypes

    data = ctypes.create_string_buffer(16)
    for code, in_sz in ((0x0040, 16), (int(Hvcall.GET_VP_REGISTERS), 4), (int(Hvcall.GET_VP_REGISTERS), 0x1001)):
        args = abi.ROOT_HVCALL.pack(code, 0, in_sz, 0, 0, bytes(6), ctypes.addressof(data), 0)
        with pytest.raises(OSError) as info:
            _raw(kernel, partition.fd, abi.MSHV_ROOT_HVCALL, args)
        assert info.value.errno == errno.EINVAL


def test_a_failed_hypercall_names_the_call_and_the_hv_status(partition: PartitionFd) -> None:
    with pytest.raises(MshvError, match=r"MSHV_ROOT_HVCALL\(GET_PARTITION_PROPERTY\).*UNKNOWN_PROPERTY") as info:
        partition.get_property(0x1234)
    assert info.value.hv_status == 0x9 and info.value.errno == errno.EIO


def test_eventfd_flags_and_port_ioeventfds(partition: PartitionFd) -> None:
    efd = os.eventfd(0)
    try:
        with pytest.raises(MshvError, match="MSHV_IOEVENTFD.*errno 95"):  # EOPNOTSUPP
            partition.ioeventfd(efd, 0x3F8, pio=True)
        partition.ioeventfd(efd, 0x1000_0000, length=4)
        with pytest.raises(MshvError, match="errno 17"):
            partition.ioeventfd(efd, 0x1000_0000, length=4)
        with pytest.raises(OSError) as info:
            _raw(partition.kernel, partition.fd, abi.MSHV_IRQFD, abi.USER_IRQFD.pack(efd, -1, 1, 1 << 2))
        assert info.value.errno == errno.EINVAL
        partition.irqfd(efd, 5)
        with pytest.raises(MshvError, match="MSHV_IRQFD.*errno 16"):  # EBUSY: one eventfd, one irq
            partition.irqfd(efd, 6)
    finally:
        os.close(efd)


def test_vp_state_buffers_must_be_whole_pages(kernel: SimulatedKernel, partition: PartitionFd) -> None:
    partition.initialize()
    vp = VpFd(kernel, partition.create_vp(0), 0)
    area = mmap.mmap(-1, 0x2000)
    try:
        for kind, size, ptr in ((5, 0x1000, _addr(area)), (0, 0x800, _addr(area)), (0, 0x1000, _addr(area) + 8)):
            with pytest.raises(OSError) as info:
                _raw(kernel, vp.fd, abi.MSHV_GET_VP_STATE, abi.GET_SET_VP_STATE.pack(kind, bytes(3), size, ptr))
            assert info.value.errno == errno.EINVAL
        state = vp.get_state(VpState.LAPIC)  # through the bindings (they align the buffer)
        assert struct.unpack_from("<I", state, 4)[0] != 0  # the APIC version register
    finally:
        area.close()
        vp.close()


def test_the_register_page_maps_and_the_ghcb_page_does_not(kernel: SimulatedKernel, partition: PartitionFd) -> None:
    partition.initialize()
    vp = VpFd(kernel, partition.create_vp(0), 0)
    assert vp.map_register_page() is not None
    with pytest.raises(OSError) as info:
        kernel.mmap(vp.fd, 0x1000, 2 * 0x1000)
    assert info.value.errno == errno.ENODEV
    vp.close()
