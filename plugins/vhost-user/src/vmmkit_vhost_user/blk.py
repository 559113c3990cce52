"""The virtio-blk device (virtio 1.2, section 5.2) behind the vhost-user backend: ``vmmkit-vhost-user
blk``.

Requests are vmmkit's own virtio-blk's: every chain goes to
:meth:`vmmkit_devices.virtio.block.BlockDevice.handle` (IN, OUT, FLUSH, GET_ID, DISCARD,
WRITE_ZEROES; header, length, capacity and read-only checks, the status byte, the counters), over
:mod:`vmmkit_devices.virtio.blk_io`'s image and I/O paths on the frontend's mapped memory. The
configuration space is that device's too (capacity, ``seg_max``, ``blk_size``, discard and
write-zeroes limits, ``num_queues``). A request without a device-writable status byte cannot be
answered: the ring stops (the frontend hears of it on the ring's error eventfd), as QEMU's
``virtio_error``.

Block requests are idempotent, so the device keeps the in-flight record (``INFLIGHT_SHMFD``): a
backend restarted under a running guest resubmits what its predecessor had taken.
"""

from __future__ import annotations

import logging

from vmmkit_devices.virtio.blk_io import BlockIo, DiskImage, make_block_io
from vmmkit_devices.virtio.block import BlockDevice, _Malformed

from vmmkit.memory import GuestMemory
from vmmkit.virtio.chain import DescriptorChain, ErrorKind, VirtqueueError

log = logging.getLogger("vmmkit_vhost_user")

#: The largest ring the frontend may set up (the config space's seg_max follows it, as vmmkit's own device).
QUEUE_SIZE = 128


class VirtioBlk:
    """A virtio-blk device serving the raw (or qcow2) image at ``path``.

    :raises DeviceError: the image cannot be opened (missing, locked, unsupported format).
    """

    name = "virtio-blk"
    inflight = True

    def __init__(self, path: str, *, readonly: bool = False, serial: str | None = None, num_queues: int = 1,
                 image_type: str = "Raw", direct: bool = False) -> None:
        image = DiskImage(path, readonly=readonly, direct=direct, image_type=image_type, owner="vmmkit-vhost-user blk")
        try:
            self.blk = BlockDevice("vhost-user-blk", image, num_queues=num_queues, queue_size=QUEUE_SIZE,
                                   serial=serial.encode() if serial is not None else None)
        except BaseException:
            image.close()
            raise
        self.num_queues = num_queues
        self._io: tuple[GuestMemory, BlockIo] | None = None

    def device_features(self) -> int:
        return self.blk.features()

    def set_features(self, features: int) -> None:
        self.blk.acked_features = features

    def config(self) -> bytes | None:
        return self.blk.config_space()

    def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        memory = chain.memory
        if memory is None:
            raise VirtqueueError(ErrorKind.DEVICE, f"queue {queue_index}: a chain without memory")
        current = self._io
        if current is None or current[0] is not memory:  # a new memory table
            current = (memory, make_block_io(self.blk.image, memory))
            self._io = current
        self.blk._io = current[1]
        try:
            return self.blk.handle(chain)
        except _Malformed as exc:
            raise VirtqueueError(ErrorKind.DEVICE, f"queue {queue_index}: {exc}") from None

    def reset(self) -> None:
        counts = self.blk.counters()
        if any(counts.values()):
            summary = " ".join(f"{name}={count}" for name, count in sorted(counts.items()) if count)
            log.info("block requests served since the daemon started: %s", summary)
        self._io = None
        self.blk._io = None

    def close(self) -> None:
        self.blk.close()

