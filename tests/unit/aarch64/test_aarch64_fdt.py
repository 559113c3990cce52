"""The device tree: read back with libfdt, and (when installed) checked by dtc."""

from __future__ import annotations

import shutil
import subprocess

import libfdt
import pytest
from aarch64_helpers import placed
from vmmkit_aarch64 import layout as L
from vmmkit_aarch64.fdt import build_fdt
from vmmkit_aarch64.psci import PsciPower
from vmmkit_devices.debug.exit import DebugExit
from vmmkit_devices.legacy.pl011 import Pl011
from vmmkit_devices.legacy.rtc_pl031 import Pl031

from vmmkit.aarch64 import mpidr_for
from vmmkit.bus import Bus
from vmmkit.memory import MemoryRange
from vmmkit.pci.host import PciRoot
from vmmkit.virtio.mmio import VirtioMmioTransport

RAM = (MemoryRange(L.RAM_START, 256 << 20),)


def bare(cls: type) -> object:
    """An instance of a device class for its ``describe_fdt`` (which reads only ``placed``)."""
    return object.__new__(cls)


def devices() -> list:
    return [
        placed("pl011", mmio=(0x0900_0000, 0x1000), irq=33, device=bare(Pl011)),
        placed("rtc-pl031", mmio=(0x0901_0000, 0x1000), irq=34, device=bare(Pl031)),
        placed("debug-exit", mmio=(0x0902_0000, 0x1000), device=bare(DebugExit)),
        placed("psci", mmio=(0x0903_0000, 0x1000), device=bare(PsciPower)),
        placed("virtio-mmio", mmio=(0x0A00_0000, 0x1000), irq=37, device=bare(VirtioMmioTransport)),
        placed("virtio-mmio", mmio=(0x0A00_1000, 0x1000), irq=38, device=bare(VirtioMmioTransport)),
    ]


@pytest.fixture
def fdt() -> libfdt.Fdt:
    blob = build_fdt(ram=RAM, mpidrs=[mpidr_for(i) for i in range(3)], cmdline="console=ttyAMA0 hello",
                     initrd=MemoryRange(0x4F00_0000, 0x1234), devices=devices())
    return libfdt.Fdt(blob)


def prop(fdt: libfdt.Fdt, path: str, name: str) -> bytes:
    return bytes(fdt.getprop(fdt.path_offset(path), name))


def cells(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 4], "big") for i in range(0, len(data), 4)]


def strings(data: bytes) -> list[str]:
    return data.rstrip(b"\0").decode().split("\0")


def test_chosen_has_bootargs_initrd_and_stdout(fdt: libfdt.Fdt) -> None:
    assert prop(fdt, "/chosen", "bootargs") == b"console=ttyAMA0 hello\0"
    assert int.from_bytes(prop(fdt, "/chosen", "linux,initrd-start"), "big") == 0x4F00_0000
    assert int.from_bytes(prop(fdt, "/chosen", "linux,initrd-end"), "big") == 0x4F00_1234
    assert strings(prop(fdt, "/chosen", "stdout-path")) == ["/pl011@9000000"]


def test_memory_node_covers_ram(fdt: libfdt.Fdt) -> None:
    assert strings(prop(fdt, "/memory@40000000", "device_type")) == ["memory"]
    assert cells(prop(fdt, "/memory@40000000", "reg")) == [0, L.RAM_START, 0, 256 << 20]


def test_every_cpu_is_listed_with_its_mpidr_and_psci(fdt: libfdt.Fdt) -> None:
    for index in range(3):
        path = f"/cpus/cpu@{index:x}"
        assert cells(prop(fdt, path, "reg")) == [mpidr_for(index) & 0xFFFFFF]
        assert strings(prop(fdt, path, "enable-method")) == ["psci"]
        assert strings(prop(fdt, path, "device_type")) == ["cpu"]
    assert strings(prop(fdt, "/psci", "compatible")) == ["arm,psci-1.0", "arm,psci-0.2"]
    assert strings(prop(fdt, "/psci", "method")) == ["hvc"]


