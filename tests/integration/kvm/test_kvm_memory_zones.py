"""Memory zones on real /dev/kvm with the self-test guest: guest RAM made of two zones is one
memory map to the guest (the same e820 RAM it sees with ``--memory size=`` of the same total),
each zone is its own KVM slot, and a file-backed ``shared=on`` zone holds what the VMM wrote into
guest RAM (the kernel command line at 0x20000), a ``shared=off`` one does not. With
``hotplug_method=virtio-mem`` a zone's ``hotplug_size`` is a virtio-mem device of its own that
``resize_zone`` drives. (The self-test guest has no virtio-mem driver: Linux plugging blocks
is tests/linux/test_linux_memory_hotplug.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

import vmmkit
from vmmkit.config import ConfigError

pytestmark = pytest.mark.requires_kvm

MiB = 1 << 20
GiB = 1 << 30
CMDLINE_START = 0x20000  # vmmkit_x86_64.layout: where the VMM writes the kernel command line
CMDLINE = "hello zones"


def memory_map(serial: str) -> list[str]:
    """The guest's ``selftest: info memmap`` and ``ram`` lines."""
    return [line for line in serial.splitlines() if line.startswith(("selftest: info memmap", "selftest: info ram"))]


def test_two_zones_are_one_memory_map_and_a_shared_file_zone_holds_guest_ram(tmp_path: Path) -> None:
    shared, private = tmp_path / "z0.ram", tmp_path / "z1.ram"
    with vmmkit.Vm(kernel=vmmkit.demo_kernel(), cmdline=CMDLINE, memory="size=0", hypervisor="kvm",
                   memory_zones=[f"id=z0,size=64M,file={shared},shared=on", f"id=z1,size=64M,file={private}"]) as vm:
        machine = vm.machine
        machine.build()
        assert machine.vm is not None and machine.memory is not None
        slots = machine.vm.memory_slots()  # type: ignore[attr-defined]
        for region, start in zip(machine.memory.regions, (0, 64 * MiB), strict=True):
            assert (region.start, region.size) == (start, 64 * MiB)
            assert (start, 64 * MiB, region.host_address) in slots
        vm.start()
        zoned = vm.wait(timeout=120)
    assert zoned.ok, (zoned.reason, zoned.serial[-2000:])
    with vmmkit.Vm(kernel=vmmkit.demo_kernel(), cmdline=CMDLINE, memory="size=128M", hypervisor="kvm") as vm:
        vm.start()
        plain = vm.wait(timeout=120)
    assert plain.ok, (plain.reason, plain.serial[-2000:])
    seen = memory_map(zoned.serial)
    assert any("ram" in line for line in seen) and seen == memory_map(plain.serial), (seen, memory_map(plain.serial))
    assert "selftest: ok memmap" in zoned.serial
    with open(shared, "rb") as image:
        image.seek(CMDLINE_START)
        assert image.read(len(CMDLINE) + 1) == CMDLINE.encode() + b"\0"
    assert private.stat().st_size == 64 * MiB and private.read_bytes().count(0) == 64 * MiB  # writes stayed private


def test_a_zone_hotplug_size_is_a_virtio_mem_device_of_its_own() -> None:
    with vmmkit.Vm(kernel=vmmkit.demo_kernel(), cmdline="hello", memory="size=0,hotplug_method=virtio-mem",
                   hypervisor="kvm", memory_zones=["id=boot,size=128M", "id=z1,size=64M,hotplug_size=128M",
                                                   "id=z2,size=0,hotplug_size=64M,hotplugged_size=32M"]) as vm:
        machine = vm.machine
        machine.build()
        assert machine.memory is not None
        z1, z2 = (machine.memory.find_region(start) for start in (4 * GiB, 4 * GiB + 128 * MiB))
        assert z1 is not None and z1.size == 128 * MiB and z2 is not None and z2.size == 64 * MiB
        counters = machine.manager.counters()
        assert counters["_virtio-mem-z1"]["requested_size"] == 0
        assert counters["_virtio-mem-z2"]["requested_size"] == 32 * MiB
        assert machine.resize_zone("z1", 64 * MiB + 96 * MiB)
        assert machine.manager.counters()["_virtio-mem-z1"]["requested_size"] == 96 * MiB
        assert machine.manager.counters()["_virtio-mem-z2"]["requested_size"] == 32 * MiB  # the other zone: as it was
        assert machine.resize_zone("z2", 0)  # virtio-mem may shrink: the driver unplugs
        assert not machine.resize_zone("z2", 0)
        with pytest.raises(ConfigError, match="2 MiB"):
            machine.resize_zone("z1", 64 * MiB + MiB)
        with pytest.raises(ConfigError, match="64 MiB to 192 MiB"):
            machine.resize_zone("z1", 256 * MiB)
        for zone in ("boot", "nope"):
            with pytest.raises(ConfigError, match="a zone with a hotplug_size"):
                machine.resize_zone(zone, 128 * MiB)
        vm.start()
        result = vm.wait(timeout=120)
    assert result.ok, (result.reason, result.serial[-2000:])
