"""VFIO in the x86-64 lab (issue 19), opt-in (``VMMKIT_LAB_X86_64=1``: the x86 lab stays out of the
default run, see lab/README.md): QEMU's ``intel-iommu`` with interrupt remapping (``lab.py run
--arch x86_64 --iommu``: ``-M q35,kernel-irqchip=split``, ``intel_iommu=on``), an ``edu`` and an
NVMe controller bound to ``vfio-pci`` and used from userspace, then ``test=edu`` on vmmkit's KVM
(AMD SVM, no quirks) with the edu passed through: the same checks as test_lab_vfio_aarch64.py,
the guest's MSI through the local APIC. One lab boot with one emulated CPU (the x86 lab's two-CPU
hang, see the README), ~75 s on this loaded host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from integration.guest_output import selftest_lines
from integration.test_guest_edu_qemu import EDU_LINES, edu_lines

from .conftest import LAB, run_in_lab
from .test_lab_vfio_aarch64 import EDU_ID, NVME_ID, explain, vfio_lines

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("VMMKIT_LAB_X86_64") != "1",
                       reason="the x86-64 lab is opt-in: VMMKIT_LAB_X86_64=1 runs it"),
]


@pytest.fixture(scope="module")
def x86_vfio_lab(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"the x86-64 lab needs {tool}")
    build = subprocess.run([sys.executable, str(LAB), "build", "--arch", "x86_64"], capture_output=True,
                           text=True, timeout=1800)
    if build.returncode != 0:
        pytest.skip(f"the x86-64 lab cannot be built here: {build.stderr.strip().splitlines()[-1:]}")
    image = tmp_path_factory.mktemp("vfio") / "nvme.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    return run_in_lab("--arch", "x86_64", "--smp", "1", "--iommu", "--edu", "--nvme", str(image),
                      "--timeout", "900", "--", "sh", "-c",
                      f"sh lab/vfio/bind.sh {EDU_ID} {NVME_ID} && python3 lab/vfio/check.py {EDU_ID} {NVME_ID}; "
                      "status=$?; sh lab/vfio/edu-on-vmmkit.sh 2>&1; exit $(( status | $? ))")


def test_intel_iommu_groups_are_usable_dma_and_msi_work(x86_vfio_lab: subprocess.CompletedProcess[str]) -> None:
    assert x86_vfio_lab.returncode == 0, explain(x86_vfio_lab)
    lines = vfio_lines(x86_vfio_lab)
    assert not [line for line in lines if " FAIL " in line], explain(x86_vfio_lab)
    assert len([line for line in lines if " driver vfio-pci group " in line]) == 2, explain(x86_vfio_lab)
    for expected in (
        "VMMKIT-VFIO: edu dma: 256 bytes from IOVA 0x100000 to the device and back to IOVA 0x101000 "
        "(VFIO_IOMMU_MAP_DMA, through the IOMMU)",
        "VMMKIT-VFIO: edu msi: raised 0x4000, the eventfd counted it (VFIO_DEVICE_SET_IRQS), acknowledged",
        "VMMKIT-VFIO: 2 function(s) checked, 0 failure(s)",
    ):
        assert expected in lines, explain(x86_vfio_lab)


def test_test_edu_on_vmmkit_with_the_passed_through_edu_prints_what_qemus_edu_prints(
        x86_vfio_lab: subprocess.CompletedProcess[str]) -> None:
    vmmkit = x86_vfio_lab.stdout.split("VMMKIT-VFIO: vmmkit --hypervisor kvm", 1)
    assert len(vmmkit) == 2, explain(x86_vfio_lab)
    assert edu_lines(vmmkit[1]) == EDU_LINES["x86_64"], explain(x86_vfio_lab)
    assert selftest_lines(vmmkit[1])[-1] == "selftest: exit 0", explain(x86_vfio_lab)
