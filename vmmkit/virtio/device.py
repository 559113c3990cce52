"""The interface between a virtio device and its transport (Cloud Hypervisor's
``VirtioDevice`` trait): features, config space, activation with queues, reset."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from attrs import frozen

if TYPE_CHECKING:
    from vmmkit.eventloop import EventLoop
    from vmmkit.memory import GuestMemory
    from vmmkit.virtio.queue import Virtqueue

#: Feature bits every modern device offers or the transport handles (virtio 1.x, section 6).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_F_RING_PACKED = 1 << 34


class VirtioInterruptType(enum.Enum):
    CONFIG = "config"
    QUEUE = "queue"


class VirtioInterrupt(Protocol):
    """How a device signals the driver; the transport picks ISR bits or an MSI-X vector."""

    def trigger(self, kind: VirtioInterruptType, queue_index: int = 0) -> None: ...


@frozen
class ActivationContext:
    """What a device gets when the driver sets DRIVER_OK.

    ``queue_events[i]`` is an eventfd that becomes readable when the driver notifies queue
    ``i`` (an ioeventfd where the backend has them, otherwise written by the transport).
    Register them with ``event_loop.add_reader`` and process the queue in the callback.
    """

    memory: GuestMemory
    queues: Sequence[Virtqueue]
    queue_events: Sequence[int]
    interrupt: VirtioInterrupt
    event_loop: EventLoop


class VirtioDevice(ABC):
    """A virtio device, independent of transport."""

    #: The virtio device ID (1 net, 2 block, 3 console, 4 entropy, ...).
    device_type: ClassVar[int]
    #: Firmware-table kind is the transport's; this names the device in logs and counters.
    name: ClassVar[str] = "virtio"
    #: Placed by a virtio transport (``virtio-mmio``, ``virtio-pci``: :mod:`vmmkit.transport`).
    transport_family: ClassVar[str] = "virtio"

    def __init__(self, device_id: str) -> None:
        self.id = device_id
        self.acked_features = 0
        self.broken: str | None = None
        #: Set by the transport: told the first time the device is marked broken, so it can
        #: set DEVICE_NEEDS_RESET and notify the driver (virtio 1.2, 2.1.2).
        self.on_broken: Callable[[str], None] | None = None

    @property
    @abstractmethod
    def queue_max_sizes(self) -> Sequence[int]:
        """The maximum size of each queue (its length is the number of queues)."""

    @abstractmethod
    def features(self) -> int:
        """Feature bits offered, including ``VIRTIO_F_VERSION_1``."""

    def ack_features(self, features: int) -> None:
        """The driver accepted ``features`` (a subset of :meth:`features`)."""
        self.acked_features = features

    def read_config(self, offset: int, size: int) -> bytes:
        """Device-specific configuration space; out-of-range reads return zeros."""
        config = self.config_space()
        data = config[offset : offset + size] if 0 <= offset < len(config) else b""
        return data + b"\0" * (size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver writes to the configuration space (ignored unless the device allows)."""

    def config_space(self) -> bytes:
        return b""

    @abstractmethod
    def activate(self, ctx: ActivationContext) -> None:
        """Start processing queues (the driver set DRIVER_OK)."""

    def reset(self) -> None:
        """The driver reset the device: stop processing, forget queues and features."""
        self.acked_features = 0
        self.broken = None

    def mark_broken(self, reason: str) -> None:
        """The guest did something the device cannot honour: the transport sets
        DEVICE_NEEDS_RESET (with a configuration-change interrupt after DRIVER_OK) and the
        device stops processing until the driver resets it."""
        first = self.broken is None
        self.broken = reason
        if first and self.on_broken is not None:
            self.on_broken(reason)

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def hand_over(self) -> None:
        """As :meth:`vmmkit.device.ManagedDevice.hand_over` (the transport forwards it)."""

    def take_back(self) -> None:
        """As :meth:`vmmkit.device.ManagedDevice.take_back`."""

    def close(self) -> None: ...

    def resize(self, size: int) -> None:
        """``vm.resize-disk``: the device now has ``size`` bytes (and tells the driver with a
        configuration-change interrupt). By default a device cannot be resized.

        :raises DeviceError: this device cannot take that size, or no size change at all.
        """
        from vmmkit.errors import DeviceError

        raise DeviceError(f"device {self.id} ({self.name}) cannot be resized")

    def counters(self) -> Mapping[str, int]:
        return {}

    def describe(self) -> Mapping[str, Any]:
        return {}
