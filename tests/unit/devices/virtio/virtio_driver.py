"""A small fake virtio driver for the device tests: it lays out split virtqueues in a real
:class:`GuestMemory` as a guest driver does (virtio 1.2, 2.7), negotiates features, activates a
device with real eventfds on a real event loop, adds descriptor chains, kicks, and reads back the
used ring. It can also drive a device through the virtio-mmio transport's registers (no
ioeventfd: every kick is a QueueNotify write the transport turns into an eventfd signal).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory, GuestRegion, MemoryRange
from vmmkit.virtio.chain import VirtqueueError
from vmmkit.virtio.device import ActivationContext, VirtioDevice, VirtioInterruptType
from vmmkit.virtio.queue import Virtqueue, ring_sizes

PAGE = mmap.PAGESIZE
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
MIB = 1 << 20

#: Where the fake driver puts queue i's rings, and where buffers start.
RING_BASE = 0x10000
RING_STRIDE = 0x8000  # rings of a queue of up to 1024 entries
DATA_BASE = 1 * MIB

Buffer = tuple[int, int, bool]  # (gpa, length, device-writable)


class DriverQueue:
    """The driver's half of one split virtqueue."""

    def __init__(self, memory: GuestMemory, index: int, size: int, base: int) -> None:
        self.memory = memory
        self.index = index
        self.size = size
        desc_len, avail_len, used_len = ring_sizes(size)
        self.desc = base
        self.avail = base + desc_len
        self.used = (self.avail + avail_len + 0xFFF) & ~0xFFF
        for gpa, length in ((self.desc, desc_len), (self.avail, avail_len), (self.used, used_len)):
            memory.fill(gpa, length, 0)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int = 0,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, DESC.pack(addr & (2**64 - 1), length & 0xFFFF_FFFF,
                                                       flags & 0xFFFF, next_ & 0xFFFF))

    def add(self, buffers: Sequence[Buffer], *, indirect_table: int | None = None, publish: bool = True) -> int:
        """Chain ``buffers`` and make the chain available; returns its head."""
        if indirect_table is not None:
            for i, (gpa, length, writable) in enumerate(buffers):
                flags = (F_WRITE if writable else 0) | (F_NEXT if i + 1 < len(buffers) else 0)
                self.write_desc(i, gpa, length, flags, i + 1, table=indirect_table)
            indices = [self.free.pop(0)]
            self.write_desc(indices[0], indirect_table, 16 * len(buffers), F_INDIRECT)
        else:
            if len(buffers) > len(self.free):
                raise RuntimeError("the fake driver ran out of descriptors")
            indices = [self.free.pop(0) for _ in buffers]
            for i, (gpa, length, writable) in enumerate(buffers):
                last = i + 1 == len(buffers)
                flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
                self.write_desc(indices[i], gpa, length, flags, 0 if last else indices[i + 1])
        head = indices[0]
        self.chains[head] = indices
        if publish:
            self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def set_used_event(self, value: int) -> None:
        """VIRTIO_F_EVENT_IDX: interrupt me once the used index passes ``value``."""
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value & 0xFFFF)

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        while self.last_used != self.used_idx:
            slot = self.last_used % self.size
            head, length = struct.unpack("<II", self.memory.read(self.used + 4 + 8 * slot, 8))
            out.append((head, length))
            self.free.extend(self.chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def configure(self, queue: Virtqueue, features: int) -> None:
        queue.size = self.size
        queue.desc_table, queue.avail_ring, queue.used_ring = self.desc, self.avail, self.used
        queue.set_features(features)
        queue.ready = True


class RecordingInterrupt:
    """A VirtioInterrupt that records what the device signalled."""

    def __init__(self) -> None:
        self.events: list[tuple[VirtioInterruptType, int]] = []
        self._lock = threading.Lock()

    def trigger(self, kind: VirtioInterruptType, queue_index: int = 0) -> None:
        with self._lock:
            self.events.append((kind, queue_index))

    def count(self, kind: VirtioInterruptType = VirtioInterruptType.QUEUE, queue: int | None = None) -> int:
        with self._lock:
            return sum(1 for k, q in self.events if k is kind and (queue is None or q == queue))


def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class Harness:
    """A device activated by the fake driver: queues, eventfds, a bump allocator for buffers."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, loop: EventLoop, *,
                 features: int | None = None, sizes: Sequence[int] | None = None,
                 native_walker: bool | None = None, ready: Sequence[bool] | None = None,
                 data_base: int = DATA_BASE) -> None:
        self.device = device
        self.memory = memory
        self.loop = loop
        offered = device.features()
        self.features = offered if features is None else features & offered
        device.ack_features(self.features)
        self.interrupt = RecordingInterrupt()
        self.errors: list[VirtqueueError] = []
        self.queues: list[Virtqueue] = []
        self.driver: list[DriverQueue] = []
        self.events: list[int] = []
        for index, max_size in enumerate(device.queue_max_sizes):
            size = min(max_size, sizes[index]) if sizes else max_size
            driver = DriverQueue(memory, index, size, RING_BASE + index * RING_STRIDE)
            queue = Virtqueue(max_size, memory, index, native=native_walker)
            driver.configure(queue, self.features)
            if ready is not None and not ready[index]:
                queue.ready = False
            queue.on_error = self.errors.append
            if queue.ready:
                queue.validate()
            self.queues.append(queue)
            self.driver.append(driver)
            self.events.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        self._next = data_base
        self.closed = False

    def activate(self) -> Harness:
        self.device.activate(ActivationContext(memory=self.memory, queues=tuple(self.queues),
                                               queue_events=tuple(self.events), interrupt=self.interrupt,
                                               event_loop=self.loop))
        return self

    # -- buffers ---------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 16, data: bytes | None = None) -> int:
        gpa = (self._next + align - 1) & ~(align - 1)
        self._next = gpa + max(size, 1)
        if data is not None:
            self.memory.write(gpa, data)
        else:
            self.memory.fill(gpa, size, 0xCC)
        return gpa

    def kick(self, index: int) -> None:
        os.eventfd_write(self.events[index], 1)

    def submit(self, index: int, buffers: Sequence[Buffer], **kwargs: Any) -> int:
        head = self.driver[index].add(buffers, **kwargs)
        self.kick(index)
        return head

    def wait_used(self, index: int, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []

        def enough() -> bool:
            got.extend(self.driver[index].take_used())
            return len(got) >= count

        wait_for(enough, timeout, f"{count} used buffer(s) on queue {index}")
        return got

    def settle(self, seconds: float = 0.1) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.device.reset()
        for fd in self.events:
            os.close(fd)


# -- guest memory -----------------------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@contextmanager
def guarded_memory(layout: Sequence[tuple[int, int]]) -> Iterator[GuestMemory]:
    """Guest memory whose regions ((gpa, size) each) sit between inaccessible host pages, so
    host code that strays outside guest RAM faults (and the test process dies) instead of
    touching a neighbour."""
    total = PAGE + sum(size + PAGE for _, size in layout)
    arena = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pin = ctypes.c_char.from_buffer(arena)
    base = ctypes.addressof(pin)
    views: list[memoryview] = []
    regions = []
    offset = PAGE
    guards = [0]
    for slot, (gpa, size) in enumerate(layout):
        view = memoryview(arena)[offset : offset + size]
        views.append(view)
        regions.append(GuestRegion(MemoryRange(gpa, size), view, base + offset, slot=slot))  # type: ignore[arg-type]
        offset += size
        guards.append(offset)
        offset += PAGE
    for guard in guards:
        if _libc.mprotect(ctypes.c_void_p(base + guard), PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    memory = GuestMemory(regions)
    try:
        yield memory
    finally:
        for view in views:
            view.release()
        del pin, regions, memory
        arena.close()
