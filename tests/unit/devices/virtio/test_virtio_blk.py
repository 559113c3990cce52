"""virtio-blk against real image files: every request type, the bytes on disk, read-only
images, out-of-range sectors, O_DIRECT, lifecycle. Each test runs on the C data path and on
the Python reference, and (where it matters) with both chain walkers."""

from __future__ import annotations

import fcntl
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from blk_support import (
    DISCARD,
    FLUSH,
    GET_ID,
    IN,
    OUT,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR,
    WRITE_ZEROES,
    request,
    segment,
    walker_params,
)
from virtio_driver import Harness, wait_for
from vmmkit_devices.virtio import blk_io
from vmmkit_devices.virtio.block import (
    CONFIG,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    BlockDevice,
    VirtioBlockType,
)

from vmmkit.config import DiskConfig, MemoryConfig, VmConfig
from vmmkit.errors import DeviceError
from vmmkit.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1

IMAGE_SIZE = (1 << 20) + 100  # a partial last sector the guest must not see
CAPACITY = (1 << 20) // SECTOR


def _data_paths() -> list[Any]:
    native = pytest.param(True, id="c-io", marks=pytest.mark.skipif(
        not blk_io.native_available(), reason=f"native block path: {blk_io.NATIVE_UNAVAILABLE_REASON}"))
    return [native, pytest.param(False, id="py-io")]


