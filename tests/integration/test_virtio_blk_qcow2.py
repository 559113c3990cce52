"""A qcow2 image under the self-test guest's virtio-blk driver (``test=blk``): the guest writes
its pattern and reads it back through vmmkit's qcow2 layer; on the host ``qemu-img check`` must
find the image clean and ``qemu-img convert -O raw`` must show the pattern (and zeros elsewhere).
With a raw backing file (``backing_files=on``), the backing file stays untouched."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

from .guest_output import selftest_lines
from .qemu_peer import SECTOR, blk_ok_line, check_blk_image, make_disk

pytestmark = [pytest.mark.requires_kvm,
              pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) is not installed")]

DISK_SIZE = 4 << 20
SERIAL = "qcow2-blk0"


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=False, timeout=60)


@pytest.mark.parametrize("backing", [False, True], ids=["plain", "raw-backing"])
def test_the_guest_writes_its_pattern_into_a_qcow2_image(selftest_elf: Path, tmp_path: Path,
                                                          vmmkit_hypervisor: str, backing: bool) -> None:
    image = tmp_path / "disk.qcow2"
    create = ["create", "-f", "qcow2", "-o", "cluster_size=4096"]
    if backing:
        make_disk(tmp_path / "base.raw", DISK_SIZE)
        create += ["-b", "base.raw", "-F", "raw", str(image)]
    else:
        create += [str(image), str(DISK_SIZE)]
    assert qemu_img(*create).returncode == 0
    disk = f"path={image},serial={SERIAL}" + (",backing_files=on" if backing else "")
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf), "--memory", "size=128M",
                        "--cmdline", "test=blk", "--disk", disk, timeout=180)
    explain = f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, explain
    assert blk_ok_line(DISK_SIZE // SECTOR, SERIAL) in selftest_lines(result.stdout), explain

    check = qemu_img("check", image)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout + check.stderr
    raw = tmp_path / "as-raw.img"
    assert qemu_img("convert", "-O", "raw", image, raw).returncode == 0
    assert check_blk_image(raw) == []
    if backing:
        assert (tmp_path / "base.raw").read_bytes() == bytes(DISK_SIZE)


def test_a_backing_file_needs_backing_files_on(selftest_elf: Path, tmp_path: Path, vmmkit_hypervisor: str) -> None:
    make_disk(tmp_path / "base.raw", DISK_SIZE)
    image = tmp_path / "top.qcow2"
    assert qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", image).returncode == 0
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf), "--cmdline", "test=blk",
                        "--disk", f"path={image}", timeout=60)
    assert result.returncode != 0
    assert f"_disk0: qcow2 image {image}: backing_file:" in result.stderr, result.stderr
    assert "backing_files=on" in result.stderr and "Traceback" not in result.stderr
