"""virtio-vsock (virtio 1.2, section 5.10) with Cloud Hypervisor's hybrid vsock backend: device
type ``virtio-vsock``, from ``VmConfig.vsock`` (``--vsock cid=,socket=``, ``vm.add-vsock``).

Three queues: RX (0, packets to the guest), TX (1, packets from the guest), event (2: the device
posts no events; a transport reset only follows migration, which vmmkit does not do).
Configuration space: ``le64 guest_cid``. No feature bits of its own (stream sockets only, no
``VIRTIO_VSOCK_F_SEQPACKET``); ``INDIRECT_DESC`` and ``EVENT_IDX`` are offered.

The device runs on its own thread (``<id>_mux``, a :class:`~.loop.MuxerLoop`): queue
notifications and every host socket of the :class:`~.muxer.Muxer` are served there, so the
muxer needs no locking against itself; lifecycle calls from other threads (reset, pause, close)
take the device's muxer lock.

Hostile input: a TX chain too short for the 44-byte header, or an RX chain too small to hold
one, cannot be answered: the device fails (``DEVICE_NEEDS_RESET``). Every other header problem
(length, type, operation, CIDs, ports, credit overruns) resets only that stream (or is dropped,
for a forged source CID); see :func:`.packet.check_guest_header`.

Counters: ``connections``, ``connections_refused``, ``connections_reset``, ``tx_bytes``,
``rx_bytes`` (stream payload), ``tx_refused`` (packets refused), ``rx_dropped``.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit.virtio.device import ActivationContext
from vmmkit.virtio.queue import Virtqueue
from vmmkit_devices.device_types import VirtioVsockType as VirtioVsockType  # declared there, re-exported
from vmmkit_devices.virtio.common import QueueDevice
from vmmkit_devices.virtio.vsock.loop import MuxerLoop
from vmmkit_devices.virtio.vsock.muxer import Muxer, bind_listener
from vmmkit_devices.virtio.vsock.packet import HEADER_SIZE, MAX_PAYLOAD, Header

if TYPE_CHECKING:
    from vmmkit.config import VsockConfig
    from vmmkit.virtio.chain import DescriptorChain

VIRTIO_ID_VSOCK: Final = 19
RX_QUEUE: Final = 0
TX_QUEUE: Final = 1
EVENT_QUEUE: Final = 2
QUEUE_SIZE: Final = 256
#: Packets moved per pass over a queue before the loop serves other work.
BURST: Final = 256


class VsockDevice(QueueDevice):
    """A virtio-vsock device for guest ``cid``, its host side on the Unix socket ``socket_path``.

    :param device_id: the device's id.
    :param cid: the guest's CID (3 to 2**32 - 2).
    :param socket_path: where the device listens (it must not exist; the device removes it
        when closed).
    """

    device_type = VIRTIO_ID_VSOCK
    name = "virtio-vsock"

    def __init__(self, device_id: str, cid: int, socket_path: str) -> None:
        if not 3 <= cid < 0xFFFF_FFFF:
            raise DeviceError(f"{device_id}: vsock CID {cid} is reserved or out of range (3 to 4294967294)")
        super().__init__(device_id, [QUEUE_SIZE] * 3, 0)
        self.cid = cid
        self.socket_path = socket_path
        self._mux_lock = threading.RLock()
        self._loop = MuxerLoop(f"{device_id}_mux")
        self._rx_chain: DescriptorChain | None = None
        listener = bind_listener(socket_path, device_id)
        self.muxer = Muxer(cid, socket_path, listener, self._loop, self._kick_rx, self.count, self._mux_lock)
        for name in ("connections", "rx_bytes", "tx_bytes"):
            self.count(name, 0)
        # Started here, by the thread that builds or hot-adds the VM, never by the vCPU that
        # activates the device: a thread's seccomp filter is stacked on its creator's, and a
        # vCPU may not open the host streams (socket, connect) the muxer does.
        self._loop.start()

    @classmethod
    def from_config(cls, device_id: str, config: VsockConfig) -> VsockDevice:
        return cls(device_id, config.cid, config.socket)

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.cid)

    def describe(self) -> Mapping[str, Any]:
        return {"cid": self.cid, "socket": self.socket_path}

    # -- lifecycle --------------------------------------------------------------------------

    def activate(self, ctx: ActivationContext) -> None:
        super().activate(attrs.evolve(ctx, event_loop=self._loop))

    def activated(self, ctx: ActivationContext) -> None:
        with self._mux_lock:
            self._rx_chain = None
            self.muxer.start()

    def deactivated(self) -> None:
        with self._mux_lock:
            self._rx_chain = None  # popped but unused: the driver reclaims it at reset
            self.muxer.reset()

    def paused(self) -> None:
        with self._mux_lock:
            self.muxer.stop()

    def resumed(self) -> None:
        with self._mux_lock:
            if self.context is not None:
                self.muxer.start()

    def release(self) -> None:
        with self._mux_lock:
            self.muxer.close()
        self._loop.close()

    # -- queues -----------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        with self._mux_lock:
            if index == TX_QUEUE:
                self._transmit(queue)
                if self.muxer.has_rx():
                    self.serve(RX_QUEUE)
            elif index == RX_QUEUE:
                self._receive(queue)
            # EVENT_QUEUE: the driver's buffers wait for events the device never posts

    def _kick_rx(self) -> None:
        self.serve(RX_QUEUE)

    def _transmit(self, queue: Virtqueue) -> None:
        done = 0
        while self.running():
            if done == BURST:
                self.wake(TX_QUEUE)
                break
            chain = queue.pop()
            if chain is None:
                break
            available = chain.readable_bytes
            if available < HEADER_SIZE:
                self.fail(queue, f"transmit buffer {chain.head} has {available} readable bytes, "
                                 f"less than the {HEADER_SIZE}-byte header")
                return
            header = Header.unpack(chain.read(HEADER_SIZE))
            self.muxer.from_guest(header, available - HEADER_SIZE, _payload_reader(chain))
            queue.add_used(chain.head, 0)
            done += 1
        if done:
            self.signal(queue)

    def _receive(self, queue: Virtqueue) -> None:
        delivered = 0
        while self.running() and self.muxer.has_rx():
            if delivered == BURST:
                self.wake(RX_QUEUE)
                break
            chain = self._rx_chain or queue.pop()
            if chain is None:
                break  # the driver's next RX kick brings us back
            room = chain.writable_bytes - HEADER_SIZE
            if room < 0:
                self.fail(queue, f"receive buffer {chain.head} has {chain.writable_bytes} writable bytes, "
                                 f"less than the {HEADER_SIZE}-byte header")
                return
            self._rx_chain = chain
            packet = self.muxer.next_rx(min(room, MAX_PAYLOAD))
            if packet is None:
                break
            header, payload = packet
            written = chain.write(header.pack() + payload)
            queue.add_used(chain.head, written)
            self._rx_chain = None
            delivered += 1
        if delivered:
            self.signal(queue)


def _payload_reader(chain: DescriptorChain) -> Callable[[int], bytes]:
    def read(size: int) -> bytes:
        return chain.read(HEADER_SIZE + size)[HEADER_SIZE:]

    return read


def create(ctx: DeviceContext, request: DeviceRequest) -> VsockDevice:
    """``VirtioVsockType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    config = request.config
    if config is None or not hasattr(config, "cid") or not hasattr(config, "socket"):
        raise DeviceError(f"{request.id}: virtio-vsock needs a VsockConfig")
    return VsockDevice.from_config(request.id, config)
