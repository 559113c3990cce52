"""Snapshot and restore judged by Linux (issue 16): the team's kernel (PVH, virtio over PCI)
with ``snapshot_init.sh`` as ``/init`` counts, with a word in a tmpfs file; the host pauses and
snapshots it, ends that VMM, restores the snapshot in a new ``vmmkit --restore`` process and
resumes it: the count goes on from the next number, the file still holds the word, and the
kernel does not boot again. Interrupt controllers, timers (the LAPIC, the userspace PIT), the
TSC and every device of a running Linux come through."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from initramfs import build_initramfs, missing_busybox_reason
from linuxboot import BASE_CMDLINE, LINUX_DIR, Boot, linux_missing_reason, scaled_timeout

from vmmkit.api.client import ApiClient, ApiError
from vmmkit.testing import kvm_unusable_reason

pytestmark = [pytest.mark.slow, pytest.mark.requires_kvm]

HERE = Path(__file__).resolve().parent
PREFIX = "VMMKIT-SNAP: "
WORD = "vmmkit-snapshot-word"
#: The boot alone is ~40-90 s on a kvm_pvm host (minutes when the host is loaded).
TIMEOUT = scaled_timeout(600.0)


def ticks(boot: Boot) -> list[tuple[int, str]]:
    out = []
    for _, line in list(boot.result.lines):
        if PREFIX + "tick " in line:
            words = line.split(PREFIX, 1)[1].split()
            out.append((int(words[1]), words[2] if len(words) > 2 else ""))
    return out


def wait_until(boot: Boot, predicate, deadline: float, what: str) -> None:  # noqa: ANN001
    while time.monotonic() < deadline:
        if predicate():
            return
        if boot._proc.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"no {what}\n{boot.wait().describe()}")


def test_linux_goes_on_counting_after_a_restore_in_a_new_process(tmp_path: Path) -> None:
    for reason in (linux_missing_reason(LINUX_DIR), missing_busybox_reason(), kvm_unusable_reason()):
        if reason:
            pytest.skip(reason)
    initramfs = build_initramfs(tmp_path / "snapshot.cpio", init=HERE / "snapshot_init.sh")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as image:
        image.truncate(1 << 20)
    first_socket, second_socket = tmp_path / "a.sock", tmp_path / "b.sock"
    first = Boot("snapshot-source", [
        sys.executable, "-m", "vmmkit", "--hypervisor", "kvm", "--kernel", str(LINUX_DIR / "vmlinux"),
        "--initramfs", str(initramfs), "--cpus", "boot=1", "--memory", "size=128M", "--serial", "tty",
        "--disk", f"path={disk}", "--platform", "virtio_transport=pci",
        "--cmdline", f"{BASE_CMDLINE} -- word={WORD}", "--api-socket", f"path={first_socket}",
    ], timeout=TIMEOUT)
    second: Boot | None = None
    try:
        deadline = time.monotonic() + TIMEOUT
        wait_until(first, lambda: len(ticks(first)) >= 3, deadline, "ticks from the guest")
        api = ApiClient(str(first_socket), timeout=60)
        api.request("PUT", "vm.pause")
        api.request("PUT", "vm.snapshot", {"destination_url": f"file://{tmp_path}/snap"})
        last, word = ticks(first)[-1]
        assert word == WORD
        api.request("PUT", "vmm.shutdown")
        assert first.wait().returncode == 0, first.result.describe()
        assert "Linux version" in first.result.output

        second = Boot("snapshot-restored", [
            sys.executable, "-m", "vmmkit", "--hypervisor", "kvm", "--api-socket", f"path={second_socket}",
            "--restore", f"source_url=file://{tmp_path}/snap",
        ], timeout=TIMEOUT)
        restored = second
        api2 = ApiClient(str(second_socket), timeout=60)

        def state() -> str | None:
            try:
                return str(api2.info()["state"]) if second_socket.exists() else None
            except (ApiError, OSError):  # the socket serves before the restore is done: 404
                return None
        wait_until(restored, lambda: state() is not None, deadline, "the restored VM")
        assert state() == "Paused"
        api2.request("PUT", "vm.resume")
        wait_until(restored, lambda: len(ticks(restored)) >= 3, deadline, "ticks after the restore")
        after = ticks(restored)
        assert [n for n, _ in after[:3]] == [last + 1, last + 2, last + 3], after
        assert all(word == WORD for _, word in after), after
        assert "Linux version" not in restored.result.output  # it did not boot again
        api2.request("PUT", "vmm.shutdown")
        assert restored.wait().returncode == 0, restored.result.describe()
    finally:
        first.kill()
        if second is not None:
            second.kill()
