"""Several PCI segments (``--platform num_pci_segments=``, as Kata Containers asks for two): each
segment has its own root bridge in the DSDT (``PC01``, ``_SEG`` 1), its own MCFG entry and share
of the ECAM and MMIO windows, and a device asks for its segment with ``pci_segment=``. The tables
are read back from a built VM's memory as a guest finds them (Linux judging it:
``tests/linux/test_linux_hotplug.py``, which hot-adds on segment 1)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmmkit.config import ConfigError, VmConfig
from vmmkit.machine import Machine

from .test_example_plugin_firmware import RSDP_ADDRESS, _table, guest_dsdt


def built(make_machine: object, hypervisor: str, kernel: Path, tmp_path: Path) -> Machine:
    for name in ("a.img", "b.img"):
        with open(tmp_path / name, "wb") as image:
            image.truncate(1 << 20)
    config = VmConfig.from_cli(kernel=str(kernel), platform="num_pci_segments=2,virtio_transport=pci",
                               disks=[f"path={tmp_path / 'a.img'}", f"path={tmp_path / 'b.img'},pci_segment=1"])
    machine: Machine = make_machine(config, hypervisor=hypervisor, arch="x86_64")  # type: ignore[operator]
    machine.build()
    return machine


def mcfg_entries(machine: Machine) -> list[tuple[int, int, int, int]]:
    memory = machine.memory
    assert memory is not None
    xsdt = _table(memory, struct.unpack("<Q", memory.read(RSDP_ADDRESS + 24, 8))[0])
    for (entry,) in struct.iter_unpack("<Q", xsdt[36:]):
        table = _table(memory, entry)
        if table[:4] == b"MCFG":
            return [struct.unpack_from("<QHBB", table, offset) for offset in range(44, len(table), 16)]
    raise AssertionError("no MCFG in the XSDT")


@pytest.mark.requires_kvm
def test_each_segment_has_its_root_windows_and_mcfg_entry(make_machine: object, vmmkit_hypervisor: str,
                                                          selftest_elf: Path, tmp_path: Path) -> None:
    machine = built(make_machine, vmmkit_hypervisor, selftest_elf, tmp_path)
    placed = {p.id: p for p in machine.devices}
    assert placed["_disk0"].properties["bdf"] == "0000:00:01.0"
    assert placed["_disk1"].properties["bdf"] == "0001:00:01.0"
    roots = machine.manager.pci_segments
    assert sorted(roots) == [0, 1] and all(root.hotplug for root in roots.values())
    ecams = [root.ecam for root in roots.values()]
    assert ecams[0] is not None and ecams[1] is not None and ecams[0].end == ecams[1].start
    for a, b in ((roots[0].mmio32, roots[1].mmio32), (roots[0].mmio64, roots[1].mmio64)):
        assert a is not None and b is not None and not a.overlaps(b)
    assert roots[1].io is None  # port I/O (and 0xCF8) stays segment 0's
    bar = placed["_disk1"].properties["bars"]
    assert all(roots[1].mmio32.contains(base, size) or roots[1].mmio64.contains(base, size)  # type: ignore[union-attr]
               for base, size in bar.values() if size)
    assert mcfg_entries(machine) == [(ecams[0].start, 0, 0, ecams[0].size // (1 << 20) - 1),
                                     (ecams[1].start, 1, 0, ecams[1].size // (1 << 20) - 1)]
    if shutil.which("iasl") is None:
        pytest.skip("iasl (acpica-tools) is not installed: the DSDT is not disassembled")
    (tmp_path / "dsdt.dat").write_bytes(guest_dsdt(machine))
    result = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    pc01 = dsl[dsl.index("Device (PC01)"):]
    assert "Name (_SEG, One)" in pc01[:400], pc01[:400]
    assert "\\_SB.PC01.PCNT ()" in dsl  # the hotplug scan covers segment 1


def test_a_device_on_a_segment_the_platform_lacks_is_refused() -> None:
    with pytest.raises(ConfigError, match="num_pci_segments"):
        VmConfig.from_cli(kernel="k", disks=["path=a.img,pci_segment=1"])
