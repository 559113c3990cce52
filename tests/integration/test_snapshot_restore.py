"""Snapshot and restore on a real backend (issue 16): the self-test guest's heartbeat and every
CPU go on where they were, virtio devices keep working, the snapshot directory is checked
before anything runs, and a device that cannot be saved is named."""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from vmmkit import hookimpl
from vmmkit.config import VmConfig
from vmmkit.device import Device, DeviceRequest, DeviceType
from vmmkit.machine import Machine, MachineState
from vmmkit.snapshot import open_snapshot
from vmmkit.state import NotSnapshottable, SnapshotError

GUEST_ARCH = "x86_64"  # what vmmkit_hypervisor resolves for (see vmmkit.testing)

pytestmark = pytest.mark.requires_kvm


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def heartbeats(serial: Path) -> list[int]:
    return [int(line.split()[-1]) for line in serial.read_text(errors="replace").splitlines()
            if line.startswith("selftest: heartbeat ") and line.split()[-1].isdigit()]  # not a line half written


def spin_config(kernel: Path, serial: Path, **extra: Any) -> VmConfig:
    return VmConfig.from_cli(kernel=str(kernel), cmdline=extra.pop("cmdline", "test=spin"), cpus="boot=2",
                             memory=extra.pop("memory", "size=64M"), serial=f"file={serial}", **extra)


def with_serial(config: VmConfig, serial: Path) -> VmConfig:
    """The restored VM's configuration with its serial output in a file of its own."""
    return attrs.evolve(config, serial=VmConfig.from_cli(serial=f"file={serial}").serial)


def snapshot_of(machine: Machine, directory: Path) -> Path:
    machine.pause()
    machine.snapshot(f"file://{directory}")
    return directory


def restore(make_machine: Callable[..., Machine], directory: Path, hypervisor: str, serial: Path,
            config: VmConfig | None = None) -> Machine:
    image = open_snapshot(f"file://{directory}")
    image = attrs.evolve(image, config=config or with_serial(image.config, serial))
    machine = make_machine(image.config, hypervisor=hypervisor)
    machine.build(restore=image)
    machine.start_paused()
    return machine


def ap_stack_page(machine: Machine) -> tuple[int, bytes]:
    """The page holding vCPU 1's stack pointer (the self-test guest maps memory 1:1), where its
    ``spin_forever`` loop keeps its volatile counter."""
    rsp = machine.vcpus[1].get_regs().rsp  # type: ignore[attr-defined]
    page = rsp & ~0xFFF
    assert machine.memory is not None
    return page, machine.memory.read(page, 0x1000)


def counters_that_grew(before: bytes, after: bytes) -> dict[int, tuple[int, int]]:
    old = struct.unpack("<512Q", before)
    new = struct.unpack("<512Q", after)
    return {slot * 8: (a, b) for slot, (a, b) in enumerate(zip(old, new, strict=True)) if b > a + 1000}


@pytest.fixture
def spinning(make_machine: Callable[..., Machine], vmmkit_hypervisor: str, selftest_elf: Path,
             tmp_path: Path) -> Iterator[tuple[Machine, Path]]:
    serial = tmp_path / "serial.log"
    machine = make_machine(spin_config(selftest_elf, serial), hypervisor=vmmkit_hypervisor)
    machine.boot()
    assert wait_for(lambda: len(heartbeats(serial)) >= 2), serial.read_text()
    yield machine, serial
    if machine.state is not MachineState.SHUTDOWN:
        machine.shutdown()


def test_the_heartbeat_and_every_cpu_go_on_after_restore(spinning: tuple[Machine, Path], make_machine: Any,
                                                         vmmkit_hypervisor: str, tmp_path: Path) -> None:
    machine, serial = spinning
    snapshot_of(machine, tmp_path / "snap")
    last = heartbeats(serial)[-1]
    page, at_snapshot = ap_stack_page(machine)
    machine.shutdown()
    machine.close()

    serial2 = tmp_path / "serial2.log"
    restored = restore(make_machine, tmp_path / "snap", vmmkit_hypervisor, serial2)
    assert restored.state is MachineState.PAUSED
    assert ap_stack_page(restored) == (page, at_snapshot)  # the AP is where it was, its counter too
    restored.resume()
    assert wait_for(lambda: len(heartbeats(serial2)) >= 2), serial2.read_text()
    beats = heartbeats(serial2)
    assert beats[:2] == [last + 1, last + 2]  # no gap, no restart
    assert "selftest: vmmkit x86_64 selftest v1" not in serial2.read_text()
    restored.pause()
    grown = counters_that_grew(at_snapshot, ap_stack_page(restored)[1])
    assert grown, "vCPU 1's spin counter did not advance after the restore"
    assert all(before > 0 for before, _after in grown.values())  # it went on from its value, not from 0
    restored.shutdown()


