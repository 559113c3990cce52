"""The generic vhost-user frontend on AArch64 (the emu backend, virtio-mmio): the AArch64 test
guest's blk test passes through qemu-storage-daemon served as ``--generic-vhost-user
virtio_id=2,queue_sizes=[128]``, and the host finds its pattern in the image."""

from __future__ import annotations

from pathlib import Path

from vmmkit.testing import run_vmmkit

from ..guest_output import selftest_lines
from ..qemu_peer import SECTOR, blk_ok_line, check_blk_image, make_disk
from ..test_vhost_user_blk import QSD_SERIAL, StorageDaemon

GUEST_ARCH = "aarch64"
DISK_SIZE = 4 << 20


def test_the_aarch64_guest_blk_test_passes_through_a_generic_vhost_user_device(
    selftest_image: Path, vmmkit_hypervisor: str, tmp_path: Path
) -> None:
    daemon = StorageDaemon(make_disk(tmp_path / "disk.img", DISK_SIZE), tmp_path / "blk.sock").start()
    try:
        result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_image),
                            "--memory", "size=128M,shared=on", "--cmdline", "test=blk",
                            "--platform", "virtio_transport=mmio",
                            "--generic-vhost-user", f"socket={daemon.socket},virtio_id=2,queue_sizes=[128]",
                            timeout=300)
    finally:
        daemon.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert blk_ok_line(DISK_SIZE // SECTOR, QSD_SERIAL) in selftest_lines(result.stdout), result.stdout
    assert check_blk_image(daemon.image) == []
