"""A snapshot taken on ``kvm`` restores on ``emu`` (issue 16, item 4): the state travels in the
backend-neutral layouts (:mod:`vmmkit.x86`, :mod:`vmmkit.x86_platform`), the guest's heartbeat
and its second CPU go on under the software backend; what cannot cross is refused by name."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from vmmkit.machine import Machine, MachineState
from vmmkit.state import NotSnapshottable, SnapshotError

from .test_snapshot_restore import (
    ap_stack_page,
    counters_that_grew,
    heartbeats,
    restore,
    snapshot_of,
    spin_config,
    wait_for,
)

GUEST_ARCH = "x86_64"

pytestmark = pytest.mark.requires_kvm


@pytest.fixture
def emu(vmmkit_registries: Any) -> str:
    if "emu" not in vmmkit_registries.hypervisors:
        pytest.skip("the emu backend is not installed")
    availability = vmmkit_registries.hypervisors.get("emu").is_available()
    if not availability:
        pytest.skip(f"emu is not usable: {availability.reason}")
    return "emu"


@pytest.fixture
def kvm_snapshot(make_machine: Any, selftest_elf: Path, tmp_path: Path) -> tuple[Path, int, int, bytes]:
    """A 2-CPU spin guest on KVM, snapshotted: (directory, last heartbeat, AP stack page, its bytes)."""
    serial = tmp_path / "kvm.log"
    machine: Machine = make_machine(spin_config(selftest_elf, serial), hypervisor="kvm")
    machine.boot()
    assert wait_for(lambda: len(heartbeats(serial)) >= 2), serial.read_text()
    snapshot_of(machine, tmp_path / "snap")
    page, data = ap_stack_page(machine)
    last = heartbeats(serial)[-1]
    machine.shutdown()
    machine.close()
    return tmp_path / "snap", last, page, data


def test_a_kvm_snapshot_goes_on_under_emu(kvm_snapshot: tuple[Path, int, int, bytes], emu: str,
                                          make_machine: Any, tmp_path: Path) -> None:
    directory, last, page, at_snapshot = kvm_snapshot
    assert json.loads((directory / "state.json").read_text())["hypervisor"] == "kvm"
    serial = tmp_path / "emu.log"
    restored = restore(make_machine, directory, emu, serial)
    assert restored.hypervisor is not None and restored.hypervisor.name == "emu"
    assert restored.state is MachineState.PAUSED
    assert ap_stack_page(restored) == (page, at_snapshot)
    restored.resume()
    assert wait_for(lambda: len(heartbeats(serial)) >= 2, timeout=120), serial.read_text()
    assert heartbeats(serial)[:2] == [last + 1, last + 2]
    assert "selftest: vmmkit x86_64 selftest v1" not in serial.read_text()
    restored.pause()
    assert counters_that_grew(at_snapshot, ap_stack_page(restored)[1]), "vCPU 1 did not run under emu"
    restored.shutdown()


def _edit_state(directory: Path, change: Any) -> None:
    import hashlib

    path = directory / "state.json"
    state = json.loads(path.read_text())
    change(state)
    data = json.dumps(state).encode()
    path.write_bytes(data)
    manifest = json.loads((directory / "snapshot.json").read_text())
    manifest["files"]["state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "snapshot.json").write_text(json.dumps(manifest))


def _kvmclock_on(state: dict[str, Any]) -> None:
    state["vcpus"][0]["state"]["msrs"].append([0x4B564D01, 0x1000 | 1])


def _pic_in_use(state: dict[str, Any]) -> None:
    state["vm"]["state"]["pics"][0].update(irq_base=0x20, imr=0xFB)


def _sse_registers(state: dict[str, Any]) -> None:
    import base64

    area = bytearray(base64.b64decode(state["vcpus"][0]["state"]["xsave"]))
    area[160] = 0x5A  # XMM0
    state["vcpus"][0]["state"]["xsave"] = base64.b64encode(bytes(area)).decode()


def _kvm_pit(state: dict[str, Any]) -> None:
    state["vm"]["state"]["kvm_pit2"] = "AAAA"


@pytest.mark.parametrize(("change", "reason"), [
    (_kvmclock_on, "the guest uses kvmclock and backend X86Vcpu has no paravirtual clock"),
    (_pic_in_use, "the guest uses the 8259 PICs (unmasked) and emu has none"),
    (_sse_registers, "the x87/SSE/AVX registers hold values and backend X86Vcpu has no XSAVE interface"),
    (_kvm_pit, "KVM's in-kernel PIT, which cannot cross to emu"),
], ids=["kvmclock", "pic", "sse", "kvm-pit"])
def test_what_cannot_cross_is_refused_with_the_reason(kvm_snapshot: tuple[Path, int, int, bytes], emu: str,
                                                      make_machine: Any, tmp_path: Path, change: Any,
                                                      reason: str) -> None:
    """Pieces this guest does not use, put into its snapshot as a guest that uses them would
    have them: the restore on emu names what it cannot take."""
    directory = kvm_snapshot[0]
    _edit_state(directory, change)
    with pytest.raises(SnapshotError, match=re.escape(reason)):
        restore(make_machine, directory, emu, tmp_path / "emu.log")


def test_emu_cannot_take_snapshots_and_says_why(emu: str, make_machine: Any, selftest_elf: Path,
                                                tmp_path: Path) -> None:
    serial = tmp_path / "emu.log"
    machine: Machine = make_machine(spin_config(selftest_elf, serial), hypervisor=emu)
    machine.boot()
    assert wait_for(lambda: len(heartbeats(serial)) >= 1, timeout=120), serial.read_text()
    machine.pause()
    with pytest.raises(NotSnapshottable, match="cannot save the FPU/SSE state"):
        machine.snapshot(f"file://{tmp_path}/snap")
    machine.shutdown()
