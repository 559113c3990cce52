"""Where a split ring may resume after its vhost-user backend died, when the backend keeps no
in-flight record (no ``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``, e.g. qemu-storage-daemon 7.2).

The new backend is told ``SET_VRING_BASE`` = the used index ``U`` (QEMU's
``virtio_queue_restore_last_avail_idx``) and takes the available positions ``[U, A)`` again.
That is exact only if the dead backend completed exactly the positions ``[0, U)``: a request it
completed out of order (a position ``p >= U``) would be served twice, and one it had taken
before it (``r < U``) never. The frontend cannot see which avail entries the backend had taken;
it can only prove that no position of ``[U, A)`` was completed, from guest memory and one
observation of its own:

- position ``p`` became available when the driver had at most ``size`` requests outstanding,
  so the device's used index was then at least ``p + 1 - size``: if ``p`` was completed, its
  used element is at a position ``q >= p + 1 - size``, still in the used ring;
- when the frontend saw the backend hang up it read the used index ``U0`` then the avail index
  ``A0``: a position ``p >= A0`` became available after that, so its completion (if any) is at
  ``q >= U0``. With a backend that is gone, ``U`` stays ``U0`` and such a ``p`` is safe.

So for each ``p`` in ``[U, A)`` the used elements from that lower bound up to ``U`` are searched
for ``p``'s head: none found, ``p`` was not completed (sound). Found, either ``p`` was completed
out of order or the head was used before for an earlier request; the two cannot be told apart
(drivers reuse heads at once), so the resume is refused with :class:`VhostUserResumeRefused`
and the device fails (``DEVICE_NEEDS_RESET``) instead of serving a request twice. A backend
with ``INFLIGHT_SHMFD`` knows what it had taken (the spec's "Inflight I/O tracking") and is not
asked: it resubmits by itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from vmmkit_devices.vhost_user.connection import VhostUserError

_USED_ELEM = struct.Struct("<II")


class VhostUserResumeRefused(VhostUserError):
    """A ring cannot be resumed without risking a request served twice (no in-flight record)."""


@dataclass(frozen=True)
class RingSnapshot:
    """A split ring as guest memory holds it: ``avail(i)`` the head in avail slot ``i``,
    ``used(i)`` the id in used slot ``i`` (slots, not positions)."""

    size: int
    avail_idx: int
    used_idx: int
    avail: Callable[[int], int]
    used: Callable[[int], int]


@dataclass(frozen=True)
class LossObservation:
    """Read when the backend was seen gone: the used index first, then the avail index."""

    used_idx: int
    avail_idx: int


def check_resume(ring: RingSnapshot, seen: LossObservation | None) -> None:
    """Raise :class:`VhostUserResumeRefused` unless resuming at ``ring.used_idx`` provably
    serves every outstanding request exactly once (module docstring)."""
    size, used_idx, avail_idx = ring.size, ring.used_idx, ring.avail_idx
    outstanding = (avail_idx - used_idx) & 0xFFFF
    if outstanding > size:
        raise VhostUserResumeRefused(f"avail index {avail_idx} is {outstanding} ahead of used index {used_idx} "
                                     f"(ring of {size})")
    safe_from = outstanding  # offsets j >= safe_from (p = U + j >= A0) became available after the loss
    since_loss = 0  # used elements the old backend added after the observation
    if seen is not None:
        since_loss = (used_idx - seen.used_idx) & 0xFFFF
        after = (avail_idx - seen.avail_idx) & 0xFFFF  # positions made available since
        if since_loss <= size and after <= outstanding:
            safe_from = outstanding - after
    for j in range(outstanding):
        position = (used_idx + j) & 0xFFFF
        head = ring.avail(position % size)
        back = size - 1 - j  # used elements to search: q >= p + 1 - size
        if seen is not None and j >= safe_from:
            back = min(back, since_loss)
        for k in range(1, back + 1):
            q = (used_idx - k) & 0xFFFF
            if ring.used(q % size) == head:
                raise VhostUserResumeRefused(
                    f"the request at avail position {position} (head {head}) may have been completed out of "
                    f"order before the backend was lost (head {head} is in the used ring at {q}); without "
                    f"the backend's INFLIGHT_SHMFD record, resuming could serve it twice")


def snapshot(read_u16: Callable[[int], int], read_u32: Callable[[int], int], *, size: int, avail_ring: int,
             used_ring: int) -> RingSnapshot:
    """The ring at guest addresses ``avail_ring`` / ``used_ring`` (read through the callables)."""
    return RingSnapshot(
        size=size, avail_idx=read_u16(avail_ring + 2), used_idx=read_u16(used_ring + 2),
        avail=lambda slot: read_u16(avail_ring + 4 + 2 * slot),
        used=lambda slot: read_u32(used_ring + 4 + _USED_ELEM.size * slot),
    )
