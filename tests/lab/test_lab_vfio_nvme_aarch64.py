"""A passed-through NVMe controller under a nested Linux (issue 19): the AArch64 lab boots with its
SMMUv3 and QEMU's NVMe controller on a raw image of this host (``lab.py run --iommu --nvme``);
inside, ``lab/vfio/nvme-on-vmmkit.sh`` binds it to ``vfio-pci`` and boots the lab's own Debian
kernel nested on vmmkit's KVM-arm64 with it passed through. The nested ``/init``
(``lab/vfio/nvme-init.sh``) must find it with Debian's own ``nvme`` driver (its interrupts MSI-X
through vmmkit's ITS), read the marker this host wrote into sector 0, and write a pattern at
2 MiB and read it back; then this host finds the pattern in the image file. QEMU ``virt`` with
its emulated NVMe controller, booting the same kernel and initramfs on this host, prints the same
``VMMKIT-NVME`` lines. Opt-in (``VMMKIT_LAB_ALL=1``): one lab boot with a nested Linux, ~60 s on
this loaded 2-core host, and ~10 s of QEMU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, run_in_lab

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("VMMKIT_LAB_ALL") != "1",
                       reason="a lab boot with a nested Linux (~60 s): VMMKIT_LAB_ALL=1 runs it"),
]

MARKER = b"vmmkit-host-marker\n"
PATTERN_OFFSET = 2 << 20
Run = tuple[subprocess.CompletedProcess[str], Path]  # the console output, the NVMe image


def make_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.write(MARKER)
        f.truncate(16 << 20)
    return path


def nvme_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith("VMMKIT-NVME:")]


def pattern_page(word: str) -> bytes:
    return ((word + "\n") * (4096 // (len(word) + 1) + 1)).encode()[:4096]


@pytest.fixture(scope="module")
def lab_run(aarch64_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    image = make_image(tmp_path_factory.mktemp("nvme") / "nvme.img")
    result = run_in_lab("--add", "kernel", "--iommu", "--nvme", str(image), "--timeout", "800", "--",
                        "env", "PATTERN=vmmkit-nvme-pattern", "sh", "lab/vfio/nvme-on-vmmkit.sh")
    return result, image


@pytest.fixture(scope="module")
def qemu_run(aarch64_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    if not Path("/bin/busybox").is_file():
        pytest.skip("the host's /bin/busybox lists the applets of the nested initramfs")
    work = tmp_path_factory.mktemp("nvme-qemu")
    nested = aarch64_lab.dir / "nested"
    initrd = work / "nvme.cpio"
    subprocess.run([sys.executable, str(ROOT / "lab" / "linux" / "nested_initramfs.py"), str(initrd),
                    "--busybox", str(nested / "busybox"), "--modules", str(nested / "modules"),
                    "--applets-of", "/bin/busybox", "--init-sh", str(ROOT / "lab" / "vfio" / "nvme-init.sh")],
                   check=True)
    image = make_image(work / "nvme.img")
    result = subprocess.run(
        ["qemu-system-aarch64", "-M", "virt,gic-version=3", "-cpu", "max,pauth-impdef=on", "-m", "256M", "-smp", "2",
         "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", str(aarch64_lab.kernel),
         "-initrd", str(initrd), "-append", "console=ttyAMA0 quiet nvme_pattern=vmmkit-nvme-pattern",
         "-drive", f"file={image},format=raw,if=none,id=nvme0", "-device", "nvme,serial=vmmkit-nvme0,drive=nvme0"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    return result, image


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"{result.stdout}\n--- stderr ---\n{result.stderr[-3000:]}"


def test_the_nested_linux_drives_the_passed_through_nvme_and_the_host_sees_its_write(lab_run: Run) -> None:
    result, image = lab_run
    assert result.returncode == 0, explain(result)
    lines = nvme_lines(result.stdout)
    assert "VMMKIT-NVME: controller nvme0: serial 'vmmkit-nvme0', model 'QEMU NVMe Ctrl', driver nvme" in lines, \
        explain(result)
    assert "VMMKIT-NVME: sector 0: vmmkit-host-marker" in lines, explain(result)
    assert "VMMKIT-NVME: ok: 4 KiB of 'vmmkit-nvme-pattern' written at 2 MiB, flushed and read back" in lines, \
        explain(result)
    assert "VMMKIT-NVME: admin queue interrupt: ITS-MSI Edge" in lines, explain(result)
    with open(image, "rb") as f:
        f.seek(PATTERN_OFFSET)
        assert f.read(4096) == pattern_page("vmmkit-nvme-pattern")


def test_qemus_emulated_nvme_prints_the_same_lines(lab_run: Run, qemu_run: Run) -> None:
    qemu, image = qemu_run
    assert nvme_lines(qemu.stdout) == nvme_lines(lab_run[0].stdout), explain(qemu)
    with open(image, "rb") as f:
        f.seek(PATTERN_OFFSET)
        assert f.read(4096) == pattern_page("vmmkit-nvme-pattern")