def test_gicv3_timer_and_devices(fdt: libfdt.Fdt) -> None:
    gic = "/intc@8000000"
    assert strings(prop(fdt, gic, "compatible")) == ["arm,gic-v3"]
    assert cells(prop(fdt, gic, "reg")) == [0, L.GIC_DIST.start, 0, L.GIC_DIST.size,
                                           0, L.GIC_REDIST_BASE, 0, 3 * L.GIC_REDIST_SIZE]
    assert cells(prop(fdt, "/", "interrupt-parent")) == cells(prop(fdt, gic, "phandle"))
    assert cells(prop(fdt, "/timer", "interrupts"))[1::3] == [13, 14, 11, 10]
    assert cells(prop(fdt, "/pl011@9000000", "interrupts")) == [0, 1, 4]
    assert cells(prop(fdt, "/pl031@9010000", "interrupts")) == [0, 2, 4]
    assert strings(prop(fdt, "/pl011@9000000", "compatible")) == ["arm,pl011", "arm,primecell"]
    assert cells(prop(fdt, "/virtio_mmio@a000000", "interrupts")) == [0, 5, 1]
    assert cells(prop(fdt, "/virtio_mmio@a001000", "reg")) == [0, 0x0A00_1000, 0, 0x1000]
    assert strings(prop(fdt, "/debug-exit@9020000", "compatible")) == ["vmmkit,debug-exit"]


def test_the_psci_power_device_is_not_described(fdt: libfdt.Fdt) -> None:
    with pytest.raises(libfdt.FdtException):
        fdt.path_offset("/psci@9030000")


def test_no_initrd_means_no_initrd_properties() -> None:
    fdt = libfdt.Fdt(build_fdt(ram=RAM, mpidrs=[mpidr_for(0)], cmdline="", initrd=None, devices=[]))
    node = fdt.path_offset("/chosen")
    assert fdt.getprop(node, "linux,initrd-start", quiet=(libfdt.NOTFOUND,)) == -libfdt.NOTFOUND


@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc (device-tree-compiler) is not installed")
def test_dtc_accepts_the_blob_without_warnings(tmp_path) -> None:
    blob = build_fdt(ram=RAM, mpidrs=[mpidr_for(i) for i in range(2)], cmdline="hello", initrd=None,
                     devices=devices())
    (tmp_path / "vm.dtb").write_bytes(blob)
    result = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "-o", str(tmp_path / "vm.dts"),
                             str(tmp_path / "vm.dtb")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    dts = (tmp_path / "vm.dts").read_text()
    assert 'bootargs = "hello";' in dts
    assert "warning" not in result.stderr.lower(), result.stderr


class _Root(PciRoot):
    def intx_routes(self) -> tuple[tuple[int, int, int], ...]:
        return ((1, 1, 40), (2, 1, 41))


def test_a_pci_segment_is_a_generic_ecam_host(tmp_path) -> None:
    root = _Root(mmio_bus=Bus("mmio"), pio_bus=Bus("pio"), mmio32=L.PCI_MMIO32, ecam=L.PCI_ECAM,
                 mmio64=MemoryRange(1 << 39, 1 << 38))
    host = placed("pci-host", mmio=(L.PCI_ECAM.start, L.PCI_ECAM.size), device=root)
    blob = build_fdt(ram=RAM, mpidrs=[mpidr_for(0)], cmdline="", initrd=None, devices=[*devices(), host])
    fdt = libfdt.Fdt(blob)
    node = f"/pcie@{L.PCI_ECAM.start:x}"
    assert strings(prop(fdt, node, "compatible")) == ["pci-host-ecam-generic"]
    assert cells(prop(fdt, node, "reg")) == [0, L.PCI_ECAM.start, 0, L.PCI_ECAM.size]
    assert cells(prop(fdt, node, "bus-range")) == [0, 0]
    assert cells(prop(fdt, node, "ranges")) == [
        0x0200_0000, 0, L.PCI_MMIO32.start, 0, L.PCI_MMIO32.start, 0, L.PCI_MMIO32.size,
        0x0300_0000, 0x80, 0, 0x80, 0, 0x40, 0,
    ]
    gic = cells(prop(fdt, "/intc@8000000", "phandle"))[0]
    assert cells(prop(fdt, node, "interrupt-map")) == [
        1 << 11, 0, 0, 1, gic, 0, 0, 0, 40 - 32, 4,
        2 << 11, 0, 0, 1, gic, 0, 0, 0, 41 - 32, 4,
    ]
    if shutil.which("dtc"):
        (tmp_path / "vm.dtb").write_bytes(blob)
        result = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(tmp_path / "vm.dtb")],
                                capture_output=True, text=True)
        assert result.returncode == 0 and "warning" not in result.stderr.lower(), result.stderr
