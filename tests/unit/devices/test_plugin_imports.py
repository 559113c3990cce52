"""Loading a plugin costs only what registration needs (every VM start loads every plugin).

Device types, the AArch64 architecture and the hypervisor backends are light declarations;
implementations (native modules, OpenSSL, libfdt, unicorn, the virtio SDK, terminal control)
are imported when a VM uses them. Each check runs in a fresh interpreter, whose ``sys.modules``
shows what the imports really pulled in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import vmmkit_aarch64.plugin
import vmmkit_devices.plugin
from devices_support import FakeContext

from vmmkit.config import BalloonConfig, ConsoleConfig, DeviceConfig, DiskConfig, PmemConfig, RngConfig, VsockConfig
from vmmkit.device import Device, DeviceRequest, ManagedDevice
from vmmkit.memory_hotplug import VirtioMemRegion
from vmmkit.pci.function import PciFunction
from vmmkit.plugin import collect_registries, make_plugin_manager
from vmmkit.registry import Registries
from vmmkit.virtio.device import VirtioDevice

GUEST_ARCH = "x86_64"  # the boot check's guest (what vmmkit_hypervisor resolves for)

PLUGINS = ("vmmkit_devices.plugin", "vmmkit_aarch64.plugin", "vmmkit_mshv.plugin", "vmmkit_emu.plugin")

#: Modules no plugin may import to load and register.
HEAVY = (
    "_cffi_backend",  # any cffi native module: virtio-blk's, the virtio SDK's
    "vmmkit_devices.virtio._native",
    "vmmkit_devices.virtio.blk_io",
    "hashlib",  # virtio-net's generated MACs; loads OpenSSL
    "_hashlib",
    "libfdt",  # the AArch64 device tree
    "_libfdt",
    "unicorn",  # the emu backend's engine
    "vmmkit.virtio",  # the virtio SDK and transports
    "vmmkit.pci",
    "vmmkit.aarch64",  # the AArch64 register interface
    "tty",  # console backends: raw mode, ptys
    "termios",
    "subprocess",  # tap set-up
)

#: Plugin modules holding implementations rather than declarations (prefixes).
IMPLEMENTATIONS = (
    "vmmkit_devices.acpi",
    "vmmkit_devices.debug",
    "vmmkit_devices.legacy",
    "vmmkit_devices.virtio",
    "vmmkit_devices.console.backends",
    "vmmkit_devices.console.tty",
    "vmmkit_aarch64.fdt",
    "vmmkit_aarch64.image",
    "vmmkit_aarch64.layout",
    "vmmkit_aarch64.psci",
    "vmmkit_emu.arm64",
    "vmmkit_emu.x86",
)

_REGISTER = """
import importlib, json, sys
from vmmkit.plugin import collect_registries, make_plugin_manager
core = set(sys.modules)
plugins = [importlib.import_module(name) for name in sys.argv[1:]]
registries = collect_registries(make_plugin_manager(autoload=False, plugins=plugins))
print(json.dumps({"imported": sorted(set(sys.modules) - core),
                  "registered": [name for registry in registries.all() for name in registry.names()]}))
