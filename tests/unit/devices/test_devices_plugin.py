"""The plugin registers the contracted device type names."""

from __future__ import annotations

from importlib import metadata

import pytest
import vmmkit_devices.plugin
from devices_support import FACTORIES

from vmmkit.device import Device, DeviceType
from vmmkit.plugin import collect_registries, make_plugin_manager

CONTRACT = {
    "serial-16550",
    "rtc-cmos",
    "i8042",
    "debug-port",
    "debug-console",
    "debug-exit",
    "acpi-pm",
}


def test_registers_the_contracted_types() -> None:
    pm = make_plugin_manager(autoload=False, plugins=[vmmkit_devices.plugin])
    registries = collect_registries(pm)
    assert CONTRACT <= set(registries.devices.names())
    for name in CONTRACT:
        device_type = registries.devices.get(name)
        assert issubclass(device_type, DeviceType)
        assert device_type.description


def test_device_kinds_match_type_names() -> None:
    for name, factory in FACTORIES.items():
        device = factory()
        try:
            assert isinstance(device, Device)
            assert device.kind == name
        finally:
            device.close()


def test_entry_point_when_installed() -> None:
    entry_points = {ep.name: ep for ep in metadata.entry_points(group="vmmkit")}
    if "devices" not in entry_points:
        pytest.skip("vmmkit-devices is not installed (pip install -e plugins/devices)")
    assert entry_points["devices"].value == "vmmkit_devices.plugin"
