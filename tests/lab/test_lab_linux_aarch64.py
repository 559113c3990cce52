"""A real arm64 Linux on vmmkit: Debian's arm64 kernel (the AArch64 lab's own) boots on vmmkit's
KVM-arm64 backend inside the lab with virtio-blk, virtio-net (a tap in the lab) and virtio-rng
over MMIO, and the Linux tier's ``/init`` (``tests/linux/init.sh``) checks them. The same kernel
and ``/init`` under QEMU ``virt`` (TCG, GICv3, the same devices; user networking) on the host
print the same ``VMMKIT-INIT`` lines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, run_in_lab

pytestmark = pytest.mark.slow

NET = "net=192.168.127.2/24,192.168.127.1"
PATTERN = "vmmkit-arm64-pattern"  # what lab/linux/boot-aarch64.sh asks /init to write


def init_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith("VMMKIT-INIT:")]


@pytest.fixture(scope="module")
def vmmkit_boot(aarch64_lab: Any) -> subprocess.CompletedProcess[str]:
    # virtio-mmio, as QEMU's peer run below (the VM's default on KVM is PCI: test_lab_its_aarch64.py)
    return run_in_lab("--add", "kernel", "--timeout", "600", "--", "env", "TRANSPORT=mmio", "sh",
                      "lab/linux/boot-aarch64.sh")


@pytest.fixture(scope="module")
def qemu_boot(aarch64_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    if not Path("/bin/busybox").is_file():
        pytest.skip("the host's /bin/busybox lists the applets of the arm64 one (apt-get install busybox-static)")
    work = tmp_path_factory.mktemp("qemu-arm64-linux")
    nested = aarch64_lab.dir / "nested"
    initramfs = work / "nested.cpio"
    subprocess.run([sys.executable, str(ROOT / "lab/linux/nested_initramfs.py"), str(initramfs),
                    "--busybox", str(nested / "busybox"), "--modules", str(nested / "modules"),
                    "--applets-of", "/bin/busybox"], check=True)
    disk = work / "disk.img"
    with disk.open("wb") as stream:
        stream.truncate(8 << 20)
    result = subprocess.run(
        [str(shutil.which("qemu-system-aarch64")), "-M", "virt,gic-version=3", "-cpu", "max,pauth-impdef=on",
         "-accel", "tcg,thread=multi", "-m", "256M", "-smp", "2", "-nodefaults", "-no-user-config",
         "-nographic", "-serial", "stdio", "-no-reboot", "-kernel", str(aarch64_lab.kernel), "-initrd", str(initramfs),
         "-append", f"console=ttyAMA0 quiet -- {NET} pattern={PATTERN}",
         "-drive", f"if=none,id=d0,file={disk},format=raw", "-device", "virtio-blk-device,drive=d0",
         "-netdev", "user,id=n0,net=192.168.127.0/24,host=192.168.127.1", "-device", "virtio-net-device,netdev=n0",
         "-device", "virtio-rng-device"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert disk.read_bytes()[1 << 20:].startswith(PATTERN.encode())
    return result


def test_every_init_check_passes_on_vmmkit_kvm_arm64(vmmkit_boot: subprocess.CompletedProcess[str]) -> None:
    output = vmmkit_boot.stdout
    assert vmmkit_boot.returncode == 0, output + vmmkit_boot.stderr
    lines = init_lines(output)
    assert "VMMKIT-INIT: ok virtio devices: blk net rng" in lines, output
    assert "VMMKIT-INIT: ok serial: ttyAMA0 on GICv3 pin 33, level" in lines, output
    assert "VMMKIT-INIT: ok net: eth0 192.168.127.2/24, ping 192.168.127.1 answered" in lines, output
    assert "VMMKIT-INIT: ok block: pattern written at 1 MiB and read back" in lines, output
    assert "VMMKIT-INIT: ok hwrng: read from virtio_rng" in lines, output
    assert lines[-1] == "VMMKIT-INIT: done: 9 checks, 0 failed", output
    assert f"nested-disk: {PATTERN}" in output  # the guest's write reached the image file


def test_qemu_virt_prints_the_same_init_lines(vmmkit_boot: subprocess.CompletedProcess[str],
                                              qemu_boot: subprocess.CompletedProcess[str]) -> None:
    theirs = init_lines(qemu_boot.stdout)
    assert theirs and theirs[-1].startswith("VMMKIT-INIT: done:"), qemu_boot.stdout + qemu_boot.stderr
    assert init_lines(vmmkit_boot.stdout) == theirs
