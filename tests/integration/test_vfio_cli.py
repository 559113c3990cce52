"""VFIO on this host, as a user meets it: no ``/dev/vfio`` here, so ``--device path=`` fails with
a message naming it (exit 1, the VMM could not start the VM), an option vmmkit does not take is
refused by name (exit 2), and ``vmmkit plugins`` lists the ``vfio-pci`` device type and says
whether ``/dev/vfio`` is usable. The passthrough itself is contract-tested in ``tests/unit/vfio``
(a simulated ``/dev/vfio``); it runs for real only where a kernel has VFIO (the nested lab)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

GUEST_ARCH = "x86_64"
HOST_DEVICE = "/sys/bus/pci/devices/0000:00:00.0"

no_vfio_here = pytest.mark.skipif(os.path.exists("/dev/vfio"), reason="this host has /dev/vfio")


@no_vfio_here
def test_a_device_without_dev_vfio_is_a_clear_error(guest_elf: Path) -> None:
    result = run_vmmkit("--device", f"path={HOST_DEVICE}", "--kernel", str(guest_elf))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [text for text in result.stderr.splitlines() if text.startswith("vmmkit: error:")]
    assert "/dev/vfio" in line and "missing" in line


def test_options_vmmkit_does_not_take_are_refused_by_name(guest_elf: Path) -> None:
    result = run_vmmkit("--device", f"path={HOST_DEVICE},iommu=on", "--kernel", str(guest_elf))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--device: iommu is not supported yet (a virtual IOMMU)" in result.stderr
    result = run_vmmkit("--device", f"path={HOST_DEVICE},x_nv_gpudirect_clique=1", "--kernel", str(guest_elf))
    assert result.returncode == 2 and "x_nv_gpudirect_clique is not supported yet" in result.stderr


def test_vmmkit_plugins_reports_vfio() -> None:
    result = run_vmmkit("plugins")
    assert result.returncode == 0, result.stderr
    (line,) = [text for text in result.stdout.splitlines() if text.strip().startswith("vfio-pci ")
               and "passed through" in text and "[" in text and "here" in text]
    if os.path.exists("/dev/vfio/vfio"):
        assert "usable here" in line
    else:
        assert "[not usable here: /dev/vfio/vfio not found (no VFIO on this host)]" in line
    assert any(text.strip().startswith("vfio-pci") and " vfio " in text for text in result.stdout.splitlines())