"""

_BOOT = """
import json, sys
from vmmkit.cli import main
status = main(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    json.dump(sorted(sys.modules), out)
sys.exit(status)
"""


def _matches(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == name or m.startswith(name + ".") for name in names)]


@pytest.mark.parametrize("plugin", [*PLUGINS, "all"])
def test_loading_and_registering_imports_no_implementation(plugin: str) -> None:
    names = PLUGINS if plugin == "all" else (plugin,)
    result = subprocess.run([sys.executable, "-c", _REGISTER, *names], capture_output=True, text=True,
                            timeout=60, check=True)
    report = json.loads(result.stdout)
    assert report["registered"], f"{plugin} registered nothing"
    assert _matches(report["imported"], HEAVY) == []
    assert _matches(report["imported"], IMPLEMENTATIONS) == []


def test_types_are_still_importable_from_their_implementations() -> None:
    import vmmkit_aarch64.arch
    from vmmkit_aarch64.psci import PsciPowerType
    from vmmkit_devices import device_types, plugin
    from vmmkit_devices.legacy.serial import Serial16550Type
    from vmmkit_devices.vfio.device_type import VfioPciType
    from vmmkit_devices.virtio import VirtioBlockType
    from vmmkit_devices.virtio.block import VirtioBlockType as FromBlock

    assert Serial16550Type is device_types.Serial16550Type
    assert VirtioBlockType is FromBlock is device_types.VirtioBlockType
    assert PsciPowerType is vmmkit_aarch64.arch.PsciPowerType
    assert set(plugin.DEVICE_TYPES) == {
        value for value in vars(device_types).values()
        if isinstance(value, type) and value.__module__ == device_types.__name__
    } | {VfioPciType}  # VFIO's type is declared in its own package


#: Configurations for the types that build nothing without one.
_CONFIGS = {
    "serial-16550": "Null",
    "pl011": "Null",
    "debug-console": "Null",
    "virtio-console": ConsoleConfig(mode="Null"),
    "virtio-rng": RngConfig(),
    "virtio-mem": VirtioMemRegion(start=1 << 30, size=2 << 20),
    "virtio-balloon": BalloonConfig(size=1 << 20),
    "vfio-pci": DeviceConfig(path="/sys/bus/pci/devices/0000:00:00.0"),
}


def _registries() -> Registries:
    return collect_registries(make_plugin_manager(autoload=False, plugins=[vmmkit_devices.plugin,
                                                                           vmmkit_aarch64.plugin]))


#: virtio-net is left out: it needs a tap (test_virtio_net.py builds one in a network namespace);
#: so are the vhost-user types: they need a backend (tests/unit/vhost_user/test_frontend.py builds
#: them against a scripted one; generic-vhost-user against qemu-storage-daemon in
#: tests/integration/test_generic_vhost_user_config_space.py).
_BUILDABLE = sorted(name for name in _registries().devices.names()
                    if name not in ("virtio-net", "generic-vhost-user") and not name.startswith("vhost-user-"))


@pytest.mark.parametrize("name", _BUILDABLE)
def test_each_declared_type_builds_its_device(name: str, ctx: FakeContext, tmp_path: Path) -> None:
    config = _CONFIGS.get(name)
    if name == "virtio-vsock":
        config = VsockConfig(cid=3, socket=str(tmp_path / "v.sock"))
    if name == "virtio-pmem":
        config = PmemConfig(file=str(tmp_path), size=2 << 20)  # a directory: an unnamed file in it
    if name == "virtio-blk":
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(4096))
        config = DiskConfig(path=str(image))
    registries = _registries()
    device = registries.devices.get(name).create(ctx, DeviceRequest(name, f"_{name}", config))
    try:
        # a VFIO request is opened by its own transport (vfio-pci) when it is placed
        assert isinstance(device, Device | VirtioDevice | PciFunction) or (
            isinstance(device, ManagedDevice) and device.transport_family in {t.family for t in registries.transports})
    finally:
        device.close()


@pytest.mark.requires_kvm
def test_a_boot_imports_only_the_devices_it_has(tmp_path: Path, selftest_elf: Path, vmmkit_hypervisor: str) -> None:
    """The selftest guest with the default configuration: no disk, net, virtio console, debug
    console or pvpanic, an x86 guest. virtio-rng is always there (as in Cloud Hypervisor), so
    its implementation and the virtio SDK are loaded; nothing else of the virtio devices."""
    modules_file = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", _BOOT, str(modules_file), "--hypervisor", vmmkit_hypervisor,
         "--kernel", str(selftest_elf), "--memory", "size=128M"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: exit 0" in result.stdout
    modules = json.loads(modules_file.read_text())
    absent = (
        "vmmkit_devices.virtio._native", "vmmkit_devices.virtio.blk_io", "vmmkit_devices.virtio.block",
        "vmmkit_devices.virtio.net", "vmmkit_devices.virtio.tap", "vmmkit_devices.virtio.console",
        "vmmkit_devices.debug.console", "vmmkit_devices.debug.pvpanic", "vmmkit_devices.legacy.pl011",
        "vmmkit_devices.legacy.rtc_pl031", "vmmkit_devices.console.tty", "hashlib", "_hashlib", "termios",
        "libfdt", "vmmkit.aarch64", "vmmkit_aarch64.fdt", "vmmkit_aarch64.image", "vmmkit_aarch64.psci",
    )
    assert _matches(modules, absent) == []
    assert "vmmkit_devices.virtio.rng" in modules and "vmmkit_devices.legacy.serial" in modules
