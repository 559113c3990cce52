"""Simulated VFIO devices and a recording VM for the VFIO contract tests.

Everything VFIO here is :mod:`vmmkit_devices.vfio.simulator` (a simulated ``/dev/vfio``): these
are contract tests of the plugin against the kernel's documented semantics, not runs on VFIO.
The device manager, buses, PCI root, guest memory, eventfds and event loop are the real ones.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pci"))

from pci_support import FakeMachine, FakeVm  # noqa: E402
from vmmkit_devices.vfio import uapi  # noqa: E402
from vmmkit_devices.vfio.simulator import SimBar, SimDevice, SimulatedVfio, pci_config, sysfs_device  # noqa: E402
from vmmkit_devices.vfio.transport import VfioPciTransport, VfioRequest  # noqa: E402

from vmmkit.device import DeviceRequest, PlacedDevice  # noqa: E402
from vmmkit.errors import HypervisorError  # noqa: E402

MSI_ADDRESS = 0xFEE0_0000

# the NVMe-like function: BAR0 64-bit 16 KiB, MSI-X (8 vectors) table at 0x2000, PBA at 0x3000
NVME_TABLE, NVME_PBA, NVME_VECTORS = 0x2000, 0x3000, 8
CAP_SATA = 0x12  # a capability vmmkit hides


def msi_body(*, vectors_log2: int, is_64bit: bool, per_vector_mask: bool) -> bytes:
    control = vectors_log2 << 1 | (0x80 if is_64bit else 0) | (0x100 if per_vector_mask else 0)
    length = (24 if is_64bit else 20) if per_vector_mask else (14 if is_64bit else 10)
    return struct.pack("<H", control) + bytes(length - 4)


def nvme_like(name: str = "0000:01:00.0", group: str = "7") -> SimDevice:
    bars = {0: SimBar(0x4000, mem64=True)}
    caps = [
        (0x01, bytes(6)),  # power management
        (0x05, msi_body(vectors_log2=2, is_64bit=True, per_vector_mask=True)),
        (0x10, bytes(0x3A)),  # PCI Express
        (CAP_SATA, bytes(6)),
        (0x11, struct.pack("<HII", NVME_VECTORS - 1, NVME_TABLE | 0, NVME_PBA | 0)),
    ]
    config = pci_config(vendor=0x1B36, device=0x0010, class_code=0x010802, caps=caps, bars=bars)
    return SimDevice(name, group, config, bars, {uapi.VFIO_PCI_INTX_IRQ_INDEX: 1, uapi.VFIO_PCI_MSI_IRQ_INDEX: 4,
                                                 uapi.VFIO_PCI_MSIX_IRQ_INDEX: NVME_VECTORS})


def edu_like(name: str = "0000:02:00.0", group: str = "8") -> SimDevice:
    """QEMU's ``edu``: BAR0 32-bit 1 MiB, MSI (one 32-bit vector), INTx."""
    bars = {0: SimBar(0x10_0000)}
    caps = [(0x05, msi_body(vectors_log2=0, is_64bit=False, per_vector_mask=False))]
    config = pci_config(vendor=0x1234, device=0x11E8, class_code=0x00FF00, caps=caps, bars=bars)
    return SimDevice(name, group, config, bars, {uapi.VFIO_PCI_INTX_IRQ_INDEX: 1, uapi.VFIO_PCI_MSI_IRQ_INDEX: 1})


def io_like(name: str = "0000:03:00.0", group: str = "9") -> SimDevice:
    """An I/O BAR and a memory BAR the kernel does not let userspace mmap: both trapped."""
    bars = {0: SimBar(0x20, io=True, mmap=False), 2: SimBar(0x1000, mmap=False)}
    config = pci_config(vendor=0x8086, device=0x1234, bars=bars, interrupt_pin=0)
    return SimDevice(name, group, config, bars, {})


class VfioVm(FakeVm):
    """A recording VM that also keeps memory slots (refusing a slot in use, as KVM does) and the
    resample fds of irqfds."""

    def __init__(self, *, refuse_resample: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: As KVM on arm64 before its vGIC is initialized: resampling irqfds refused.
        self.refuse_resample = refuse_resample
        self.slots: dict[int, tuple[int, int, int]] = {}
        #: gsi -> (trigger fd, resample fd) of resampling irqfds (INTx)
        self.resample: dict[int, tuple[int, int]] = {}

    def add_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int, *,
                          readonly: bool = False, log_dirty: bool = False) -> None:
        if slot in self.slots:
            raise HypervisorError("KVM_SET_USER_MEMORY_REGION", 22)
        self.slots[slot] = (guest_addr, size, host_addr)

    def remove_memory_region(self, slot: int) -> None:
        del self.slots[slot]

    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        if resample_fd is None:
            super().register_irqfd(fd, gsi)
            return
        # KVM takes another irqfd on a GSI that has one (a shared INTx line), one per eventfd
        if self.refuse_resample:
            raise HypervisorError("KVM_IRQFD", 11)
        if gsi in self.resample:
            raise HypervisorError("KVM_IRQFD", 16)
        self.resample[gsi] = (fd, resample_fd)

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        if self.resample.get(gsi, (None,))[0] == fd:
            del self.resample[gsi]
            return
        super().unregister_irqfd(fd, gsi)

    def bar_slots(self) -> list[tuple[int, int]]:
        return sorted((gpa, size) for gpa, size, _ in self.slots.values())


class Lab:
    """A simulated ``/dev/vfio``, a sysfs tree of real files, and a device manager."""

    def __init__(self, machine: FakeMachine, sysfs: Path) -> None:
        self.machine = machine
        self.sysfs = str(sysfs)
        self.sim = SimulatedVfio()
        machine.registries.transports.add(VfioPciTransport)

    def add(self, device: SimDevice, *, viable: bool = True) -> str:
        self.sim.add_device(device, viable=viable)
        return sysfs_device(self.sysfs, device.name, device.group)

    def place(self, path: str, device_id: str = "vfio0", *, slot: int | None = None,
              exclude_mmap: frozenset[int] = frozenset()) -> PlacedDevice:
        request = DeviceRequest("vfio-pci", device_id, None, transport="vfio-pci", pci_slot=slot)
        pending = VfioRequest(path, exclude_mmap=exclude_mmap, kernel=self.sim, dev_dir=self.sim.dev_dir)
        return self.machine.place(pending, request)
