"""``vhost-user-net``: a virtio network device served by a vhost-user backend (DPDK, OVS-DPDK,
vmmkit-vhost-user net): ``--net vhost_user=on,socket=<path>,vhost_mode=client|server``, as Cloud
Hypervisor's ``virtio-devices/src/vhost_user/net.rs``.

The frontend owns the configuration space (``mac``: ``mac=`` or one derived from the device id;
``status``: link up; ``max_virtqueue_pairs``) and offers ``MAC`` and ``STATUS`` itself; the
offloads and ``MRG_RXBUF`` are the backend's, within ``offload_tso``/``offload_ufo``/
``offload_csum``. One queue pair (``num_queues=2``): more needs ``MQ``, which the virtio spec
ties to a control queue the frontend would have to serve, not implemented here (refused by
name). Options that configure a tap (``tap``, ``fd``, ``ip``, ``mask``, ``host_mac``), ``mtu``
and rate limits are refused: they belong to the backend.

``vhost_mode=client`` (default) connects to a listening backend (and reconnects to a restarted
one); ``server`` listens on the socket and waits for the backend to connect (no reconnection).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit_devices.device_types import VhostUserNetType as VhostUserNetType  # declared there, re-exported
from vmmkit_devices.vhost_user.connection import VhostUserConnection
from vmmkit_devices.vhost_user.device import VhostUserDevice, open_backend

if TYPE_CHECKING:
    from vmmkit.config import NetConfig
    from vmmkit.eventloop import EventLoop

VIRTIO_ID_NET: Final = 1
VIRTIO_NET_F_CSUM: Final = 1 << 0
VIRTIO_NET_F_GUEST_CSUM: Final = 1 << 1
VIRTIO_NET_F_MAC: Final = 1 << 5
VIRTIO_NET_F_MRG_RXBUF: Final = 1 << 15
VIRTIO_NET_F_STATUS: Final = 1 << 16
VIRTIO_NET_S_LINK_UP: Final = 1
#: TSO (GUEST/HOST TSO4, TSO6, ECN) and UFO (GUEST/HOST UFO) feature bits (virtio 1.2, 5.1.3).
TSO_FEATURES: Final = sum(1 << bit for bit in (7, 8, 9, 11, 12, 13))
UFO_FEATURES: Final = (1 << 10) | (1 << 14)
#: struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu.
CONFIG: Final = struct.Struct("<6sHHH")

#: NetConfig fields a vhost-user net device refuses (they configure a tap, or the backend).
_REFUSED: Final = ("tap", "fds", "ip", "mask", "host_mac", "mtu", "rate_limiter_config")


def offload_features(net: NetConfig) -> int:
    """The backend features the guest may be offered, after the ``offload_*`` options (CH's
    semantics: checksum offload off takes every offload with it, they all rely on it)."""
    features = VIRTIO_NET_F_MRG_RXBUF
    if not net.offload_csum:
        return features
    features |= VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
    if net.offload_tso:
        features |= TSO_FEATURES
    if net.offload_ufo:
        features |= UFO_FEATURES
    return features


def check_net(net: NetConfig, device_id: str) -> None:
    import attrs

    fields = attrs.fields_dict(type(net))
    for name in _REFUSED:
        field = fields.get(name)
        if field is not None and getattr(net, name) != field.default:
            key = {"fds": "fd", "rate_limiter_config": "bw_*/ops_*"}.get(name, name)
            raise DeviceError(f"{device_id}: --net {key}= does not apply to a vhost-user net device (the backend "
                              "owns the interface)")
    if net.num_queues != 2:
        raise DeviceError(f"{device_id}: a vhost-user net device has one queue pair here (num_queues=2): more "
                          "needs the control queue, which vmmkit's vhost-user frontend does not serve yet")


def create_device(device_id: str, net: NetConfig, event_loop: EventLoop | None = None,
                  accept_timeout: float | None = None) -> VhostUserDevice:
    from vmmkit_devices.virtio.net import generated_mac, parse_mac

    check_net(net, device_id)
    socket_path = net.vhost_socket
    assert socket_path is not None
    server = net.vhost_mode.lower() == "server"

    def connect() -> VhostUserConnection:
        return VhostUserConnection.connect(socket_path, device_id)

    def accept() -> VhostUserConnection:
        if accept_timeout is None:
            return VhostUserConnection.listen_and_accept(socket_path, device_id)
        return VhostUserConnection.listen_and_accept(socket_path, device_id, accept_timeout)

    backend = open_backend(accept if server else connect)
    mac = parse_mac(net.mac) if net.mac else generated_mac(device_id)
    config = CONFIG.pack(mac, VIRTIO_NET_S_LINK_UP, net.num_queues // 2, 0)
    return VhostUserDevice(
        device_id, device_type=VIRTIO_ID_NET, name="vhost-user-net", backend=backend,
        opener=None if server else connect, queue_sizes=[net.queue_size] * net.num_queues,
        device_features=offload_features(net), frontend_features=VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS,
        config=config, event_loop=event_loop,
        describe={"mac": ":".join(f"{b:02x}" for b in mac), "vhost_mode": net.vhost_mode,
                  "queue_size": net.queue_size},
    )


def create(ctx: DeviceContext, request: DeviceRequest) -> VhostUserDevice:
    """``VhostUserNetType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    net: Any = request.config
    if net is None or not getattr(net, "vhost_user", False) or net.vhost_socket is None:
        raise DeviceError(f"{request.id}: vhost-user-net needs a NetConfig with vhost_user=on,socket=")
    return create_device(request.id, net, ctx.event_loop)
