"""Snapshot and restore across processes, as the issue's "show it" does: ``vmmkit-remote
snapshot file:///dir`` on one VMM, ``vmmkit --restore source_url=file:///dir`` in a new one,
``vmmkit-remote resume``: the heartbeat goes on from where it was."""

from __future__ import annotations

from pathlib import Path

from vmmkit.testing import run_vmmkit

from .conftest import BANNER, VmmProcess, wait_for


def heartbeat_numbers(text: str) -> list[int]:
    return [int(line.split()[-1]) for line in text.splitlines() if line.startswith("selftest: heartbeat ")]


def snapshot_spinning_vm(vmm: VmmProcess, selftest_elf: Path, snapshot: Path) -> str:
    """Boot the spin guest, pause it, snapshot it, end the VMM; the serial output so far."""
    vmm.create(vmm.guest_config(selftest_elf))
    vmm.remote("boot")
    wait_for(lambda: vmm.heartbeats() >= 2, 60, "two heartbeats")
    vmm.remote("pause")
    result = vmm.remote("snapshot", f"file://{snapshot}")
    assert result.stdout == ""
    output = vmm.output()
    vmm.remote("shutdown-vmm")
    assert vmm.wait_exit() == 0
    return output


def test_snapshot_then_restore_in_a_new_vmm_and_resume(start_vmm, selftest_elf: Path, short_dir: Path,  # noqa: ANN001
                                                       vmmkit_hypervisor: str) -> None:
    first = start_vmm()
    before = snapshot_spinning_vm(first, selftest_elf, short_dir / "snap")
    last = heartbeat_numbers(before)[-1]
    assert ("vm", "snapshotted") in first.events()

    (short_dir / "b").mkdir()
    second = VmmProcess(short_dir / "b", vmmkit_hypervisor, "--restore", f"source_url=file://{short_dir}/snap")
    try:
        assert second.info()["state"] == "Paused"
        assert second.info()["config"]["payload"]["cmdline"] == "test=spin"
        second.remote("resume")
        serial = short_dir / "serial.log"  # the snapshot's configuration writes where the first VM did

        def after_restore() -> list[int]:
            text = serial.read_text(errors="replace")
            return heartbeat_numbers(text[len(before):] if text.startswith(before) else text)
        beats = wait_for(lambda: len(after_restore()) >= 2 and after_restore(), 60, "heartbeats after restore")
        assert beats[:2] == [last + 1, last + 2]
        text = serial.read_text(errors="replace")
        assert text.count(BANNER) <= 1 and (text.startswith(before) or BANNER not in text)
        assert ("vm", "restored") in second.events()
        second.remote("shutdown-vmm")
        assert second.wait_exit() == 0
    finally:
        second.stop()


def test_the_api_refuses_what_it_cannot_do(vmm: VmmProcess, selftest_elf: Path, short_dir: Path) -> None:
    missing = vmm.remote("snapshot", f"file://{short_dir}/s", check=False)
    assert missing.returncode == 1 and "404" in missing.stderr
    vmm.create(vmm.guest_config(selftest_elf))
    vmm.remote("boot")
    running = vmm.remote("snapshot", f"file://{short_dir}/s", check=False)
    assert running.returncode == 1
    assert "405" in running.stderr and "cannot snapshot a VM that is Running (vm.pause it first)" in running.stderr
    vmm.remote("pause")
    bad_url = vmm.remote("snapshot", "tcp:localhost:1234", check=False)
    assert "400" in bad_url.stderr and "not a file:///<directory> URL" in bad_url.stderr
    exists = vmm.remote("restore", f"source_url=file://{short_dir}/s", check=False)
    assert "409" in exists.stderr and "a VM is already created" in exists.stderr
    assert vmm.info()["state"] == "Paused"


def test_a_damaged_snapshot_is_refused_by_vm_restore(start_vmm, selftest_elf: Path,  # noqa: ANN001
                                                     short_dir: Path, vmmkit_hypervisor: str) -> None:
    snapshot_spinning_vm(start_vmm(), selftest_elf, short_dir / "snap")
    with open(short_dir / "snap" / "memory-0.bin", "r+b") as memory:
        memory.truncate(1 << 20)
    (short_dir / "b").mkdir()
    second = VmmProcess(short_dir / "b", vmmkit_hypervisor)
    try:
        result = second.remote("restore", f"source_url=file://{short_dir}/snap", check=False)
        assert result.returncode == 1 and "400" in result.stderr
        assert "memory-0.bin: 1048576 bytes, the manifest says 67108864 (truncated or damaged)" in result.stderr
        assert "404" in second.remote("info", check=False).stderr  # nothing was created
        refused = second.remote("restore", f"source_url=file://{short_dir}/snap,memory_restore_mode=Copy",
                                check=False)
        assert refused.returncode == 2 and "unknown key 'memory_restore_mode'" in refused.stderr
    finally:
        second.stop()
    # The same from the command line: a clear message, exit 1, nothing run.
    cli = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--api-socket", f"path={short_dir}/c.sock",
                     "--restore", f"source_url=file://{short_dir}/snap")
    assert cli.returncode == 1
    assert "truncated or damaged" in cli.stderr and "Traceback" not in cli.stderr


def test_restore_usage_errors(short_dir: Path) -> None:
    with_kernel = run_vmmkit("--restore", "source_url=file:///tmp/x", "--kernel", "k", "--api-socket",
                             f"path={short_dir}/a.sock")
    assert with_kernel.returncode == 2
    assert "the configuration comes from the snapshot; --kernel cannot be given with it" in with_kernel.stderr
    no_api = run_vmmkit("--restore", "source_url=file:///tmp/x")
    assert no_api.returncode == 2 and "give --api-socket to resume it (or resume=on)" in no_api.stderr
    no_url = run_vmmkit("--restore", "prefault=on", "--api-socket", f"path={short_dir}/a.sock")
    assert no_url.returncode == 2 and "source_url is required" in no_url.stderr
    bad_key = run_vmmkit("--restore", "source_url=file:///tmp/x,fast=on", "--api-socket", f"path={short_dir}/a.sock")
    assert bad_key.returncode == 2 and "unknown key 'fast'" in bad_key.stderr
