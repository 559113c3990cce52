"""Kata Containers' VFIO path on vmmkit in the x86-64 lab (issue 21), opt-in like the rest of that
lab (``VMMKIT_LAB_X86_64=1``, lab/README.md): the same replay as
``test_lab_kata_vfio_aarch64.py`` (``lab/vfio/kata-on-vmmkit.sh``, ``tests/lab/kata_vfio_replay.py``)
behind QEMU's ``intel-iommu``, with the lab's Debian amd64 kernel nested on vmmkit's KVM (AMD SVM,
no quirks). Here Kata's ``VmConfig`` goes in unchanged (x86-64 has ACPI memory and PCI hotplug,
and virtio over PCI by default) and Kata's hot-plug runs too: ``vm.add-device`` of the edu answers
200 + ``PciDeviceInfo`` whose ``0000:00:XX.0`` BDF ``clhPciInfoToPath`` takes, the nested Linux
(ACPI PCI hotplug, acpiphp) shows a ``1234:11e8`` function at exactly that slot, ``vm.remove-device``
of the answer's id answers 204 and the guest sees it go; the cold-plugged NVMe is driven throughout.
One lab boot with one emulated CPU (the x86 lab's two-CPU hang): 157 s at load 12, 365 s at load 19.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from .conftest import LAB, run_in_lab
from .test_lab_kata_vfio_aarch64 import (
    MARKER,
    PATTERN,
    Run,
    check_cold_plug,
    check_hot_plug,
    check_stop,
    explain,
    kata_lines,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("VMMKIT_LAB_X86_64") != "1",
                       reason="the x86-64 lab is opt-in: VMMKIT_LAB_X86_64=1 runs it"),
]


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"the x86-64 lab needs {tool}")
    build = subprocess.run([sys.executable, str(LAB), "build", "--arch", "x86_64"], capture_output=True,
                           text=True, timeout=1800)
    if build.returncode != 0:
        pytest.skip(f"the x86-64 lab cannot be built here: {build.stderr.strip().splitlines()[-1:]}")
    image = tmp_path_factory.mktemp("kata-vfio") / "nvme.img"
    with open(image, "wb") as f:
        f.write(MARKER)
        f.truncate(16 << 20)
    result = run_in_lab("--arch", "x86_64", "--smp", "1", "--add", "kernel", "--iommu", "--edu", "--nvme", str(image),
                        "--timeout", "900", "--", "env", f"PATTERN={PATTERN}", "sh", "lab/vfio/kata-on-vmmkit.sh",
                        timeout=960)
    print("\n".join(kata_lines(result.stdout)))  # the replay's steps and seconds (pytest -s)
    return result, image


def test_kata_cold_plugs_the_nvme_with_its_unchanged_body_and_the_nested_linux_drives_it(lab_run: Run) -> None:
    check_cold_plug(*lab_run, departures=[], guest_lines=())


def test_kata_hot_plugs_the_edu_at_the_slot_its_bdf_names_and_removes_it(lab_run: Run) -> None:
    assert check_hot_plug(lab_run[0]), explain(lab_run[0])


def test_kata_stops_the_vmm_and_the_vfio_groups_are_released(lab_run: Run) -> None:
    check_stop(lab_run[0])