@pytest.fixture(params=_data_paths())
def native(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture(params=walker_params())
def walker(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def pattern(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(IMAGE_SIZE))
    return path


def disk(path: Path, native: bool | None = None, **options: Any) -> BlockDevice:
    return BlockDevice.from_config("_disk0", DiskConfig(path=str(path), **options), native=native)


def read_file(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


# -- configuration -----------------------------------------------------------------------------


def test_features_and_config_space(image: Path) -> None:
    device = disk(image, queue_size=64, serial="abc")
    try:
        features = device.features()
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX, VIRTIO_BLK_F_SEG_MAX,
                    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
            assert features & bit, hex(bit)
        assert not features & (VIRTIO_BLK_F_RO | VIRTIO_BLK_F_MQ)
        assert device.queue_max_sizes == (64,)
        fields = CONFIG.unpack(device.config_space())
        assert fields[0] == CAPACITY  # capacity, partial sector dropped
        assert fields[2] == 62  # seg_max = queue size - 2
        assert fields[6] == 512  # blk_size
        assert fields[13] == 1  # num_queues
        assert fields[14] > 0 and fields[15] > 0  # discard limits
        assert fields[19] == 1  # write_zeroes_may_unmap
        assert device.read_config(0, 8) == struct.pack("<Q", CAPACITY)
        assert device.read_config(0x1000, 4) == b"\0" * 4
    finally:
        device.close()


def test_readonly_and_multiqueue_features(image: Path) -> None:
    device = disk(image, readonly=True, num_queues=3, sparse=False)
    try:
        features = device.features()
        assert features & VIRTIO_BLK_F_RO and features & VIRTIO_BLK_F_MQ
        assert not features & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)
        assert len(device.queue_max_sizes) == 3
        assert CONFIG.unpack(device.config_space())[13] == 3
        flags = fcntl.fcntl(device.image.fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY
    finally:
        device.close()


def test_missing_image_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    with pytest.raises(DeviceError, match=str(missing)):
        disk(missing)


def test_a_broken_qcow2_and_unsupported_formats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.img"
    path.write_bytes(b"QFI\xfb" + bytes(4092))  # qcow2's magic (so qcow2, as CH detects it), version 0
    with pytest.raises(DeviceError, match=r"qcow2 image .*q\.img: version"):
        disk(path)
    disk(path, image_type="Raw").close()
    with pytest.raises(DeviceError, match="not supported"):
        disk(path, image_type="Vhdx")


def test_an_image_in_use_is_refused(image: Path) -> None:
    first = disk(image)
    try:
        with pytest.raises(DeviceError, match="locked"):
            disk(image)
    finally:
        first.close()
    disk(image).close()  # the lock went with the first device


def test_requests_follow_the_config(image: Path) -> None:
    config = VmConfig(disks=[DiskConfig(path=str(image)), DiskConfig(path=str(image), id="data", transport="mmio"),
                             DiskConfig(vhost_user=True, vhost_socket="/tmp/x.sock")],
                      memory=MemoryConfig(size=1 << 30, shared=True))
    with pytest.raises(TypeError, match="assign_ids"):  # ids come from the entry point, once
        VirtioBlockType.requests(config)
    requests = VirtioBlockType.requests(config.assign_ids())
    assert [(r.type, r.id, r.transport) for r in requests] == [("virtio-blk", "_disk0", None),
                                                              ("virtio-blk", "data", "mmio")]
    assert requests[0].config.path == str(image)


# -- requests ----------------------------------------------------------------------------------


def test_write_then_read(image: Path, native: bool, walker: bool, activate: Callable[..., Harness]) -> None:
    device = disk(image, native)
    h = activate(device, native_walker=walker, sizes=[64])
    data = pattern(3 * SECTOR, seed=99)
    reply = request(h, OUT, 8, out=data, pieces=3)
    assert (reply.status, reply.used) == (S_OK, 1)
    assert read_file(image, 8 * SECTOR, len(data)) == data
    assert read_file(image, 7 * SECTOR, SECTOR) == pattern(IMAGE_SIZE)[7 * SECTOR : 8 * SECTOR]

    reply = request(h, IN, 8, in_len=len(data), pieces=2)
    assert (reply.status, reply.used, reply.data) == (S_OK, len(data) + 1, data)
    reply = request(h, IN, 0, in_len=SECTOR, indirect=True)
    assert reply.data == pattern(IMAGE_SIZE)[:SECTOR]
    counters = device.counters()
    assert counters["write_ops"] == 1 and counters["write_bytes"] == len(data)
    assert counters["read_ops"] == 2 and counters["read_bytes"] == len(data) + SECTOR
    assert h.interrupt.count(queue=0) >= 1


def test_flush_get_id(image: Path, native: bool, activate: Callable[..., Harness]) -> None:
    device = disk(image, native, serial="vmmkit-blk0")
    h = activate(device)
    assert request(h, FLUSH) == (S_OK, 1, b"")
    reply = request(h, GET_ID, in_len=20)
    assert (reply.status, reply.used, reply.data) == (S_OK, 21, b"vmmkit-blk0" + bytes(9))
    reply = request(h, GET_ID, in_len=8)  # a short buffer gets what fits
    assert (reply.status, reply.used, reply.data) == (S_OK, 9, b"vmmkit-b")
    assert device.counters()["flush_ops"] == 1


def test_default_serial_is_cloud_hypervisors(image: Path, activate: Callable[..., Harness]) -> None:
    h = activate(disk(image))
    info = os.stat(image)
    expected = f"{info.st_dev}{info.st_rdev}{info.st_ino}".encode()[:20]
    assert request(h, GET_ID, in_len=20).data == expected.ljust(20, b"\0")


def test_discard_and_write_zeroes(image: Path, native: bool, activate: Callable[..., Harness]) -> None:
    device = disk(image, native)
    h = activate(device)
    original = pattern(IMAGE_SIZE)
    assert request(h, DISCARD, out=segment(16, 8)).status == S_OK
    assert read_file(image, 16 * SECTOR, 8 * SECTOR) == bytes(8 * SECTOR)  # a hole reads as zeros
    assert request(h, WRITE_ZEROES, out=segment(40, 3) + segment(100, 1, 1)).status == S_OK
    assert read_file(image, 40 * SECTOR, 3 * SECTOR) == bytes(3 * SECTOR)
    assert read_file(image, 100 * SECTOR, SECTOR) == bytes(SECTOR)
    assert read_file(image, 43 * SECTOR, SECTOR) == original[43 * SECTOR : 44 * SECTOR]
    assert os.path.getsize(image) == IMAGE_SIZE  # KEEP_SIZE
    counters = device.counters()
    assert counters["discard_ops"] == 1 and counters["write_zeroes_ops"] == 1


def test_discard_and_write_zeroes_refusals(image: Path, native: bool, activate: Callable[..., Harness]) -> None:
    h = activate(disk(image, native))
    before = image.read_bytes()
    assert request(h, DISCARD, out=segment(0, 1, 1)).status == S_UNSUPP  # unmap on discard
    assert request(h, WRITE_ZEROES, out=segment(0, 1, 4)).status == S_UNSUPP  # unknown flag
    assert request(h, DISCARD, out=segment(0, 1) * 33).status == S_UNSUPP  # too many segments
    assert request(h, DISCARD, out=segment(CAPACITY - 1, 2)).status == S_IOERR  # past the end
    assert request(h, WRITE_ZEROES, out=segment(2**63, 1)).status == S_IOERR
    assert request(h, DISCARD, out=segment(0, 1)[:12]).status == S_IOERR  # not whole segments
    assert request(h, DISCARD).status == S_IOERR  # no segment at all
    # one bad segment: nothing is done, not even the good one before it
    assert request(h, WRITE_ZEROES, out=segment(0, 4) + segment(CAPACITY, 1)).status == S_IOERR
    assert image.read_bytes() == before


def test_commands_not_negotiated_are_unsupported(image: Path, activate: Callable[..., Harness]) -> None:
    device = disk(image)
    h = activate(device, features=device.features() & ~(VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES))
    assert request(h, DISCARD, out=segment(0, 1)).status == S_UNSUPP
    assert request(h, WRITE_ZEROES, out=segment(0, 1)).status == S_UNSUPP
    assert request(h, 0x1234).status == S_UNSUPP
    assert request(h, 10, in_len=16).status == S_UNSUPP  # GET_LIFETIME
    assert device.counters()["unsupported_requests"] == 4


def test_readonly_refuses_writes(image: Path, native: bool, activate: Callable[..., Harness]) -> None:
    device = disk(image, native, readonly=True)
    h = activate(device)
    before = image.read_bytes()
    assert request(h, OUT, 0, out=bytes(SECTOR)).status == S_IOERR
    assert request(h, DISCARD, out=segment(0, 1)).status == S_UNSUPP
    assert request(h, WRITE_ZEROES, out=segment(0, 1)).status == S_UNSUPP
    assert request(h, FLUSH).status == S_OK
    assert request(h, IN, 1, in_len=SECTOR).data == before[SECTOR : 2 * SECTOR]
    assert image.read_bytes() == before


def test_sector_bounds(image: Path, native: bool, activate: Callable[..., Harness]) -> None:
    device = disk(image, native)
    h = activate(device)
    last = pattern(SECTOR, seed=5)
    assert request(h, OUT, CAPACITY - 1, out=last).status == S_OK
    assert request(h, OUT, CAPACITY - 1, out=bytes(2 * SECTOR)).status == S_IOERR  # crosses the end
    assert request(h, OUT, CAPACITY, out=bytes(SECTOR)).status == S_IOERR
    assert request(h, OUT, 2**64 - 1, out=bytes(SECTOR)).status == S_IOERR
    assert request(h, IN, CAPACITY, in_len=SECTOR).status == S_IOERR
    assert request(h, IN, 2**61, in_len=SECTOR).status == S_IOERR
    assert request(h, OUT, 0, out=bytes(100)).status == S_IOERR  # not whole sectors
    assert request(h, IN, 0, in_len=SECTOR + 1).status == S_IOERR
    reply = request(h, IN, CAPACITY, in_len=0)  # zero-length at the very end: fine
    assert reply.status == S_OK
    assert os.path.getsize(image) == IMAGE_SIZE  # never a write beyond EOF
    assert read_file(image, (CAPACITY - 1) * SECTOR, SECTOR) == last
    assert read_file(image, CAPACITY * SECTOR, 100) == pattern(IMAGE_SIZE)[CAPACITY * SECTOR :]
    assert device.counters()["invalid_requests"] == 7


def test_short_header_gets_ioerr(image: Path, activate: Callable[..., Harness]) -> None:
    h = activate(disk(image))
    status = h.alloc(1, data=b"\xee")
    h.submit(0, [(h.alloc(8, data=bytes(8)), 8, False), (status, 1, True)])
    assert h.wait_used(0) and h.memory.read_u8(status) == S_IOERR
    assert h.device.broken is None


def test_multiqueue(image: Path, native: bool, activate: Callable[..., Harness]) -> None:
    device = disk(image, native, num_queues=2)
    h = activate(device)
    data = pattern(SECTOR, seed=3)
    assert request(h, OUT, 4, out=data, queue=1).status == S_OK
    assert request(h, IN, 4, in_len=SECTOR, queue=0).data == data
    threads = {t.name for t in device._threads}
    assert threads == {"_disk0_q0", "_disk0_q1"}


def test_pause_holds_requests_until_resume(image: Path, activate: Callable[..., Harness]) -> None:
    device = disk(image)
    h = activate(device)
    device.pause()
    request(h, IN, 0, in_len=SECTOR, wait=False)
    h.settle(0.1)
    assert h.driver[0].used_idx == 0
    device.resume()
    assert h.wait_used(0)


def test_reset_and_activate_again(image: Path, activate: Callable[..., Harness]) -> None:
    device = disk(image)
    h = activate(device)
    assert request(h, FLUSH).status == S_OK
    h.close()
    assert not device._threads and device.context is None
    h2 = activate(device)
    assert request(h2, IN, 0, in_len=SECTOR).status == S_OK


def test_close_releases_the_image(image: Path) -> None:
    device = disk(image, direct=True)
    fds = (device.image.fd, device.image.direct_fd)
    device.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    device.close()  # idempotent


# -- O_DIRECT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_direct_io(where: str, tmp_path: Path, native: bool, activate: Callable[..., Harness]) -> None:
    base = tmp_path if where == "tmp" else Path("/dev/shm")
    if not base.is_dir():
        pytest.skip(f"{base} does not exist")
    path = base / f"vmmkit-direct-{os.getpid()}-{native}.img"
    path.write_bytes(pattern(1 << 20))
    try:
        try:
            probe = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError as exc:
            pytest.skip(f"O_DIRECT is not supported on {base}: {exc.strerror}")
        os.close(probe)
        device = disk(path, native, direct=True)
        h = activate(device)
        data = pattern(8192, seed=11)
        # page-aligned guest buffers, 4 KiB multiples: the O_DIRECT descriptor
        assert request(h, OUT, 8, out=data, pieces=2, align=4096).status == S_OK
        assert device.counters().get("direct_ops", 0) == 1
        assert read_file(path, 8 * SECTOR, len(data)) == data
        # misaligned guest buffers: the buffered descriptor, same bytes
        reply = request(h, IN, 8, in_len=len(data), pieces=3, align=8)
        assert (reply.status, reply.data) == (S_OK, data)
        other = pattern(SECTOR, seed=12)
        assert request(h, OUT, 1, out=other, align=8).status == S_OK
        assert request(h, IN, 1, in_len=SECTOR, align=4096).data == other
        assert device.counters().get("direct_fallbacks", 0) >= 2
        assert read_file(path, SECTOR, SECTOR) == other
        assert request(h, FLUSH).status == S_OK
    finally:
        path.unlink()


def test_direct_io_advertises_its_alignment(image: Path) -> None:
    device = disk(image, direct=True)
    try:
        assert device.image.block_size >= 512
        assert CONFIG.unpack(device.config_space())[6] == device.image.block_size
        assert device.describe()["direct"] is True
    finally:
        device.close()


def test_native_requested_but_missing(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blk_io, "_lib", None)
    with pytest.raises(DeviceError, match="native"):
        disk(image, True)
    device = disk(image)  # None: the Python path
    try:
        assert device.native is False
    finally:
        device.close()


def test_interrupts_follow_event_idx(image: Path, activate: Callable[..., Harness]) -> None:
    device = disk(image)
    h = activate(device)
    assert h.features & VIRTIO_F_EVENT_IDX
    request(h, FLUSH)
    wait_for(lambda: h.interrupt.count(queue=0) >= 1, what="an interrupt")


@pytest.mark.parametrize("negotiate_flush", [True, False])
def test_writes_are_write_through_when_the_driver_has_no_flush(
    image: Path, native: bool, activate: Callable[..., Harness], negotiate_flush: bool
) -> None:
    """Without VIRTIO_BLK_F_FLUSH a driver may not ask for a flush, so every write must be
    stable before it completes (virtio 1.2, 5.2.6.2): the device syncs after each write."""
    device = disk(image, native)
    flush_bit = 1 << 9
    features = device.features() if negotiate_flush else device.features() & ~flush_bit
    h = activate(device, features=features)
    assert request(h, OUT, 2, out=pattern(SECTOR, seed=5)).status == S_OK
    assert device.counters()["flush_ops"] == (0 if negotiate_flush else 1)
