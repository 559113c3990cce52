"""The example plugin's own tests: the device, its option, its registration."""

from __future__ import annotations

import pytest
from vmmkit_example_device import plugin
from vmmkit_example_device.led import LedPanel, LedPanelType

from vmmkit.config import PluginDeviceConfig, VmConfig
from vmmkit.errors import DeviceError
from vmmkit.plugin import collect_registries, make_plugin_manager


def test_guest_writes_set_the_leds_and_reads_return_them() -> None:
    panel = LedPanel("led0", "front")
    panel.write(0, b"\x05")
    assert panel.read(0, 1) == b"\x05"
    panel.write(0, b"\x05")
    assert panel.counters() == {"changes": 1, "state": 5}
    panel.reset()
    assert panel.read(0, 1) == b"\x00"


def test_accesses_outside_the_port_are_ignored() -> None:
    panel = LedPanel("led0", "front")
    panel.write(3, b"\xff")
    assert panel.read(1, 2) == b"\xff\xff"
    assert panel.state == 0


def test_registered_through_the_hook() -> None:
    registries = collect_registries(make_plugin_manager(autoload=False, plugins=[plugin]))
    assert registries.devices.get("example-led") is LedPanelType


def test_option_becomes_a_request_at_the_given_port() -> None:
    spec = PluginDeviceConfig.parse("example-led", "port=0x520,label=back")
    config = VmConfig.from_cli(kernel="k", plugin_devices=(spec,)).assign_ids()
    (request,) = LedPanelType.requests(config)
    assert request.pio == (0x520, 1)


def test_bad_port_is_a_clear_error() -> None:
    spec = PluginDeviceConfig.parse("example-led", "port=lots")
    config = VmConfig.from_cli(kernel="k", plugin_devices=(spec,)).assign_ids()
    with pytest.raises(DeviceError, match="invalid port 'lots'"):
        LedPanelType.requests(config)


def test_mmio_placement_for_architectures_without_ports() -> None:
    spec = PluginDeviceConfig.parse("example-led", "mmio=0x9030000")
    (request,) = LedPanelType.requests(VmConfig.from_cli(kernel="k", plugin_devices=(spec,)).assign_ids())
    assert request.mmio == (0x903_0000, 0x1000) and request.pio is None
    for bad, message in (("mmio=0x9030010", "multiple of"), ("mmio=1,port=2", "not both"), ("colour=red", "unknown")):
        spec = PluginDeviceConfig.parse("example-led", bad)
        with pytest.raises(DeviceError, match=message):
            LedPanelType.requests(VmConfig.from_cli(kernel="k", plugin_devices=(spec,)).assign_ids())
