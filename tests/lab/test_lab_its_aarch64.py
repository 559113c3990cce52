"""MSI-X on AArch64 through KVM's in-kernel GICv3 ITS, judged by Linux: Debian's arm64 kernel
boots nested on vmmkit's KVM-arm64 in the lab with virtio-blk and virtio-rng over **PCI**, the
VM's default transport where the backend has an ITS (``lab/linux/boot-aarch64.sh`` with ``NET=off``
and no ``TRANSPORT``). Its ``/proc/interrupts`` (printed
by the nested ``/init`` as ``VMMKIT-IRQ:`` lines once the drivers probed) must show every virtio
interrupt on ``ITS-MSI`` with the requester ID in the hwirq (``RID << 11 | vector``), and the
virtio-blk request vector must have fired; then the Linux tier's checks (disk pattern written and
read back, hwrng read) run on those MSIs. QEMU ``virt`` (TCG, GICv3 with its ITS, the same
devices as virtio-*-pci) on the host prints the same interrupt table and ``VMMKIT-INIT`` lines.
Where Linux put the functions' BARs (``VMMKIT-BAR:`` lines, from sysfs): vmmkit's 64-bit BARs
stay above 4 GiB, in the 64-bit window of the host bridge's ``ranges``, as QEMU's do in its own.
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


def bars(output: str) -> list[tuple[str, str, int, int, int, int]]:
    """The ``VMMKIT-BAR:`` lines: (bdf, vendor:device, resource index, start, end, flags)."""
    found = []
    for line in output.splitlines():
        fields = line.strip().split()
        if fields[:1] == ["VMMKIT-BAR:"] and len(fields) == 7:
            found.append((fields[1], fields[2], int(fields[3]), *(int(f, 16) for f in fields[4:])))
    return found


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
                      "env", "NET=off", "sh", "lab/linux/boot-aarch64.sh")


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


#: ``IORESOURCE_MEM`` and ``IORESOURCE_MEM_64`` (include/linux/ioport.h): a 64-bit memory BAR.
IORESOURCE_MEM = 0x0000_0200
IORESOURCE_MEM_64 = 0x0010_0000
VIRTIO_VENDOR = "0x1af4"


def virtio_memory_bars(output: str) -> list[tuple[str, str, int, int, int, int]]:
    return [bar for bar in bars(output) if bar[1].startswith(VIRTIO_VENDOR + ":") and bar[2] < 6
            and bar[5] & IORESOURCE_MEM]


def test_virtio_pci_bars_stay_in_the_64_bit_window_above_4_gib(vmmkit_boot: subprocess.CompletedProcess[str],
                                                                qemu_boot: subprocess.CompletedProcess[str]) -> None:
    """vmmkit places each virtio-pci function's BAR 0 (64-bit, 512 KiB) in the 64-bit window
    (``vmmkit_aarch64.layout``: from 512 GiB); Linux keeps them there, and it can, because the
    window is in the bridge's ``ranges``. QEMU ``virt`` puts its 64-bit BARs in its high window."""
    from vmmkit_aarch64 import layout as L

    window = L.memory_layout(256 << 20).pci_mmio64
    assert window is not None
    ours = virtio_memory_bars(vmmkit_boot.stdout)
    assert {bar[0] for bar in ours} == {"0000:00:01.0", "0000:00:02.0"}, vmmkit_boot.stdout
    for _, _, index, start, end, flags in ours:
        assert flags & IORESOURCE_MEM_64 and index == 0, ours
        assert start >= 1 << 32 and window.start <= start and end < window.end, ours
    theirs = [bar for bar in virtio_memory_bars(qemu_boot.stdout) if bar[5] & IORESOURCE_MEM_64]
    assert theirs and all(bar[3] >= 1 << 32 for bar in theirs), qemu_boot.stdout
