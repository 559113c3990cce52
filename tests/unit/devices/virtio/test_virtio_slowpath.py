"""Every device behind the real virtio-mmio transport, placed by a real Machine from the
device types' requests, on a VM without ioeventfds: the driver initialises the device through
the register window on the MMIO bus and every kick is a QueueNotify write that exits to the
VMM (the transport's slow path), as under a hypervisor that has no ioeventfd."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blk_support import IN, OUT, S_OK
from netns_support import FakeTap
from virtio_driver import DriverQueue, wait_for
from vmmkit_devices.virtio.block import VirtioBlockType
from vmmkit_devices.virtio.console import VirtioConsoleType
from vmmkit_devices.virtio.net import NetDevice
from vmmkit_devices.virtio.rng import VirtioRngType
from vmmkit_devices.virtio.tap import VNET_HDR_SIZE

from vmmkit.arch import MemoryLayout
from vmmkit.config import ConsoleConfig, DiskConfig, PlatformConfig, RngConfig, VmConfig
from vmmkit.device import DeviceRequest, PlacedDevice
from vmmkit.device_manager import DeviceManager
from vmmkit.machine import Machine
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.plugin import make_plugin_manager
from vmmkit.registry import Registries
from vmmkit.virtio import mmio as m

MIB = 1 << 20
WINDOW = MemoryRange(0xD000_0000, 0x10_0000)


class NoIoeventfdVm:
    """The parts of a Vm the transport uses, without ioeventfds (or irqfds)."""

    supports_ioeventfd = False
    supports_irqfd = False

    def __init__(self) -> None:
        self.lines: list[tuple[int, bool]] = []

    def set_irq_line(self, gsi: int, level: bool) -> None:
        self.lines.append((gsi, level))

    def register_ioeventfd(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("no ioeventfds on this VM")

    def close(self) -> None:
        pass


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    machine = Machine(VmConfig(platform=PlatformConfig(virtio_transport="mmio")), registries=Registries(),
                      plugin_manager=make_plugin_manager(autoload=False))
    machine.layout = MemoryLayout(ram=(MemoryRange(0, 16 * MIB),), device_mmio=WINDOW)
    machine.memory = GuestMemory.allocate(machine.layout.ram)
    machine.vm = NoIoeventfdVm()  # type: ignore[assignment]
    machine.device_manager = DeviceManager(
        vm=machine.vm, memory=machine.memory, layout=machine.layout, config=machine.config,
        event_loop=machine.event_loop, registries=machine.registries, context=machine._device_ctx,
        virtio_transport="mmio",
    )
    machine.event_loop.start()
    yield machine
    machine.close()  # stops the loop, closes every placed device, unmaps guest memory


class MmioDriver:
    """A guest driver talking to one virtio-mmio window over the machine's MMIO bus."""

    def __init__(self, machine: Machine, placed: PlacedDevice) -> None:
        assert placed.mmio is not None and placed.kind == "virtio-mmio"
        self.machine = machine
        self.base = placed.mmio[0]
        self.transport: m.VirtioMmioTransport = placed.device
        assert machine.memory is not None
        self.memory = machine.memory
        self.queues: list[DriverQueue] = []
        self._next = 4 * MIB

    def read32(self, offset: int) -> int:
        return int.from_bytes(self.machine.mmio_bus.read(self.base + offset, 4) or b"", "little")

    def write32(self, offset: int, value: int) -> None:
        self.machine.mmio_bus.write(self.base + offset, value.to_bytes(4, "little"))

    def initialise(self, queue_size: int = 16) -> int:
        assert self.read32(m.MAGIC) == m.MAGIC_VALUE and self.read32(m.VERSION_REG) == 2
        self.write32(m.STATUS, 0)
        self.write32(m.STATUS, m.ACKNOWLEDGE)
        self.write32(m.STATUS, m.ACKNOWLEDGE | m.DRIVER)
        features = 0
        for sel in (0, 1):
            self.write32(m.DEVICE_FEATURES_SEL, sel)
            features |= self.read32(m.DEVICE_FEATURES) << (32 * sel)
        for sel in (0, 1):
            self.write32(m.DRIVER_FEATURES_SEL, sel)
            self.write32(m.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.write32(m.STATUS, m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK)
        assert self.read32(m.STATUS) & m.FEATURES_OK
        index = 0
        while True:
            self.write32(m.QUEUE_SEL, index)
            if self.read32(m.QUEUE_NUM_MAX) == 0:
                break
            queue = DriverQueue(self.memory, index, queue_size, 0x10000 + index * 0x8000)
            self.write32(m.QUEUE_NUM, queue_size)
            for low, gpa in ((m.QUEUE_DESC_LOW, queue.desc), (m.QUEUE_DRIVER_LOW, queue.avail),
                             (m.QUEUE_DEVICE_LOW, queue.used)):
                self.write32(low, gpa & 0xFFFF_FFFF)
                self.write32(low + 4, gpa >> 32)
            self.write32(m.QUEUE_READY, 1)
            self.queues.append(queue)
            index += 1
        self.write32(m.STATUS, m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK | m.DRIVER_OK)
        assert self.read32(m.STATUS) & m.DRIVER_OK and not self.read32(m.STATUS) & m.DEVICE_NEEDS_RESET
        return features

    def alloc(self, size: int, data: bytes | None = None) -> int:
        gpa = (self._next + 15) & ~15
        self._next = gpa + size
        self.memory.write(gpa, data if data is not None else b"\xcc" * size)
        return gpa

    def submit(self, index: int, buffers: list[tuple[int, int, bool]]) -> None:
        self.queues[index].add(buffers)
        self.write32(m.QUEUE_NOTIFY, index)  # exits to the VMM: no ioeventfd

    def wait_used(self, index: int, count: int = 1) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []

        def enough() -> bool:
            got.extend(self.queues[index].take_used())
            return len(got) >= count

        wait_for(enough, what=f"used buffers on queue {index}")
        # The device adds used buffers, then interrupts; then the driver acknowledges and, as
        # Linux does with VIRTIO_F_EVENT_IDX, asks to be interrupted for the next one.
        status = wait_for(lambda: self.read32(m.INTERRUPT_STATUS) & m.INT_VRING, what="the used-buffer interrupt")
        self.write32(m.INTERRUPT_ACK, status)
        self.queues[index].set_used_event(self.queues[index].last_used)
        return got


def place(machine: Machine, device_type: Any, config: VmConfig) -> list[MmioDriver]:
    drivers = []
    for request in device_type.requests(config.assign_ids()):
        device = device_type.create(machine._device_ctx, request)  # what DeviceManager.create does
        placed = machine.manager.place(device, request)
        drivers.append(MmioDriver(machine, placed))
    return drivers


def test_blk(machine: Machine, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 1024))
    (driver,) = place(machine, VirtioBlockType, VmConfig(disks=[DiskConfig(path=str(image), transport="mmio")]))
    driver.initialise()
    assert driver.transport.counters()["activations"] == 1
    data = bytes(range(256)) * 2
    status = driver.alloc(1)
    driver.submit(0, [(driver.alloc(16, struct.pack("<IIQ", OUT, 0, 5)), 16, False),
                      (driver.alloc(512, data), 512, False), (status, 1, True)])
    driver.wait_used(0)
    assert driver.memory.read_u8(status) == S_OK
    assert image.read_bytes()[5 * 512 : 6 * 512] == data
    into = driver.alloc(512)
    driver.submit(0, [(driver.alloc(16, struct.pack("<IIQ", IN, 0, 5)), 16, False), (into, 512, True),
                      (status, 1, True)])
    assert driver.wait_used(0) == [(3, 513)]
    assert driver.memory.read(into, 512) == data
    assert driver.transport.counters()["notifications_trapped"] == 2
    assert machine.vm.lines  # type: ignore[union-attr]  # the legacy line was pulsed


