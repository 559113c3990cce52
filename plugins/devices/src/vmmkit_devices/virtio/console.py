"""virtio-console (virtio 1.2, section 5.3), one port, no multiport: device type
``virtio-console``, from ``VmConfig.console`` unless its mode is ``Off`` (vmmkit's default).

Output and input go through the serial port's backends (:mod:`vmmkit_devices.console.backends`):
``Tty``, ``Pty``, ``File``, ``Socket`` or ``Null``, chosen by ``ConsoleConfig.mode``.

Queues: receiveq (0) and transmitq (1). TX: each chain's device-readable bytes are written to the
backend, at most :data:`MAX_TX_CHAIN` per chain (the rest is dropped and counted: a hostile chain
may claim gigabytes); output the backend cannot take now is dropped there (``tx_dropped``). RX:
host input waits in a buffer of :data:`RX_BUFFER` bytes (the backend stops reading while it is
full) and is copied into the driver's receive buffers as they come. Buffered input survives a
driver reset (it is the host's, not in flight); a popped receive chain does not.

Offered features: ``VIRTIO_CONSOLE_F_SIZE`` when the backend is the VMM's terminal (its size at
start; resizes are not followed), ``VIRTIO_CONSOLE_F_EMERG_WRITE`` (a byte written to
``emerg_wr`` goes straight to the output, even before the queues are up), ``INDIRECT_DESC``,
``EVENT_IDX``. Configuration space: ``cols``, ``rows``, ``max_nr_ports`` (1), ``emerg_wr``.

A receive chain with no device-writable byte cannot be answered: the device fails.

Counters: ``rx_bytes`` (to the guest), ``tx_bytes`` (from the guest), ``tx_dropped``,
``rx_pending`` (buffered input now).
"""

from __future__ import annotations

import fcntl
import struct
import termios
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit.eventloop import EventLoop
from vmmkit.log import get_logger
from vmmkit.state import pack_bytes, unpack_bytes
from vmmkit.virtio.queue import Virtqueue
from vmmkit_devices.console.backends import ConsoleBackend, console_mode, open_backend
from vmmkit_devices.device_types import VirtioConsoleType as VirtioConsoleType  # declared there, re-exported
from vmmkit_devices.virtio.common import QueueDevice

if TYPE_CHECKING:
    from vmmkit.config import ConsoleConfig

log = get_logger()

VIRTIO_ID_CONSOLE: Final = 3

VIRTIO_CONSOLE_F_SIZE: Final = 1 << 0
VIRTIO_CONSOLE_F_EMERG_WRITE: Final = 1 << 2

RX_QUEUE: Final = 0
TX_QUEUE: Final = 1
QUEUE_SIZE: Final = 256
#: Host input held for the guest before the backend stops reading.
RX_BUFFER: Final = 64 * 1024
#: The most output taken from one transmit chain.
MAX_TX_CHAIN: Final = 1024 * 1024
_TX_CHUNK: Final = 64 * 1024
#: struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr.
CONFIG: Final = struct.Struct("<HHII")
_EMERG_WR: Final = 8


