"""``vhost-user-fs``: the virtio-fs device (virtio 1.2, section 5.11; device ID 26) whose FUSE
server is a vhost-user backend (virtiofsd, vmmkit-vhost-user fs): ``--fs tag=,socket=,
num_queues=,queue_size=``, as Cloud Hypervisor's ``virtio-devices/src/vhost_user/fs.rs`` and
QEMU's ``hw/virtio/vhost-user-fs.c``.

Queues: the high-priority queue, then ``num_queues`` request queues, each of ``queue_size``.
Configuration space (the frontend's): ``tag`` (36 bytes, NUL-padded) and
``num_request_queues`` (le32). No device feature bits (``VIRTIO_FS_F_NOTIFICATION`` needs a
notification queue, not offered). No DAX window (the shared-memory cache): like Cloud
Hypervisor's default, the guest mounts without ``dax``.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit_devices.device_types import VhostUserFsType as VhostUserFsType  # declared there, re-exported
from vmmkit_devices.vhost_user.connection import VhostUserConnection
from vmmkit_devices.vhost_user.device import VhostUserDevice, open_backend

VIRTIO_ID_FS: Final = 26
TAG_SIZE: Final = 36
CONFIG: Final = struct.Struct(f"<{TAG_SIZE}sI")


def create_device(device_id: str, tag: str, socket_path: str, *, num_queues: int, queue_size: int,
                  event_loop: Any = None) -> VhostUserDevice:
    encoded = tag.encode()
    if not encoded or len(encoded) > TAG_SIZE:
        raise DeviceError(f"{device_id}: a virtio-fs tag has 1 to {TAG_SIZE} bytes")

    def connect() -> VhostUserConnection:
        return VhostUserConnection.connect(socket_path, device_id)

    backend = open_backend(connect)
    return VhostUserDevice(
        device_id, device_type=VIRTIO_ID_FS, name="vhost-user-fs", backend=backend, opener=connect,
        queue_sizes=[queue_size] * (1 + num_queues), device_features=0,
        config=CONFIG.pack(encoded, num_queues), event_loop=event_loop,
        describe={"tag": tag, "num_queues": num_queues, "queue_size": queue_size},
    )


def create(ctx: DeviceContext, request: DeviceRequest) -> VhostUserDevice:
    """``VhostUserFsType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    fs: Any = request.config
    if fs is None or not hasattr(fs, "tag"):
        raise DeviceError(f"{request.id}: vhost-user-fs needs an FsConfig")
    return create_device(request.id, fs.tag, fs.socket, num_queues=fs.num_queues, queue_size=fs.queue_size,
                         event_loop=ctx.event_loop)
