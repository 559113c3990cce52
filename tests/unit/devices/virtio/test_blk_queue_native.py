"""The C virtio-blk queue's own behaviour: it serves requests with no Python per request, signals
through an irqfd when the transport offers one, stops for pause/reset and sees a resize."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from blk_support import IN, OUT, S_IOERR, S_OK, SECTOR, request
from virtio_driver import Harness
from vmmkit_devices.virtio import blk_io
from vmmkit_devices.virtio.block import BlockDevice

from vmmkit.config import DiskConfig
from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory
from vmmkit.virtio.device import VirtioInterruptType

pytestmark = pytest.mark.skipif(not blk_io.native_queue_available(),
                                reason=f"native block queue: {blk_io.NATIVE_QUEUE_UNAVAILABLE_REASON}")

IMAGE_SIZE = 64 * SECTOR


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(0).randbytes(IMAGE_SIZE))
    return path


def disk(path: Path, **options: object) -> BlockDevice:
    device = BlockDevice.from_config("_disk0", DiskConfig(path=str(path), **options))  # type: ignore[arg-type]
    assert device.native_queue and device.describe()["native_queue"]
    return device


def test_requests_never_reach_python(image: Path, activate: Callable[..., Harness],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def python_path(*_: object) -> int:
        raise AssertionError("the Python request path ran")

    monkeypatch.setattr(BlockDevice, "handle", python_path)
    h = activate(disk(image))
    data = random.Random(1).randbytes(2 * SECTOR)
    assert request(h, OUT, 3, out=data).status == S_OK
    reply = request(h, IN, 3, in_len=2 * SECTOR, pieces=2)
    assert (reply.status, reply.used, reply.data) == (S_OK, 2 * SECTOR + 1, data)
    assert image.read_bytes()[3 * SECTOR : 5 * SECTOR] == data
    counts = h.device.counters()
    assert (counts["read_ops"], counts["write_ops"], counts["read_bytes"]) == (1, 1, 2 * SECTOR)
    assert h.device.broken is None


class IrqfdInterrupt:
    """A transport interrupt that offers an irqfd per queue (as virtio-pci with MSI-X)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.triggered: list[tuple[VirtioInterruptType, int]] = []

    def trigger(self, kind: VirtioInterruptType, queue_index: int = 0) -> None:
        self.triggered.append((kind, queue_index))

    def queue_irqfd(self, queue_index: int) -> int | None:
        return self.fd


def test_the_c_queue_signals_through_the_irqfd(image: Path, memory: GuestMemory, event_loop: EventLoop) -> None:
    device = disk(image)
    h = Harness(device, memory, event_loop)
    irq = IrqfdInterrupt()
    h.interrupt = irq  # type: ignore[assignment]
    h.activate()
    try:
        for sector in range(4):
            assert request(h, IN, sector, in_len=SECTOR).status == S_OK
        signals = os.eventfd_read(irq.fd)
        assert 1 <= signals <= 4
        assert irq.triggered == []  # no interrupt went through Python
    finally:
        h.close()
        device.close()
        os.close(irq.fd)


def test_pause_stops_the_c_worker_and_reset_ends_its_thread(image: Path, activate: Callable[..., Harness]) -> None:
    h = activate(disk(image))
    assert request(h, IN, 0, in_len=SECTOR).status == S_OK
    h.device.pause()
    request(h, IN, 1, in_len=SECTOR, wait=False)
    h.settle(0.2)
    assert h.driver[0].used_idx == 1  # nothing served while paused
    h.device.resume()
    assert len(h.wait_used(0)) == 1
    h.close()  # device reset
    assert not [t for t in threading.enumerate() if t.name.startswith("_disk0_q")]


def test_the_c_queue_sees_a_resize(image: Path, activate: Callable[..., Harness]) -> None:
    h = activate(disk(image))
    assert request(h, IN, IMAGE_SIZE // SECTOR, in_len=SECTOR).status == S_IOERR
    h.device.resize(IMAGE_SIZE + 8 * SECTOR)
    assert request(h, IN, IMAGE_SIZE // SECTOR, in_len=SECTOR).status == S_OK


def test_each_queue_has_its_c_worker(image: Path, activate: Callable[..., Harness]) -> None:
    h = activate(disk(image, num_queues=2))
    for queue in (0, 1):
        assert request(h, IN, queue, in_len=SECTOR, queue=queue).status == S_OK
    names = {t.name for t in threading.enumerate()}
    assert {"_disk0_q0", "_disk0_q1"} <= names


def test_memory_hotplugged_while_the_c_queue_runs(image: Path, memory: GuestMemory,
                                                  activate: Callable[..., Harness]) -> None:
    """A buffer in a region added after activation: the C queue re-reads the region table and
    serves it (the walk is retried once the table changed, instead of failing the device)."""
    from vmmkit.memory import MemoryRange, close_region, map_region

    h = activate(disk(image))
    assert request(h, IN, 0, in_len=SECTOR).status == S_OK
    start = 64 << 20
    region = map_region(MemoryRange(start, 1 << 20), 5, shared=False, hugepages=False, hugepage_size=None,
                        thp=False, mergeable=False, prefault=False)
    memory.add_region(region)
    try:
        header = h.alloc(16, data=bytes([IN, 0, 0, 0]) + bytes(4) + (2).to_bytes(8, "little"))
        status = h.alloc(1)
        h.submit(0, [(header, 16, False), (start + 4096, SECTOR, True), (status, 1, True)])
        h.wait_used(0)
        assert memory.read_u8(status) == S_OK and h.device.broken is None
        assert bytes(memory.read(start + 4096, SECTOR)) == image.read_bytes()[2 * SECTOR : 3 * SECTOR]
    finally:
        h.close()
        memory.remove_region(start)
        close_region(region)
