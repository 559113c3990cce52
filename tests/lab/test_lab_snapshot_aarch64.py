"""AArch64 snapshots on a real KVM (issue 16, beyond x86), in the AArch64 lab: the self-test
guest's ``test=spin`` on vmmkit's KVM-arm64 backend is snapshotted by one vmmkit process and
restored by another (``tests/lab/snapshot_aarch64_inside.py``), and its heartbeat goes on with no
gap and no restart; the restored VM's state, read back before it runs, is the saved one (every
system register KVM lists, the in-kernel GICv3 and ITS). The same snapshot, carried out of the
lab, restores on the host's emu backend and the heartbeat goes on there too.

One lab boot for the module (~150 s of which ~20 s is the lab's boot, on this loaded 2-core host).
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from vmmkit.config import VmConfig
from vmmkit.machine import Machine, MachineState
from vmmkit.snapshot import open_snapshot

from .conftest import run_in_lab

pytestmark = pytest.mark.slow

REPORT = "VMMKIT-SNAP: "
#: GITS_CBASER: KVM sanitises the cacheability fields of any value written to it, 0 included
#: (vgic-its.c, vgic_sanitise_its_cbaser -> vgic_sanitise_inner_cacheability): a guest that never
#: set its ITS up reads back other cacheability bits after a restore, nothing else changes.
GITS_CBASER = "0x0080"


@pytest.fixture(scope="module")
def lab_run(aarch64_lab: Any) -> dict[str, Any]:
    start = time.monotonic()
    result = run_in_lab("--", "python3", "tests/lab/snapshot_aarch64_inside.py", timeout=900)
    elapsed = time.monotonic() - start
    output = result.stdout
    lines = [line for line in output.splitlines() if line.startswith(REPORT)]
    assert result.returncode == 0 and lines, f"exit {result.returncode}\n{output[-6000:]}\n{result.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(lines[0][len(REPORT):])
    text = output.split("VMMKIT-SNAP-TAR-BEGIN\n", 1)[1].split("VMMKIT-SNAP-TAR-END", 1)[0]
    report["tar"] = base64.b64decode("".join(text.split()))
    report["lab_seconds"] = elapsed
    print(f"lab run: {elapsed:.1f} s; snapshot {report['snapshot_s']} s, restore {report['restore_s']} s in the lab")
    return report


def test_a_gic_and_its_in_use_go_into_another_vm(lab_run: dict[str, Any]) -> None:
    """``tests/lab/test_kvm_arm64_gic_state.py``, run inside the lab."""
    gic = lab_run["gic_test"]
    print(f"dirty log capabilities of the lab's KVM: {lab_run['dirty_log']}")
    assert gic["status"] == 0 and "1 passed" in gic["output"], gic["output"]


def heartbeats(text: str) -> list[int]:
    return [int(line.split()[-1]) for line in text.splitlines()
            if line.startswith("selftest: heartbeat ") and line.split()[-1].isdigit()]


def goes_on(before: str, after: str) -> None:
    """The serial output after the restore continues the one before it: the heartbeats counted
    without a gap or a restart (a line the guest was printing when it was paused is finished
    after the restore, so the two outputs are read as one)."""
    beats = heartbeats(before + after)
    assert len(heartbeats(before)) >= 2 and len(beats) >= len(heartbeats(before)) + 2, (before, after)
    assert beats == list(range(1, len(beats) + 1)), beats
    assert "selftest: vmmkit aarch64 selftest v1" not in after, "the guest restarted instead of going on"


def test_the_heartbeat_goes_on_in_a_new_process_on_kvm(lab_run: dict[str, Any]) -> None:
    goes_on(lab_run["serial_before"], lab_run["serial_after"])
    assert lab_run["info_state"] == "Paused"


def _without(state: dict[str, Any], counts: list[int]) -> dict[str, Any]:
    """``state`` with what a restore legitimately changes taken out (the timer counts, returned
    in ``counts``; GITS_CBASER's sanitised cacheability; the ``snapshot`` header, whose checksum
    covers the counts)."""
    state = json.loads(json.dumps(state))
    state.pop("snapshot", None)
    for vcpu in state["vcpus"]:
        counts.append(vcpu["state"]["timer"].pop("count"))
    its = state["vm"]["state"]["its"]
    if its is not None:
        its["registers"].pop(GITS_CBASER)
    return state


def test_the_restored_state_is_the_saved_one(lab_run: dict[str, Any]) -> None:
    saved, restored = lab_run["states"]
    assert saved["hypervisor"] == "kvm" and saved["arch"] == "aarch64"
    vm = saved["vm"]["state"]
    assert vm["gic"]["nr_irqs"] == 256 and vm["its"] is not None
    assert [r["mpidr"] for r in vm["gic"]["redistributors"]] == [v["state"]["mpidr"] for v in saved["vcpus"]]
    assert saved["vm"]["state"]["its"]["registers"][GITS_CBASER] == 0
    for vcpu in saved["vcpus"]:
        state = vcpu["state"]
        assert state["power"] == "on" and state["opaque"]["backend"] == "kvm"
        assert len(state["sysregs"]) > 50  # KVM_GET_REG_LIST's system registers, not a hand-picked few
    saved_counts: list[int] = []
    restored_counts: list[int] = []
    assert _without(restored, restored_counts) == _without(saved, saved_counts)
    # the VM goes on from the first vCPU's count (all read the one counter while it was paused)
    assert restored_counts == [min(saved_counts)] * len(saved_counts)


def test_the_kvm_snapshot_goes_on_under_emu(lab_run: dict[str, Any], make_machine: Callable[..., Machine],
                                            vmmkit_registries: Any, tmp_path: Path) -> None:
    if "emu" not in vmmkit_registries.hypervisors or not vmmkit_registries.hypervisors.get("emu").is_available():
        pytest.skip("the emu backend is not usable here")
    with tarfile.open(fileobj=io.BytesIO(lab_run["tar"]), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    image = open_snapshot(f"file://{tmp_path / 'snap'}")
    serial = tmp_path / "emu.log"
    image = attrs.evolve(image, config=attrs.evolve(image.config,
                                                    serial=VmConfig.from_cli(serial=f"file={serial}").serial))
    machine = make_machine(image.config, hypervisor="emu", arch="aarch64")
    machine.build(restore=image)
    machine.start_paused()
    assert machine.state is MachineState.PAUSED
    machine.resume()
    before = lab_run["serial_before"]
    deadline = time.monotonic() + 120
    text = ""
    while time.monotonic() < deadline and len(heartbeats(before + text)) < len(heartbeats(before)) + 2:
        time.sleep(0.1)
        text = serial.read_text(errors="replace") if serial.exists() else ""
    goes_on(before, text)
    machine.shutdown()
