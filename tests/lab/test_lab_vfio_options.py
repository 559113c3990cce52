"""``lab.py run --iommu --edu --nvme``: the QEMU command lines they make (no lab is booted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import LAB, load_lab

VERSION = (7, 2, 22)


def argv(arch: str, **extras: object) -> list[str]:
    lab = load_lab()
    return list(lab.qemu_argv(lab.System(arch), Path("/initrd"), 2, 1024, VERSION, lab.PciExtras(**extras)))


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_aarch64_iommu_edu_and_nvme(tmp_path: Path) -> None:
    image = tmp_path / "nvme.img"
    args = argv("aarch64", iommu=True, edu=True, nvme=image)
    assert option(args, "-M") == "virt,virtualization=on,gic-version=3,iommu=smmuv3"
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert devices == ["virtio-rng-pci", "edu,dma_mask=0xffffffffffff", "nvme,serial=vmmkit-nvme0,drive=nvme0"]
    assert option(args, "-drive") == f"file={image},format=raw,if=none,id=nvme0,cache=writeback"
    assert "intel_iommu" not in option(args, "-append")


def test_x86_64_intel_iommu_with_interrupt_remapping_needs_a_split_irqchip() -> None:
    args = argv("x86_64", iommu=True)
    assert option(args, "-M") == "q35,kernel-irqchip=split"
    assert "intel-iommu,intremap=on,caching-mode=on" in args
    assert option(args, "-append").endswith(" intel_iommu=on")


def test_without_the_options_the_machine_is_the_lab_s_usual_one() -> None:
    args = argv("aarch64")
    assert option(args, "-M") == "virt,virtualization=on,gic-version=3"
    assert [args[i + 1] for i, a in enumerate(args) if a == "-device"] == ["virtio-rng-pci"]
    assert "-drive" not in args


def test_a_missing_nvme_image_is_refused_by_name(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    result = subprocess.run([sys.executable, str(LAB), "run", "--nvme", str(missing), "--", "true"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert f"--nvme {missing}: not a file" in result.stderr
