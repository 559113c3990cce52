"""MSI-X on AArch64 through KVM's in-kernel GICv3 ITS, judged by Linux: Debian's arm64 kernel
boots nested on vmmkit's KVM-arm64 in the lab with virtio-blk and virtio-rng over **PCI**
(``lab/linux/boot-aarch64.sh`` with ``TRANSPORT=pci NET=off``). Its ``/proc/interrupts`` (printed
by the nested ``/init`` as ``VMMKIT-IRQ:`` lines once the drivers probed) must show every virtio
interrupt on ``ITS-MSI`` with the requester ID in the hwirq (``RID << 11 | vector``), and the
virtio-blk request vector must have fired; then the Linux tier's checks (disk pattern written and
read back, hwrng read) run on those MSIs. QEMU ``virt`` (TCG, GICv3 with its ITS, the same
devices as virtio-*-pci) on the host prints the same interrupt table and ``VMMKIT-INIT`` lines.
One nested boot (~70 s alone, 2-3 min on a loaded host) and one QEMU boot."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, run_in_lab

pytestmark = pytest.mark.slow

PATTERN = "vmmkit-arm64-pattern"  # what lab/linux/boot-aarch64.sh asks /init to write


def init_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith("VMMKIT-INIT:")]


def interrupts(output: str) -> dict[str, tuple[str, int, str, int]]:
    """``/proc/interrupts`` rows by action name: (chip, hwirq, trigger, count summed over CPUs)."""
    rows = {}
    for line in output.splitlines():
        if "VMMKIT-IRQ:" not in line:
            continue
        fields = line.split("VMMKIT-IRQ:", 1)[1].split()
        counts = [int(f) for f in itertools.takewhile(str.isdigit, fields[1:])]
        rest = fields[1 + len(counts):]
        chip, hwirq, trigger, name = rest[0], int(rest[1]), rest[2], rest[-1]
        rows[name] = (chip, hwirq, trigger, sum(counts))
    return rows


def shape(rows: dict[str, tuple[str, int, str, int]]) -> dict[str, tuple[str, int, str]]:
    """The rows without their counts (which depend on timing)."""
    return {name: row[:3] for name, row in rows.items()}


@pytest.fixture(scope="module")
def vmmkit_boot(aarch64_lab: Any) -> subprocess.CompletedProcess[str]:
    return run_in_lab("--add", "kernel", "--timeout", "800", "--",
                      "env", "TRANSPORT=pci", "NET=off", "sh", "lab/linux/boot-aarch64.sh")


@pytest.fixture(scope="module")
def qemu_boot(aarch64_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    if not Path("/bin/busybox").is_file():
        pytest.skip("the host's /bin/busybox lists the applets of the arm64 one (apt-get install busybox-static)")
    work = tmp_path_factory.mktemp("qemu-arm64-its")
    nested = aarch64_lab.dir / "nested"
    initramfs = work / "nested.cpio"
    subprocess.run([sys.executable, str(ROOT / "lab/linux/nested_initramfs.py"), str(initramfs),
                    "--busybox", str(nested / "busybox"), "--modules", str(nested / "modules"),
                    "--applets-of", "/bin/busybox"], check=True)
    disk = work / "disk.img"
    with disk.open("wb") as stream:
        stream.truncate(8 << 20)
    return subprocess.run(
        [str(shutil.which("qemu-system-aarch64")), "-M", "virt,gic-version=3", "-cpu", "max,pauth-impdef=on",
         "-accel", "tcg,thread=multi", "-m", "256M", "-smp", "2", "-nodefaults", "-no-user-config",
         "-nographic", "-serial", "stdio", "-no-reboot", "-kernel", str(aarch64_lab.kernel), "-initrd", str(initramfs),
         "-append", f"console=ttyAMA0 quiet -- pattern={PATTERN}",
         # one request queue, as vmmkit's virtio-blk has (QEMU's default is one per vCPU)
         "-drive", f"if=none,id=d0,file={disk},format=raw", "-device", "virtio-blk-pci,drive=d0,num-queues=1",
         "-device", "virtio-rng-pci"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_virtio_pci_interrupts_are_its_msis_on_vmmkit_kvm_arm64(vmmkit_boot: subprocess.CompletedProcess[str]) -> None:
    output = vmmkit_boot.stdout
    assert vmmkit_boot.returncode == 0, output + vmmkit_boot.stderr
    rows = interrupts(output)
    virtio = {name: row for name, row in rows.items() if name.startswith("virtio")}
    assert virtio, output
    assert {row[0] for row in virtio.values()} == {"ITS-MSI"}, rows  # none on the GICv3's SPIs (INTx)
    requests = [row for name, row in virtio.items() if name.endswith("-req.0")]
    assert len(requests) == 1 and requests[0][3] > 0, rows  # the partition-table read completed by MSI
    assert {row[1] >> 11 for row in virtio.values()} == {1 << 3, 2 << 3}, rows  # RIDs 00:01.0, 00:02.0
    lines = init_lines(output)
    assert "VMMKIT-INIT: ok virtio devices: blk rng" in lines, output
    assert "VMMKIT-INFO: virtio: virtio0 blk over pci, driver virtio_blk" in output
    assert "VMMKIT-INIT: ok block: pattern written at 1 MiB and read back" in lines, output
    assert "VMMKIT-INIT: ok hwrng: read from virtio_rng" in lines, output
    assert lines[-1] == "VMMKIT-INIT: done: 8 checks, 0 failed", output
    assert f"nested-disk: {PATTERN}" in output


def test_qemu_virt_has_the_same_its_interrupts_and_init_lines(vmmkit_boot: subprocess.CompletedProcess[str],
                                                              qemu_boot: subprocess.CompletedProcess[str]) -> None:
    theirs = init_lines(qemu_boot.stdout)
    assert theirs and theirs[-1].startswith("VMMKIT-INIT: done:"), qemu_boot.stdout + qemu_boot.stderr
    assert init_lines(vmmkit_boot.stdout) == theirs
    assert shape(interrupts(vmmkit_boot.stdout)) == shape(interrupts(qemu_boot.stdout))
