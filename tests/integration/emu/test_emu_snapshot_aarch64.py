"""AArch64 snapshots on emu (issue 16, beyond x86): the AArch64 self-test guest's ``test=spin``
heartbeat and its second CPU go on after a restore, the virtual counter goes on from the saved
count, and what emu cannot take from another backend's snapshot (KVM's: an enabled GICv3, an
armed timer interrupt, a hardware breakpoint) is refused with the reason. The snapshot KVM-arm64
takes in the AArch64 lab restores here too (``tests/lab/test_lab_snapshot_aarch64.py``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from vmmkit.aarch64 import Aarch64VcpuSnapshot
from vmmkit.machine import Machine, MachineState
from vmmkit.snapshot import open_snapshot
from vmmkit.state import SnapshotError

from ..test_snapshot_restore import heartbeats, snapshot_of, spin_config, wait_for, with_serial

GUEST_ARCH = "aarch64"


def heartbeats_in(text: str) -> list[int]:
    return [int(line.split()[-1]) for line in text.splitlines()
            if line.startswith("selftest: heartbeat ") and line.split()[-1].isdigit()]


def beats_after(before: str, serial: Path) -> list[int]:
    """The heartbeats after the restore, read as one output with those before it (a line the
    guest was printing when it was paused is finished after the restore)."""
    after = serial.read_text(errors="replace") if serial.exists() else ""
    return heartbeats_in(before + after)[len(heartbeats_in(before)):]


def restore(make_machine: Callable[..., Machine], directory: Path, hypervisor: str, serial: Path) -> Machine:
    image = open_snapshot(f"file://{directory}")
    image = attrs.evolve(image, config=with_serial(image.config, serial))
    machine = make_machine(image.config, hypervisor=hypervisor, arch="aarch64")
    machine.build(restore=image)
    machine.start_paused()
    return machine


def cpu_state(machine: Machine, index: int) -> Any:
    vcpu = machine.vcpus[index]
    assert isinstance(vcpu, Aarch64VcpuSnapshot)
    return vcpu.save_cpu_state()


def spin_stack(machine: Machine, index: int) -> tuple[int, bytes]:
    """The 256 bytes under vCPU ``index``'s stack pointer, where ``spin_forever`` keeps its counter."""
    sp = cpu_state(machine, index).sp_el1
    assert machine.memory is not None
    return sp, machine.memory.read(sp - 0x40, 0x100)


@pytest.fixture
def emu_snapshot(make_machine: Callable[..., Machine], vmmkit_hypervisor: str, selftest_image: Path,
                 tmp_path: Path) -> tuple[Path, str, Any]:
    """A 2-CPU spin guest on emu, snapshotted: (directory, its serial output, both vCPUs' states)."""
    serial = tmp_path / "serial.log"
    machine = make_machine(spin_config(selftest_image, serial, memory="size=128M"), hypervisor=vmmkit_hypervisor,
                           arch="aarch64")
    machine.boot()
    assert wait_for(lambda: len(heartbeats(serial)) >= 2, 120), serial.read_text()
    snapshot_of(machine, tmp_path / "snap")
    saved = [cpu_state(machine, i) for i in range(2)]
    before = serial.read_text(errors="replace")
    machine.shutdown()
    machine.close()
    return tmp_path / "snap", before, saved


