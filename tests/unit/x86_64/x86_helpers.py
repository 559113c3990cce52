"""Helpers shared by the x86-64 unit tests: configurations, placed devices, synthetic images."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from typing import Any

from vmmkit.bus import Bus
from vmmkit.config import CpusConfig, MemoryConfig, PayloadConfig, VmConfig
from vmmkit.device import DeviceRequest, ManagedDevice, PlacedDevice
from vmmkit.memory import MemoryRange
from vmmkit.pci.host import PciRoot

REPO_ROOT = Path(__file__).resolve().parents[3]
GUEST_BUILD = REPO_ROOT / "tests" / "guests" / "build" / "x86_64"
LINUX_DIR = REPO_ROOT.parent / "shared" / "guests" / "linux"


def make_config(
    kernel: str | Path = "/nonexistent/kernel",
    *,
    cmdline: str | None = "console=ttyS0",
    initramfs: str | Path | None = None,
    memory: str | int = "64M",
    boot_vcpus: int = 1,
    max_vcpus: int | None = None,
    **cpus: Any,
) -> VmConfig:
    return VmConfig(
        payload=PayloadConfig(
            kernel=str(kernel), cmdline=cmdline, initramfs=None if initramfs is None else str(initramfs)
        ),
        memory=MemoryConfig(size=memory),
        cpus=CpusConfig(boot_vcpus=boot_vcpus, max_vcpus=max_vcpus or boot_vcpus, **cpus),
    )


class _Undescribed(ManagedDevice):
    """A device of a kind nothing knows, that says nothing of itself."""


def _device_class(kind: str) -> type:
    from vmmkit_devices.acpi.ged import AcpiGed
    from vmmkit_devices.acpi.pm import AcpiPm
    from vmmkit_devices.debug.port80 import DebugPort
    from vmmkit_devices.debug.pvpanic import PvPanic
    from vmmkit_devices.legacy.i8042 import I8042
    from vmmkit_devices.legacy.rtc import CmosRtc
    from vmmkit_devices.legacy.serial import Serial16550

    from vmmkit.virtio.mmio import VirtioMmioTransport

    classes: dict[str, type] = {
        "serial-16550": Serial16550, "rtc-cmos": CmosRtc, "i8042": I8042, "debug-port": DebugPort,
        "acpi-pm": AcpiPm, "acpi-ged": AcpiGed, "pvpanic": PvPanic, "virtio-mmio": VirtioMmioTransport,
    }
    return classes.get(kind, _Undescribed)


def placed(
    kind: str,
    *,
    pio: tuple[int, int] | None = None,
    mmio: tuple[int, int] | None = None,
    irq: int | None = None,
    device: Any = None,
    **properties: Any,
) -> PlacedDevice:
    """A placed device of ``kind``: an instance of the real class (built without its
    ``__init__``: firmware description reads only ``placed``), unless ``device`` is given."""
    if device is None:
        device = object.__new__(_device_class(kind))
    return PlacedDevice(
        device, DeviceRequest(kind, f"_{kind}"), kind, pio=pio, mmio=mmio, irq=irq, properties=properties
    )


class _RootWithRoutes(PciRoot):
    def __init__(self, routes: tuple[tuple[int, int, int], ...], **windows: Any) -> None:
        super().__init__(mmio_bus=Bus("mmio"), pio_bus=Bus("pio"), **windows)
        self._routes = routes

    def intx_routes(self) -> tuple[tuple[int, int, int], ...]:
        return self._routes


def pci_host(routes: tuple[tuple[int, int, int], ...] = ((1, 1, 10), (2, 1, 11))) -> PlacedDevice:
    """A segment-0 root complex as the device manager places it, with these INTx routes."""
    root = _RootWithRoutes(
        routes, ecam=MemoryRange(0xE800_0000, 256 << 20), mmio32=MemoryRange(0xC800_0000, 512 << 20),
        mmio64=MemoryRange(0x1_C000_0000, 64 << 30), io=MemoryRange(0x1000, 0xF000),
    )
    return placed("pci-host", pio=(0xCF8, 8), mmio=(0xE800_0000, 256 << 20), device=root)


def pc_devices() -> list[PlacedDevice]:
    """What a machine places for the platform devices, plus two virtio-mmio devices and a PCI host."""
    return [
        placed("serial-16550", pio=(0x3F8, 8), irq=4),
        placed("rtc-cmos", pio=(0x70, 2), irq=8),
        placed("i8042", pio=(0x60, 5), irq=1),
        placed("debug-port", pio=(0x80, 1)),
        placed("acpi-pm", pio=(0x600, 8), irq=9),
        placed("virtio-mmio", mmio=(0xC000_0000, 0x1000), irq=5),
        placed("virtio-mmio", mmio=(0xC000_1000, 0x1000), irq=6),
        pci_host(),
        placed("something-new", pio=(0x510, 2)),
    ]


def run(cmd: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


# -- synthetic kernel images --------------------------------------------------------------------


def note(owner: bytes, note_type: int, desc: bytes) -> bytes:
    name = owner + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), note_type) + pad(name) + pad(desc)


def build_elf(
    segments: list[tuple[int, bytes, int]],
    *,
    entry: int,
    pvh_entry: int | None = None,
    linux: bool = False,
    elf_class: int = 64,
    machine: int | None = None,
    vaddr_offset: int = 0,
) -> bytes:
    """An executable ELF: ``segments`` are ``(paddr, file bytes, memsz)``, loaded at file offsets
    0x1000, 0x2000, ...; a PT_NOTE with the Xen PVH entry and a Linux note when asked."""
    is64 = elf_class == 64
    machine = machine if machine is not None else (62 if is64 else 3)
    notes = b""
    if pvh_entry is not None:
        notes += note(b"Xen", 18, struct.pack("<Q" if is64 else "<I", pvh_entry))
    if linux:
        notes += note(b"Linux", 0x100, b"\0\0\0\0")
    phentsize = 56 if is64 else 32
    phnum = len(segments) + (1 if notes else 0)
    ehsize = 64 if is64 else 52
    body = bytearray()
    offset = 0x1000
    phdrs = b""
    for paddr, data, memsz in segments:
        if is64:
            phdrs += struct.pack(
                "<IIQQQQQQ", 1, 7, offset, paddr + vaddr_offset, paddr, len(data), memsz, 0x1000
            )
        else:
            phdrs += struct.pack(
                "<IIIIIIII", 1, offset, paddr + vaddr_offset, paddr, len(data), memsz, 7, 0x1000
            )
        body += bytes(offset - 0x1000 - len(body)) + data
        offset = 0x1000 + ((len(body) + 0xFFF) & ~0xFFF)
    if notes:
        if is64:
            phdrs += struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(notes), len(notes), 4)
        else:
            phdrs += struct.pack("<IIIIIIII", 4, offset, 0, 0, len(notes), len(notes), 4, 4)
        body += bytes(offset - 0x1000 - len(body)) + notes
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + bytes(9)
    if is64:
        header = ident + struct.pack(
            "<HHIQQQIHHHHHH", 2, machine, 1, entry, ehsize, 0, 0, ehsize, phentsize, phnum, 64, 0, 0
        )
    else:
        header = ident + struct.pack(
            "<HHIIIIIHHHHHH", 2, machine, 1, entry, ehsize, 0, 0, ehsize, phentsize, phnum, 40, 0, 0
        )
    image = bytearray(header + phdrs)
    image += bytes(0x1000 - len(image))
    return bytes(image + body)


def build_bzimage(
    payload: bytes = b"\x90" * 0x4000,
    *,
    version: int = 0x020F,
    setup_sects: int = 4,
    xloadflags: int = 0x1,
    loadflags: int = 0x1,
    kernel_alignment: int = 0x200000,
    relocatable: int = 1,
    pref_address: int = 0x1000000,
    init_size: int = 0x100000,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFFFFFF,
    syssize: int | None = None,
    header_jump: int = 0x6A,
) -> bytes:
    """A bzImage-shaped file: setup sectors with a setup header, then ``payload``."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, (len(payload) + 15) // 16 if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = header_jump
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload
