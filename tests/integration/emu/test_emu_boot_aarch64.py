"""Boot the AArch64 test guest on emu as a user would (the CLI), and cross-check it against
QEMU's ``virt`` machine (TCG) running the very same Image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

from ..guest_output import selftest_lines, stable_lines

GUEST_ARCH = "aarch64"


def boot(kernel: Path, *args: str, hypervisor: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # No --arch: an arm64 Image selects the aarch64 architecture by itself.
    return run_vmmkit("--hypervisor", hypervisor, "--kernel", str(kernel), *args, timeout=timeout)


def run_qemu_virt(kernel: Path, cmdline: str, cpus: int, *extra: str) -> subprocess.CompletedProcess[str]:
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        pytest.skip("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    return subprocess.run(
        [qemu, "-M", "virt", "-cpu", "cortex-a72", "-m", "256M", "-smp", str(cpus), "-nodefaults",
         "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", str(kernel), "-append", cmdline, *extra],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


def test_the_guest_sees_its_command_line_and_both_cpus(selftest_image: Path, vmmkit_hypervisor: str) -> None:
    result = boot(selftest_image, "--cmdline", "hello", "--cpus", "boot=2", hypervisor=vmmkit_hypervisor)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: vmmkit aarch64 selftest v1" in lines
    assert "selftest: cmdline: hello" in lines
    assert "selftest: cpus: 2" in lines
    assert "selftest: cpu 1 online" in lines
    for check in ("memmap", "fdt", "psci", "rtc"):
        assert f"selftest: ok {check}" in lines
    assert "selftest: ok smp (2/2 cpus online)" in lines
    assert lines[-1] == "selftest: exit 0"
    assert not [line for line in lines if "FAIL" in line]


@pytest.mark.parametrize("cpus", [1, 2])
def test_qemu_virt_prints_the_same_lines(selftest_image: Path, vmmkit_hypervisor: str, cpus: int) -> None:
    ours = boot(selftest_image, "--cmdline", "hello", "--cpus", f"boot={cpus}", hypervisor=vmmkit_hypervisor)
    qemu = run_qemu_virt(selftest_image, "hello", cpus)
    assert qemu.returncode == 0, qemu.stdout + qemu.stderr
    assert stable_lines(qemu.stdout), "QEMU printed no selftest lines"
    assert stable_lines(ours.stdout) == stable_lines(qemu.stdout)


def test_virtio_blk_over_mmio(selftest_image: Path, vmmkit_hypervisor: str, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as stream:
        stream.truncate(4 << 20)
    result = boot(selftest_image, "--cmdline", "test=blk", "--disk", f"path={disk}",
                  "--platform", "virtio_transport=mmio", hypervisor=vmmkit_hypervisor)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(line.startswith("selftest: ok blk (8192 sectors") for line in lines), lines
    assert disk.read_bytes()[:4] == b"vmmk"  # the guest's pattern reached the file


def test_an_exception_reaches_the_guest_vectors_and_fails_the_run(selftest_image: Path,
                                                                  vmmkit_hypervisor: str) -> None:
    result = boot(selftest_image, "--cmdline", "test=fault", hypervisor=vmmkit_hypervisor)
    lines = selftest_lines(result.stdout)
    assert any(line.startswith("selftest: FAIL exception: sync: undefined instruction") for line in lines), lines
    assert lines[-1] == "selftest: exit 1"
    assert result.returncode == 1  # the guest's status, through debug-exit and PSCI SYSTEM_OFF


def test_the_initramfs_is_described_to_the_guest(selftest_image: Path, vmmkit_hypervisor: str,
                                                 tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\0" * 5000)
    result = boot(selftest_image, "--initramfs", str(initrd), hypervisor=vmmkit_hypervisor)
    assert result.returncode == 0, result.stdout + result.stderr
    info = [line for line in selftest_lines(result.stdout) if line.startswith("selftest: info initrd:")]
    assert len(info) == 1
    start, end = (int(part, 16) for part in info[0].split("[")[1].rstrip(")").split("-"))
    assert end - start == 5000