def test_the_heartbeat_and_both_cpus_go_on_after_restore(emu_snapshot: tuple[Path, str, Any],
                                                         make_machine: Callable[..., Machine],
                                                         vmmkit_hypervisor: str, tmp_path: Path) -> None:
    directory, before, saved = emu_snapshot
    state = json.loads((directory / "state.json").read_text())
    assert state["arch"] == "aarch64" and state["vm"]["state"] == {"gic": None, "its": None}
    assert [v["state"]["power"] for v in state["vcpus"]] == ["on", "on"]
    serial = tmp_path / "restored.log"
    restored = restore(make_machine, directory, vmmkit_hypervisor, serial)
    assert restored.state is MachineState.PAUSED
    again = [cpu_state(restored, i) for i in range(2)]
    for old, new, entry in zip(saved, again, state["vcpus"], strict=True):
        assert (new.x, new.pc, new.pstate, new.sp_el1, new.sysregs) == (old.x, old.pc, old.pstate, old.sp_el1,
                                                                        old.sysregs)
        # the counter goes on from the saved count (CNTVOFF_EL2), not from the host's
        assert 0 <= new.timer.count - entry["state"]["timer"]["count"] < 62_500_000 * 30
    sp, stack = spin_stack(restored, 1)
    restored.resume()
    assert wait_for(lambda: len(beats_after(before, serial)) >= 2, 120), serial.read_text()
    assert beats_after(before, serial)[:2] == [heartbeats_in(before)[-1] + 1, heartbeats_in(before)[-1] + 2]
    assert "selftest: vmmkit aarch64 selftest v1" not in serial.read_text()
    restored.pause()
    assert spin_stack(restored, 1)[0] == sp
    assert spin_stack(restored, 1)[1] != stack, "vCPU 1's spin counter did not move after the restore"
    restored.shutdown()


def _edit_state(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "state.json"
    state = json.loads(path.read_text())
    change(state)
    data = json.dumps(state).encode()
    path.write_bytes(data)
    manifest = json.loads((directory / "snapshot.json").read_text())
    manifest["files"]["state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "snapshot.json").write_text(json.dumps(manifest))


def _kvm_gic(enabled: bool) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        redists = [{"mpidr": v["state"]["mpidr"], "registers": {}, "cpu_interface": {"ICC_IGRPEN1_EL1": 0}}
                   for v in state["vcpus"]]
        state["vm"]["state"]["gic"] = {"nr_irqs": 256, "distributor": {"0x0000": 0x12 if enabled else 0x10},
                                       "line_levels": [], "redistributors": redists}
    return change


def _timer_armed(state: dict[str, Any]) -> None:
    state["vcpus"][0]["state"]["timer"]["ctl"] = 1


def _breakpoint(state: dict[str, Any]) -> None:
    state["vcpus"][1]["state"]["sysregs"].append(["S2_0_C0_C0_5", 0x1E5])  # DBGBCR0_EL1, enabled


@pytest.mark.parametrize(("change", "reason"), [
    (_kvm_gic(True), "the guest enabled the GICv3 distributor (GICD_CTLR), and emu has no interrupt controller"),
    (_timer_armed, "vcpu0: the virtual timer's interrupt is armed"),
    (_breakpoint, "vcpu1: S2_0_C0_C0_5 = 0x1e5: a hardware breakpoint is enabled and emu has none"),
], ids=["gic-enabled", "timer-armed", "breakpoint"])
def test_what_cannot_cross_is_refused_with_the_reason(emu_snapshot: tuple[Path, str, Any],
                                                      make_machine: Callable[..., Machine], vmmkit_hypervisor: str,
                                                      tmp_path: Path, change: Any, reason: str) -> None:
    """Pieces this guest does not use, put into its snapshot as KVM would have them for a guest
    that does: the restore on emu names what it cannot take, before anything runs."""
    directory = emu_snapshot[0]
    _edit_state(directory, change)
    with pytest.raises(SnapshotError, match="cannot restore") as info:
        restore(make_machine, directory, vmmkit_hypervisor, tmp_path / "x.log")
    assert reason in str(info.value)


def test_a_gic_the_guest_never_enabled_crosses(emu_snapshot: tuple[Path, str, Any],
                                               make_machine: Callable[..., Machine], vmmkit_hypervisor: str,
                                               tmp_path: Path) -> None:
    directory, before, _ = emu_snapshot
    _edit_state(directory, _kvm_gic(False))
    serial = tmp_path / "restored.log"
    restored = restore(make_machine, directory, vmmkit_hypervisor, serial)
    restored.resume()
    assert wait_for(lambda: len(beats_after(before, serial)) >= 1, 120), serial.read_text()
    assert beats_after(before, serial)[0] == heartbeats_in(before)[-1] + 1
    restored.shutdown()
