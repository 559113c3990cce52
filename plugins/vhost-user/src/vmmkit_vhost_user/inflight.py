"""The backend's in-flight record (``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``; QEMU's
``docs/interop/vhost-user.rst``, "Inflight I/O tracking", split virtqueues; libvhost-user's
``vu_get_inflight_fd`` / ``vu_check_queue_inflights`` / ``vu_queue_inflight_*``).

The backend allocates the buffer (GET_INFLIGHT_FD: a sealed memfd, zeroed), the frontend keeps it
and hands it to every backend it connects afterwards (SET_INFLIGHT_FD), so a restarted backend
knows which chains its predecessor had taken and not completed. Per queue, at
``i * queue_region_size(queue_size)``::

    struct QueueRegionSplit { u64 features; u16 version; u16 desc_num; u16 last_batch_head;
                              u16 used_idx; DescStateSplit desc[desc_num]; }
    struct DescStateSplit   { u8 inflight; u8 padding[5]; u16 next; u64 counter; }

Taking head ``i`` from the avail ring: ``desc[i].counter = counter++``, ``desc[i].inflight = 1``.
Completing it: ``desc[i].next = last_batch_head``, ``last_batch_head = i``, the used element and
index, then ``desc[i].inflight = 0`` and ``used_idx = used->idx``. Starting a ring on a buffer
already in use (``version`` set): if ``used_idx`` differs from the used ring's index the backend
died between the two steps, so the last batch is done; the chains still marked in flight are
resubmitted in counter order, and the ring resumes taking new chains at ``used->idx + inuse``.

The buffer is the frontend's to give: its fields are checked (heads within the ring, no more
in flight than the ring holds) before anything is resubmitted.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Final

from vmmkit.vhost_user.protocol import Inflight

INFLIGHT_VERSION: Final = 1
ALIGNMENT: Final = 64
_HEADER = struct.Struct("=QHHHH")  # features, version, desc_num, last_batch_head, used_idx
_DESC = struct.Struct("=B5xHQ")  # inflight, padding, next, counter
_VERSION_AT: Final = 8
_DESC_NUM_AT: Final = 10
_LAST_BATCH_AT: Final = 12
_USED_IDX_AT: Final = 14
_U16 = struct.Struct("=H")
_U64 = struct.Struct("=Q")
MAX_QUEUE_SIZE: Final = 32768


class InflightError(Exception):
    """The frontend's buffer or request is unusable."""


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region (libvhost-user's ``vu_inflight_queue_size``)."""
    return (_DESC.size * queue_size + 2 + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class InflightQueue:
    """One queue's region of the mapped buffer."""

    def __init__(self, buffer: mmap.mmap, offset: int, queue_size: int) -> None:
        self.buffer = buffer
        self.offset = offset
        self.queue_size = queue_size
        self.counter = 0

    def _desc(self, head: int) -> int:
        return self.offset + _HEADER.size + _DESC.size * head

    def taken(self, head: int) -> None:
        """Head ``head`` was taken from the avail ring."""
        at = self._desc(head)
        _U64.pack_into(self.buffer, at + 8, self.counter)
        self.counter += 1
        self.buffer[at] = 1

    def completing(self, head: int) -> None:
        """Before the used element of ``head`` is published (a batch of one)."""
        _U16.pack_into(self.buffer, self._desc(head) + 6, self._get(_LAST_BATCH_AT))
        _U16.pack_into(self.buffer, self.offset + _LAST_BATCH_AT, head)

    def completed(self, head: int, used_idx: int) -> None:
        """After the used index that publishes ``head`` was written."""
        self.buffer[self._desc(head)] = 0
        _U16.pack_into(self.buffer, self.offset + _USED_IDX_AT, used_idx)

    def _get(self, field_at: int) -> int:
        value: int = _U16.unpack_from(self.buffer, self.offset + field_at)[0]
        return value

    def recover(self, used_idx: int, ring_size: int) -> list[int] | None:
        """At ring start: the heads to resubmit, oldest first, or ``None`` for a fresh buffer
        (then initialised). ``used_idx``: the used ring's index now.

        :raises InflightError: the buffer says more is in flight than the ring can hold, or
            names heads beyond it.
        """
        if self._get(_VERSION_AT) == 0:
            _U16.pack_into(self.buffer, self.offset + _VERSION_AT, INFLIGHT_VERSION)
            self.counter = 0
            return None
        recorded = self._get(_USED_IDX_AT)
        if recorded != used_idx:  # died between the used index and clearing the batch: it is done
            head = self._get(_LAST_BATCH_AT)
            for _ in range(min((used_idx - recorded) & 0xFFFF, self.queue_size)):
                if head >= self.queue_size:
                    raise InflightError(f"inflight region's last batch names head {head}")
                at = self._desc(head)
                self.buffer[at] = 0
                head = _U16.unpack_from(self.buffer, at + 6)[0]
            _U16.pack_into(self.buffer, self.offset + _USED_IDX_AT, used_idx)
        pending: list[tuple[int, int]] = []
        for head in range(self.queue_size):
            flag, _next, counter = _DESC.unpack_from(self.buffer, self._desc(head))
            if flag == 0:
                continue
            if flag != 1 or head >= ring_size:
                raise InflightError(f"inflight region marks head {head} with {flag} (ring of {ring_size})")
            pending.append((counter, head))
        if len(pending) > ring_size:
            raise InflightError(f"inflight region has {len(pending)} chains in flight, the ring holds {ring_size}")
        pending.sort()
        self.counter = pending[-1][0] + 1 if pending else 0
        return [head for _counter, head in pending]


class InflightBuffer:
    """The mapped buffer and its queues."""

    def __init__(self, fd: int, info: Inflight, num_queues: int) -> None:
        """Map ``info.mmap_size`` bytes of ``fd`` at ``info.mmap_offset`` (the descriptor stays
        the caller's)."""
        if not 1 <= info.num_queues <= num_queues:
            raise InflightError(f"inflight buffer for {info.num_queues} queues (the device has {num_queues})")
        if not 1 <= info.queue_size <= MAX_QUEUE_SIZE:
            raise InflightError(f"inflight queue size {info.queue_size}")
        needed = queue_region_size(info.queue_size) * info.num_queues
        if info.mmap_size < needed or info.mmap_offset % mmap.PAGESIZE:
            raise InflightError(f"inflight buffer of {info.mmap_size} bytes at {info.mmap_offset}: "
                                f"{needed} needed, page-aligned")
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise InflightError(f"inflight descriptor: {exc.strerror}") from None
        if size < info.mmap_offset + info.mmap_size:
            raise InflightError(f"inflight file of {size} bytes is smaller than the {info.mmap_size}-byte buffer "
                                f"at {info.mmap_offset} it should hold")
        try:
            self.buffer = mmap.mmap(fd, needed, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                    offset=info.mmap_offset)
        except (OSError, ValueError, OverflowError) as exc:
            raise InflightError(f"cannot map the inflight buffer: {exc}") from None
        self.info = info
        region = queue_region_size(info.queue_size)
        self.queues = [InflightQueue(self.buffer, i * region, info.queue_size) for i in range(info.num_queues)]
        for queue in self.queues:
            _U16.pack_into(self.buffer, queue.offset + _DESC_NUM_AT, info.queue_size)

    def close(self) -> None:
        self.queues = []
        self.buffer.close()


def allocate(num_queues: int, queue_size: int) -> tuple[Inflight, int]:
    """GET_INFLIGHT_FD: a new zeroed buffer (a sealed memfd) and its description."""
    if not 1 <= num_queues <= 0xFFFF or not 1 <= queue_size <= MAX_QUEUE_SIZE:
        raise InflightError(f"inflight buffer for {num_queues} queues of {queue_size}")
    size = queue_region_size(queue_size) * num_queues
    fd = os.memfd_create("vmmkit-vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        import fcntl

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return Inflight(size, 0, num_queues, queue_size), fd
