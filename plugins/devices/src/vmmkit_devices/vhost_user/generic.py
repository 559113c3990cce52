"""``generic-vhost-user``: a virtio device of any type whose configuration space and queues are
entirely the backend's (``--generic-vhost-user socket=,virtio_id=,queue_sizes=[..]``), as Cloud
Hypervisor's ``virtio-devices/src/vhost_user/generic_vhost_user.rs``.

The frontend knows nothing of the device type: the guest is offered the backend's device
feature bits (0 to 23) and the transport features vmmkit implements (``VERSION_1``,
``INDIRECT_DESC``, ``EVENT_IDX``; the backend's others, such as ``ACCESS_PLATFORM`` or
``RING_PACKED``, are dropped). With the ``CONFIG`` protocol feature the guest's configuration
reads and writes go to the backend (``GET_CONFIG`` / ``SET_CONFIG``); without, reads return
0xFF bytes and writes are dropped, as Cloud Hypervisor does.

Reads ask for the configuration space from offset 0 up to the end of the guest's access and
keep the tail: libvhost-user (qemu-storage-daemon) answers ``GET_CONFIG`` with the start of the
space whatever the offset (QEMU's frontend only ever asks from 0), other backends honour the
offset; from 0, both give the same bytes. With ``MQ``, the backend's ``GET_QUEUE_NUM`` bounds
the number of queues, as in Cloud Hypervisor. The connection, memory table, rings, in-flight
tracking and reconnection are :class:`~vmmkit_devices.vhost_user.device.VhostUserDevice`'s.
"""

from __future__ import annotations

from typing import Any, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.vhost_user import protocol as p
from vmmkit_devices.device_types import GenericVhostUserType as GenericVhostUserType  # declared there
from vmmkit_devices.vhost_user.connection import VhostUserConnection, VhostUserError
from vmmkit_devices.vhost_user.device import (
    INFLIGHT_PROTOCOL,
    WANTED_PROTOCOL,
    Backend,
    VhostUserDevice,
    open_backend,
)

log = get_logger()

#: Device-specific feature bits (virtio 1.2, 2.2: bits 0 to 23 belong to the device type).
DEVICE_FEATURES: Final = (1 << 24) - 1
#: The largest configuration space GET_CONFIG carries (vhost-user.rst: 256 bytes).
MAX_CONFIG_SIZE: Final = 256
_WANTED: Final = WANTED_PROTOCOL | INFLIGHT_PROTOCOL


class GenericVhostUserDevice(VhostUserDevice):
    """A :class:`VhostUserDevice` whose configuration space is the backend's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._config_warned = False

    def read_config(self, offset: int, size: int) -> bytes:
        if size <= 0 or offset < 0 or offset + size > MAX_CONFIG_SIZE:
            return bytes(max(size, 0))
        with self._lock:
            conn = self.backend.conn
            if not conn.has(p.ProtocolFeature.CONFIG):
                self._warn_config("the backend does not offer the CONFIG protocol feature")
                return b"\xff" * size
            try:
                return conn.get_config(offset + size)[offset:]
            except VhostUserError as exc:
                self._warn_config(str(exc))
                return b"\xff" * size

    def write_config(self, offset: int, data: bytes) -> None:
        if not data or offset < 0 or offset + len(data) > MAX_CONFIG_SIZE:
            return
        with self._lock:
            conn = self.backend.conn
            if not conn.has(p.ProtocolFeature.CONFIG):
                self._warn_config("the backend does not offer the CONFIG protocol feature")
                return
            try:
                conn.set_config(offset, data)
            except VhostUserError as exc:
                self._warn_config(f"SET_CONFIG at {offset}: {exc}")

    def _warn_config(self, reason: str) -> None:
        """Once per device: configuration access the backend does not serve (reads give 0xFF)."""
        if not self._config_warned:
            self._config_warned = True
            log.warning("vhost_user.config_unavailable", device=self.id, reason=reason)


def _check_queues(backend: Backend, device_id: str, num_queues: int) -> None:
    conn = backend.conn
    if not conn.has(p.ProtocolFeature.MQ):
        return
    available = conn.get_queue_num()
    if num_queues > available:
        raise DeviceError(f"{device_id}: queue_sizes has {num_queues} queues but the vhost-user backend at "
                          f"{conn.path} serves {available}")


def create_device(device_id: str, socket_path: str, *, device_type: int, queue_sizes: tuple[int, ...],
                  event_loop: Any = None) -> GenericVhostUserDevice:
    """Connect to the backend at ``socket_path`` and build the device."""
    if not queue_sizes:
        raise DeviceError(f"{device_id}: a generic vhost-user device needs at least one queue")

    def connect() -> VhostUserConnection:
        return VhostUserConnection.connect(socket_path, device_id)

    backend = open_backend(connect, _WANTED)
    try:
        _check_queues(backend, device_id, len(queue_sizes))
    except BaseException:
        backend.conn.close()
        raise
    return GenericVhostUserDevice(
        device_id, device_type=device_type, name="generic-vhost-user", backend=backend, opener=connect,
        queue_sizes=queue_sizes, device_features=DEVICE_FEATURES, event_loop=event_loop,
        wanted_protocol=_WANTED, track_inflight=True,
        describe={"device_type": device_type, "queue_sizes": list(queue_sizes)},
    )


def create(ctx: DeviceContext, request: DeviceRequest) -> GenericVhostUserDevice:
    """``GenericVhostUserType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    config: Any = request.config
    if config is None or not hasattr(config, "device_type"):
        raise DeviceError(f"{request.id}: generic-vhost-user needs a GenericVhostUserConfig")
    return create_device(request.id, config.socket, device_type=config.device_type,
                         queue_sizes=tuple(config.queue_sizes), event_loop=ctx.event_loop)
