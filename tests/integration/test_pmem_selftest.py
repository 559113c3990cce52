"""virtio-pmem under the x86-64 test guest's driver (``test=pmem``, tests/guests/virtio/pmem.c):
the guest reads the region from the configuration space, maps it, sees the host's bytes, writes
its own through the mapping (they reach the file: ``MAP_SHARED``), and FLUSH answers 0 while an
unknown request answers EIO; over virtio-pci and virtio-mmio. Linux's driver is the judge in
tests/linux/test_linux_pmem.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

from .guest_output import selftest_lines


def pmem_image(path: Path, size: int = 4 << 20) -> Path:
    with path.open("wb") as out:
        out.write(b"HOSTPMEM")
        out.truncate(size)
    return path


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_the_guest_reads_writes_and_flushes_the_file(selftest_elf: Path, vmmkit_hypervisor: str, tmp_path: Path,
                                                     transport: str) -> None:
    image = pmem_image(tmp_path / "pmem.img")
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf), "--memory", "size=128M",
                        "--cmdline", "test=pmem", "--pmem", f"file={image},transport={transport}", timeout=120)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: info pmem: first bytes: HOSTPMEM" in lines, lines
    assert "selftest: ok pmem 4 MiB, flush ok" in lines, lines
    region = next(line for line in lines if "region [" in line)
    start = int(region.split("[")[1].split("-")[0], 16)
    assert start >= 1 << 32 and start % (2 << 20) == 0, region  # above RAM, in the 64-bit window
    assert image.read_bytes()[:16] == b"HOSTPMEMGUESTPM!"
    assert image.stat().st_size == 4 << 20


def test_discard_writes_keeps_the_file(selftest_elf: Path, vmmkit_hypervisor: str, tmp_path: Path) -> None:
    image = pmem_image(tmp_path / "pmem.img")
    image.chmod(0o444)
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf), "--memory", "size=128M",
                        "--cmdline", "test=pmem", "--pmem", f"file={image},discard_writes=on", timeout=120)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: ok pmem 4 MiB, flush ok" in lines, lines
    assert image.read_bytes()[:16] == b"HOSTPMEM" + bytes(8)  # the guest wrote to a private copy


@pytest.mark.parametrize(("spec", "said"), [
    ("file={dir}", "is a directory: give size= for a temporary file in it"),
    ("file={dir}/short.img", "has size 3145728, not a positive multiple of 2 MiB"),
    ("file={dir}/none.img", "cannot be opened: No such file or directory"),
])
def test_bad_files_exit_2_with_one_line(selftest_elf: Path, tmp_path: Path, spec: str, said: str) -> None:
    with (tmp_path / "short.img").open("wb") as out:
        out.truncate(3 << 20)
    result = run_vmmkit("--kernel", str(selftest_elf), "--pmem", spec.format(dir=tmp_path), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("vmmkit: error: --pmem: "), result.stderr
    assert said in result.stderr


def test_the_region_stays_clear_of_the_memory_hotplug_area(selftest_elf: Path, vmmkit_hypervisor: str,
                                                           tmp_path: Path) -> None:
    """x86-64: 128 MiB of RAM, hotplug RAM from 4 GiB to 4.5 GiB; the 64-bit device window, and
    the pmem region in it, start at the next GiB above (5 GiB)."""
    image = pmem_image(tmp_path / "pmem.img")
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf),
                        "--memory", "size=128M,hotplug_size=512M", "--cmdline", "test=pmem",
                        "--pmem", f"file={image}", timeout=120)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: ok pmem 4 MiB, flush ok" in lines, lines
    region = next(line for line in lines if "region [" in line)
    start = int(region.split("[")[1].split("-")[0], 16)
    assert start >= 5 << 30, region
