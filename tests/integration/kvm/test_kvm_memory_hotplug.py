"""ACPI memory hotplug on real /dev/kvm: a DIMM plugged into a built VM becomes a KVM memory slot
above 4 GiB that the host writes through guest memory, and the self-test guest then boots and
passes with the memory hotplug registers in its DSDT and the extra slot. (The guest cannot run
AML: Linux using the DIMM is tests/linux/test_linux_memory_hotplug.py.)"""

from __future__ import annotations

import pytest

import vmmkit
from vmmkit.config import ConfigError

pytestmark = pytest.mark.requires_kvm

MiB = 1 << 20
GiB = 1 << 30


def test_a_dimm_is_a_kvm_slot_and_the_guest_still_boots() -> None:
    with vmmkit.Vm(kernel=vmmkit.demo_kernel(), cmdline="hello", memory="size=128M,hotplug_size=512M",
                   hypervisor="kvm") as vm:
        machine = vm.machine
        machine.build()
        assert machine.resize_memory(256 * MiB)
        assert machine.vm is not None and machine.memory is not None
        slots = machine.vm.memory_slots()  # type: ignore[attr-defined]
        dimm = machine.memory.find_region(4 * GiB)
        assert dimm is not None and (4 * GiB, 128 * MiB, dimm.host_address) in slots
        machine.memory.write_u64(4 * GiB + 128 * MiB - 8, 0x5A5A_1234)
        assert machine.memory.read_u64(4 * GiB + 128 * MiB - 8) == 0x5A5A_1234
        with pytest.raises(ConfigError, match="128 MiB"):
            machine.resize_memory(256 * MiB + 4096)
        vm.start()
        result = vm.wait(timeout=120)
    assert result.ok, (result.reason, result.serial[-2000:])


def test_virtio_mem_maps_its_region_at_boot_and_a_resize_sets_the_requested_size() -> None:
    with vmmkit.Vm(kernel=vmmkit.demo_kernel(), cmdline="hello",
                   memory="size=128M,hotplug_method=virtio-mem,hotplug_size=256M,hotplugged_size=64M",
                   hypervisor="kvm") as vm:
        machine = vm.machine
        machine.build()
        assert machine.vm is not None and machine.memory is not None
        region = machine.memory.find_region(4 * GiB)
        assert region is not None and region.size == 256 * MiB
        assert (4 * GiB, 256 * MiB, region.host_address) in machine.vm.memory_slots()  # type: ignore[attr-defined]
        mem = machine.manager.get("_mem0")
        counters = machine.manager.counters()["_mem0"]
        assert counters["requested_size"] == 64 * MiB and counters["plugged_size"] == 0, counters
        assert machine.resize_memory(128 * MiB + 192 * MiB)
        assert machine.manager.counters()["_mem0"]["requested_size"] == 192 * MiB
        assert machine.resize_memory(128 * MiB)  # virtio-mem may shrink: the driver unplugs
        with pytest.raises(ConfigError, match="2 MiB"):
            machine.resize_memory(128 * MiB + MiB)
        with pytest.raises(ConfigError, match="128 MiB to 384 MiB"):
            machine.resize_memory(64 * MiB)
        assert mem.kind in ("virtio-pci", "virtio-mmio")
        vm.start()
        result = vm.wait(timeout=120)
    assert result.ok, (result.reason, result.serial[-2000:])
