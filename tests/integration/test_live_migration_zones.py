"""Live migration of a VM whose RAM is memory zones (issue 16), between two VMMs in one process
on a real backend with the self-test guest: every zone's RAM and its zone's virtio-mem state
arrive, the heartbeat goes on without a gap; ``local=true`` hands each shared zone's file over
(a memfd, or the zone's file at the piece's offset: a zone straddling the 32-bit hole); a
copying migration into the very file the source runs on is refused and the source goes on."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmmkit.config import VmConfig
from vmmkit.migration.protocol import MigrationError
from vmmkit.vmm import Vmm

from .test_live_migration import heartbeats, receiving, wait_for

GUEST_ARCH = "x86_64"

pytestmark = pytest.mark.requires_kvm

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def make_vmm(vmmkit_pm: Any, vmmkit_registries: Any, vmmkit_hypervisor: str) -> Iterator[Callable[[], Vmm]]:
    made: list[Vmm] = []

    def make() -> Vmm:
        vmm = Vmm(registries=vmmkit_registries, plugin_manager=vmmkit_pm, hypervisor=vmmkit_hypervisor,
                  seccomp="false")
        made.append(vmm)
        return vmm

    yield make
    for vmm in made:
        vmm.close()


def spinning(make_vmm: Callable[[], Vmm], kernel: Path, serial: Path, zones: list[str], memory: str = "size=0") -> Vmm:
    vmm = make_vmm()
    vmm.create(VmConfig.from_cli(kernel=str(kernel), cmdline="test=spin", cpus="boot=2", serial=f"file={serial}",
                                 memory=memory, memory_zones=zones))
    vmm.boot()
    wait_for(lambda: len(heartbeats(serial)) >= 2)
    return vmm


def write(vmm: Vmm, address: int, data: bytes) -> None:
    assert vmm.machine is not None and vmm.machine.memory is not None
    vmm.machine.memory.write(address, data)


def read(vmm: Vmm, address: int, size: int) -> bytes:
    assert vmm.machine is not None and vmm.machine.memory is not None
    return vmm.machine.memory.read(address, size)


def test_every_zone_arrives_by_a_copying_migration(make_vmm: Callable[[], Vmm], selftest_elf: Path,
                                                   tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    source = spinning(make_vmm, selftest_elf, serial, [
        "id=anon,size=32M", "id=memfd,size=16M,shared=on", f"id=unnamed,size=16M,file={tmp_path},shared=on",
        "id=hot,size=16M,hotplug_size=64M"], memory="size=0,hotplug_method=virtio-mem")
    source.resize_zone("hot", 16 * MiB + 32 * MiB)
    marks = {24 * MiB: b"anon zone", 40 * MiB: b"memfd zone", 56 * MiB: b"unnamed file zone",
             4 * GiB + 20 * MiB: b"hot zone's virtio-mem area"}
    for address, data in marks.items():
        write(source, address, data)
    target = make_vmm()
    path = tmp_path / "m.sock"
    thread, errors = receiving(target, f"unix:{path}", path)
    before = heartbeats(serial)
    source.send_migration(f"unix:{path}")()
    thread.join(60)
    assert not errors, errors
    assert target.state == "Running" and source.done
    for address, data in marks.items():
        assert read(target, address, len(data)) == data, hex(address)
    assert target.machine is not None
    assert target.machine.manager.counters()["_virtio-mem-hot"]["requested_size"] == 32 * MiB
    assert target.config is not None and target.config.memory.zones[3].hotplugged_size == 32 * MiB
    beats = wait_for(lambda: len(heartbeats(serial)) >= len(before) + 3 and heartbeats(serial), 120)
    assert beats == list(range(1, len(beats) + 1)), beats  # one guest: no gap, no restart


def test_a_copy_into_the_sources_own_zone_file_is_refused(make_vmm: Callable[[], Vmm], selftest_elf: Path,
                                                          tmp_path: Path) -> None:
    serial, backing = tmp_path / "serial.log", tmp_path / "zone.ram"
    source = spinning(make_vmm, selftest_elf, serial, ["id=boot,size=32M", f"id=f,size=32M,file={backing},shared=on"])
    write(source, 48 * MiB, b"the source's bytes")
    target = make_vmm()
    path = tmp_path / "m.sock"
    thread, errors = receiving(target, f"unix:{path}", path)
    with pytest.raises(MigrationError, match=r"memory zone 'f': .*zone.ram is the file the source VM runs on .*"
                                             r"local=true"):
        source.send_migration(f"unix:{path}")
    thread.join(60)
    assert errors and target.machine is None
    assert source.state == "Running"
    count = len(heartbeats(serial))
    wait_for(lambda: len(heartbeats(serial)) >= count + 2)
    with open(backing, "rb") as f:  # nothing was written over the running guest's RAM
        f.seek(16 * MiB)
        assert f.read(18) == b"the source's bytes"


def test_local_migration_hands_each_zone_file_over(make_vmm: Callable[[], Vmm], selftest_elf: Path,
                                                   tmp_path: Path) -> None:
    """``local=true``: the memfd and the zone's file go by SCM_RIGHTS; zone ``f`` straddles the
    32-bit hole, so its second piece is its file from 16 MiB on."""
    serial, backing = tmp_path / "serial.log", tmp_path / "zone.ram"
    source = spinning(make_vmm, selftest_elf, serial,
                      ["id=low,size=3056M,shared=on", f"id=f,size=32M,file={backing},shared=on"])
    assert source.machine is not None and source.machine.memory is not None
    high = source.machine.memory.find_region(4 * GiB)
    assert high is not None and high.fd is not None and high.fd_offset == 16 * MiB
    write(source, 4 * GiB + 4096, b"above the hole, in the file at 16 MiB + 4 KiB")
    target = make_vmm()
    path = tmp_path / "m.sock"
    thread, errors = receiving(target, f"unix:{path}", path)
    before = heartbeats(serial)
    source.send_migration(f"unix:{path}", local=True)()
    thread.join(60)
    assert not errors, errors
    assert read(target, 4 * GiB + 4096, 45) == b"above the hole, in the file at 16 MiB + 4 KiB"
    with open(backing, "rb") as f:
        f.seek(16 * MiB + 4096)
        assert f.read(45) == b"above the hole, in the file at 16 MiB + 4 KiB"
    write(target, 4 * GiB + 8192, b"the destination writes the same file")
    with open(backing, "rb") as f:
        f.seek(16 * MiB + 8192)
        assert f.read(36) == b"the destination writes the same file"
    beats = wait_for(lambda: len(heartbeats(serial)) >= len(before) + 3 and heartbeats(serial), 120)
    assert beats == list(range(1, len(beats) + 1)), beats
    assert json.loads(json.dumps(target.config.to_json()))["memory"]["zones"][1]["file"] == str(backing)  # type: ignore[union-attr]
