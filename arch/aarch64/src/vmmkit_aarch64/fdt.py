"""The flattened device tree an AArch64 guest boots with, written with pylibfdt (``FdtSw``).

Nodes, in the order written::

    /                 compatible "linux,dummy-virt", #address-cells = #size-cells = 2
    /chosen           bootargs, stdout-path (the PL011), linux,initrd-start/-end (u64)
    /memory@<base>    one per RAM range
    /cpus/cpu@<n>     reg = the vCPU's MPIDR affinity, enable-method "psci"
    /psci             compatible "arm,psci-1.0", "arm,psci-0.2"; method "hvc"
    /timer            "arm,armv8-timer", PPIs 13, 14, 11, 10 (level-low)
    /intc@8000000     GICv3: distributor + redistributors for every vCPU (the emu backend
                      delivers no interrupts; the node is there for KVM and for Linux)
      msi-controller@8080000   the GICv3 ITS ("arm,gic-v3-its", #msi-cells = 1), only when the
                      backend created one; PCI host bridges point their ``msi-map`` at it
    /apb-pclk         the fixed 24 MHz clock PL011/PL031 name
    /<device>@<base>  whatever each placed device writes of itself
                      (:meth:`vmmkit.device.ManagedDevice.describe_fdt`, through
                      :class:`FdtNodeWriter`), in address order: the PL011 (which makes
                      itself ``/chosen/stdout-path``), the PL031, virtio-mmio windows, ...

``interrupts`` use three cells (type, number, flags): type 0 = SPI (number = GSI - 32),
type 1 = PPI; flags 4 = level-high, 1 = edge-rising.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import libfdt

from vmmkit.device import ManagedDevice, PlacedDevice
from vmmkit.memory import MemoryRange
from vmmkit_aarch64 import layout as L

PHANDLE_GIC: Final = 1
PHANDLE_CLOCK: Final = 2
PHANDLE_ITS: Final = 3

GIC_SPI: Final = 0
GIC_PPI: Final = 1
IRQ_EDGE_RISING: Final = 1
IRQ_LEVEL_HIGH: Final = 4
IRQ_LEVEL_LOW: Final = 8
#: PPI flags: level-low, routed to every CPU (the CPU mask in bits 8-15).
_PPI_ALL_CPUS: Final = 0xFF00


def _cells(*values: int) -> bytes:
    return b"".join(value.to_bytes(4, "big") for value in values)


def _reg(start: int, size: int) -> bytes:
    return _cells(start >> 32, start & 0xFFFF_FFFF, size >> 32, size & 0xFFFF_FFFF)


def _strings(*values: str) -> bytes:
    return b"".join(value.encode() + b"\0" for value in values)


def _spi(gsi: int, flags: int) -> bytes:
    return _cells(GIC_SPI, gsi - L.SPI_BASE, flags)


class FdtNodeWriter:
    """The :class:`vmmkit.firmware.FdtWriter` devices write their nodes with: ``FdtSw`` plus
    the encodings of this platform (GICv3 SPIs, the 24 MHz APB clock, 2+2 address cells)."""

    def __init__(self, sw: libfdt.FdtSw, *, msi_controller: int | None = None) -> None:
        self._sw = sw
        self.stdout_path: str | None = None
        #: The phandle of the ITS, if the VM has one.
        self.msi_controller = msi_controller

    def begin_node(self, name: str) -> None:
        self._sw.begin_node(name)

    def end_node(self) -> None:
        self._sw.end_node()

    def property(self, name: str, value: bytes) -> None:
        self._sw.property(name, value)

    def property_string(self, name: str, value: str) -> None:
        self._sw.property_string(name, value)

    def property_strings(self, name: str, *values: str) -> None:
        self._sw.property(name, _strings(*values))

    def property_u32(self, name: str, value: int) -> None:
        self._sw.property_u32(name, value)

    def property_reg(self, start: int, size: int) -> None:
        self._sw.property("reg", _reg(start, size))

    def property_interrupt(self, irq: int, *, edge: bool) -> None:
        self._sw.property("interrupts", _spi(irq, IRQ_EDGE_RISING if edge else IRQ_LEVEL_HIGH))

    def interrupt_specifier(self, irq: int, *, edge: bool) -> bytes:
        # The GIC node has #address-cells = 2: two zero unit-address cells before the SPI.
        return _cells(PHANDLE_GIC, 0, 0) + _spi(irq, IRQ_EDGE_RISING if edge else IRQ_LEVEL_HIGH)

    def property_clocks(self, *names: str) -> None:
        self._sw.property("clocks", _cells(*(PHANDLE_CLOCK for _ in names)))
        self._sw.property("clock-names", _strings(*names))

    def property_msi_map(self, device_id_base: int, length: int) -> None:
        if self.msi_controller is not None:
            self._sw.property("msi-map", _cells(0, self.msi_controller, device_id_base, length))

    def set_stdout(self, path: str) -> None:
        self.stdout_path = path


def build_fdt(
    *,
    ram: Sequence[MemoryRange],
    mpidrs: Sequence[int],
    cmdline: str,
    initrd: MemoryRange | None,
    devices: Sequence[PlacedDevice],
    cpu_compatible: str = "arm,arm-v8",
    its: MemoryRange | None = None,
) -> bytes:
    """The DTB for a VM with ``ram``, vCPUs with affinities ``mpidrs`` and ``devices``; with
    ``its``, a GICv3 ITS there (Documentation/devicetree/bindings/interrupt-controller/
    arm,gic-v3.yaml; Cloud Hypervisor's ``arch/src/aarch64/fdt.rs``)."""
    ordered = sorted((d for d in devices if isinstance(d.device, ManagedDevice)),
                     key=lambda d: d.mmio[0] if d.mmio else 0)
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property("compatible", _strings("linux,dummy-virt"))
    sw.property_string("model", "vmmkit")
    sw.property_u32("#address-cells", 2)
    sw.property_u32("#size-cells", 2)
    sw.property_u32("interrupt-parent", PHANDLE_GIC)

    sw.begin_node("chosen")
    sw.property_string("bootargs", cmdline)
    stdout = _stdout_path(ordered)
    if stdout is not None:
        sw.property_string("stdout-path", stdout)
    if initrd is not None:
        sw.property_u64("linux,initrd-start", initrd.start)
        sw.property_u64("linux,initrd-end", initrd.end)
    sw.end_node()

    for rng in ram:
        sw.begin_node(f"memory@{rng.start:x}")
        sw.property_string("device_type", "memory")
        sw.property("reg", _reg(rng.start, rng.size))
        sw.end_node()

    sw.begin_node("cpus")
    sw.property_u32("#address-cells", 1)
    sw.property_u32("#size-cells", 0)
    for mpidr in mpidrs:
        affinity = mpidr & 0xFF_FFFF
        sw.begin_node(f"cpu@{affinity:x}")
        sw.property_string("device_type", "cpu")
        sw.property("compatible", _strings(cpu_compatible))
        sw.property_u32("reg", affinity)
        sw.property_string("enable-method", "psci")
        sw.end_node()
    sw.end_node()

    sw.begin_node("psci")
    sw.property("compatible", _strings("arm,psci-1.0", "arm,psci-0.2"))
    sw.property_string("method", "hvc")
    sw.end_node()

    sw.begin_node("timer")
    sw.property("compatible", _strings("arm,armv8-timer"))
    flags = _PPI_ALL_CPUS | IRQ_LEVEL_LOW
    sw.property("interrupts", b"".join(_cells(GIC_PPI, ppi, flags) for ppi in L.TIMER_PPIS))
    sw.property("always-on", b"")
    sw.end_node()

    redist = L.gic_redistributors(len(mpidrs))
    sw.begin_node(f"intc@{L.GIC_DIST.start:x}")
    sw.property("compatible", _strings("arm,gic-v3"))
    sw.property_u32("#interrupt-cells", 3)
    sw.property("interrupt-controller", b"")
    sw.property_u32("#address-cells", 2)
    sw.property_u32("#size-cells", 2)
    sw.property("ranges", b"")
    sw.property_u32("#redistributor-regions", 1)
    sw.property("reg", _reg(L.GIC_DIST.start, L.GIC_DIST.size) + _reg(redist.start, redist.size))
    sw.property_u32("phandle", PHANDLE_GIC)
    if its is not None:
        sw.begin_node(f"msi-controller@{its.start:x}")
        sw.property("compatible", _strings("arm,gic-v3-its"))
        sw.property("msi-controller", b"")
        sw.property_u32("#msi-cells", 1)
        sw.property("reg", _reg(its.start, its.size))
        sw.property_u32("phandle", PHANDLE_ITS)
        sw.end_node()
    sw.end_node()

    sw.begin_node("apb-pclk")
    sw.property("compatible", _strings("fixed-clock"))
    sw.property_u32("#clock-cells", 0)
    sw.property_u32("clock-frequency", 24_000_000)
    sw.property_string("clock-output-names", "clk24mhz")
    sw.property_u32("phandle", PHANDLE_CLOCK)
    sw.end_node()

    writer = FdtNodeWriter(sw, msi_controller=PHANDLE_ITS if its is not None else None)
    for placed in ordered:
        placed.device.describe_fdt(placed, writer)

    sw.end_node()
    fdt = sw.as_fdt()
    fdt.pack()
    blob = bytes(fdt.as_bytearray())
    if len(blob) > L.FDT_MAX_SIZE:
        raise ValueError(f"the device tree is {len(blob)} bytes, more than the 2 MiB the boot protocol allows")
    return blob


def _stdout_path(devices: Sequence[PlacedDevice]) -> str | None:
    """The node a device names as the console: the nodes are written after ``/chosen``, so a
    first pass into a scratch tree asks each device (cheap: a few nodes)."""
    scratch = libfdt.FdtSw()
    scratch.finish_reservemap()
    scratch.begin_node("")
    writer = FdtNodeWriter(scratch)
    for placed in devices:
        placed.device.describe_fdt(placed, writer)
    return writer.stdout_path
