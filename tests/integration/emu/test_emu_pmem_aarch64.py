"""virtio-pmem on AArch64 over virtio-mmio (issue 17 item 8), on the emu backend, driven by the
AArch64 test guest (``test=pmem``): the device is found on virtio-mmio, its region is 2 MiB
aligned in the 64-bit device window (512 GiB up), FLUSH answers 0 and an unknown request EIO.
Not exercised here: the guest touching the region's bytes (its identity map ends at 512 GiB,
below the window: the guest says so) and Linux on AArch64 (no arm64 kernel on this host)."""

from __future__ import annotations

from pathlib import Path

from vmmkit.testing import run_vmmkit

from ..guest_output import selftest_lines

GUEST_ARCH = "aarch64"


def test_the_aarch64_guest_flushes_pmem_over_mmio(selftest_image: Path, vmmkit_hypervisor: str,
                                                  tmp_path: Path) -> None:
    image = tmp_path / "pmem.img"
    with image.open("wb") as out:
        out.truncate(4 << 20)
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_image), "--memory", "size=128M",
                        "--cmdline", "test=pmem", "--pmem", f"file={image}", timeout=300)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    region = next(line for line in lines if "pmem: mmio" in line and "region [" in line)
    start = int(region.split("[")[1].split("-")[0], 16)
    assert start >= 1 << 39 and start % (2 << 20) == 0, region
    assert "selftest: info pmem: the region is beyond this guest's map: no data access" in lines, lines
    assert "selftest: ok pmem 4 MiB, flush ok" in lines, lines
