"""virtio-rng (virtio 1.2, section 5.4, "entropy device"): device type ``virtio-rng``, from
``VmConfig.rng``. Like Cloud Hypervisor, every VM has one (``src=/dev/urandom`` by default).

One request queue. Each chain's device-writable buffers are filled from the source file, at most
:data:`MAX_REQUEST` bytes per chain (a hostile chain may claim gigabytes; the driver asks again),
and returned with the byte count as used length. A source that runs dry (a regular file at its
end) gives fewer bytes, possibly none. A chain with no device-writable byte cannot be served: the
device fails, as for every device here. No feature bits of its own; ``INDIRECT_DESC`` and
``EVENT_IDX`` are offered. No configuration space.

Counters: ``read_bytes`` (entropy delivered), ``read_ops`` (requests served), ``read_errors``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.paths import PathError, open_input
from vmmkit.virtio.queue import Virtqueue
from vmmkit_devices.device_types import VirtioRngType as VirtioRngType  # declared there, re-exported
from vmmkit_devices.virtio.common import QueueDevice

if TYPE_CHECKING:
    from vmmkit.config import RngConfig

log = get_logger()

VIRTIO_ID_ENTROPY: Final = 4
QUEUE_SIZE: Final = 256
#: The most bytes delivered per request.
MAX_REQUEST: Final = 64 * 1024


class RngDevice(QueueDevice):
    """A virtio entropy device reading ``source`` (an open fd the device owns and closes).

    :param device_id: the device's id.
    :param source: a readable fd (``/dev/urandom``).
    :param path: the source's path, for logs.
    """

    device_type = VIRTIO_ID_ENTROPY
    name = "virtio-rng"

    def __init__(self, device_id: str, source: int, path: str = "") -> None:
        super().__init__(device_id, [QUEUE_SIZE], 0)
        self.source = source
        self.path = path
        self.count("read_bytes", 0)
        self.count("read_ops", 0)

    @classmethod
    def from_config(cls, device_id: str, config: RngConfig) -> RngDevice:
        try:  # non-blocking open: a FIFO (which would wait for a writer) is refused
            fd = open_input(config.src, device_id, allow_char_device=True)
        except PathError as exc:
            raise DeviceError(f"{device_id}: entropy source {config.src} {exc.reason}") from None
        try:
            return cls(device_id, fd, config.src)
        except BaseException:
            os.close(fd)
            raise

    def describe(self) -> Mapping[str, Any]:
        return {"src": self.path}

    def release(self) -> None:
        fd, self.source = self.source, -1
        if fd >= 0:
            os.close(fd)

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        served = 0
        while self.running():
            chain = queue.pop()
            if chain is None:
                break
            want = min(chain.writable_bytes, MAX_REQUEST)
            if want == 0:
                self.fail(queue, f"entropy request {chain.head} has no device-writable buffer")
                return
            data = self._read(want)
            written = chain.write(data)
            queue.add_used(chain.head, written)
            served += 1
            self.count("read_ops")
            self.count("read_bytes", written)
        if served:
            self.signal(queue)

    def _read(self, want: int) -> bytes:
        out = bytearray()
        while len(out) < want:
            try:
                data = os.read(self.source, want - len(out))
            except InterruptedError:
                continue
            except OSError as exc:  # EAGAIN from a non-blocking source, EIO...
                self.count("read_errors")
                log.debug("virtio_rng.read_failed", device=self.id, error=exc.strerror)
                break
            if not data:
                break
            out += data
        return bytes(out)


def create(ctx: DeviceContext, request: DeviceRequest) -> RngDevice:
    """``VirtioRngType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    config = request.config
    if config is None or not hasattr(config, "src"):
        raise DeviceError(f"{request.id}: virtio-rng needs an RngConfig")
    return RngDevice.from_config(request.id, config)
