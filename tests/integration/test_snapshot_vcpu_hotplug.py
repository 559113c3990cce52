"""vCPU hotplug on a restored VM (issue #21: Kata Containers restores a sandbox from a template
VM's snapshot, then resizes it): the restored machine was never booted by this process, and a
hot-added vCPU takes the configuration's CPUID and topology without the boot's BootInfo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmmkit.config import VmConfig

from .test_snapshot_restore import heartbeats, restore, snapshot_of, wait_for

pytestmark = pytest.mark.requires_kvm


def test_a_restored_vm_takes_a_hot_added_vcpu(make_machine: Any, vmmkit_hypervisor: str, selftest_elf: Path,
                                              tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    config = VmConfig.from_cli(kernel=str(selftest_elf), cmdline="test=spin", cpus="boot=1,max=2",
                               memory="size=64M", serial=f"file={serial}")
    machine = make_machine(config, hypervisor=vmmkit_hypervisor)
    machine.boot()
    assert wait_for(lambda: len(heartbeats(serial)) >= 2), serial.read_text()
    snapshot_of(machine, tmp_path / "snap")
    machine.shutdown()

    restored_serial = tmp_path / "restored.log"
    restored = restore(make_machine, tmp_path / "snap", vmmkit_hypervisor, restored_serial)
    restored.resume()
    assert wait_for(lambda: len(heartbeats(restored_serial)) >= 2), restored_serial.read_text()
    restored.resize_vcpus(2)  # was an AssertionError (no BootInfo on a restored machine)
    assert restored.config.cpus.boot_vcpus == 2 and len(restored.vcpus) == 2
    assert wait_for(lambda: len(heartbeats(restored_serial)) >= 4), "the guest stopped after the vCPU was added"
    restored.shutdown()