def test_a_running_vm_is_not_snapshotted(spinning: tuple[Machine, Path], tmp_path: Path) -> None:
    machine, _serial = spinning
    with pytest.raises(Exception, match="cannot snapshot a VM that is Running"):
        machine.snapshot(f"file://{tmp_path}/snap")
    assert not (tmp_path / "snap").exists()


def test_a_directory_holding_a_snapshot_is_not_overwritten(spinning: tuple[Machine, Path], tmp_path: Path) -> None:
    machine, _serial = spinning
    snapshot_of(machine, tmp_path / "snap")
    with pytest.raises(SnapshotError, match="already holds a snapshot"):
        machine.snapshot(f"file://{tmp_path}/snap")
    with pytest.raises(SnapshotError, match="not a file:///<directory> URL"):
        machine.snapshot(f"http://{tmp_path}/other")


# -- damaged or mismatched snapshots ---------------------------------------------------------------


@pytest.fixture
def snapshot_dir(spinning: tuple[Machine, Path], tmp_path: Path) -> Path:
    machine, _serial = spinning
    directory = snapshot_of(machine, tmp_path / "snap")
    machine.shutdown()
    return directory


def _edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _truncate_memory(directory: Path) -> None:
    with open(directory / "memory-0.bin", "r+b") as memory:
        memory.truncate(4096)


def _edit_state(directory: Path) -> None:
    """One digit changed, the size kept: only the checksum can tell."""
    path = directory / "state.json"
    text = path.read_text()
    at = text.index('"rip": ') + len('"rip": ')
    digit = "1" if text[at] != "1" else "2"
    path.write_text(text[:at] + digit + text[at + 1:])


def _other_version(directory: Path) -> None:
    _edit_json(directory / "snapshot.json", lambda m: m.update(version=99))


def _drop_state(directory: Path) -> None:
    (directory / "state.json").unlink()


