"""The test guest's ``test=edu`` (tests/guests/common/edu.c) against QEMU's own ``edu`` PCI device
(hw/misc/edu.c: identification, liveness, factorial, DMA, interrupts): the peer whose lines a VMM
passing a real edu through VFIO must print too (issue 19; ``lab/vfio/`` has the lab side).

- x86-64: ``-M q35 -device edu`` (SeaBIOS assigns BAR 0; the guest programs the MSI capability
  for its boot CPU's local APIC and counts three MSIs: raised, factorial done, DMA done).
- AArch64: ``-M virt,highmem=off,gic-version=3 -device edu,dma_mask=...`` (the guest reads the
  ``pci-host-ecam-generic`` bridge of the device tree and assigns BAR 0 itself from its 32-bit
  window; ``highmem=off`` keeps the ECAM in the guest's Device-memory gigabyte; RAM starts at
  1 GiB, above edu's default 28-bit DMA mask, hence ``dma_mask``). The MSIs go through the
  GICv3 ITS (the guest maps the requester id as DeviceID, event 0 to LPI 8192): the same lines
  as on x86-64. With a GICv2 (no ITS) the guest sees the interrupts in edu's status register
  only, and its line says so.

Each boot takes well under a second (TCG). Lines are compared exactly (``stable_lines``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .guest_output import selftest_lines, stable_lines
from .qemu_peer import qemu_accel

pytestmark = pytest.mark.requires_qemu

GUESTS = Path(__file__).resolve().parents[1] / "guests"
#: What edu needs on AArch64 (RAM from 1 GiB); the lab passes the same (lab/lab.py EDU_DEVICE).
EDU_AARCH64 = "edu,dma_mask=0xffffffffffff"

EDU_LINES_X86_64 = [
    "selftest: ok edu id (0x010000ed, version 1.0)",
    "selftest: ok edu liveness (4 values read back inverted)",
    "selftest: ok edu factorial (0! = 1, 1! = 1, 5! = 120, 12! = 479001600)",
    "selftest: ok edu dma (3840 bytes RAM -> edu -> RAM at offset 0, 128 bytes at offset 0xe00)",
    "selftest: ok edu irq (msi: 3 interrupts, status 0x4000 raised, 0x1 factorial, 0x100 dma, each acknowledged)",
    "selftest: ok edu",
]
#: The edu lines of a correct run, per architecture (what vmmkit with a passed-through edu must print).
EDU_LINES = {"x86_64": EDU_LINES_X86_64, "aarch64": EDU_LINES_X86_64}
NO_MSI_IRQ_LINE = ("selftest: ok edu irq (no msi, status register only: 0x4000 raised, 0x1 factorial, 0x100 dma, "
                   "each acknowledged)")


def edu_lines(output: str) -> list[str]:
    return [line for line in stable_lines(output) if line.startswith(("selftest: ok edu", "selftest: FAIL"))]


def run_x86(guest: Path, devices: list[str], cmdline: str = "test=edu") -> subprocess.CompletedProcess[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return subprocess.run(
        [qemu, "-M", "q35", "-accel", qemu_accel(), "-m", "128M", "-smp", "1", "-nodefaults", "-no-user-config",
         "-nographic", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", *devices,
         "-kernel", str(guest), "-append", cmdline],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def aarch64_image() -> Path:
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 is not installed")
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("the AArch64 guest needs aarch64-linux-gnu-gcc")
    result = subprocess.run(["make", "-s", "-C", str(GUESTS), "ARCH=aarch64"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"make -C tests/guests ARCH=aarch64 failed:\n{result.stdout}{result.stderr}")
    return GUESTS / "build" / "aarch64" / "selftest.Image"


def run_aarch64(image: Path, devices: list[str], gic: int = 3) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-system-aarch64", "-M", f"virt,highmem=off,gic-version={gic}", "-cpu", "cortex-a72", "-m", "256M",
         "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", *devices,
         "-kernel", str(image), "-append", "test=edu"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"$ {' '.join(map(str, result.args))}\n{result.stdout}{result.stderr[-2000:]}"


def test_x86_64_edu_on_q35_passes_with_msi(guest_elf: Path) -> None:
    result = run_x86(guest_elf, ["-device", "edu"])
    assert edu_lines(result.stdout) == EDU_LINES["x86_64"], explain(result)
    assert selftest_lines(result.stdout)[-1] == "selftest: exit 0", explain(result)
    assert result.returncode == 1, explain(result)  # isa-debug-exit: status 0 << 1 | 1
    assert "selftest: info edu: msi vector 0x31" in selftest_lines(result.stdout), explain(result)


def test_x86_64_without_an_edu_the_test_fails_by_name(guest_elf: Path) -> None:
    result = run_x86(guest_elf, [])
    assert edu_lines(result.stdout) == ["selftest: FAIL edu: no edu device (1234:11e8) on PCI bus 0"], explain(result)
    assert result.returncode == 3, explain(result)  # status 1


def test_aarch64_edu_on_virt_passes_through_ecam_with_msis_through_the_its(aarch64_image: Path) -> None:
    result = run_aarch64(aarch64_image, ["-device", EDU_AARCH64])
    assert edu_lines(result.stdout) == EDU_LINES["aarch64"], explain(result)
    lines = selftest_lines(result.stdout)
    assert lines[-1] == "selftest: exit 0", explain(result)
    assert "selftest: info edu: msi its lpi 8192" in lines, explain(result)
    assert "selftest: info fdt: pci ecam 0x3f000000 (16 MiB), 32-bit window 0x10000000 (751 MiB)" in lines
    assert "selftest: info edu: pci 00:01.0: bar 0 assigned 0x10000000 (1024 KiB)" in lines, explain(result)


def test_aarch64_dma_to_ram_above_the_default_mask_fails_and_says_why(aarch64_image: Path) -> None:
    """edu's default 28-bit DMA mask cannot reach RAM at 1 GiB: the data does not come back, and
    the FAIL line names the mask (the DMA check compares what came back)."""
    result = run_aarch64(aarch64_image, ["-device", "edu"])
    fails = [line for line in edu_lines(result.stdout) if line.startswith("selftest: FAIL")]
    assert len(fails) == 1 and fails[0].startswith("selftest: FAIL edu dma: word 0 came back"), explain(result)
    assert "dma_mask" in fails[0]
    assert selftest_lines(result.stdout)[-1] == "selftest: exit 1", explain(result)


def test_aarch64_with_a_gicv2_the_interrupts_are_checked_in_the_status_register(aarch64_image: Path) -> None:
    result = run_aarch64(aarch64_image, ["-device", EDU_AARCH64], gic=2)
    assert edu_lines(result.stdout) == [*EDU_LINES_X86_64[:4], NO_MSI_IRQ_LINE, "selftest: ok edu"], explain(result)
    assert ("selftest: info edu: no MSI: no GICv3 ITS in the device tree; interrupts seen in the status register "
            "only") in selftest_lines(result.stdout), explain(result)
