"""virtio-rng from /dev/urandom and from a file of known bytes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from virtio_driver import Harness, wait_for
from vmmkit_devices.virtio.rng import MAX_REQUEST, RngDevice, VirtioRngType

from vmmkit.config import RngConfig, VmConfig
from vmmkit.errors import DeviceError
from vmmkit.virtio.device import VIRTIO_F_VERSION_1


def rng(src: str = "/dev/urandom") -> RngDevice:
    return RngDevice.from_config("__rng", RngConfig(src=src))


def test_urandom(activate: Callable[..., Harness]) -> None:
    device = rng()
    assert device.features() & VIRTIO_F_VERSION_1 and device.config_space() == b""
    h = activate(device, sizes=[32])
    small, big = h.alloc(64), h.alloc(MAX_REQUEST + 4096)
    h.submit(0, [(small, 64, True)])
    h.submit(0, [(big, MAX_REQUEST, True), (big + MAX_REQUEST, 4096, True)])
    used = h.wait_used(0, 2)
    assert [length for _, length in used] == [64, MAX_REQUEST]  # bounded per request
    assert h.memory.read(small, 64) != b"\xcc" * 64
    assert h.memory.read(big + MAX_REQUEST, 4096) == b"\xcc" * 4096  # beyond the bound: untouched
    assert device.counters() == {"read_bytes": 64 + MAX_REQUEST, "read_ops": 2}
    assert h.interrupt.count(queue=0) >= 1


def test_file_source_in_order_until_it_runs_dry(tmp_path: Path, activate: Callable[..., Harness]) -> None:
    source = tmp_path / "entropy"
    source.write_bytes(bytes(range(100)))
    h = activate(rng(str(source)), sizes=[32])
    first, second, third = h.alloc(60), h.alloc(60), h.alloc(60)
    for gpa in (first, second, third):
        h.submit(0, [(gpa, 60, True)])
    assert [length for _, length in h.wait_used(0, 3)] == [60, 40, 0]
    assert h.memory.read(first, 60) + h.memory.read(second, 40) == bytes(range(100))


def test_readable_only_chain_fails_the_device(activate: Callable[..., Harness]) -> None:
    device = rng()
    h = activate(device, sizes=[32])
    h.submit(0, [(h.alloc(16), 16, False)])
    wait_for(lambda: device.broken is not None, what="the device to fail")
    assert h.errors


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=str(tmp_path / "none")):
        rng(str(tmp_path / "none"))
    with pytest.raises(DeviceError, match="directory"):
        rng(str(tmp_path))


def test_always_requested() -> None:
    (request,) = VirtioRngType.requests(VmConfig())
    assert (request.type, request.id, request.transport) == ("virtio-rng", "__rng", None)
    assert request.config.src == "/dev/urandom"