def terminal_size(fd: int) -> tuple[int, int] | None:
    """``(cols, rows)`` of the terminal on ``fd``, or ``None``."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    except OSError:
        return None
    return (cols, rows) if cols and rows else None


class ConsoleDevice(QueueDevice):
    """A single-port virtio console on ``backend`` (the device owns and closes it).

    :param device_id: the device's id.
    :param backend: where output goes and input comes from.
    :param event_loop: where the backend's input is read (the VM's event loop).
    :param size: ``(cols, rows)`` to offer with ``VIRTIO_CONSOLE_F_SIZE``.
    """

    device_type = VIRTIO_ID_CONSOLE
    name = "virtio-console"

    def __init__(self, device_id: str, backend: ConsoleBackend, event_loop: EventLoop | None = None, *,
                 size: tuple[int, int] | None = None) -> None:
        features = VIRTIO_CONSOLE_F_EMERG_WRITE | (VIRTIO_CONSOLE_F_SIZE if size else 0)
        super().__init__(device_id, [QUEUE_SIZE, QUEUE_SIZE], features)
        self.backend = backend
        self.size = size
        self._pending = bytearray()
        self._pending_lock = threading.Lock()
        for name in ("rx_bytes", "tx_bytes", "tx_dropped"):
            self.count(name, 0)
        if event_loop is not None:
            backend.attach(event_loop, self)

    @classmethod
    def from_config(cls, device_id: str, config: ConsoleConfig, event_loop: EventLoop | None) -> ConsoleDevice:
        mode = console_mode(config)
        if mode == "Off":
            raise DeviceError(f"{device_id}: the virtio console is off")
        backend = open_backend(mode, name="virtio_console", file=config.file, socket_path=config.socket)
        try:
            size = terminal_size(backend.output_fd) if mode == "Tty" else None
            return cls(device_id, backend, event_loop, size=size)
        except BaseException:
            backend.close()
            raise

    def config_space(self) -> bytes:
        cols, rows = self.size or (0, 0)
        return CONFIG.pack(cols, rows, 1, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == _EMERG_WR and len(data) == 4 and not self._closed:
            char = int.from_bytes(data, "little") & 0xFF
            self.backend.write(bytes((char,)))
            self.count("tx_bytes")

    def describe(self) -> Mapping[str, Any]:
        return {"mode": self.backend.mode, "path": getattr(self.backend, "path", None)}

    def counters(self) -> Mapping[str, int]:
        counts = dict(super().counters())
        counts["tx_dropped"] = counts.get("tx_dropped", 0) + self.backend.tx_dropped
        counts["rx_pending"] = len(self._pending)
        return counts

    # -- the backend's InputSink ------------------------------------------------------------

    def room(self) -> int:
        if self._closed or self._paused:
            return 0
        return max(0, RX_BUFFER - len(self._pending))

    def receive(self, data: bytes) -> None:
        with self._pending_lock:
            self._pending += data[: max(0, RX_BUFFER - len(self._pending))]
        self.serve(RX_QUEUE)  # on the event loop, where the backend reads

    # -- lifecycle --------------------------------------------------------------------------

    def device_state(self) -> Mapping[str, Any]:
        """Host input received and not yet given to the guest."""
        with self._pending_lock:
            return {"pending": pack_bytes(bytes(self._pending))}

    def restore_device_state(self, state: Mapping[str, Any]) -> None:
        pending = unpack_bytes(state.get("pending"), f"{self.id}.pending")
        with self._pending_lock:
            self._pending[:] = pending

    def resumed(self) -> None:
        self.backend.input_ready()

    def release(self) -> None:
        self.backend.close()

    # -- queues -----------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if index == RX_QUEUE:
            self._fill_receive(queue)
        elif index == TX_QUEUE:
            self._transmit(queue)

    def _fill_receive(self, queue: Virtqueue) -> None:
        delivered = 0
        while self._pending and self.running():
            chain = queue.pop()
            if chain is None:
                break
            room = chain.writable_bytes
            if room == 0:
                self.fail(queue, f"receive buffer {chain.head} has no device-writable byte")
                return
            with self._pending_lock:
                data = bytes(self._pending[:room])
                del self._pending[: len(data)]
            written = chain.write(data)
            queue.add_used(chain.head, written)
            self.count("rx_bytes", written)
            delivered += 1
        if delivered:
            self.signal(queue)
            if len(self._pending) < RX_BUFFER:
                self.backend.input_ready()

    def _transmit(self, queue: Virtqueue) -> None:
        memory = self.context.memory if self.context is not None else None
        sent = 0
        while self.running() and memory is not None:
            chain = queue.pop()
            if chain is None:
                break
            budget = MAX_TX_CHAIN
            for segment in chain.readable:
                if budget <= 0:
                    break
                take = min(segment.length, budget)
                budget -= take
                for start in range(0, take, _TX_CHUNK):
                    data = memory.read(segment.gpa + start, min(_TX_CHUNK, take - start))
                    self.backend.write(data)
                    self.count("tx_bytes", len(data))
            if chain.readable_bytes > MAX_TX_CHAIN:
                self.count("tx_dropped", chain.readable_bytes - MAX_TX_CHAIN)
            queue.add_used(chain.head, 0)
            sent += 1
        if sent:
            self.signal(queue)


def create(ctx: DeviceContext, request: DeviceRequest) -> ConsoleDevice:
    """``VirtioConsoleType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    config = request.config
    if config is None or not hasattr(config, "mode"):
        raise DeviceError(f"{request.id}: virtio-console needs a ConsoleConfig")
    return ConsoleDevice.from_config(request.id, config, ctx.event_loop)

