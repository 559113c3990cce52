"""The AArch64 test guest on whatever backend the session targets for ``aarch64`` guests: KVM in
the AArch64 lab (``tox -e py311-kvm-aarch64``, which runs this inside ``lab/``), emu on an x86
host. The lines QEMU ``virt`` prints for the same Image are compared on the host, where QEMU is
(``test_lab_aarch64.py``, ``tests/integration/emu/test_emu_boot_aarch64.py``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from integration.guest_output import selftest_lines

from vmmkit.testing import run_vmmkit

GUEST_ARCH = "aarch64"  # what vmmkit_hypervisor resolves for (see vmmkit.testing)

IMAGE = Path(__file__).resolve().parents[1] / "guests" / "build" / "aarch64" / "selftest.Image"


@pytest.fixture(scope="module")
def image() -> Path:
    if not IMAGE.is_file():
        pytest.skip(f"{IMAGE} is not built (make -C tests/guests, with gcc-aarch64-linux-gnu)")
    return IMAGE


def boot(kernel: Path, *args: str, hypervisor: str) -> subprocess.CompletedProcess[str]:
    return run_vmmkit("--hypervisor", hypervisor, "--kernel", str(kernel), *args, timeout=300)


@pytest.mark.parametrize("cpus", [1, 2])
def test_the_guest_sees_its_command_line_and_its_cpus(image: Path, vmmkit_hypervisor: str, cpus: int) -> None:
    result = boot(image, "--cmdline", "hello", "--cpus", f"boot={cpus}", hypervisor=vmmkit_hypervisor)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: cmdline: hello" in lines
    assert f"selftest: cpus: {cpus}" in lines
    for check in ("memmap", "fdt", "psci", "rtc"):
        assert f"selftest: ok {check}" in lines
    assert f"selftest: ok smp ({cpus}/{cpus} cpus online)" in lines
    assert lines[-1] == "selftest: exit 0"
    assert not [line for line in lines if "FAIL" in line]


def test_an_exception_fails_the_run_with_the_guests_status(image: Path, vmmkit_hypervisor: str) -> None:
    result = boot(image, "--cmdline", "test=fault", hypervisor=vmmkit_hypervisor)
    lines = selftest_lines(result.stdout)
    assert any(line.startswith("selftest: FAIL exception: sync: undefined instruction") for line in lines), lines
    assert lines[-1] == "selftest: exit 1"
    assert result.returncode == 1


@pytest.mark.requires_interrupts
@pytest.mark.parametrize("cpus", [1, 2])
def test_an_sgi_the_virtual_timer_and_a_device_spi_arrive(image: Path, vmmkit_hypervisor: str, cpus: int) -> None:
    result = boot(image, "--cmdline", "test=irq", "--cpus", f"boot={cpus}", hypervisor=vmmkit_hypervisor)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: ok gic sgi (INTID 1 to self)" in lines
    assert "selftest: ok timer (virtual timer INTID 27, 10 ms ahead)" in lines
    assert "selftest: ok gic spi (PL031 match, INTID 34)" in lines
    assert not [line for line in lines if "FAIL" in line]


def test_virtio_blk_over_mmio_reaches_the_file(image: Path, vmmkit_hypervisor: str, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as stream:
        stream.truncate(4 << 20)
    result = boot(image, "--cmdline", "test=blk", "--disk", f"path={disk}",
                  "--platform", "virtio_transport=mmio", hypervisor=vmmkit_hypervisor)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(line.startswith("selftest: ok blk (8192 sectors") for line in lines), lines
    assert disk.read_bytes()[:4] == b"vmmk"


def test_the_initramfs_is_described_to_the_guest(image: Path, vmmkit_hypervisor: str, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\0" * 5000)
    result = boot(image, "--initramfs", str(initrd), hypervisor=vmmkit_hypervisor)
    assert result.returncode == 0, result.stdout + result.stderr
    info = [line for line in selftest_lines(result.stdout) if line.startswith("selftest: info initrd:")]
    assert len(info) == 1
    start, end = (int(part, 16) for part in info[0].split("[")[1].rstrip(")").split("-"))
    assert end - start == 5000


@pytest.mark.parametrize("transport", [None, "pci"])
def test_virtio_blk_on_pci_or_the_vms_default_reaches_the_file(image: Path, vmmkit_hypervisor: str, tmp_path: Path,
                                                                transport: str | None) -> None:
    """The VM's default transport follows the backend: virtio-pci where it has a GICv3 ITS (KVM),
    virtio-mmio where it has none (emu). Over PCI the guest finds vmmkit's 64-bit BAR at 512 GiB,
    beyond its identity map, and moves it into the 32-bit window, as firmware would."""
    disk = tmp_path / "disk.img"
    with disk.open("wb") as stream:
        stream.truncate(4 << 20)
    platform = [] if transport is None else ["--platform", f"virtio_transport={transport}"]
    result = boot(image, "--cmdline", "test=blk", "--disk", f"path={disk}", *platform, hypervisor=vmmkit_hypervisor)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = transport or ("pci" if vmmkit_hypervisor == "kvm" else "mmio")
    assert any(line.startswith(f"selftest: info virtio: blk: {expected} ") for line in lines), lines
    if expected == "pci":
        assert "selftest: info virtio: pci 00:01.0: bar 0 at 0x8000000000 is beyond this guest's map" in lines
    assert any(line.startswith("selftest: ok blk (8192 sectors") for line in lines), lines
    assert disk.read_bytes()[:4] == b"vmmk"