def _resealed(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """An edit of state.json whose checksum is then fixed in the manifest too (a forged or
    buggy snapshot): the pieces' own checks must catch it."""
    def edit(directory: Path) -> None:
        import hashlib

        _edit_json(directory / "state.json", change)
        data = (directory / "state.json").read_bytes()

        def reseal(manifest: dict[str, Any]) -> None:
            manifest["files"]["state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

        _edit_json(directory / "snapshot.json", reseal)

    return edit


@pytest.mark.parametrize(("damage", "message"), [
    (_truncate_memory, r"memory-0.bin: 4096 bytes, the manifest says 67108864 \(truncated or damaged\)"),
    (_edit_state, r"state.json: checksum mismatch"),
    (_other_version, r"snapshot format version 99; this vmmkit .* restores version 1"),
    (_drop_state, r"state.json: missing"),
    (_resealed(lambda s: s["devices"][0].update(version=7)), r"device _serial \(serial-16550\): state version 7"),
    (_resealed(lambda s: s["vcpus"].pop()), r"1 vCPUs in the snapshot, the configuration makes 2"),
    (_resealed(lambda s: s["vcpus"][0]["state"]["regs"].update(rip="x")), r"vcpu0.regs.rip: expected int"),
    (_resealed(lambda s: s["devices"][0]["state"].update(ier=True)), r"_serial.ier: True is not a valid int"),
], ids=["truncated-memory", "edited-state", "other-version", "missing-state", "device-version", "vcpu-count",
        "bad-register", "bad-device-field"])
def test_a_damaged_snapshot_is_refused_before_anything_runs(snapshot_dir: Path, make_machine: Any,
                                                            vmmkit_hypervisor: str, tmp_path: Path,
                                                            damage: Callable[[Path], None], message: str) -> None:
    damage(snapshot_dir)
    serial = tmp_path / "refused.log"
    with pytest.raises(SnapshotError, match=message):
        restore(make_machine, snapshot_dir, vmmkit_hypervisor, serial)
    assert not serial.exists() or "heartbeat" not in serial.read_text()


# -- virtio devices ----------------------------------------------------------------------------------


def test_virtio_blk_and_console_keep_working_after_restore(make_machine: Any, vmmkit_hypervisor: str,
                                                         selftest_elf: Path, tmp_path: Path) -> None:
    """The snapshot is taken while the guest's blkbench has requests going through the live
    virtio-blk device (DRIVER_OK, its rings in use); after the restore the run goes on through
    the restored rings to ``ok blkbench`` with every request's status checked by the guest, and
    the virtio console, set up by the guest after the restore, delivers its line."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as image:
        image.truncate(64 << 20)
    serial, console = tmp_path / "serial.log", tmp_path / "console.log"
    config = spin_config(selftest_elf, serial, cmdline="test=blkbench,console blkbench.total=16M",
                         disks=[f"path={disk}"], console=f"file={console}")
    machine = make_machine(config, hypervisor=vmmkit_hypervisor)
    machine.boot()
    transport = machine.manager.get("_disk0").device

    def in_use() -> bool:
        # The device's counters, not the queue's position: the C queue keeps the ring position
        # to itself while it serves, and hands it back to the Virtqueue when paused.
        return transport.core.active and bool(transport.virtqueues) and \
            transport.device.counters().get("write_ops", 0) > 0
    assert wait_for(in_use), serial.read_text()
    snapshot_of(machine, tmp_path / "snap")
    assert "ok blkbench" not in serial.read_text(), "blkbench ended before the snapshot: use more blkbench.total"
    saved = transport.virtqueues[0].position()
    assert transport.core.active
    machine.shutdown()
    machine.close()

    serial2 = tmp_path / "serial2.log"
    restored = restore(make_machine, tmp_path / "snap", vmmkit_hypervisor, serial2)
    restored_transport = restored.manager.get("_disk0").device
    assert restored_transport.core.active
    assert restored_transport.virtqueues[0].position() == saved
    restored.resume()
    assert wait_for(lambda: "selftest: ok console" in serial2.read_text(), timeout=180), serial2.read_text()
    text = serial2.read_text()
    assert "selftest: ok blkbench" in text and "FAIL" not in text, text
    assert "selftest: vmmkit x86_64 selftest v1" not in text
    assert "vmmkit virtio-console says hello" in console.read_text()
    restored.shutdown()


# -- a third-party device --------------------------------------------------------------------------


class CounterDevice(Device):
    """A port that counts the guest's writes: a plugin's device with state."""

    kind = "test-counter"

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id)
        self.count = 0

    def read(self, offset: int, size: int) -> bytes:
        return self.count.to_bytes(4, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.count += 1


class SnapshottableCounter(CounterDevice):
    """The same device taking part in snapshots: two methods and a version."""

    state_version = 3

    def save_state(self) -> dict[str, Any]:
        return {"count": self.count}

    def restore_state(self, state: Any) -> None:
        self.count = int(state["count"])


def _counter_plugin(device_class: type[CounterDevice]) -> Any:
    class CounterType(DeviceType):
        name = "test-counter"

        @classmethod
        def create(cls, ctx: Any, request: DeviceRequest) -> Any:
            return device_class(request.id)

    class Plugin:
        @hookimpl
        def vmmkit_register_devices(self, registry: Any) -> None:
            registry.add(CounterType)

        @hookimpl
        def vmmkit_platform_devices(self, machine: Any) -> Any:
            return [DeviceRequest("test-counter", "_counter", pio=(0x520, 1))]

    return Plugin()


@pytest.fixture
def counter_class() -> type[CounterDevice] | None:
    """The plugin device the VM gets (parametrized by the tests that want one)."""
    return None


@pytest.fixture
def vmmkit_plugins(vmmkit_builtin_plugins: list[Any], counter_class: type[CounterDevice] | None) -> list[Any]:
    extra = [_counter_plugin(counter_class)] if counter_class is not None else []
    return [*vmmkit_builtin_plugins, *extra]


@pytest.mark.parametrize("counter_class", [CounterDevice])
def test_a_device_without_the_contract_makes_the_snapshot_fail_with_its_name(
        spinning: tuple[Machine, Path], tmp_path: Path) -> None:
    machine, _serial = spinning
    machine.pause()
    with pytest.raises(NotSnapshottable, match=r"device _counter \(test-counter, CounterDevice\) does not "
                                               r"implement the snapshot contract"):
        machine.snapshot(f"file://{tmp_path}/snap")
    assert not (tmp_path / "snap" / "snapshot.json").exists()


@pytest.mark.parametrize("counter_class", [SnapshottableCounter])
def test_a_third_party_device_takes_part_with_two_methods(spinning: tuple[Machine, Path], make_machine: Any,
                                                          vmmkit_hypervisor: str, tmp_path: Path) -> None:
    machine, _serial = spinning
    machine.manager.get("_counter").device.count = 41
    snapshot_of(machine, tmp_path / "snap")
    machine.shutdown()
    state = json.loads((tmp_path / "snap" / "state.json").read_text())
    (entry,) = [d for d in state["devices"] if d["id"] == "_counter"]
    assert entry["version"] == 3 and entry["state"] == {"count": 41}
    restored = restore(make_machine, tmp_path / "snap", vmmkit_hypervisor, tmp_path / "s2.log")
    assert restored.manager.get("_counter").device.count == 41
    restored.shutdown()


def test_the_snapshot_directory_is_what_the_docstring_says(snapshot_dir: Path) -> None:
    names = sorted(path.name for path in snapshot_dir.iterdir())
    assert names == ["config.json", "memory-0.bin", "snapshot.json", "state.json"]
    state = json.loads((snapshot_dir / "state.json").read_text())
    assert set(state) == {"arch", "hypervisor", "vm", "vcpus", "devices", "memory", "snapshot"}
    assert state["snapshot"]["format"] == "vmmkit-snapshot" and len(state["snapshot"]["sha256"]) == 64
    assert state["memory"] == [{"slot": 0, "start": 0, "size": 64 << 20, "file": "memory-0.bin"}]
    # RAM the guest never touched is a hole in the file, not 64 MiB of zeros written out
    assert (snapshot_dir / "memory-0.bin").stat().st_blocks * 512 < 32 << 20
    shutil.rmtree(snapshot_dir)


# -- memory: mapped, not read ----------------------------------------------------------------------


def _mapping_of(path: Path) -> tuple[int, int]:
    """(size, resident bytes) of this process's mappings of ``path`` (/proc/self/smaps)."""
    size = rss = 0
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[:1] == ["Size:"]:
            size += int(fields[1]) * 1024
        elif inside and fields[:1] == ["Rss:"]:
            rss += int(fields[1]) * 1024
    return size, rss


@pytest.mark.parametrize("prefault", [False, True], ids=["on-demand", "prefault"])
def test_memory_is_mapped_from_the_snapshot_not_read(snapshot_dir: Path, make_machine: Any, vmmkit_hypervisor: str,
                                                     tmp_path: Path, prefault: bool) -> None:
    """The restore maps the memory file copy-on-write: only what is touched becomes resident
    (so restore time does not grow with untouched RAM); ``prefault=on`` populates it all."""
    image = open_snapshot(f"file://{snapshot_dir}")
    image = attrs.evolve(image, config=with_serial(image.config, tmp_path / "s.log"))
    machine = make_machine(image.config, hypervisor=vmmkit_hypervisor)
    machine.build(restore=image, prefault=prefault)
    memory_file = snapshot_dir / "memory-0.bin"
    size, rss = _mapping_of(memory_file)
    assert size == 64 << 20
    if prefault:
        assert rss == 64 << 20
    else:
        assert rss < 8 << 20, rss  # at most the pages the restore itself looked at
    machine.close()
    assert _mapping_of(memory_file) == (0, 0)  # unmapped with the VM


def test_a_restored_vm_reboots_into_a_fresh_guest(snapshot_dir: Path, make_machine: Any, vmmkit_hypervisor: str,
                                                  tmp_path: Path) -> None:
    """A reset of a restored VM boots the kernel again on zeroed RAM (not on the snapshot's)."""
    serial = tmp_path / "s.log"
    restored = restore(make_machine, snapshot_dir, vmmkit_hypervisor, serial)
    restored.resume()
    assert wait_for(lambda: len(heartbeats(serial)) >= 1), serial.read_text()
    restored.reboot()
    assert wait_for(lambda: "selftest: vmmkit x86_64 selftest v1" in serial.read_text()), serial.read_text()
    assert wait_for(lambda: 1 in heartbeats(serial)), serial.read_text()  # counting from 1 again
    assert "selftest: ok smp (2/2 cpus online)" in serial.read_text()
    restored.shutdown()