def test_rng(machine: Machine) -> None:
    (driver,) = place(machine, VirtioRngType, VmConfig(rng=RngConfig(transport="mmio")))
    driver.initialise()
    gpa = driver.alloc(32)
    driver.submit(0, [(gpa, 32, True)])
    assert driver.wait_used(0) == [(0, 32)]
    assert driver.transport.counters()["read_bytes"] == 32


def test_console(machine: Machine, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    (driver,) = place(machine, VirtioConsoleType, VmConfig(console=ConsoleConfig(mode="File", file=str(log))))
    driver.initialise()
    driver.submit(1, [(driver.alloc(6, b"hello\n"), 6, False)])
    driver.wait_used(1)
    assert log.read_bytes() == b"hello\n"
    gpa = driver.alloc(16)
    driver.submit(0, [(gpa, 16, True)])
    driver.transport.device.receive(b"keys")  # type: ignore[attr-defined]
    assert driver.wait_used(0) == [(0, 4)]
    assert driver.memory.read(gpa, 4) == b"keys"


def test_net(machine: Machine) -> None:
    tap = FakeTap()
    device = NetDevice("_net0", tap, bytes.fromhex("525400000001"))
    request = DeviceRequest("virtio-net", "_net0", None, transport="mmio")
    placed = machine.manager.place(device, request)
    driver = MmioDriver(machine, placed)
    driver.initialise()
    frame = b"\xff" * 6 + bytes.fromhex("525400000001") + b"\x88\xb5" + b"slow path"
    driver.submit(1, [(driver.alloc(VNET_HDR_SIZE + len(frame), bytes(VNET_HDR_SIZE) + frame),
                       VNET_HDR_SIZE + len(frame), False)])
    tap.peer.settimeout(5)
    assert tap.peer.recv(100)[VNET_HDR_SIZE:] == frame
    gpa = driver.alloc(128)
    driver.submit(0, [(gpa, 128, True)])
    tap.peer.send(bytes(VNET_HDR_SIZE) + frame)
    ((_, length),) = driver.wait_used(0)
    assert driver.memory.read(gpa + VNET_HDR_SIZE, length - VNET_HDR_SIZE) == frame


def test_driver_reset_and_reinitialise(machine: Machine, tmp_path: Path) -> None:
    (driver,) = place(machine, VirtioRngType, VmConfig(rng=RngConfig(transport="mmio")))
    driver.initialise()
    driver.write32(m.STATUS, 0)  # the guest resets the device (e.g. a driver reload)
    assert driver.transport.device.context is None  # type: ignore[attr-defined]
    driver.queues.clear()
    driver.initialise()
    gpa = driver.alloc(16)
    driver.submit(0, [(gpa, 16, True)])
    assert driver.wait_used(0) == [(0, 16)]


def test_hostile_kick_marks_needs_reset(machine: Machine) -> None:
    (driver,) = place(machine, VirtioRngType, VmConfig(rng=RngConfig(transport="mmio")))
    driver.initialise()
    driver.submit(0, [(0x8000_0000, 16, True)])  # outside guest RAM
    wait_for(lambda: driver.read32(m.STATUS) & m.DEVICE_NEEDS_RESET, what="DEVICE_NEEDS_RESET")
    assert driver.read32(m.INTERRUPT_STATUS) & m.INT_CONFIG

