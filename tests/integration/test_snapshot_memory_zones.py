"""Snapshots of a VM whose RAM is memory zones (issues 16 and 21), on a real backend with the
self-test guest: every zone's RAM comes back (an anonymous zone, a memfd zone, a zone backed by
a shared file, a zone's virtio-mem area with its requested size), the heartbeat goes on without
a gap, and, as Cloud Hypervisor does, a shared file zone's RAM is not copied into the snapshot:
the file holds it, and a restore maps it again (copy-on-write once ``config.json`` says
``shared: false``, as Kata Containers edits a VM template's). A damaged zone (its file
truncated, its RAM file truncated, its file gone from the configuration) is refused before
anything is built."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from vmmkit_devices.virtio.mem import REQ_PLUG, REQ_STATE, RESP_ACK, STATE_PLUGGED, STATE_UNPLUGGED

from vmmkit.config import VmConfig
from vmmkit.machine import Machine, MachineState
from vmmkit.snapshot import open_snapshot
from vmmkit.state import SnapshotError

from .test_snapshot_restore import heartbeats, restore, wait_for, with_serial

GUEST_ARCH = "x86_64"

pytestmark = pytest.mark.requires_kvm

MiB = 1 << 20
GiB = 1 << 30
#: Guest addresses inside each zone the self-test guest never touches (it lives in its first MiBs).
MARKS = {"anon": 24 * MiB, "file": 40 * MiB, "memfd": 56 * MiB, "hot": 4 * GiB + 10 * MiB}
#: Where the zone ``hot``'s plugged blocks start (its virtio-mem area starts at 4 GiB).
PLUGGED = 4 * GiB + 4 * MiB


def zoned_config(kernel: Path, serial: Path, backing: Path) -> VmConfig:
    return VmConfig.from_cli(
        kernel=str(kernel), cmdline="test=spin", cpus="boot=2", serial=f"file={serial}",
        memory="size=0,hotplug_method=virtio-mem",
        memory_zones=["id=anon,size=32M", f"id=file,size=16M,file={backing},shared=on", "id=memfd,size=16M,shared=on",
                      "id=hot,size=16M,hotplug_size=64M,hotplugged_size=16M"])


def booted(make_machine: Callable[..., Machine], hypervisor: str, config: VmConfig, serial: Path) -> Machine:
    machine = make_machine(config, hypervisor=hypervisor)
    machine.boot()
    assert wait_for(lambda: len(heartbeats(serial)) >= 2), serial.read_text()
    return machine


def mark(zone: str) -> bytes:
    return f"zone {zone} keeps its bytes".encode()


@pytest.fixture
def template(make_machine: Callable[..., Machine], vmmkit_hypervisor: str, selftest_elf: Path,
             tmp_path: Path) -> tuple[Path, Path, int]:
    """A spinning zoned VM, marked in every zone, resized, paused and snapshotted; the
    snapshot directory, the file zone's backing file and the last heartbeat."""
    serial, backing = tmp_path / "serial.log", tmp_path / "template.ram"
    machine = booted(make_machine, vmmkit_hypervisor, zoned_config(selftest_elf, serial, backing), serial)
    assert machine.memory is not None
    assert machine.resize_zone("hot", 16 * MiB + 48 * MiB)
    # three 2 MiB blocks plugged, as the guest's virtio-mem driver asks (the test guest has none)
    assert machine.manager.get("_virtio-mem-hot").device.device.handle(REQ_PLUG, PLUGGED, 3) == (RESP_ACK, 0)
    for zone, address in MARKS.items():
        machine.memory.write(address, mark(zone))
    machine.pause()
    resized = machine.config.memory.zones[3]
    config = attrs.evolve(machine.config, memory=attrs.evolve(machine.config.memory, zones=(
        *machine.config.memory.zones[:3], attrs.evolve(resized, hotplugged_size=48 * MiB))))
    machine.snapshot(f"file://{tmp_path / 'snap'}", config=config)  # what vm.resize-zone leaves in the config
    last = heartbeats(serial)[-1]
    machine.shutdown()
    machine.close()
    return tmp_path / "snap", backing, last


