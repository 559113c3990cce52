"""The x86-64 test guest on emu: every default check passes (ACPI, SMP through the backend's
INIT/SIPI, CMOS RTC, ACPI power-off); exceptions reach the guest's IDT as on KVM."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

from ..guest_output import selftest_lines

GUEST_ARCH = "x86_64"


@pytest.mark.parametrize(("image", "cpus"), [("selftest.elf", 1), ("selftest.elf", 2), ("selftest.bzImage", 2)])
def test_the_default_checks_pass(selftest_elf: Path, vmmkit_hypervisor: str, image: str, cpus: int) -> None:
    kernel = selftest_elf.parent / image
    if not kernel.is_file():
        pytest.skip(f"{kernel} is not built (make -C tests/guests)")
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(kernel), "--cmdline", "hello",
                        "--cpus", f"boot={cpus}", timeout=120)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("memmap", "acpi", "rtc"):
        assert f"selftest: ok {check}" in lines
    assert f"selftest: ok smp ({cpus}/{cpus} cpus online)" in lines
    assert lines[-1] == "selftest: exit 0"


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_virtio_blk_is_polled(selftest_elf: Path, vmmkit_hypervisor: str, tmp_path: Path, transport: str) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as stream:
        stream.truncate(4 << 20)
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf), "--cmdline", "test=blk",
                        "--disk", f"path={disk}", "--platform", f"virtio_transport={transport}", timeout=120)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(line.startswith("selftest: ok blk") for line in lines), lines


def test_a_guest_exception_reaches_the_guests_handler(selftest_elf: Path, vmmkit_hypervisor: str) -> None:
    """test=fault executes ud2: the backend delivers #UD through the guest's IDT (it used to end
    the run with an internal error) and the guest reports it and exits with its failure count."""
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf), "--cmdline", "test=fault",
                        timeout=120)
    lines = selftest_lines(result.stdout)
    assert any(line.startswith("selftest: FAIL exception: #UD (vector 6) error 0x0") for line in lines), lines
    assert result.returncode == 1 and lines[-1] == "selftest: exit 1"


def test_plugins_lists_emu_as_usable() -> None:
    result = run_vmmkit("plugins", timeout=60)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("emu "))
    assert "usable" in line and "not usable" not in line
    assert "x86_64,aarch64" in line
