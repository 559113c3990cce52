"""The virtio-net device (virtio 1.2, section 5.1) behind the vhost-user backend, on a tap:
``vmmkit-vhost-user net``.

Queues come in pairs (receive ``2i``, transmit ``2i + 1``), each pair on its own queue of the
tap (``IFF_MULTI_QUEUE`` when there is more than one pair, and ``VIRTIO_NET_F_MQ`` is offered; the
frontend serves the control queue, as QEMU's ``vhost-user`` netdev and Cloud Hypervisor do).
The configuration space (MAC, status, ``max_virtqueue_pairs``) is the frontend's too: the
backend does not offer ``CONFIG``.

Offered device features: ``MRG_RXBUF``, ``MQ`` (more than one pair), and the offloads the tap
takes (probed when it is opened) by vmmkit's own virtio-net's rule
(:func:`vmmkit_devices.virtio.net.offered_offloads`: checksum offload, and TSO/UFO only with it);
the backend adds ``VERSION_1``, ``INDIRECT_DESC`` and ``EVENT_IDX``. At SET_FEATURES the tap gets
``TUNSETOFFLOAD`` with the ``GUEST_*`` offloads acknowledged, so the kernel hands partial
checksums and super-frames only to a driver that takes them, and a header of the negotiated
size (12 bytes with ``VERSION_1`` or ``MRG_RXBUF``, else the legacy 10).

TX (the backend's ``handle`` for odd queues): each chain is one frame, written to the tap with
one ``writev``. Without ``CSUM`` the driver's header is replaced by zeros; with it the header
passes only if it asks for what was negotiated (:func:`vmmkit_devices.virtio.net.tx_header_ok`),
else the frame is dropped (``tx_errors``). A chain shorter than the header cannot be a frame:
the ring stops (the frontend hears of it on the ring's error eventfd). A chain longer than the
largest frame is dropped unread.

RX (a :class:`~vmmkit_vhost_user.backend.RingDriver`: the backend hands even rings to
:meth:`VirtioNet.ring_kicked`): the tap is watched in the backend's loop only while the ring has
buffers. A frame is read into the device's buffer, then put into as many chains as it needs (one
without ``MRG_RXBUF``; ``num_buffers`` says how many), published together and signalled once per
burst. When the ring lacks buffers the chains popped for the frame are given back
(``undo_pop``), the frame waits, the tap is no longer watched (frames queue in the kernel, which
drops what overflows) and notifications are enabled (``avail_event`` with ``EVENT_IDX``) until
the driver's next kick. A frame bigger than one chain (no ``MRG_RXBUF``) or than every buffer of
the ring together is dropped (``rx_dropped``). A receive chain without room for the header stops
the ring. A ring that stops (GET_VRING_BASE, SET_VRING_ENABLE 0) leaves nothing popped behind.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections import Counter
from typing import Final

from vmmkit_devices.virtio.net import (
    MAX_FRAME,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MRG_RXBUF,
    offered_offloads,
    tap_offload_flags,
    tx_header_ok,
)
from vmmkit_devices.virtio.tap import (
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    TUN_PATH,
    TUNSETIFF,
    TUNSETVNETHDRSZ,
    Tap,
    _check_name,
)

from vmmkit.errors import DeviceError
from vmmkit.virtio.chain import DescriptorChain, ErrorKind, VirtqueueError
from vmmkit_vhost_user.backend import VIRTIO_F_VERSION_1, Backend, DrivenRing

log = logging.getLogger("vmmkit_vhost_user")

VIRTIO_NET_F_MQ: Final = 1 << 22
IFF_MULTI_QUEUE: Final = 0x0100
#: The most queue pairs (virtio-net allows 0x8000; a tap at most 256 queues).
MAX_QUEUE_PAIRS: Final = 256
#: Frames moved per wake-up before the loop serves others.
BURST: Final = 64
#: virtio_net_hdr's size with VERSION_1 or MRG_RXBUF (num_buffers), and the legacy one without.
HEADER: Final = 12
LEGACY_HEADER: Final = 10


#: Feature bits by name, for the log (virtio 1.2, 5.1.3 and 6).
FEATURE_NAMES: Final = {0: "CSUM", 1: "GUEST_CSUM", 7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN",
                        10: "GUEST_UFO", 11: "HOST_TSO4", 12: "HOST_TSO6", 13: "HOST_ECN", 14: "HOST_UFO",
                        15: "MRG_RXBUF", 22: "MQ", 28: "INDIRECT_DESC", 29: "EVENT_IDX", 32: "VERSION_1"}


def open_taps(name: str | None, pairs: int) -> list[Tap]:
    """One tap queue per pair: ``Tap.open`` for one, ``IFF_MULTI_QUEUE`` queues of the same
    interface for more (the interface must then be a multi-queue one, or new).

    :raises DeviceError: the tap cannot be opened.
    """
    if pairs == 1:
        return [Tap.open(name)]
    if name is not None:
        _check_name(name)
    taps: list[Tap] = []
    try:
        for _ in range(pairs):
            try:
                fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                raise DeviceError(f"cannot open {TUN_PATH}: {exc.strerror or exc}") from None
            try:
                request = struct.pack("16sH22x", (taps[0].name if taps else name or "vmtap%d").encode(),
                                      IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE)
                answer = fcntl.ioctl(fd, TUNSETIFF, request)
            except OSError as exc:
                os.close(fd)
                what = f"tap {name}" if name else "a new tap"
                hint = " (is it a multi-queue tap? `ip tuntap add ... multi_queue`)" if exc.errno == errno.EINVAL \
                    else ""
                raise DeviceError(f"cannot open queue {len(taps)} of {what}: {exc.strerror or exc}{hint}") from None
            tap = Tap(fd, answer[:16].rstrip(b"\0").decode())
            taps.append(tap)
            tap._configure_queue()  # the header size, no offloads yet, the offloads it takes
        return taps
    except BaseException:
        for tap in taps:
            tap.close()
        raise


class _Pair:
    """One queue pair's tap queue and receive state."""

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        self.rx: DrivenRing | None = None
        self.watching = False
        self.pending = 0  # the length of a frame in buffer waiting for receive chains (header included)
        self.buffer = bytearray(HEADER + MAX_FRAME)