def test_every_zone_comes_back_and_the_heartbeat_goes_on(template: tuple[Path, Path, int], make_machine: Any,
                                                         vmmkit_hypervisor: str, tmp_path: Path) -> None:
    directory, backing, last = template
    state = json.loads((directory / "state.json").read_text())
    memory = {entry.get("zone"): entry for entry in state["memory"]}
    assert set(memory) == {"anon", "file", "memfd", "hot"}
    # the shared file zone's RAM stays in its file (Cloud Hypervisor's SkipPersisted); the others are copied
    assert memory["file"]["file"] is None and memory["file"]["zone_file"] == str(backing)
    assert memory["file"]["zone_offset"] == 0 and memory["file"]["size"] == 16 * MiB
    assert all(memory[z]["file"] == f"memory-{memory[z]['slot']}.bin" for z in ("anon", "memfd", "hot"))
    assert not (directory / f"memory-{memory['file']['slot']}.bin").exists()
    with open(backing, "rb") as f:
        f.seek(MARKS["file"] - 32 * MiB)
        assert f.read(len(mark("file"))) == mark("file")
    assert state["zone_hotplug"]["hot"]["requested"] == 48 * MiB

    serial = tmp_path / "restored.log"
    restored = restore(make_machine, directory, vmmkit_hypervisor, serial)
    assert restored.state is MachineState.PAUSED and restored.memory is not None
    for zone, address in MARKS.items():
        assert restored.memory.read(address, len(mark(zone))) == mark(zone), zone
    assert restored.manager.counters()["_virtio-mem-hot"]["requested_size"] == 48 * MiB
    assert restored.manager.counters()["_virtio-mem-hot"]["plugged_size"] == 6 * MiB
    device = restored.manager.get("_virtio-mem-hot").device.device  # the transport's virtio device
    assert device.handle(REQ_STATE, PLUGGED, 3) == (RESP_ACK, STATE_PLUGGED)
    assert device.handle(REQ_STATE, PLUGGED + 6 * MiB, 1) == (RESP_ACK, STATE_UNPLUGGED)
    restored.resume()
    assert wait_for(lambda: len(heartbeats(serial)) >= 2), serial.read_text()
    assert heartbeats(serial)[:2] == [last + 1, last + 2]  # no gap, no restart
    # shared=on as saved: the restored guest's RAM is the file again
    restored.memory.write(MARKS["file"] + 4096, b"written after the restore")
    with open(backing, "rb") as f:
        f.seek(MARKS["file"] - 32 * MiB + 4096)
        assert f.read(25) == b"written after the restore"
    assert restored.resize_zone("hot", 16 * MiB + 32 * MiB)  # the zone's requested size came back: 48 -> 32 MiB
    assert restored.manager.counters()["_virtio-mem-hot"]["requested_size"] == 32 * MiB
    restored.shutdown()


def test_kata_template_edit_restores_copy_on_write_twice(template: tuple[Path, Path, int], make_machine: Any,
                                                         vmmkit_hypervisor: str, tmp_path: Path) -> None:
    """Kata's ``save_vm``: ``memory.shared`` and every zone's ``shared`` set to false in
    config.json; each sandbox gets config.json and state.json only (``prepare_restore_files``)
    and maps the template's file privately: two sandboxes run from one file, which stays as it was."""
    directory, backing, last = template
    config = json.loads((directory / "config.json").read_text())
    config["memory"]["shared"] = False
    for zone in config["memory"]["zones"]:
        zone["shared"] = False
    (directory / "config.json").write_text(json.dumps(config))
    before = backing.read_bytes()
    sandboxes = []
    for name in ("one", "two"):
        sandbox = tmp_path / name
        sandbox.mkdir()
        for file in ("config.json", "state.json"):
            shutil.copy2(directory / file, sandbox / file)
        with pytest.raises(SnapshotError, match=r"memory-\d+.bin: missing"):  # the anon zone's RAM was copied
            open_snapshot(f"file://{sandbox}")
        for ram in directory.glob("memory-*.bin"):
            shutil.copy2(ram, sandbox / ram.name)
        serial = tmp_path / f"{name}.log"
        machine = restore(make_machine, sandbox, vmmkit_hypervisor, serial)
        assert machine.memory is not None
        assert machine.memory.read(MARKS["file"], len(mark("file"))) == mark("file")
        machine.resume()
        assert wait_for(lambda log=serial: len(heartbeats(log)) >= 2), serial.read_text()  # type: ignore[misc]
        assert heartbeats(serial)[:2] == [last + 1, last + 2]
        machine.memory.write(MARKS["file"], f"sandbox {name} writes its own copy".encode())
        sandboxes.append(machine)
    assert sandboxes[0].memory is not None and sandboxes[1].memory is not None
    assert sandboxes[0].memory.read(MARKS["file"], 14) == b"sandbox one wr"
    assert sandboxes[1].memory.read(MARKS["file"], 14) == b"sandbox two wr"
    assert backing.read_bytes() == before  # copy-on-write: the template's file is only read
    for machine in sandboxes:
        machine.shutdown()


