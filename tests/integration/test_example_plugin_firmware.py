"""A third-party device describes itself to the guest's firmware: the example plugin's LED panel
is in the DSDT a built x86-64 VM holds in guest memory (read back as the guest finds it, from
the RSDP, and disassembled by ``iasl -d``) and in the device tree an AArch64 VM boots with
(``dtc -I dtb``). Neither architecture plugin knows the device's kind."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmkit.config import PayloadConfig, PluginDeviceConfig, VmConfig
from vmmkit.machine import Machine
from vmmkit.plugin import collect_registries, make_plugin_manager

EXAMPLE_SRC = Path(__file__).resolve().parents[2] / "examples" / "vmmkit-example-device" / "src"
GUESTS = Path(__file__).resolve().parents[1] / "guests" / "build"
RSDP_ADDRESS = 0xE0000  # where the x86-64 architecture writes the RSDP (PVH hands it over)
GUEST_ARCH = "x86_64"  # what vmmkit_hypervisor resolves a backend for (the DSDT test)


@pytest.fixture(scope="module")
def example_plugin() -> Iterator[object]:
    sys.path.insert(0, str(EXAMPLE_SRC))
    try:
        from vmmkit_example_device import plugin

        yield plugin
    finally:
        sys.path.remove(str(EXAMPLE_SRC))


def build(example_plugin: object, *, arch: str, hypervisor: str, kernel: Path, led: str) -> Machine:
    pm = make_plugin_manager()
    if not pm.is_registered(example_plugin):  # unless it is installed in this environment
        pm.register(example_plugin)
    config = VmConfig(payload=PayloadConfig(kernel=str(kernel)),
                      plugin_devices=(PluginDeviceConfig.parse("example-led", led),))
    machine = Machine(config, registries=collect_registries(pm), plugin_manager=pm,
                      hypervisor=hypervisor, arch=arch)
    machine.build()
    return machine


def _table(memory: object, address: int) -> bytes:
    length = struct.unpack("<I", memory.read(address + 4, 4))[0]  # type: ignore[attr-defined]
    return bytes(memory.read(address, length))  # type: ignore[attr-defined]


def guest_dsdt(machine: Machine) -> bytes:
    """The DSDT as a guest finds it: RSDP -> XSDT -> FACP -> X_DSDT."""
    memory = machine.memory
    assert memory is not None
    assert memory.read(RSDP_ADDRESS, 8) == b"RSD PTR "
    xsdt = _table(memory, struct.unpack("<Q", memory.read(RSDP_ADDRESS + 24, 8))[0])
    for (entry,) in struct.iter_unpack("<Q", xsdt[36:]):
        table = _table(memory, entry)
        if table[:4] == b"FACP":
            return _table(memory, struct.unpack_from("<Q", table, 140)[0])
    raise AssertionError("no FACP in the XSDT")


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_the_led_panel_is_in_the_dsdt(example_plugin: object, vmmkit_hypervisor: str, tmp_path: Path) -> None:
    machine = build(example_plugin, arch="x86_64", hypervisor=vmmkit_hypervisor,
                    kernel=GUESTS / "x86_64" / "selftest.elf", led="port=0x510,label=front")
    try:
        (tmp_path / "dsdt.dat").write_bytes(guest_dsdt(machine))
    finally:
        machine.close()
    result = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    device = dsl[dsl.index("Device (LED0)"):]
    device = device[: device.index("Device (", 10) if "Device (" in device[10:] else len(device)]
    assert 'Name (_HID, "VMKE0001")' in device
    assert "IO (Decode16,\n" in device and "0x0510," in device, device
    assert 'Unicode ("front")' in device, device


@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc (device-tree-compiler) is not installed")
def test_the_led_panel_is_in_the_device_tree(example_plugin: object, tmp_path: Path) -> None:
    pytest.importorskip("unicorn", reason="the emu backend (unicorn) builds the AArch64 VM")
    machine = build(example_plugin, arch="aarch64", hypervisor="emu",
                    kernel=GUESTS / "aarch64" / "selftest.Image", led="mmio=0x9040000,label=rear")
    try:
        assert machine.boot_info is not None and machine.memory is not None
        blob = machine.memory.read(int(machine.boot_info.extra["fdt"]), int(machine.boot_info.extra["fdt_size"]))
        (tmp_path / "vm.dtb").write_bytes(bytes(blob))
    finally:
        machine.close()
    result = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "vm.dtb"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    node = result.stdout[result.stdout.index("led@9040000 {"):]
    node = node[: node.index("};")]
    assert 'compatible = "vmmkit,example-led";' in node
    assert "reg = <0x00 0x9040000 0x00 0x1000>;" in node
    assert 'label = "rear";' in node
