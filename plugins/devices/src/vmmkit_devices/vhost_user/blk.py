"""``vhost-user-blk``: a virtio block device served by a vhost-user backend
(``--disk vhost_user=on,socket=<path>,num_queues=,queue_size=``), as Cloud Hypervisor's
``virtio-devices/src/vhost_user/blk.rs`` and QEMU's ``hw/block/vhost-user-blk.c``.

The backend owns the image: its capacity, block size, read-only state and serial are the
backend's (``GET_CONFIG``; a backend without the ``CONFIG`` protocol feature is refused, the
guest could not learn the capacity). The disk options that describe a local image (``readonly``,
``direct``, ``serial``, ``image_type``, rate limits...) are refused by name: set them on the
backend. ``num_queues`` above 1 needs the backend's ``MQ`` (``GET_QUEUE_NUM`` bounds it) and is
written into the configuration space's ``num_queues``, as QEMU does.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit.vhost_user import protocol as p
from vmmkit_devices.device_types import VhostUserBlkType as VhostUserBlkType  # declared there, re-exported
from vmmkit_devices.vhost_user.connection import VhostUserConnection, VhostUserError
from vmmkit_devices.vhost_user.device import (
    INFLIGHT_PROTOCOL,
    WANTED_PROTOCOL,
    Backend,
    VhostUserDevice,
    open_backend,
)

if TYPE_CHECKING:
    from vmmkit.config import DiskConfig
    from vmmkit.eventloop import EventLoop

VIRTIO_ID_BLOCK: Final = 2
#: Device features passed through from the backend (virtio 1.2, 5.2.3): SIZE_MAX, SEG_MAX,
#: GEOMETRY, RO, BLK_SIZE, FLUSH, TOPOLOGY, MQ, DISCARD, WRITE_ZEROES. CONFIG_WCE (11) is not:
#: a writable configuration field would need SET_CONFIG (as Cloud Hypervisor, which drops it too).
BLK_FEATURES: Final = sum(1 << bit for bit in (1, 2, 4, 5, 6, 9, 10, 12, 13, 14))
VIRTIO_BLK_F_MQ: Final = 1 << 12
#: struct virtio_blk_config up to write_zeroes_may_unmap and its padding.
CONFIG_SIZE: Final = 60
NUM_QUEUES_OFFSET: Final = 34

#: DiskConfig fields that describe a local image; with vhost_user they belong to the backend.
_LOCAL_ONLY: Final = ("readonly", "direct", "serial", "rate_limiter_config", "rate_limit_group", "queue_affinity",
                      "backing_files", "sparse", "image_type", "lock_granularity")


def check_disk(disk: DiskConfig, device_id: str) -> None:
    import attrs

    fields = attrs.fields_dict(type(disk))
    for name in _LOCAL_ONLY:
        field = fields.get(name)
        if field is None:
            continue
        default: Any = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        if getattr(disk, name) != default:
            raise DeviceError(f"{device_id}: --disk {name}= does not apply to a vhost-user disk (the backend "
                              "owns the image: set it there)")


def create_device(device_id: str, socket_path: str, *, num_queues: int, queue_size: int,
                  event_loop: EventLoop | None = None, opener: Any = None) -> VhostUserDevice:
    """Connect to the backend at ``socket_path`` and build the device."""
    def connect() -> VhostUserConnection:
        return VhostUserConnection.connect(socket_path, device_id)

    opener = opener or connect
    backend = open_backend(opener, WANTED_PROTOCOL | INFLIGHT_PROTOCOL)
    try:
        config = _blk_config(backend, device_id, num_queues)
    except BaseException:
        backend.conn.close()
        raise
    return VhostUserDevice(
        device_id, device_type=VIRTIO_ID_BLOCK, name="vhost-user-blk", backend=backend, opener=opener,
        queue_sizes=[queue_size] * num_queues,
        device_features=BLK_FEATURES if num_queues > 1 else BLK_FEATURES & ~VIRTIO_BLK_F_MQ,
        config=config, describe={"num_queues": num_queues, "queue_size": queue_size}, event_loop=event_loop,
        track_inflight=True, wanted_protocol=WANTED_PROTOCOL | INFLIGHT_PROTOCOL,
    )


def _blk_config(backend: Backend, device_id: str, num_queues: int) -> bytes:
    conn = backend.conn
    if not conn.has(p.ProtocolFeature.CONFIG):
        raise DeviceError(f"{device_id}: the vhost-user-blk backend at {conn.path} does not offer the CONFIG "
                          "protocol feature: the guest could not learn the disk's capacity")
    if num_queues > 1:
        if not backend.features & VIRTIO_BLK_F_MQ or not conn.has(p.ProtocolFeature.MQ):
            raise DeviceError(f"{device_id}: num_queues={num_queues} but the vhost-user-blk backend at {conn.path} "
                              "has no multiqueue support")
        available = conn.get_queue_num()
        if num_queues > available:
            raise DeviceError(f"{device_id}: num_queues={num_queues} but the vhost-user-blk backend at "
                              f"{conn.path} serves {available} queues")
    try:
        config = bytearray(conn.get_config(CONFIG_SIZE))
    except VhostUserError as exc:
        raise DeviceError(f"{device_id}: reading the disk's configuration from the backend failed: {exc}") from None
    struct.pack_into("<H", config, NUM_QUEUES_OFFSET, num_queues)
    return bytes(config)


def create(ctx: DeviceContext, request: DeviceRequest) -> VhostUserDevice:
    """``VhostUserBlkType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    disk = request.config
    if disk is None or not getattr(disk, "vhost_user", False) or disk.vhost_socket is None:
        raise DeviceError(f"{request.id}: vhost-user-blk needs a DiskConfig with vhost_user=on,socket=")
    check_disk(disk, request.id)
    return create_device(request.id, disk.vhost_socket, num_queues=disk.num_queues, queue_size=disk.queue_size,
                         event_loop=ctx.event_loop)
