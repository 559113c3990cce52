"""The plugin registers the virtio device types, and each builds a VirtioDevice from the VM
configuration section it claims."""

from __future__ import annotations

from pathlib import Path

import vmmkit_devices.plugin
from devices_support import FakeContext

from vmmkit.config import ConsoleConfig, DiskConfig, VmConfig
from vmmkit.device import DeviceType
from vmmkit.eventloop import EventLoop
from vmmkit.plugin import collect_registries, make_plugin_manager
from vmmkit.virtio.device import VirtioDevice

VIRTIO_TYPES = {"virtio-blk": 2, "virtio-net": 1, "virtio-console": 3, "virtio-rng": 4, "virtio-balloon": 5}


def test_registered_by_name() -> None:
    registries = collect_registries(make_plugin_manager(autoload=False, plugins=[vmmkit_devices.plugin]))
    for name in VIRTIO_TYPES:
        device_type = registries.devices.get(name)
        assert issubclass(device_type, DeviceType) and device_type.name == name and device_type.description


def test_config_to_devices(tmp_path: Path, event_loop: EventLoop) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    config = VmConfig(disks=[DiskConfig(path=str(image), serial="s")],
                      console=ConsoleConfig(mode="File", file=str(tmp_path / "console.log"))).assign_ids()
    ctx = FakeContext(event_loop, config)
    registries = collect_registries(make_plugin_manager(autoload=False, plugins=[vmmkit_devices.plugin]))
    built = {}
    for name in ("virtio-blk", "virtio-console", "virtio-rng"):
        device_type = registries.devices.get(name)
        for request in device_type.requests(config):
            device = device_type.create(ctx, request)
            try:
                assert isinstance(device, VirtioDevice)
                assert device.device_type == VIRTIO_TYPES[name]
                built[request.id] = name
            finally:
                device.close()
    assert built == {"_disk0": "virtio-blk", "__console": "virtio-console", "__rng": "virtio-rng"}
    assert registries.devices.get("virtio-net").requests(config) == []