class VirtioNet:
    """A virtio-net device on ``taps`` (one per queue pair; the device owns and closes them)."""

    name = "virtio-net"
    inflight = False  # frames are not requests: nothing to resubmit after a restart

    def __init__(self, taps: list[Tap]) -> None:
        if not taps:
            raise ValueError("a net device needs a tap")
        self.pairs = [_Pair(tap) for tap in taps]
        self.num_queues = 2 * len(taps)
        self.acked = 0
        self.header = HEADER
        self.counts: Counter[str] = Counter()
        self.backend: Backend | None = None  # set by attach(): its loop watches the taps
        offloads = taps[0].offloads
        for tap in taps[1:]:
            offloads &= tap.offloads
        self._features = (VIRTIO_NET_F_MRG_RXBUF | offered_offloads(offloads)
                          | (VIRTIO_NET_F_MQ if len(taps) > 1 else 0))

    def attach(self, backend: Backend) -> None:
        self.backend = backend

    # -- Device ---------------------------------------------------------------------------------

    def device_features(self) -> int:
        return self._features

    def set_features(self, features: int) -> None:
        self.acked = features
        log.info("net: features %s", " ".join(name for bit, name in FEATURE_NAMES.items() if features & 1 << bit))
        legacy = not features & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF)
        self.header = LEGACY_HEADER if legacy else HEADER
        for pair in self.pairs:
            try:
                pair.tap.set_offload(tap_offload_flags(features))
                fcntl.ioctl(pair.tap.fd, TUNSETVNETHDRSZ, struct.pack("i", self.header))
            except (DeviceError, OSError) as exc:  # it took them when probed: only a kernel change refuses now
                log.warning("net: tap %s: %s", pair.tap.name, exc)

    def config(self) -> bytes | None:
        return None  # the frontend's (MAC, status, max_virtqueue_pairs)

    def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        """Transmit one frame (odd queues; the backend never hands over receive chains)."""
        if not queue_index % 2:
            raise VirtqueueError(ErrorKind.DEVICE, f"queue {queue_index} is a receive queue")
        total = chain.readable_bytes
        if total < self.header:
            raise VirtqueueError(ErrorKind.DEVICE, f"queue {queue_index}: transmit buffer {chain.head} has "
                                 f"{total} bytes, less than the {self.header}-byte header")
        if total > self.header + MAX_FRAME:
            self.counts["tx_dropped"] += 1
            return 0
        data = memoryview(chain.read(total))
        header = bytearray(data[:self.header])
        if not self.acked & VIRTIO_NET_F_CSUM:
            header[:] = bytes(self.header)
        elif not tx_header_ok(header, self.acked):
            self.counts["tx_errors"] += 1
            return 0
        if self.header == HEADER:
            header[10:12] = b"\0\0"  # num_buffers: receive only
        tap = self.pairs[queue_index // 2].tap
        try:
            os.writev(tap.fd, [header, data[self.header:]])
        except (BlockingIOError, InterruptedError):
            self.counts["tx_dropped"] += 1
        except OSError as exc:
            self.counts["tx_dropped" if exc.errno == errno.ENOBUFS else "tx_errors"] += 1
        else:
            self.counts["tx_frames"] += 1
            self.counts["tx_bytes"] += total - self.header
        return 0

    def reset(self) -> None:
        for pair in self.pairs:
            self._unwatch(pair)
            pair.rx, pair.pending = None, 0
            try:
                pair.tap.set_offload(0)
            except DeviceError:
                pass
        if self.counts:
            log.info("net: %s", " ".join(f"{name}={count}" for name, count in sorted(self.counts.items())))
            self.counts.clear()

    def close(self) -> None:
        for pair in self.pairs:
            pair.tap.close()

    # -- RingDriver: the receive queues ---------------------------------------------------------

    def drives(self, queue_index: int) -> bool:
        return queue_index % 2 == 0

    def ring_kicked(self, ring: DrivenRing) -> None:
        pair = self.pairs[ring.index // 2]
        pair.rx = ring
        self._receive(pair)

    def ring_stopped(self, queue_index: int) -> None:
        pair = self.pairs[queue_index // 2]
        self._unwatch(pair)
        pair.rx = None  # nothing stays popped between wake-ups: nothing to give back

    def _watch(self, pair: _Pair) -> None:
        if not pair.watching and self.backend is not None:
            self.backend.watch(pair.tap.fd, lambda: self._tap_readable(pair))
            pair.watching = True

    def _unwatch(self, pair: _Pair) -> None:
        if pair.watching and self.backend is not None:
            self.backend.unwatch(pair.tap.fd)
        pair.watching = False

    def _tap_readable(self, pair: _Pair) -> None:
        if pair.rx is None or not pair.rx.usable:
            self._unwatch(pair)  # level-triggered: never leave it armed unserved
            return
        self._receive(pair)

    def _receive(self, pair: _Pair) -> None:
        ring = pair.rx
        if ring is None:
            return
        used: list[tuple[int, int]] = []
        try:
            for _ in range(BURST):
                if not ring.usable:
                    self._unwatch(pair)
                    return
                if not pair.pending:
                    if not ring.queue.pending() and not ring.queue.enable_notification():
                        self._unwatch(pair)  # no buffers: wait for the driver's kick
                        break
                    size = self._read(pair)
                    if size is None:
                        self._watch(pair)
                        break
                    pair.pending = size
                outcome = self._deliver(pair, ring, pair.pending, used)
                if outcome is None:  # too few buffers for this frame: wait for more
                    if self._wait_for_more(ring):
                        continue
                    self._unwatch(pair)
                    break
                pair.pending = 0
            else:
                self._watch(pair)  # more later: the loop comes back while the tap has frames
        except VirtqueueError as exc:
            self._unwatch(pair)
            pair.pending = 0
            ring.complete(used)
            ring.broken(exc)
            return
        ring.complete(used)

    @staticmethod
    def _wait_for_more(ring: DrivenRing) -> bool:
        """Ask the driver to kick when it adds a buffer to those available now (with
        ``EVENT_IDX``: ``avail_event`` at the available index, past the chains given back);
        whether one was added meanwhile."""
        queue = ring.queue
        seen = queue.pending()
        queue.enable_notification()
        if queue.event_idx:
            queue.set_avail_event(queue.last_avail_idx + seen)
        return queue.pending() > seen

    def _read(self, pair: _Pair) -> int | None:
        """A frame from the tap into the pair's buffer (its length, header included), or
        ``None`` when the tap has none."""
        while True:
            try:
                size = os.readv(pair.tap.fd, [pair.buffer])
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                self.counts["rx_errors"] += 1
                log.warning("net: reading tap %s: %s", pair.tap.name, exc.strerror or exc)
                return None
            if size < self.header + 14:
                self.counts["rx_dropped"] += 1
                continue
            return size

    def _deliver(self, pair: _Pair, ring: DrivenRing, size: int, used: list[tuple[int, int]]) -> bool | None:
        """Put the frame (``size`` bytes of the buffer) into chains: delivered (``True``), dropped
        (``False``), or ``None`` when the ring lacks buffers (the chains popped go back)."""
        queue = ring.queue
        mergeable = bool(self.acked & VIRTIO_NET_F_MRG_RXBUF)
        chains: list[DescriptorChain] = []
        room = 0
        while room < size:
            if chains and not mergeable or len(chains) >= queue.size:
                self._give_back(ring, len(chains))  # no chain(s) of this ring can hold it
                self.counts["rx_dropped"] += 1
                return False
            chain = queue.pop()
            if chain is None:
                self._give_back(ring, len(chains))
                return None
            if chain.writable_bytes < self.header:
                self._give_back(ring, len(chains) + 1)
                raise VirtqueueError(ErrorKind.DEVICE, f"queue {ring.index}: receive buffer {chain.head} has "
                                     f"{chain.writable_bytes} writable bytes, less than the {self.header}-byte header")
            chains.append(chain)
            room += chain.writable_bytes
        frame = memoryview(pair.buffer)[:size]
        if not self.acked & VIRTIO_NET_F_GUEST_CSUM:
            frame[:LEGACY_HEADER] = bytes(LEGACY_HEADER)
        if self.header == HEADER:
            struct.pack_into("<H", pair.buffer, 10, len(chains))
        at = 0
        for chain in chains:
            piece = min(chain.writable_bytes, size - at)
            written = chain.write(frame[at:at + piece])
            used.append((chain.head, written))
            at += piece
        self.counts["rx_frames"] += 1
        self.counts["rx_bytes"] += size - self.header
        return True

    @staticmethod
    def _give_back(ring: DrivenRing, count: int) -> None:
        for _ in range(count):
            ring.queue.undo_pop()
