"""virtio-net (virtio 1.2, section 5.1) on a TAP interface: device type ``virtio-net``, one
device per ``VmConfig.net`` entry (vhost-user ones excepted).

The tap is named (``tap=``: opened through ``/dev/net/tun``, created if absent, else a new
``vmtap<N>``; its host side then gets ``host_mac``, ``mtu``, the ``ip``/``mask`` address and
IFF_UP, each best effort with a warning) or given as an open fd (``fd=[N]``: used as is). One
queue pair (``num_queues=2``, the default); more pairs need the control queue and are refused.

Offered features: ``MAC`` (``mac=``, else a locally administered address derived from the device
id and the tap's name, so it is stable for the device), ``STATUS`` (link up), ``MTU`` when
``mtu=`` is given, ``MRG_RXBUF``, ``INDIRECT_DESC``, ``EVENT_IDX``, and the offloads the tap
takes (probed when it is opened, :attr:`.tap.Tap.offloads`) within ``offload_csum`` /
``offload_tso`` / ``offload_ufo`` (Cloud Hypervisor's options; checksum offload off takes the
others with it): ``CSUM`` + ``GUEST_CSUM``, ``HOST_TSO4/6`` + ``HOST_ECN`` and ``GUEST_TSO4/6`` +
``GUEST_ECN``, ``HOST_UFO`` + ``GUEST_UFO``. At activation the tap gets ``TUNSETOFFLOAD`` with the
``GUEST_*`` offloads the driver negotiated, so the kernel hands over partial checksums and
super-frames only to a driver that takes them. Configuration space: ``mac``, ``status``,
``max_virtqueue_pairs`` (1), ``mtu``.

Every frame carries the 12-byte ``virtio_net_hdr`` of virtio 1.x, which the tap also uses
(``TUNSETVNETHDRSZ``). RX: the tap's header passes to the driver when it negotiated
``GUEST_CSUM`` (its flags and GSO fields are the kernel's, within the offloads set on the tap),
else it is zeroed; ``num_buffers`` is set by the device. TX: without ``CSUM`` the driver's header
is replaced by zeros (a guest cannot ask the host kernel for checksum or GSO work it did not
negotiate); with it the header passes through to the tap if its flags are only ``NEEDS_CSUM`` and
its GSO type one the driver negotiated (``HOST_TSO4/6``, ``HOST_UFO``, the ECN bit with
``HOST_ECN``), else the frame is dropped and counted in ``tx_errors``. The kernel checks the
rest (checksum offsets, GSO sizes) and refuses what is wrong (``tx_errors`` again).

RX (queue 0): the tap is read while the guest has receive buffers. Without ``MRG_RXBUF`` a frame
goes into one chain (header + frame); a frame too big for the chain at hand is dropped and the
chain kept for the next one. With it a frame fills as many chains as it needs, in order, each
used for the bytes written into it, and ``num_buffers`` says how many; when the driver has not
posted enough, the frame waits for its next receive kick (and the tap is not read meanwhile); a
frame that every buffer of the ring together could not hold is dropped. When the driver posted
no buffers, the device stops watching the tap (frames wait in the tap's queue, where the kernel
drops what overflows) until the driver kicks the receive queue. TX (queue 1): each chain is one
frame, written to the tap with one ``writev``; frames the tap refuses are counted and dropped
(TX has no error status).

Malformed chains: an RX chain without room for the header, or a TX chain shorter than the header,
cannot be answered: the device fails (``DEVICE_NEEDS_RESET``). A TX chain longer than the largest
frame is dropped without reading it.

Rate limits (``bw_*``/``ops_*`` on ``--net``): as Cloud Hypervisor, the one ``rate_limiter_config``
makes two independent limiters (:class:`~vmmkit.ratelimit.RateLimiter`), one for RX and one for
TX; an operation is a frame, bytes are frame bytes. TX asks before sending a chain, which goes
back to the ring when refused; RX asks for one operation before reading a frame from the tap and
charges its bytes after delivering it (the size is known only then), so a large frame may leave
a debt that later frames wait for. A throttled queue stops (RX stops watching the tap) until the
limiter's timer fires and wakes it; nothing is dropped for it. ``rate_limited`` counts the
refusals.

Where the native module is built, both queues and the tap are served in C on a device thread
(``<id>_net``) without the GIL: ``native/net_queue.c`` through :class:`.net_io.NativeNetQueue`.
It waits in epoll on the queues' eventfds and the tap, moves the frames, writes the used rings
(event-idx suppression included) and signals the driver through the transport's irqfd
(``queue_irqfd``: virtio-pci with MSI-X), else it returns to Python for that interrupt. It is
stopped, and the ring positions handed back, before pause (snapshots), reset, failure and close.
The Python path (``process_queue``) is the reference it is tested against, and serves when the
module is not built, ``VMMKIT_NET_NATIVE=0``, or a rate limit is set.

Counters: ``rx_bytes``, ``rx_frames``, ``tx_bytes``, ``tx_frames`` (frame bytes, headers not
counted), ``rx_dropped``, ``tx_dropped``, ``tx_errors``, ``rx_errors``.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.ratelimit import RateLimiter, TokenKind
from vmmkit.sandbox import DEVICE, enter_thread
from vmmkit.virtio.chain import ErrorKind, VirtqueueError
from vmmkit.virtio.device import ActivationContext, VirtioInterruptType
from vmmkit.virtio.queue import Virtqueue
from vmmkit_devices.device_types import VirtioNetType as VirtioNetType  # declared there, re-exported
from vmmkit_devices.virtio import net_io
from vmmkit_devices.virtio.native_workers import NativeQueueDevice, NativeWorker
from vmmkit_devices.virtio.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    VNET_HDR_SIZE,
    Tap,
)

if TYPE_CHECKING:
    from vmmkit.config import NetConfig
    from vmmkit.virtio.chain import DescriptorChain

log = get_logger()

VIRTIO_ID_NET: Final = 1

VIRTIO_NET_F_CSUM: Final = 1 << 0
VIRTIO_NET_F_GUEST_CSUM: Final = 1 << 1
VIRTIO_NET_F_MTU: Final = 1 << 3
VIRTIO_NET_F_MAC: Final = 1 << 5
VIRTIO_NET_F_GUEST_TSO4: Final = 1 << 7
VIRTIO_NET_F_GUEST_TSO6: Final = 1 << 8
VIRTIO_NET_F_GUEST_ECN: Final = 1 << 9
VIRTIO_NET_F_GUEST_UFO: Final = 1 << 10
VIRTIO_NET_F_HOST_TSO4: Final = 1 << 11
VIRTIO_NET_F_HOST_TSO6: Final = 1 << 12
VIRTIO_NET_F_HOST_ECN: Final = 1 << 13
VIRTIO_NET_F_HOST_UFO: Final = 1 << 14
VIRTIO_NET_F_MRG_RXBUF: Final = 1 << 15
VIRTIO_NET_F_STATUS: Final = 1 << 16

#: virtio_net_hdr (virtio 1.2, 5.1.6): flags, gso_type values.
VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_GSO_TCPV4: Final = 1
VIRTIO_NET_HDR_GSO_UDP: Final = 3
VIRTIO_NET_HDR_GSO_TCPV6: Final = 4
VIRTIO_NET_HDR_GSO_ECN: Final = 0x80

VIRTIO_NET_S_LINK_UP: Final = 1

RX_QUEUE: Final = 0
TX_QUEUE: Final = 1
QUEUE_SIZE: Final = 256

#: The largest Ethernet frame moved either way (64 KiB IP packet + Ethernet and VLAN headers).
MAX_FRAME: Final = 65535 + 18
#: Frames moved per event-loop callback before other work gets a turn.
BURST: Final = 256
#: struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu.
CONFIG: Final = struct.Struct("<6sHHH")
_ZERO_HEADER: Final = bytes(VNET_HDR_SIZE)
_NUM_BUFFERS: Final = struct.Struct("<H")


def offered_offloads(tap_offloads: int, *, csum: bool = True, tso: bool = True, ufo: bool = True) -> int:
    """The offload feature bits to offer for a tap that takes ``tap_offloads`` (``TUN_F_*``),
    within the ``offload_*`` options (Cloud Hypervisor's rule: no checksum offload, no other)."""
    if not csum or not tap_offloads & TUN_F_CSUM:
        return 0
    features = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
    if tso and tap_offloads & TUN_F_TSO4 and tap_offloads & TUN_F_TSO6:
        features |= VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6
        if tap_offloads & TUN_F_TSO_ECN:
            features |= VIRTIO_NET_F_HOST_ECN | VIRTIO_NET_F_GUEST_ECN
    if ufo and tap_offloads & TUN_F_UFO:
        features |= VIRTIO_NET_F_HOST_UFO | VIRTIO_NET_F_GUEST_UFO
    return features


def tap_offload_flags(features: int) -> int:
    """``TUNSETOFFLOAD``'s flags for the negotiated ``features``: what the driver can receive
    (the kernel takes TSO/UFO only together with checksum offload)."""
    if not features & VIRTIO_NET_F_GUEST_CSUM:
        return 0
    flags = TUN_F_CSUM
    for feature, flag in ((VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4), (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
                          (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO)):
        if features & feature:
            flags |= flag
    if features & VIRTIO_NET_F_GUEST_ECN and flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags |= TUN_F_TSO_ECN
    return flags


def tx_header_ok(header: bytes | bytearray, features: int) -> bool:
    """Whether a transmit header asks only for what the driver negotiated (with ``CSUM``)."""
    flags, gso = header[0], header[1]
    if flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return False
    if gso & VIRTIO_NET_HDR_GSO_ECN and not features & VIRTIO_NET_F_HOST_ECN:
        return False
    kind = gso & ~VIRTIO_NET_HDR_GSO_ECN
    if kind == 0:
        return not gso & VIRTIO_NET_HDR_GSO_ECN
    needed = {VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6,
              VIRTIO_NET_HDR_GSO_UDP: VIRTIO_NET_F_HOST_UFO}.get(kind)
    return needed is not None and bool(features & needed)


class _Unanswerable(Exception):
    """A chain the device cannot use and cannot answer with an error: the device fails."""


def generated_mac(seed: str) -> bytes:
    """A locally administered unicast MAC derived from ``seed`` (stable across runs)."""
    import hashlib  # loads OpenSSL: only for a NIC without a configured MAC

    digest = hashlib.sha256(seed.encode()).digest()
    return bytes(((digest[0] & 0xFC) | 0x02,)) + digest[1:6]


def parse_mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class NetDevice(NativeQueueDevice):
    """A virtio-net device on one :class:`~.tap.Tap` queue (the device owns and closes it).

    :param device_id: the device's id.
    :param tap: the open tap.
    :param mac: the guest's MAC address (6 bytes).
    :param queue_size: each queue's maximum size.
    :param mtu: offered with ``VIRTIO_NET_F_MTU`` when given.
    :param offload_csum: offer the checksum offloads the tap takes (and allow the others).
    :param offload_tso: offer the TSO offloads the tap takes.
    :param offload_ufo: offer the UFO offloads the tap takes.
    :param native: serve the queues in C (``None``: when the module is built).
    """

    device_type = VIRTIO_ID_NET
    name = "virtio-net"

    def __init__(self, device_id: str, tap: Tap, mac: bytes, *, queue_size: int = QUEUE_SIZE,
                 mtu: int | None = None, offload_csum: bool = True, offload_tso: bool = True,
                 offload_ufo: bool = True, native: bool | None = None, rx_limiter: RateLimiter | None = None,
                 tx_limiter: RateLimiter | None = None) -> None:
        if len(mac) != 6:
            raise DeviceError(f"{device_id}: a MAC address has 6 bytes")
        limited = rx_limiter is not None or tx_limiter is not None
        if native and limited:
            raise DeviceError(f"{device_id}: rate limits are served on the Python path, not the native queues")
        if native and not net_io.native_net_available():
            raise DeviceError(f"{device_id}: the native net queues are unavailable: "
                              f"{net_io.NATIVE_NET_UNAVAILABLE_REASON}")
        features = (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF | (VIRTIO_NET_F_MTU if mtu else 0)
                    | offered_offloads(tap.offloads, csum=offload_csum, tso=offload_tso, ufo=offload_ufo))
        super().__init__(device_id, [queue_size, queue_size], features)
        self.tap = tap
        self.mac = mac
        self.mtu = mtu
        #: Whether the queues are served in C (``native/net_queue.c``); a rate-limited device is not.
        self.native = (net_io.native_net_available() and not limited) if native is None else native
        self._buffer = bytearray(VNET_HDR_SIZE + MAX_FRAME)
        #: Limiters per direction, owned by the device (``rate_limiter_config``).
        self.limiters = {RX_QUEUE: rx_limiter, TX_QUEUE: tx_limiter}
        #: What each limiter calls when it unblocks: look at its queue again.
        self._refilled = {index: functools.partial(self.wake, index) for index in (RX_QUEUE, TX_QUEUE)}
        self._rx_held: list[DescriptorChain] = []  # popped receive chains not used yet, in order
        self._rx_pending = 0  # the length of a frame in _buffer waiting for receive chains
        self._native: net_io.NativeNetQueue | None = None
        self._native_thread: threading.Thread | None = None
        for name in ("rx_bytes", "rx_frames", "tx_bytes", "tx_frames"):
            self.count(name, 0)

    @classmethod
    def from_config(cls, device_id: str, config: NetConfig, *, native: bool | None = None) -> NetDevice:
        if config.vhost_user:
            raise DeviceError(f"{device_id}: a vhost-user net device is not served by virtio-net")
        if config.num_queues != 2:
            raise DeviceError(f"{device_id}: multi-queue virtio-net is not supported yet "
                              f"(num_queues={config.num_queues}; use 2)")
        if config.fds:
            tap = Tap.adopt(config.fds[0])
        else:
            tap = Tap.open(config.tap)
            _configure_host_side(device_id, tap, config)
        rx = tx = None
        try:
            mac = parse_mac(config.mac) if config.mac else generated_mac(f"vmmkit:{device_id}:{tap.name}")
            limits = config.rate_limiter_config
            if limits is not None:
                rx = RateLimiter.from_config(limits, name=f"{device_id} rx")
                tx = RateLimiter.from_config(limits, name=f"{device_id} tx")
            return cls(device_id, tap, mac, queue_size=config.queue_size, mtu=config.mtu,
                       offload_csum=config.offload_csum, offload_tso=config.offload_tso,
                       offload_ufo=config.offload_ufo, native=native, rx_limiter=rx, tx_limiter=tx)
        except BaseException:
            for limiter in (rx, tx):
                if limiter is not None:
                    limiter.close()
            tap.close()
            raise

    def config_space(self) -> bytes:
        return CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1, self.mtu or 0)

    def describe(self) -> Mapping[str, Any]:
        return {"tap": self.tap.name, "mac": format_mac(self.mac), "mtu": self.mtu, "native": self.native}

    # -- lifecycle --------------------------------------------------------------------------

    def serves_queue_events(self) -> bool:
        return self._native is not None

    def activated(self, ctx: ActivationContext) -> None:
        self._rx_held = []
        self._rx_pending = 0
        for index, limiter in self.limiters.items():
            if limiter is not None:
                limiter.subscribe(ctx.event_loop, self._refilled[index])
        try:
            self.tap.set_offload(tap_offload_flags(self.acked_features))
        except DeviceError as exc:  # it took them when probed: only a kernel change could refuse now
            log.warning("virtio_net.offload_refused", device=self.id, error=str(exc))
        if self.native:
            self._start_native(ctx)

    def deactivated(self) -> None:
        self._rx_held = []  # popped but unused: the driver reclaims them at reset
        self._rx_pending = 0
        self.remove_reader(self.tap.fd)
        for index, limiter in self.limiters.items():
            if limiter is not None:
                limiter.unsubscribe(self._refilled[index])
        self._join_native()
        native, self._native = self._native, None
        if native is not None:
            self._retire(native)

    def paused(self) -> None:
        self.remove_reader(self.tap.fd)
        self._join_native()

    def resumed(self) -> None:
        native, ctx = self._native, self.context
        if native is not None and ctx is not None:
            self._drain_wake()
            native.allow()
            self._spawn_native()

    def release(self) -> None:
        self._stop_native()
        self._join_native()
        self._close_wake()
        for limiter in self.limiters.values():
            if limiter is not None:
                limiter.close()
        self.tap.close()

    def _limited(self, index: int, nbytes: int | None) -> bool:
        """The one place a direction's limiter is asked: ``True`` when the queue must stop now.
        ``nbytes`` None: one operation (RX, before the frame's size is known)."""
        limiter = self.limiters[index]
        if limiter is None:
            return False
        allowed = limiter.consume(1, TokenKind.OPS) if nbytes is None else limiter.consume_request(nbytes)
        if not allowed:
            self.count("rate_limited")
        return not allowed

    def _unlimit(self, index: int) -> None:
        limiter = self.limiters[index]
        if limiter is not None:
            limiter.replenish(1, TokenKind.OPS)

    # -- the C queues: stopped before anything waits for the queue locks --------------------

    def native_workers(self) -> list[NativeWorker]:
        return [] if self._native is None else [self._native]

    def _start_native(self, ctx: ActivationContext) -> None:
        wake_fd = self._open_wake()
        sizes = self.queue_max_sizes
        self._native = net_io.NativeNetQueue(
            ctx.memory, tap_fd=self.tap.fd, wake_fd=wake_fd, max_queue_size=max(sizes),
            max_segments=max(q.max_segments for q in ctx.queues))
        self._spawn_native()

    def _spawn_native(self) -> None:
        thread = threading.Thread(target=self._native_main, name=f"{self.id}_net", daemon=True)
        self._native_thread = thread
        thread.start()

    def _native_main(self) -> None:
        enter_thread(DEVICE, f"{self.id}_net")
        ctx = self.context
        # Under the lock of a ready queue (the receive queue's, normally): _serve_native serves both.
        self.serve(RX_QUEUE if ctx is None or ctx.queues[RX_QUEUE].active else TX_QUEUE)

    def _join_native(self) -> None:
        thread, self._native_thread = self._native_thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)
            if thread.is_alive():
                log.warning("virtio.worker_stuck", device=self.id, thread=thread.name)

    def _native_flags(self) -> int:
        features = self.acked_features
        ctx = self.context
        queue = ctx.queues[RX_QUEUE] if ctx is not None else None
        return net_io.queue_flags(
            event_idx=bool(queue and queue.event_idx), indirect=bool(queue and queue.indirect),
            mrg_rxbuf=bool(features & VIRTIO_NET_F_MRG_RXBUF), guest_csum=bool(features & VIRTIO_NET_F_GUEST_CSUM),
            csum=bool(features & VIRTIO_NET_F_CSUM), host_tso4=bool(features & VIRTIO_NET_F_HOST_TSO4),
            host_tso6=bool(features & VIRTIO_NET_F_HOST_TSO6), host_ecn=bool(features & VIRTIO_NET_F_HOST_ECN),
            host_ufo=bool(features & VIRTIO_NET_F_HOST_UFO))

    def _serve_native(self, native: net_io.NativeNetQueue, ctx: ActivationContext) -> None:
        """Run both queues in C until stopped (pause, reset, close) or broken."""
        queues = (ctx.queues[RX_QUEUE], ctx.queues[TX_QUEUE])
        irqfd = getattr(ctx.interrupt, "queue_irqfd", None)
        irqfds = tuple(-1 if not callable(irqfd) or (fd := irqfd(i)) is None else fd for i in (RX_QUEUE, TX_QUEUE))
        native.load(queues, (ctx.queue_events[RX_QUEUE], ctx.queue_events[TX_QUEUE]),
                    (irqfds[0], irqfds[1]), self._native_flags())
        try:
            while self.running():
                result = native.run()
                if result is net_io.NetRun.SIGNAL:
                    for index in native.signalled:
                        ctx.interrupt.trigger(VirtioInterruptType.QUEUE, index)
                elif result is net_io.NetRun.BROKEN:
                    kind, index, message = native.error
                    if kind in (ErrorKind.ADDRESS, ErrorKind.RING) and native.refresh_memory():
                        continue  # guest memory changed (hotplug): walk the same chain again with the new table
                    self._native_broken(queues[index], index, kind, message)
                    return
                else:
                    return
        finally:
            native.store(queues)

    def _native_broken(self, queue: Virtqueue, index: int, kind: int, message: str) -> None:
        """What the Python path does for the same fault (see BlockDevice._native_broken)."""
        error_kind = ErrorKind(kind)
        if error_kind is ErrorKind.DEVICE:
            self.fail(queue, message)
            return
        if error_kind is ErrorKind.AVAIL_INDEX:
            message = f"queue {index}: {message}"
        queue.mark_broken(message, error_kind)
        self.fail(None, str(VirtqueueError(error_kind, message)))

    # -- queues (the Python path, the reference) -------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        native, ctx = self._native, self.context
        if native is not None and ctx is not None:
            self._serve_native(native, ctx)  # both queues, from the device thread only
            return
        try:
            if index == RX_QUEUE:
                self._receive(queue)
            elif index == TX_QUEUE:
                self._transmit(queue)
        except _Unanswerable as exc:
            self.fail(queue, str(exc))

    def _tap_readable(self) -> None:
        ctx = self.context
        if ctx is None or not self.running() or not ctx.queues[RX_QUEUE].active:
            self.remove_reader(self.tap.fd)  # level-triggered: never leave it armed unserved
            return
        self.serve(RX_QUEUE)

    def _hold_rx(self, queue: Virtqueue) -> bool:
        """Pop one receive chain and hold it; whether there was one."""
        chain = queue.pop()
        if chain is None:
            return False
        if chain.writable_bytes < VNET_HDR_SIZE:
            raise _Unanswerable(f"receive buffer {chain.head} has {chain.writable_bytes} writable "
                                f"bytes, less than the {VNET_HDR_SIZE}-byte header")
        self._rx_held.append(chain)
        return True

    def _receive(self, queue: Virtqueue) -> None:
        delivered = 0
        for _ in range(BURST):
            size = self._rx_pending
            if not size:
                if not self._rx_held and not self._hold_rx(queue):
                    self.remove_reader(self.tap.fd)  # re-armed by the driver's next RX kick
                    break
                if self._limited(RX_QUEUE, None):
                    self.remove_reader(self.tap.fd)  # re-armed when the limiter wakes the RX queue
                    break
                self.add_reader(self.tap.fd, self._tap_readable)
                try:
                    size = os.readv(self.tap.fd, [self._buffer])
                except (BlockingIOError, InterruptedError):
                    self._unlimit(RX_QUEUE)  # no frame: the operation asked for did not happen
                    break
                except OSError as exc:
                    self.count("rx_errors")
                    log.warning("virtio_net.tap_read_failed", device=self.id, tap=self.tap.name, error=exc.strerror)
                    self.remove_reader(self.tap.fd)
                    break
                if size < VNET_HDR_SIZE:
                    self.count("rx_dropped")
                    continue
            outcome = self._deliver(queue, size)
            if outcome is None:  # waits for more receive buffers
                self._rx_pending = size
                self.remove_reader(self.tap.fd)
                break
            self._rx_pending = 0
            if outcome:
                delivered += 1
                rx_limiter = self.limiters[RX_QUEUE]
                if rx_limiter is not None:
                    rx_limiter.force(size - VNET_HDR_SIZE, TokenKind.BYTES)  # charged once delivered
            else:
                self.count("rx_dropped")
        if delivered:
            self.signal(queue)

    def _deliver(self, queue: Virtqueue, size: int) -> bool | None:
        """Put the frame in ``_buffer[:size]`` into held chains: delivered, dropped (``False``),
        or ``None`` when it waits for more chains (``MRG_RXBUF``)."""
        held = self._rx_held
        if self.negotiated(VIRTIO_NET_F_MRG_RXBUF):
            needed = room = 0
            while True:
                while needed < len(held) and room < size:
                    room += held[needed].writable_bytes
                    needed += 1
                if room >= size:
                    break
                if len(held) >= queue.size:
                    return False  # every buffer of the ring would not hold it
                if not self._hold_rx(queue):
                    return None
        else:
            needed = 1
            if size > held[0].writable_bytes:
                return False  # the chain stays for the next frame
        frame = memoryview(self._buffer)[:size]
        if not self.negotiated(VIRTIO_NET_F_GUEST_CSUM):
            frame[:10] = bytes(10)
        _NUM_BUFFERS.pack_into(self._buffer, 10, needed)
        at = 0
        for chain in held[:needed]:
            piece = min(chain.writable_bytes, size - at)
            chain.write(frame[at : at + piece])
            queue.add_used(chain.head, piece)
            at += piece
        del held[:needed]
        self.count("rx_frames")
        self.count("rx_bytes", size - VNET_HDR_SIZE)
        return True

    def _transmit(self, queue: Virtqueue) -> None:
        sent = 0
        while self.running():
            if sent == BURST:
                self.wake(TX_QUEUE)  # more later: let the event loop breathe
                break
            chain = queue.pop()
            if chain is None:
                break
            total = chain.readable_bytes
            if total < VNET_HDR_SIZE:
                raise _Unanswerable(f"transmit buffer {chain.head} is shorter than the {VNET_HDR_SIZE}-byte header")
            if self._limited(TX_QUEUE, total - VNET_HDR_SIZE):
                queue.undo_pop()  # stays available; the limiter wakes the TX queue
                break
            if total > VNET_HDR_SIZE + MAX_FRAME:
                self.count("tx_dropped")
            else:
                data = memoryview(chain.read(total))
                header = bytearray(data[:VNET_HDR_SIZE])
                if not self.negotiated(VIRTIO_NET_F_CSUM):
                    header[:] = _ZERO_HEADER
                header[10:12] = b"\0\0"  # num_buffers: receive only
                if self.negotiated(VIRTIO_NET_F_CSUM) and not tx_header_ok(header, self.acked_features):
                    self.count("tx_errors")
                else:
                    self._send(header, data[VNET_HDR_SIZE:])
            queue.add_used(chain.head, 0)
            sent += 1
        if sent:
            self.signal(queue)

    def _send(self, header: bytes | bytearray, frame: memoryview) -> None:
        try:
            os.writev(self.tap.fd, [header, frame])
        except (BlockingIOError, InterruptedError):
            self.count("tx_dropped")
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.count("tx_dropped")
            else:
                self.count("tx_errors")  # EINVAL: not an Ethernet frame; EIO: the tap is down
                log.debug("virtio_net.tap_write_failed", device=self.id, error=exc.strerror)
        else:
            self.count("tx_frames")
            self.count("tx_bytes", len(frame))


def _configure_host_side(device_id: str, tap: Tap, config: NetConfig) -> None:
    steps: list[tuple[str, Any]] = []
    if config.host_mac:
        steps.append(("host_mac", lambda: tap.set_mac(parse_mac(config.host_mac or ""))))
    if config.mtu:
        steps.append(("mtu", lambda: tap.set_mtu(config.mtu or 0)))
    if config.ip and config.mask:
        steps.append(("address", lambda: tap.set_address(config.ip, config.mask)))
    steps.append(("up", tap.set_up))
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            log.warning("virtio_net.tap_setup_failed", device=device_id, tap=tap.name, step=what,
                        error=getattr(exc, "strerror", None) or str(exc))


def create(ctx: DeviceContext, request: DeviceRequest) -> NetDevice:
    """``VirtioNetType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    config = request.config
    if config is None or not hasattr(config, "tap"):
        raise DeviceError(f"{request.id}: virtio-net needs a NetConfig")
    return NetDevice.from_config(request.id, config)
