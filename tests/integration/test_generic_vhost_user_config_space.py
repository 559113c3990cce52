"""The generic vhost-user device's configuration space is the backend's: against
qemu-storage-daemon's vhost-user-blk export (libvhost-user), reads at any offset give the
virtio-blk fields there (libvhost-user answers GET_CONFIG from offset 0 whatever the offset
asked: the frontend asks from 0 and keeps the tail), and a driver's write to the writable
``wce`` byte reaches the backend (SET_CONFIG) and reads back. No guest: the device object itself."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from .qemu_peer import make_disk
from .test_vhost_user_blk import DISK_SIZE, StorageDaemon

#: virtio 1.2, 5.2.4 struct virtio_blk_config: capacity at 0, blk_size at 20, wce at 32.
CAPACITY, BLK_SIZE, WCE = 0, 20, 32
VIRTIO_BLK_F_CONFIG_WCE = 1 << 11
VIRTIO_F_ACCESS_PLATFORM = 1 << 33


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[StorageDaemon]:
    daemon = StorageDaemon(make_disk(tmp_path / "disk.img", DISK_SIZE), tmp_path / "blk.sock").start()
    try:
        yield daemon
    finally:
        daemon.stop()


def test_reads_at_any_offset_and_writes_reach_the_backend(qsd: StorageDaemon) -> None:
    from vmmkit_devices.vhost_user.generic import create_device

    device = create_device("gvu", str(qsd.socket), device_type=2, queue_sizes=(128,))
    try:
        assert device.device_type == 2 and list(device.queue_max_sizes) == [128]
        assert struct.unpack("<Q", device.read_config(CAPACITY, 8)) == (DISK_SIZE // 512,)
        assert struct.unpack("<I", device.read_config(BLK_SIZE, 4)) == (512,)
        # CONFIG_WCE is offered (its field is writable through SET_CONFIG); ACCESS_PLATFORM never.
        assert device.features() & VIRTIO_BLK_F_CONFIG_WCE
        assert not device.features() & VIRTIO_F_ACCESS_PLATFORM
        for value in (b"\x01", b"\x00", b"\x01"):
            device.write_config(WCE, value)
            assert device.read_config(WCE, 1) == value
        # Past the backend's configuration space: it refuses, the guest reads 0xFF (as CH).
        assert device.read_config(250, 4) == b"\xff" * 4
        assert not device.backend.conn.peer_closed()
    finally:
        device.close()


def test_more_queues_than_the_backend_serves_are_refused(qsd: StorageDaemon) -> None:
    from vmmkit_devices.vhost_user.generic import create_device

    from vmmkit.errors import DeviceError

    with pytest.raises(DeviceError, match="queue_sizes has 9 queues but the vhost-user backend .* serves 1"):
        create_device("gvu", str(qsd.socket), device_type=2, queue_sizes=(128,) * 9)
