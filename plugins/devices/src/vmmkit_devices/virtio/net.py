"""virtio-net (virtio 1.2, section 5.1) on a TAP interface: device type ``virtio-net``, one
device per ``VmConfig.net`` entry (vhost-user ones excepted).

The tap is named (``tap=``: opened through ``/dev/net/tun``, created if absent, else a new
``vmtap<N>``; its host side then gets ``host_mac``, ``mtu``, the ``ip``/``mask`` address and
IFF_UP, each best effort with a warning) or given as an open fd (``fd=[N]``: used as is). One
queue pair (``num_queues=2``, the default); more pairs need the control queue and are refused.

Offered features: ``MAC`` (``mac=``, else a locally administered address derived from the device
id and the tap's name, so it is stable for the device), ``STATUS`` (link up), ``MTU`` when
``mtu=`` is given, ``INDIRECT_DESC``, ``EVENT_IDX``. No checksum or segmentation offloads: the
tap has none either (``TUNSETOFFLOAD`` 0), so frames cross complete and checksummed, and the
``offload_*`` options are not honoured yet. Configuration space: ``mac``, ``status``,
``max_virtqueue_pairs`` (1), ``mtu``.

Every frame carries the 12-byte ``virtio_net_hdr`` of virtio 1.x, which the tap also uses
(``TUNSETVNETHDRSZ``). Without offloads it says nothing: on RX the device zeroes it and sets
``num_buffers`` to 1 (the spec's rule without ``MRG_RXBUF``); on TX the driver's header is
replaced by zeros, so a hostile guest cannot ask the host kernel for GSO or checksum work.

RX (queue 0): the tap fd is watched on the event loop while the guest has receive buffers. A
frame goes into one chain (header + frame); when the driver posted no buffers, the device stops
watching the tap (frames wait in the tap's queue, where the kernel drops what overflows) until
the driver kicks the receive queue. A frame too big for the chain at hand is dropped and the chain
kept for the next one. TX (queue 1): each chain is one frame, written to the tap with one
``writev``; frames the tap refuses are counted and dropped (TX has no error status).

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

Counters: ``rx_bytes``, ``rx_frames``, ``tx_bytes``, ``tx_frames`` (frame bytes, headers not
counted), ``rx_dropped``, ``tx_dropped``, ``tx_errors``.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.ratelimit import RateLimiter, TokenKind
from vmmkit.virtio.device import ActivationContext
from vmmkit.virtio.queue import Virtqueue
from vmmkit_devices.device_types import VirtioNetType as VirtioNetType  # declared there, re-exported
from vmmkit_devices.virtio.common import QueueDevice
from vmmkit_devices.virtio.tap import VNET_HDR_SIZE, Tap

if TYPE_CHECKING:
    from vmmkit.config import NetConfig
    from vmmkit.virtio.chain import DescriptorChain

log = get_logger()

VIRTIO_ID_NET: Final = 1

VIRTIO_NET_F_MTU: Final = 1 << 3
VIRTIO_NET_F_MAC: Final = 1 << 5
VIRTIO_NET_F_STATUS: Final = 1 << 16

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
#: An RX header without offloads: everything zero, num_buffers (offset 10) = 1.
_RX_HEADER: Final = bytes(10) + struct.pack("<H", 1)


def generated_mac(seed: str) -> bytes:
    """A locally administered unicast MAC derived from ``seed`` (stable across runs)."""
    import hashlib  # loads OpenSSL: only for a NIC without a configured MAC

    digest = hashlib.sha256(seed.encode()).digest()
    return bytes(((digest[0] & 0xFC) | 0x02,)) + digest[1:6]


def parse_mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class NetDevice(QueueDevice):
    """A virtio-net device on one :class:`~.tap.Tap` queue (the device owns and closes it).

    :param device_id: the device's id.
    :param tap: the open tap.
    :param mac: the guest's MAC address (6 bytes).
    :param queue_size: each queue's maximum size.
    :param mtu: offered with ``VIRTIO_NET_F_MTU`` when given.
    """

    device_type = VIRTIO_ID_NET
    name = "virtio-net"

    def __init__(self, device_id: str, tap: Tap, mac: bytes, *, queue_size: int = QUEUE_SIZE,
                 mtu: int | None = None, rx_limiter: RateLimiter | None = None,
                 tx_limiter: RateLimiter | None = None) -> None:
        if len(mac) != 6:
            raise DeviceError(f"{device_id}: a MAC address has 6 bytes")
        features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | (VIRTIO_NET_F_MTU if mtu else 0)
        super().__init__(device_id, [queue_size, queue_size], features)
        self.tap = tap
        self.mac = mac
        self.mtu = mtu
        self._buffer = bytearray(VNET_HDR_SIZE + MAX_FRAME)
        self._rx_chain: DescriptorChain | None = None
        #: Limiters per direction, owned by the device (``rate_limiter_config``).
        self.limiters = {RX_QUEUE: rx_limiter, TX_QUEUE: tx_limiter}
        #: What each limiter calls when it unblocks: look at its queue again.
        self._refilled = {index: functools.partial(self.wake, index) for index in (RX_QUEUE, TX_QUEUE)}
        for name in ("rx_bytes", "rx_frames", "tx_bytes", "tx_frames"):
            self.count(name, 0)

    @classmethod
    def from_config(cls, device_id: str, config: NetConfig) -> NetDevice:
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
            return cls(device_id, tap, mac, queue_size=config.queue_size, mtu=config.mtu, rx_limiter=rx,
                       tx_limiter=tx)
        except BaseException:
            for limiter in (rx, tx):
                if limiter is not None:
                    limiter.close()
            tap.close()
            raise

    def config_space(self) -> bytes:
        return CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1, self.mtu or 0)

    def describe(self) -> Mapping[str, Any]:
        return {"tap": self.tap.name, "mac": format_mac(self.mac), "mtu": self.mtu}

    # -- lifecycle --------------------------------------------------------------------------

    def activated(self, ctx: ActivationContext) -> None:
        self._rx_chain = None
        for index, limiter in self.limiters.items():
            if limiter is not None:
                limiter.subscribe(ctx.event_loop, self._refilled[index])

    def deactivated(self) -> None:
        self._rx_chain = None  # popped but unused: the driver reclaims it at reset
        self.remove_reader(self.tap.fd)
        for index, limiter in self.limiters.items():
            if limiter is not None:
                limiter.unsubscribe(self._refilled[index])

    def paused(self) -> None:
        self.remove_reader(self.tap.fd)

    def release(self) -> None:
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

    # -- queues -----------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if index == RX_QUEUE:
            self._receive(queue)
        elif index == TX_QUEUE:
            self._transmit(queue)

    def _tap_readable(self) -> None:
        ctx = self.context
        if ctx is None or not self.running() or not ctx.queues[RX_QUEUE].active:
            self.remove_reader(self.tap.fd)  # level-triggered: never leave it armed unserved
            return
        self.serve(RX_QUEUE)

    def _receive(self, queue: Virtqueue) -> None:
        delivered = 0
        for _ in range(BURST):
            chain = self._rx_chain
            if chain is None:
                chain = queue.pop()
                if chain is None:
                    self.remove_reader(self.tap.fd)  # re-armed by the driver's next RX kick
                    break
                if chain.writable_bytes < VNET_HDR_SIZE:
                    self.fail(queue, f"receive buffer {chain.head} has {chain.writable_bytes} writable "
                                     f"bytes, less than the {VNET_HDR_SIZE}-byte header")
                    return
                self._rx_chain = chain
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
            if size < VNET_HDR_SIZE or size > chain.writable_bytes:
                self.count("rx_dropped")
                continue
            rx_limiter = self.limiters[RX_QUEUE]
            if rx_limiter is not None:
                rx_limiter.force(size - VNET_HDR_SIZE, TokenKind.BYTES)
            frame = memoryview(self._buffer)[:size]
            frame[:VNET_HDR_SIZE] = _RX_HEADER
            chain.write(frame)
            queue.add_used(chain.head, size)
            self._rx_chain = None
            delivered += 1
            self.count("rx_frames")
            self.count("rx_bytes", size - VNET_HDR_SIZE)
        if delivered:
            self.signal(queue)

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
                self.fail(queue, f"transmit buffer {chain.head} is shorter than the {VNET_HDR_SIZE}-byte header")
                return
            if self._limited(TX_QUEUE, total - VNET_HDR_SIZE):
                queue.undo_pop()  # stays available; the limiter wakes the TX queue
                break
            if total > VNET_HDR_SIZE + MAX_FRAME:
                self.count("tx_dropped")
            else:
                self._send(memoryview(chain.read(total))[VNET_HDR_SIZE:])
            queue.add_used(chain.head, 0)
            sent += 1
        if sent:
            self.signal(queue)

    def _send(self, frame: memoryview) -> None:
        try:
            os.writev(self.tap.fd, [_ZERO_HEADER, frame])
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
