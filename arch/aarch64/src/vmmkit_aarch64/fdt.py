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
    /apb-pclk         the fixed 24 MHz clock PL011/PL031 name
    /pl011@9000000, /pl031@9010000, /virtio_mmio@..., /debug-exit@9020000
                      one node per placed device of kind "pl011", "rtc-pl031",
                      "virtio-mmio", "debug-exit"; other kinds are not described

``interrupts`` use three cells (type, number, flags): type 0 = SPI (number = GSI - 32),
type 1 = PPI; flags 4 = level-high, 1 = edge-rising.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import libfdt

from vmmkit.device import PlacedDevice
from vmmkit.memory import MemoryRange
from vmmkit_aarch64 import layout as L

PHANDLE_GIC: Final = 1
PHANDLE_CLOCK: Final = 2

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


def build_fdt(
    *,
    ram: Sequence[MemoryRange],
    mpidrs: Sequence[int],
    cmdline: str,
    initrd: MemoryRange | None,
    devices: Sequence[PlacedDevice],
    cpu_compatible: str = "arm,arm-v8",
) -> bytes:
    """The DTB for a VM with ``ram``, vCPUs with affinities ``mpidrs`` and ``devices``."""
    uart = next((d for d in devices if d.kind == "pl011" and d.mmio is not None), None)
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
    if uart is not None and uart.mmio is not None:
        sw.property_string("stdout-path", f"/pl011@{uart.mmio[0]:x}")
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
    sw.end_node()

    sw.begin_node("apb-pclk")
    sw.property("compatible", _strings("fixed-clock"))
    sw.property_u32("#clock-cells", 0)
    sw.property_u32("clock-frequency", 24_000_000)
    sw.property_string("clock-output-names", "clk24mhz")
    sw.property_u32("phandle", PHANDLE_CLOCK)
    sw.end_node()

    for placed in sorted(devices, key=lambda d: d.mmio[0] if d.mmio else 0):
        if placed.mmio is None:
            continue
        base, size = placed.mmio
        if placed.kind == "pl011":
            sw.begin_node(f"pl011@{base:x}")
            sw.property("compatible", _strings("arm,pl011", "arm,primecell"))
            sw.property("reg", _reg(base, size))
            if placed.irq is not None:
                sw.property("interrupts", _spi(placed.irq, IRQ_LEVEL_HIGH))
            sw.property("clocks", _cells(PHANDLE_CLOCK, PHANDLE_CLOCK))
            sw.property("clock-names", _strings("uartclk", "apb_pclk"))
            sw.end_node()
        elif placed.kind == "rtc-pl031":
            sw.begin_node(f"pl031@{base:x}")
            sw.property("compatible", _strings("arm,pl031", "arm,primecell"))
            sw.property("reg", _reg(base, size))
            if placed.irq is not None:
                sw.property("interrupts", _spi(placed.irq, IRQ_LEVEL_HIGH))
            sw.property("clocks", _cells(PHANDLE_CLOCK))
            sw.property("clock-names", _strings("apb_pclk"))
            sw.end_node()
        elif placed.kind == "virtio-mmio":
            sw.begin_node(f"virtio_mmio@{base:x}")
            sw.property("compatible", _strings("virtio,mmio"))
            sw.property("reg", _reg(base, size))
            if placed.irq is not None:
                sw.property("interrupts", _spi(placed.irq, IRQ_EDGE_RISING))
            sw.property("dma-coherent", b"")
            sw.end_node()
        elif placed.kind == "debug-exit":
            sw.begin_node(f"debug-exit@{base:x}")
            sw.property("compatible", _strings("vmmkit,debug-exit"))
            sw.property("reg", _reg(base, size))
            sw.end_node()

    sw.end_node()
    fdt = sw.as_fdt()
    fdt.pack()
    blob = bytes(fdt.as_bytearray())
    if len(blob) > L.FDT_MAX_SIZE:
        raise ValueError(f"the device tree is {len(blob)} bytes, more than the 2 MiB the boot protocol allows")
    return blob