def _truncate_backing(directory: Path, backing: Path) -> None:
    with open(backing, "r+b") as f:
        f.truncate(8 * MiB)


def _truncate_zone_ram(directory: Path, backing: Path) -> None:
    state = json.loads((directory / "state.json").read_text())
    name = next(entry["file"] for entry in state["memory"] if entry.get("zone") == "memfd")
    with open(directory / name, "r+b") as f:
        f.truncate(4096)


def _backing_removed_from_config(directory: Path, backing: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    del config["memory"]["zones"][1]["file"]
    (directory / "config.json").write_text(json.dumps(config))


def _backing_deleted(directory: Path, backing: Path) -> None:
    backing.unlink()


@pytest.mark.parametrize(("damage", "message"), [
    (_truncate_backing, r"memory zone 'file': its RAM lives in .*template.ram, which holds 8388608 bytes; "
                        r"the snapshot needs 16777216 \(truncated"),
    (_truncate_zone_ram, r"memory-\d+.bin: 4096 bytes, the manifest says 16777216 \(truncated or damaged\)"),
    (_backing_removed_from_config, r"memory zone 'file': its RAM .* was left in the zone's file, but config.json "
                                   r"gives the zone no file="),
    (_backing_deleted, r"memory zone 'file': its RAM lives in .*template.ram, which cannot be read: No such file"),
], ids=["zone-file-truncated", "zone-ram-truncated", "zone-file-dropped", "zone-file-deleted"])
def test_a_damaged_zone_is_refused_before_anything_runs(template: tuple[Path, Path, int], make_machine: Any,
                                                        vmmkit_hypervisor: str, tmp_path: Path,
                                                        damage: Callable[[Path, Path], None], message: str) -> None:
    directory, backing, _last = template
    damage(directory, backing)
    with pytest.raises(SnapshotError, match=message):
        open_snapshot(f"file://{directory}")


def test_state_json_alone_is_checked_by_its_own_seal(template: tuple[Path, Path, int], tmp_path: Path) -> None:
    """Without snapshot.json (Kata copies config.json and state.json only), state.json's own
    manifest refuses an edited state."""
    directory, _backing, _last = template
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    for file in directory.iterdir():
        if file.name != "snapshot.json":
            shutil.copy2(file, sandbox / file.name)
    image = open_snapshot(f"file://{sandbox}")
    assert [kept.zone for kept in image.persisted] == ["file"]
    text = (sandbox / "state.json").read_text()
    at = text.index('"rip": ') + len('"rip": ')
    (sandbox / "state.json").write_text(text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1:])
    with pytest.raises(SnapshotError, match=r"state.json: checksum mismatch"):
        open_snapshot(f"file://{sandbox}")


def test_a_restore_refused_for_a_zone_builds_nothing(template: tuple[Path, Path, int], make_machine: Any,
                                                     vmmkit_hypervisor: str, tmp_path: Path) -> None:
    """The refusal also holds when the configuration is edited after the snapshot was opened
    (the machine's own mapping checks the file again): no vCPU runs."""
    directory, backing, _last = template
    image = open_snapshot(f"file://{directory}")
    _truncate_backing(directory, backing)
    serial = tmp_path / "refused.log"
    machine = make_machine(with_serial(image.config, serial), hypervisor=vmmkit_hypervisor)
    with pytest.raises(SnapshotError, match="which holds 8388608 bytes"):
        machine.build(restore=attrs.evolve(image, config=with_serial(image.config, serial)))
    assert machine.vcpus == [] and (not serial.exists() or "heartbeat" not in serial.read_text())
