"""virtio-mem (virtio 1.2, section 5.15, "memory device"): device type ``virtio-mem``, asked for
by the core's memory hotplug (:mod:`vmmkit.memory_hotplug`) with ``--memory
hotplug_method=virtio-mem,hotplug_size=``, as Cloud Hypervisor's ``virtio_devices::Mem``.

The device manages a region of guest-physical memory the VMM mapped at boot (``addr``,
``region_size``; the whole region is usable) in blocks of :data:`BLOCK_SIZE`. The host sets
``requested_size`` (``vm.resize desired_ram``: :meth:`MemDevice.resize`, with a
configuration-change interrupt); the driver plugs and unplugs blocks to reach it, through the one
request queue::

    request  (24 bytes, device-readable): le16 type, 3 x le16 padding, le64 addr, le16 nb_blocks, 3 x le16
    response (10 bytes, device-writable): le16 type, 3 x le16 padding, le16 state

    type  0 PLUG  1 UNPLUG  2 UNPLUG_ALL  3 STATE       response 0 ACK  1 NACK  2 BUSY  3 ERROR
    state 0 PLUGGED  1 UNPLUGGED  2 MIXED

A range must be block aligned and inside the usable region, else ERROR; PLUG of a plugged block or
UNPLUG of an unplugged one is ERROR; PLUG beyond ``requested_size`` is NACK (5.15.6.2). Unplugged
memory is given back to the host (:meth:`GuestMemory.discard`: ``MADV_DONTNEED``, or a punched
hole for memfd-backed RAM); it reads as zeros when plugged again. ``VIRTIO_MEM_F_ACPI_PXM`` is
not offered (one NUMA node); ``VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`` neither (unplugged memory stays mapped, as CH's).

Counters: ``plug_requests``, ``unplug_requests``, ``state_requests``, ``nacks``, ``errors``,
``plugged_size`` (bytes), ``requested_size``.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.virtio.device import VirtioInterruptType
from vmmkit.virtio.queue import Virtqueue
from vmmkit_devices.device_types import VirtioMemType as VirtioMemType  # declared there, re-exported
from vmmkit_devices.virtio.common import QueueDevice

if TYPE_CHECKING:
    from vmmkit.device import DeviceContext, DeviceRequest
    from vmmkit.memory import GuestMemory

log = get_logger()

VIRTIO_ID_MEM: Final = 24
QUEUE_SIZE: Final = 128
#: The device block size (Cloud Hypervisor's ``VIRTIO_MEM_DEFAULT_BLOCK_SIZE``); Linux plugs
#: sub-blocks of at least a pageblock (2 MiB on x86-64) anyway.
BLOCK_SIZE: Final = 2 << 20

REQ_PLUG: Final = 0
REQ_UNPLUG: Final = 1
REQ_UNPLUG_ALL: Final = 2
REQ_STATE: Final = 3
RESP_ACK: Final = 0
RESP_NACK: Final = 1
RESP_BUSY: Final = 2
RESP_ERROR: Final = 3
STATE_PLUGGED: Final = 0
STATE_UNPLUGGED: Final = 1
STATE_MIXED: Final = 2

REQUEST: Final = struct.Struct("<H6xQH6x")
RESPONSE: Final = struct.Struct("<H6xH")
#: ``struct virtio_mem_config``: block_size, node_id, padding, addr, region_size,
#: usable_region_size, plugged_size, requested_size.
CONFIG: Final = struct.Struct("<QH6xQQQQQ")


class MemDevice(QueueDevice):
    """A virtio-mem device over ``[addr, addr + region_size)`` of ``memory`` (mapped already).

    :param requested_size: what the driver should plug from the start (``hotplugged_size``).
    """

    device_type = VIRTIO_ID_MEM
    name = "virtio-mem"

    def __init__(self, device_id: str, memory: GuestMemory, addr: int, region_size: int,
                 requested_size: int = 0, block_size: int = BLOCK_SIZE) -> None:
        super().__init__(device_id, [QUEUE_SIZE], 0)
        if block_size & (block_size - 1) or addr % block_size or region_size % block_size or region_size <= 0:
            raise DeviceError(f"{device_id}: virtio-mem region {addr:#x}+{region_size:#x} is not in "
                              f"{block_size}-byte blocks")
        self.memory = memory
        self.addr = addr
        self.region_size = region_size
        self.block_size = block_size
        self._lock = threading.Lock()
        self._plugged = bytearray(region_size // block_size)  # 1: plugged
        self.plugged_size = 0
        self.requested_size = 0
        self._set_requested(requested_size)
        for name in ("plug_requests", "unplug_requests", "state_requests", "nacks", "errors"):
            self.count(name, 0)

    # -- the host's side ---------------------------------------------------------------------

    def _set_requested(self, size: int) -> None:
        if size < 0 or size > self.region_size or size % self.block_size:
            raise DeviceError(f"{self.id}: requested size {size} is not a multiple of {self.block_size} "
                              f"bytes up to {self.region_size}")
        self.requested_size = size

    def resize(self, size: int) -> None:
        """The driver should plug (or unplug) blocks until ``size`` bytes are plugged; an active
        driver gets a configuration-change interrupt (virtio 1.2, 5.15.5)."""
        with self._lock:
            self._set_requested(size)
        ctx = self.context
        if ctx is not None and self.running():
            ctx.interrupt.trigger(VirtioInterruptType.CONFIG)
        log.info("virtio_mem.requested", device=self.id, requested_size=size, plugged_size=self.plugged_size)

    def config_space(self) -> bytes:
        with self._lock:
            return CONFIG.pack(self.block_size, 0, self.addr, self.region_size, self.region_size,
                               self.plugged_size, self.requested_size)

    def describe(self) -> Mapping[str, Any]:
        return {"addr": self.addr, "region_size": self.region_size, "block_size": self.block_size}

    def counters(self) -> Mapping[str, int]:
        return {**super().counters(), "plugged_size": self.plugged_size, "requested_size": self.requested_size}

    # -- the driver's requests ---------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        served = 0
        while self.running():
            chain = queue.pop()
            if chain is None:
                break
            request = chain.read(REQUEST.size)
            if len(request) < REQUEST.size or chain.writable_bytes < RESPONSE.size:
                self.fail(queue, f"virtio-mem request {chain.head} is not a 24-byte request and a "
                                 "10-byte response buffer")
                return
            kind, addr, blocks = REQUEST.unpack(request)
            result, state = self.handle(kind, addr, blocks)
            queue.add_used(chain.head, chain.write(RESPONSE.pack(result, state)))
            served += 1
        if served:
            self.signal(queue)

    def handle(self, kind: int, addr: int, blocks: int) -> tuple[int, int]:
        """``(response type, state)`` for one request (everything in it is the guest's)."""
        with self._lock:
            if kind == REQ_UNPLUG_ALL:
                self.count("unplug_requests")
                self._discard(0, len(self._plugged))
                self._plugged[:] = bytes(len(self._plugged))
                self.plugged_size = 0
                return RESP_ACK, 0
            first = self._first_block(addr, blocks)
            if first is None or kind not in (REQ_PLUG, REQ_UNPLUG, REQ_STATE):
                self.count("errors")
                return RESP_ERROR, 0
            window = self._plugged[first:first + blocks]
            if kind == REQ_STATE:
                self.count("state_requests")
                plugged = window.count(1)
                state = STATE_PLUGGED if plugged == blocks else STATE_UNPLUGGED if plugged == 0 else STATE_MIXED
                return RESP_ACK, state
            if kind == REQ_PLUG:
                self.count("plug_requests")
                if any(window):
                    self.count("errors")
                    return RESP_ERROR, 0
                if self.plugged_size + blocks * self.block_size > self.requested_size:
                    self.count("nacks")
                    return RESP_NACK, 0
                self._plugged[first:first + blocks] = b"\x01" * blocks
                self.plugged_size += blocks * self.block_size
                return RESP_ACK, 0
            self.count("unplug_requests")
            if window.count(1) != blocks:
                self.count("errors")
                return RESP_ERROR, 0
            self._discard(first, blocks)
            self._plugged[first:first + blocks] = bytes(blocks)
            self.plugged_size -= blocks * self.block_size
            return RESP_ACK, 0

    def _first_block(self, addr: int, blocks: int) -> int | None:
        """The index of the block at ``addr`` when ``[addr, addr + blocks * block_size)`` is a
        whole number of blocks inside the region, else ``None``."""
        if blocks <= 0 or addr < self.addr or (addr - self.addr) % self.block_size:
            return None
        first = (addr - self.addr) // self.block_size
        return first if first + blocks <= len(self._plugged) else None

    def _discard(self, first: int, blocks: int) -> None:
        start, length = self.addr + first * self.block_size, blocks * self.block_size
        try:
            self.memory.discard(start, length)
        except Exception as exc:  # the memory is still the guest's: only the host keeps pages
            log.warning("virtio_mem.discard_failed", device=self.id, start=start, length=length, error=str(exc))

    def device_state(self) -> Mapping[str, Any]:
        """Which blocks are plugged (the memory itself is in the snapshot's RAM files) and what
        the driver was asked to plug."""
        with self._lock:
            return {"plugged": self._plugged.hex(), "requested_size": self.requested_size}

    def restore_device_state(self, state: Mapping[str, Any]) -> None:
        from vmmkit.state import StateError, field, int_field

        blocks = field(state, "plugged", str, self.id)
        try:
            plugged = bytearray.fromhex(blocks)
        except ValueError:
            raise StateError(f"{self.id}.plugged: not a hex string") from None
        if len(plugged) != len(self._plugged) or plugged.strip(b"\x00\x01"):
            raise StateError(f"{self.id}.plugged: {len(self._plugged)} blocks of 0 or 1 expected")
        requested = int_field(state, "requested_size", self.id, 0, self.region_size)
        if requested % self.block_size:
            raise StateError(f"{self.id}.requested_size: {requested} is not a multiple of {self.block_size}")
        with self._lock:
            self._set_requested(requested)
            self._plugged[:] = plugged
            self.plugged_size = plugged.count(1) * self.block_size

    def deactivated(self) -> None:
        """The driver reset the device: what it plugged stays plugged (it asks with
        UNPLUG_ALL when it starts again), as CH's."""


def create(ctx: DeviceContext, request: DeviceRequest) -> MemDevice:
    """``VirtioMemType.create`` (declared in :mod:`vmmkit_devices.device_types`): ``request.config``
    is the core's :class:`vmmkit.memory_hotplug.VirtioMemRegion`."""
    region = request.config
    try:
        addr, size, requested = int(region.start), int(region.size), int(region.requested_size)
    except (AttributeError, TypeError, ValueError):
        raise DeviceError(f"{request.id}: virtio-mem needs the region the VMM mapped for it") from None
    return MemDevice(request.id, ctx.memory, addr, size, requested)
