"""Test helpers: the driver's half of a split virtqueue written straight into guest memory
(virtio 1.2, 2.7), guest memory with guard pages, and fakes of the machine's pieces."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from vmmkit.memory import GuestMemory, GuestRegion, MemoryRange
from vmmkit.virtio.chain import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmmkit.virtio.device import VIRTIO_F_VERSION_1, ActivationContext, VirtioDevice
from vmmkit.virtio.queue import Virtqueue, ring_sizes

PAGE = mmap.PAGESIZE
DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


class FakeDriver:
    """Sets up and drives one split virtqueue the way a guest driver does."""

    def __init__(self, memory: GuestMemory, size: int, *, desc: int = 0x10000,
                 avail: int | None = None, used: int | None = None) -> None:
        self.memory = memory
        self.size = size
        desc_len, avail_len, used_len = ring_sizes(size)
        self.desc = desc
        self.avail = avail if avail is not None else desc + desc_len
        self.used = used if used is not None else (self.avail + avail_len + 0xFFF) & ~0xFFF
        for gpa, length in ((self.desc, desc_len), (self.avail, avail_len), (self.used, used_len)):
            if memory.is_valid(gpa, length):
                memory.fill(gpa, length, 0)
        self.avail_idx = 0
        self.last_used = 0
        self._next_free = 0

    # -- descriptors -----------------------------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, DESC.pack(addr & (2**64 - 1), length & 0xFFFF_FFFF,
                                                       flags & 0xFFFF, next_ & 0xFFFF))

    def add(self, buffers: Sequence[tuple[int, int, bool]], *, indirect_table: int | None = None,
            publish: bool = True) -> int:
        """Chain ``buffers`` ((gpa, len, writable) each) into the table and make it available."""
        if indirect_table is not None:
            for i, (gpa, length, writable) in enumerate(buffers):
                flags = (WRITE if writable else 0) | (NEXT if i + 1 < len(buffers) else 0)
                self.write_desc(i, gpa, length, flags, i + 1, table=indirect_table)
            head = self._allocate(1)[0]
            self.write_desc(head, indirect_table, 16 * len(buffers), INDIRECT)
        else:
            indices = self._allocate(len(buffers))
            head = indices[0]
            for i, (gpa, length, writable) in enumerate(buffers):
                last = i + 1 == len(buffers)
                flags = (WRITE if writable else 0) | (0 if last else NEXT)
                self.write_desc(indices[i], gpa, length, flags, 0 if last else indices[i + 1])
        if publish:
            self.publish(head)
        return head

    def _allocate(self, count: int) -> list[int]:
        out = [(self._next_free + i) % self.size for i in range(count)]
        self._next_free = (self._next_free + count) % self.size
        return out

    # -- the available ring ----------------------------------------------------------------

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value & 0xFFFF)

    # -- the used ring ---------------------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    @property
    def used_flags(self) -> int:
        return self.memory.read_u16(self.used)

    @property
    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    def take_used(self) -> list[tuple[int, int]]:
        """The used elements added since the last call."""
        out = []
        while self.last_used != self.used_idx:
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.memory.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # -- the device's queue, set up as a transport would -----------------------------------

    def queue(self, *, max_size: int | None = None, features: int = VIRTIO_F_VERSION_1,
              native: bool | None = None, **kwargs: Any) -> Virtqueue:
        queue = Virtqueue(max_size or self.size, self.memory, native=native, **kwargs)
        self.configure(queue, features)
        return queue

    def configure(self, queue: Virtqueue, features: int = VIRTIO_F_VERSION_1) -> None:
        queue.size = self.size
        queue.desc_table, queue.avail_ring, queue.used_ring = self.desc, self.avail, self.used
        queue.set_features(features)
        queue.ready = True


# -- guest memory with guard pages ------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_NONE = 0


@contextmanager
def guarded_memory(layout: Sequence[tuple[int, int, bool]]) -> Iterator[GuestMemory]:
    """Guest memory whose every region ((gpa, size, readonly) each) sits between inaccessible
    host pages, adjacent guest regions included: native code that strays past a region
    faults instead of reading a neighbour."""
    total = PAGE + sum(size + PAGE for _, size, _ in layout)
    arena = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pin = ctypes.c_char.from_buffer(arena)
    base = ctypes.addressof(pin)
    views: list[memoryview] = []
    regions = []
    offset = PAGE
    guards = [0]
    for slot, (gpa, size, readonly) in enumerate(layout):
        view = memoryview(arena)[offset : offset + size]
        views.append(view)
        regions.append(GuestRegion(MemoryRange(gpa, size), view, base + offset, slot=slot,  # type: ignore[arg-type]
                                   readonly=readonly))
        offset += size
        guards.append(offset)
        offset += PAGE
    for guard in guards:
        if _libc.mprotect(ctypes.c_void_p(base + guard), PAGE, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    memory = GuestMemory(regions)
    try:
        yield memory
    finally:
        for view in views:
            view.release()
        del pin, regions, memory
        arena.close()


# -- fakes -------------------------------------------------------------------------------------


class FakeLine:
    """An InterruptLine that counts pulses."""

    def __init__(self) -> None:
        self.pulses = 0
        self.level = False

    def trigger(self) -> None:
        self.pulses += 1

    def set_level(self, high: bool) -> None:
        self.level = high


class FakeEventLoop:
    def __init__(self) -> None:
        self.readers: dict[int, Any] = {}

    def add_reader(self, fd: int, callback: Any) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_soon(self, callback: Any) -> None:
        callback()


class FakeVm:
    """The parts of a Vm the virtio transports use."""

    def __init__(self, ioeventfd: bool = True) -> None:
        self.supports_ioeventfd = ioeventfd
        self.supports_irqfd = False
        self.ioeventfds: dict[tuple[int, int | None], int] = {}
        self.lines: list[tuple[int, bool]] = []

    def register_ioeventfd(self, fd: int, addr: int, *, pio: bool, length: int = 0,
                           datamatch: int | None = None) -> None:
        assert not pio and length == 4
        self.ioeventfds[(addr, datamatch)] = fd

    def unregister_ioeventfd(self, fd: int, addr: int, *, pio: bool, length: int = 0,
                             datamatch: int | None = None) -> None:
        assert self.ioeventfds.pop((addr, datamatch)) == fd

    def guest_mmio_write(self, bus: Any, addr: int, data: bytes) -> None:
        """What the hypervisor does with a guest MMIO write: an ioeventfd takes it, or it exits."""
        fd = self.ioeventfds.get((addr, int.from_bytes(data, "little"))) if len(data) == 4 else None
        if fd is not None:
            os.eventfd_write(fd, 1)
        else:
            bus.write(addr, data)

    def set_irq_line(self, gsi: int, level: bool) -> None:
        self.lines.append((gsi, level))


class FakeDevice(VirtioDevice):
    """A virtio device that records what the transport does to it."""

    device_type = 4  # entropy
    name = "fake"

    def __init__(self, device_id: str = "fake0", sizes: Sequence[int] = (16, 8),
                 features: int = VIRTIO_F_VERSION_1, config: bytes = bytes(range(1, 9))) -> None:
        super().__init__(device_id)
        self._sizes = list(sizes)
        self._features = features
        self.config = bytearray(config)
        self.context: ActivationContext | None = None
        self.activations = 0
        self.resets = 0
        self.closed = False
        self.fail_activation = False

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return self._sizes

    def features(self) -> int:
        return self._features

    def config_space(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        if 0 <= offset and offset + len(data) <= len(self.config):
            self.config[offset : offset + len(data)] = data

    def activate(self, ctx: ActivationContext) -> None:
        if self.fail_activation:
            raise RuntimeError("activation refused")
        self.context = ctx
        self.activations += 1

    def reset(self) -> None:
        super().reset()
        self.context = None
        self.resets += 1

    def close(self) -> None:
        self.closed = True
