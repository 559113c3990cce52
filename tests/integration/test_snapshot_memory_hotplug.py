"""Snapshots of a VM with hot-plugged RAM (issues 15 and 16): the plugged ACPI DIMMs and
virtio-mem's region come back from the snapshot's RAM files, with the register block's and the
device's state, and the restored VM goes on (heartbeats) and can be resized further. The
configuration records RAM as resized (``memory.size`` grows with ACPI hotplug, as in Cloud
Hypervisor); the restored machine is built with the boot RAM it had."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from vmmkit.machine import Machine
from vmmkit.snapshot import open_snapshot
from vmmkit.state import SnapshotError

from .test_snapshot_restore import heartbeats, restore, spin_config, wait_for, with_serial

pytestmark = pytest.mark.requires_kvm

MiB = 1 << 20
GiB = 1 << 30
DIMM_MARK = b"a DIMM's bytes survive the snapshot"
MEM_MARK = b"virtio-mem's region survives too"


def booted(make_machine: Callable[..., Machine], hypervisor: str, kernel: Path, serial: Path,
           memory: str) -> Machine:
    machine = make_machine(spin_config(kernel, serial, memory=memory), hypervisor=hypervisor)
    machine.boot()
    assert wait_for(lambda: len(heartbeats(serial)) >= 2), serial.read_text()
    return machine


def test_acpi_dimms_come_back_from_the_snapshot(make_machine: Any, vmmkit_hypervisor: str, selftest_elf: Path,
                                                 tmp_path: Path) -> None:
    machine = booted(make_machine, vmmkit_hypervisor, selftest_elf, tmp_path / "serial.log",
                     "size=64M,hotplug_size=512M")
    assert machine.resize_memory(64 * MiB + 256 * MiB)
    assert machine.memory is not None
    dimm = machine.memory.find_region(4 * GiB)
    assert dimm is not None and dimm.size == 256 * MiB
    machine.memory.write(4 * GiB + 200 * MiB, DIMM_MARK)
    machine.pause()
    resized = attrs.evolve(machine.config, memory=attrs.evolve(machine.config.memory, size=320 * MiB))
    machine.snapshot(f"file://{tmp_path / 'snap'}", config=resized)  # what vm.resize leaves in the VMM's config
    machine.shutdown()

    serial = tmp_path / "restored.log"
    restored = restore(make_machine, tmp_path / "snap", vmmkit_hypervisor, serial)
    assert restored.config.memory.size == 64 * MiB  # built with the boot RAM it had
    assert restored.memory is not None and restored.memory_hotplug is not None
    assert restored.memory.read(4 * GiB + 200 * MiB, len(DIMM_MARK)) == DIMM_MARK
    assert restored.memory_hotplug.current == 320 * MiB
    base, length, status = restored.memory_hotplug.controller.slot(0)  # type: ignore[union-attr]
    assert (base, length, status & 1) == (4 * GiB, 256 * MiB, 1)
    assert restored.vm is not None
    assert (4 * GiB, 256 * MiB, dimm_address(restored)) in restored.vm.memory_slots()  # type: ignore[attr-defined]
    restored.resume()
    assert wait_for(lambda: len(heartbeats(serial)) >= 2), serial.read_text()
    assert restored.resize_memory(320 * MiB + 128 * MiB)  # the next DIMM goes after the restored one
    assert restored.memory.find_region(4 * GiB + 256 * MiB) is not None
    restored.shutdown()


def dimm_address(machine: Machine) -> int:
    assert machine.memory is not None
    region = machine.memory.find_region(4 * GiB)
    assert region is not None
    return region.host_address


def test_virtio_mem_comes_back_with_its_requested_size(make_machine: Any, vmmkit_hypervisor: str,
                                                       selftest_elf: Path, tmp_path: Path) -> None:
    machine = booted(make_machine, vmmkit_hypervisor, selftest_elf, tmp_path / "serial.log",
                     "size=64M,hotplug_method=virtio-mem,hotplug_size=256M,hotplugged_size=64M")
    assert machine.resize_memory(64 * MiB + 128 * MiB)
    assert machine.memory is not None
    machine.memory.write(4 * GiB + 100 * MiB, MEM_MARK)
    machine.pause()
    machine.snapshot(f"file://{tmp_path / 'snap'}")
    machine.shutdown()

    serial = tmp_path / "restored.log"
    restored = restore(make_machine, tmp_path / "snap", vmmkit_hypervisor, serial)
    assert restored.memory is not None
    assert restored.memory.read(4 * GiB + 100 * MiB, len(MEM_MARK)) == MEM_MARK
    assert restored.manager.counters()["_mem0"]["requested_size"] == 128 * MiB
    restored.resume()
    assert wait_for(lambda: len(heartbeats(serial)) >= 2), serial.read_text()
    restored.shutdown()


def test_a_snapshot_with_dimms_is_refused_without_hotplug_size(make_machine: Any, vmmkit_hypervisor: str,
                                                               selftest_elf: Path, tmp_path: Path) -> None:
    machine = booted(make_machine, vmmkit_hypervisor, selftest_elf, tmp_path / "serial.log",
                     "size=64M,hotplug_size=512M")
    assert machine.resize_memory(64 * MiB + 128 * MiB)
    machine.pause()
    machine.snapshot(f"file://{tmp_path / 'snap'}")
    machine.shutdown()
    image = open_snapshot(f"file://{tmp_path / 'snap'}")
    config = with_serial(image.config, tmp_path / "restored.log")
    config = attrs.evolve(config, memory=attrs.evolve(config.memory, hotplug_size=None))
    with pytest.raises(SnapshotError, match="saved RAM ranges"):
        restore(make_machine, tmp_path / "snap", vmmkit_hypervisor, tmp_path / "restored.log", config=config)
