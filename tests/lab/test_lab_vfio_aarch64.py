"""VFIO in the AArch64 lab (issue 19): the lab boots with QEMU's SMMUv3 (``lab.py run --iommu``), an
``edu`` and an NVMe controller (``--edu --nvme IMAGE``); inside, ``lab/vfio/bind.sh`` moves both to
``vfio-pci`` (``driver_override``; the NVMe one from the ``nvme`` driver that claimed it at boot)
and ``lab/vfio/check.py`` uses their groups from userspace as a VMM would: viable, a Type1 v2
container, the device file, BAR 0 mapped; the edu's registers through that mapping, a DMA round
trip to and from pages mapped with ``VFIO_IOMMU_MAP_DMA`` at an IOVA (so translated by the
emulated SMMUv3: without it the device would write elsewhere), and an MSI counted by an eventfd.
Then, in the same boot, ``lab/vfio/edu-on-vmmkit.sh``: the self-test guest's ``test=edu`` on
vmmkit's KVM-arm64 with that edu passed through (``--device path=...``, the VFIO device plugin)
must print the edu lines QEMU's emulated edu prints (tests/integration/test_guest_edu_qemu.py):
identification, liveness, factorial, the DMA round trip (guest RAM at 1 GiB through the SMMUv3
to the real-model device) and three MSIs (through vmmkit's GICv3 ITS). One lab boot, ~60 s on
this loaded 2-core host (the vmmkit part ~30 s); the check without an IOMMU is one more boot
(~12 s), opt-in (``VMMKIT_LAB_ALL=1``) to keep the default tier's cost here under a minute."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from integration.guest_output import selftest_lines
from integration.test_guest_edu_qemu import EDU_LINES, edu_lines

from .conftest import run_in_lab

pytestmark = pytest.mark.slow

EDU_ID, NVME_ID = "1234:11e8", "1b36:0010"  # QEMU's edu; QEMU's NVMe controller (Red Hat vendor id)


@pytest.fixture(scope="module")
def vfio_lab(aarch64_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    image = tmp_path_factory.mktemp("vfio") / "nvme.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    return run_in_lab("--iommu", "--edu", "--nvme", str(image), "--timeout", "800", "--", "sh", "-c",
                      f"sh lab/vfio/bind.sh {EDU_ID} {NVME_ID} && python3 lab/vfio/check.py {EDU_ID} {NVME_ID}; "
                      "status=$?; sh lab/vfio/edu-on-vmmkit.sh 2>&1; exit $(( status | $? ))")


def vfio_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """bind.sh's and check.py's lines (up to check.py's summary; edu-on-vmmkit.sh binds again)."""
    lines = []
    for line in result.stdout.splitlines():
        if line.startswith("VMMKIT-VFIO:"):
            lines.append(line.strip())
            if line.endswith("failure(s)"):
                break
    return lines


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"{result.stdout}\n--- stderr ---\n{result.stderr[-3000:]}"


def test_edu_and_nvme_are_bound_to_vfio_pci_with_their_group_nodes(vfio_lab: subprocess.CompletedProcess[str]) -> None:
    lines = vfio_lines(vfio_lab)
    binds = [line for line in lines if line.startswith("VMMKIT-VFIO: bind ")]
    assert len(binds) == 2, explain(vfio_lab)
    for line, ident in zip(binds, (EDU_ID, NVME_ID), strict=True):
        assert re.fullmatch(rf"VMMKIT-VFIO: bind 0000:00:0\d\.0 {ident} driver vfio-pci group (\d+) "
                            r"\(1 device\(s\)\) /dev/vfio/\1 present", line), explain(vfio_lab)
    assert any(re.fullmatch(r"VMMKIT-VFIO: unbind 0000:00:0\d\.0 from nvme", line) for line in lines), \
        "the lab's nvme driver claims the controller at boot: bind.sh must take it away\n" + explain(vfio_lab)


def test_the_groups_are_usable_dma_goes_through_the_iommu_and_the_msi_arrives(
        vfio_lab: subprocess.CompletedProcess[str]) -> None:
    assert vfio_lab.returncode == 0, explain(vfio_lab)
    lines = vfio_lines(vfio_lab)
    assert not [line for line in lines if " FAIL " in line], explain(vfio_lab)
    viable = [line for line in lines if "viable, Type1 v2 container, device fd: pci" in line]
    assert len(viable) == 2, explain(vfio_lab)
    for expected in (
        "VMMKIT-VFIO: edu identification 0x010000ed (version 1.0) through the mapped BAR 0",
        "VMMKIT-VFIO: edu liveness: wrote 0x12345678, read 0xedcba987",
        "VMMKIT-VFIO: edu dma: 256 bytes from IOVA 0x100000 to the device and back to IOVA 0x101000 "
        "(VFIO_IOMMU_MAP_DMA, through the IOMMU)",
        "VMMKIT-VFIO: edu msi: raised 0x4000, the eventfd counted it (VFIO_DEVICE_SET_IRQS), acknowledged",
        "VMMKIT-VFIO: 2 function(s) checked, 0 failure(s)",
    ):
        assert expected in lines, explain(vfio_lab)
    assert any(re.fullmatch(r"VMMKIT-VFIO: 0000:00:0\d\.0: NVMe version register 0x000\d0\d00 \(\d\.\d\) "
                            r"through the mapped BAR 0", line) for line in lines), explain(vfio_lab)


@pytest.mark.skipif(os.environ.get("VMMKIT_LAB_ALL") != "1",
                    reason="one more lab boot (~12 s): VMMKIT_LAB_ALL=1 runs it")
def test_without_an_iommu_there_is_no_group_and_bind_says_so(aarch64_lab: Any, tmp_path: Path) -> None:
    """The same lab without ``--iommu``: no IOMMU groups, so vfio-pci has nothing to offer (a VMM's
    VFIO device must fail there with a clear error, not here)."""
    result = run_in_lab("--edu", "--timeout", "600", "--", "sh", "lab/vfio/bind.sh", EDU_ID)
    lines = vfio_lines(result)
    assert "VMMKIT-VFIO: no IOMMU groups (is there an IOMMU? lab.py run --iommu)" in lines, explain(result)
    assert result.returncode == 1, explain(result)


def test_test_edu_on_vmmkit_with_the_passed_through_edu_prints_what_qemus_edu_prints(
        vfio_lab: subprocess.CompletedProcess[str]) -> None:
    vmmkit = vfio_lab.stdout.split("VMMKIT-VFIO: vmmkit --hypervisor kvm", 1)
    assert len(vmmkit) == 2, explain(vfio_lab)
    assert edu_lines(vmmkit[1]) == EDU_LINES["aarch64"], explain(vfio_lab)
    lines = selftest_lines(vmmkit[1])
    assert "selftest: info edu: msi its lpi 8192" in lines, explain(vfio_lab)
    assert lines[-1] == "selftest: exit 0", explain(vfio_lab)
