"""Contract tests of the generic vhost-user frontend against test_frontend.py's scripted backend
(a simulation of a backend, labelled so: the real peers are qemu-storage-daemon and
vmmkit-vhost-user blk in tests/integration/test_generic_vhost_user*.py): the features offered,
the configuration space forwarded (or 0xFF without CONFIG), queues of different sizes, and the
backend's queue count as the bound."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vmmkit_devices.vhost_user import generic

from vmmkit.errors import DeviceError
from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory
from vmmkit.vhost_user import protocol as p
from vmmkit.vhost_user.protocol import FrontendRequest as Req
from vmmkit.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1


def _load_sibling(name: str) -> object:
    """The scripted backend and fixtures of test_frontend.py, by path (test modules are not a package)."""
    key = f"vmmkit_tests_vhost_user_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_frontend: Any = _load_sibling("test_frontend")
Interrupts = _frontend.Interrupts
_context = _frontend._context
backend_factory = _frontend.backend_factory
loop = _frontend.loop
memory = _frontend.memory

PF = p.ProtocolFeature
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_F_RING_PACKED = 1 << 34
DEVICE_BITS = (1 << 0) | (1 << 11) | (1 << 23)
CONFIG = bytes(range(64))


def _config_requests(log: list[tuple[Req, bytes, int]], request: Req) -> list[p.ConfigSpace]:
    return [p.ConfigSpace.unpack(payload) for code, payload, _ in log if code == request]


def test_features_are_the_backends_minus_what_the_frontend_cannot_do(
    backend_factory: Callable[..., Any], loop: EventLoop
) -> None:
    backend = backend_factory(features=DEVICE_BITS | VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_ACCESS_PLATFORM
                              | VIRTIO_F_RING_PACKED, protocol=p.protocol_mask(PF.REPLY_ACK, PF.CONFIG), config=CONFIG)
    device = generic.create_device("g0", str(backend.path), device_type=25, queue_sizes=(64, 64), event_loop=loop)
    try:
        assert device.device_type == 25 and device.name == "generic-vhost-user"
        assert device.features() == DEVICE_BITS | VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX
        assert device.describe()["device_type"] == 25
    finally:
        device.close()


def test_config_reads_ask_from_offset_0_and_writes_are_forwarded(
    backend_factory: Callable[..., Any], loop: EventLoop
) -> None:
    backend = backend_factory(features=VIRTIO_F_VERSION_1, protocol=p.protocol_mask(PF.REPLY_ACK, PF.CONFIG),
                              config=CONFIG)
    device = generic.create_device("g0", str(backend.path), device_type=2, queue_sizes=(128,), event_loop=loop)
    try:
        assert device.read_config(20, 4) == CONFIG[20:24]
        assert [(c.offset, c.size) for c in _config_requests(backend.log, Req.GET_CONFIG)] == [(0, 24)]
        device.write_config(32, b"\x01")
        (written,) = _config_requests(backend.log, Req.SET_CONFIG)
        assert (written.offset, written.size, written.payload) == (32, 1, b"\x01")
        # Outside the 256 bytes a vhost-user config message can carry: nothing is asked.
        assert device.read_config(300, 4) == bytes(4)
        device.write_config(300, b"\x01")
        assert len(_config_requests(backend.log, Req.SET_CONFIG)) == 1
    finally:
        device.close()


def test_without_the_config_protocol_feature_reads_are_0xff_and_writes_dropped(
    backend_factory: Callable[..., Any], loop: EventLoop
) -> None:
    backend = backend_factory(features=VIRTIO_F_VERSION_1, protocol=p.protocol_mask(PF.REPLY_ACK), config=CONFIG)
    device = generic.create_device("g0", str(backend.path), device_type=4, queue_sizes=(256,), event_loop=loop)
    try:
        assert device.read_config(0, 4) == b"\xff" * 4
        device.write_config(0, b"\x00")
        assert Req.GET_CONFIG not in backend.requests() and Req.SET_CONFIG not in backend.requests()
    finally:
        device.close()


def test_queues_of_different_sizes_are_all_started(backend_factory: Callable[..., Any], memory: GuestMemory,
                                                    loop: EventLoop) -> None:
    backend = backend_factory(features=VIRTIO_F_VERSION_1, protocol=p.protocol_mask(PF.REPLY_ACK, PF.MQ),
                              queue_num=4)
    device = generic.create_device("g0", str(backend.path), device_type=25, queue_sizes=(64, 64, 128, 256),
                                   event_loop=loop)
    try:
        assert tuple(device.queue_max_sizes) == (64, 64, 128, 256)
        device.ack_features(VIRTIO_F_VERSION_1)
        device.activate(_context(memory, loop, [64, 64, 128, 256], Interrupts()))
        nums = [p.VringState.unpack(payload) for code, payload, _ in backend.log if code == Req.SET_VRING_NUM]
        assert [(state.index, state.num) for state in nums] == [(0, 64), (1, 64), (2, 128), (3, 256)]
        assert sorted(backend.call) == [0, 1, 2, 3] and sorted(backend.kick) == [0, 1, 2, 3]
    finally:
        device.close()


def test_more_queues_than_the_backend_serves_are_refused(backend_factory: Callable[..., Any],
                                                          loop: EventLoop) -> None:
    backend = backend_factory(features=VIRTIO_F_VERSION_1, protocol=p.protocol_mask(PF.REPLY_ACK, PF.MQ),
                              queue_num=2)
    with pytest.raises(DeviceError, match="queue_sizes has 3 queues but the vhost-user backend .* serves 2"):
        generic.create_device("g0", str(backend.path), device_type=25, queue_sizes=(64, 64, 64), event_loop=loop)
