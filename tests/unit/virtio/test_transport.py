"""attach_virtio: transport choice, placement in the device MMIO window, interrupts and
ioeventfds, and a request served end to end through a real Machine's bus and event loop."""

from __future__ import annotations

import os
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest
from vq_driver import FakeDevice, FakeDriver, FakeVm

from vmmkit.arch import MemoryLayout
from vmmkit.config import PlatformConfig, VmConfig
from vmmkit.device import DeviceRequest, PlacedDevice
from vmmkit.errors import DeviceError
from vmmkit.machine import Machine
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.plugin import make_plugin_manager
from vmmkit.registry import Registries
from vmmkit.virtio import mmio as m
from vmmkit.virtio.chain import VirtqueueError
from vmmkit.virtio.device import VIRTIO_F_VERSION_1, ActivationContext, VirtioInterruptType
from vmmkit.virtio.transport import attach_virtio, default_transport, device_mmio_allocator

WINDOW = MemoryRange(0xD000_0000, 0x10_0000)
MIB = 1 << 20


class ClosableVm(FakeVm):
    def close(self) -> None:
        pass


def build_machine(transport: str | None = "mmio", ioeventfd: bool = True) -> Machine:
    platform = PlatformConfig(virtio_transport=transport) if transport else None
    machine = Machine(VmConfig(platform=platform), registries=Registries(),
                      plugin_manager=make_plugin_manager(autoload=False))
    machine.layout = MemoryLayout(ram=(MemoryRange(0, 4 * MIB),), device_mmio=WINDOW)
    machine.memory = GuestMemory.allocate(machine.layout.ram)
    machine.vm = ClosableVm(ioeventfd)  # type: ignore[assignment]
    machine._free_irqs = list(range(5, 24))
    return machine


@pytest.fixture
def machine() -> Iterator[Machine]:
    machine = build_machine()
    yield machine
    for placed in machine.devices:
        placed.device.close()
    machine.devices.clear()
    machine.close()


def place(machine: Machine, device: Any, **request: Any) -> PlacedDevice:
    placed = machine._place(device, DeviceRequest("fake", device.id, **request))
    machine.devices.append(placed)
    return placed


def test_default_transport_comes_from_the_platform() -> None:
    assert default_transport(VmConfig()) == "pci"
    assert default_transport(VmConfig(platform=PlatformConfig(virtio_transport="mmio"))) == "mmio"
    assert default_transport(object()) == "pci"


def test_mmio_placement(machine: Machine) -> None:
    first = place(machine, FakeDevice("a"))
    second = place(machine, FakeDevice("b"))
    assert first.kind == "virtio-mmio" and isinstance(first.device, m.VirtioMmioTransport)
    assert first.mmio == (WINDOW.start, 0x1000) and second.mmio == (WINDOW.start + 0x1000, 0x1000)
    assert (first.irq, second.irq) == (5, 6)
    assert first.properties == {"virtio_device_type": 4}
    assert machine.mmio_bus.read(WINDOW.start + 0x1000, 4) == b"virt"
    assert device_mmio_allocator(machine) is machine.device_mmio_allocator  # type: ignore[attr-defined]


def test_the_request_chooses_the_transport_and_placement(machine: Machine) -> None:
    placed = place(machine, FakeDevice("fixed"), transport="mmio", mmio=(WINDOW.start + 0x8000, 0x1000),
                   irq=11)
    assert placed.mmio == (WINDOW.start + 0x8000, 0x1000) and placed.irq == 11
    following = place(machine, FakeDevice("next"))
    assert following.mmio is not None and following.mmio[0] == WINDOW.start


def test_ranges_already_on_the_bus_are_skipped(machine: Machine) -> None:
    machine.mmio_bus.insert(object(), WINDOW.start, 0x2000)  # type: ignore[arg-type]
    placed = place(machine, FakeDevice())
    assert placed.mmio == (WINDOW.start + 0x2000, 0x1000)


def test_ioeventfds_on_queue_notify(machine: Machine) -> None:
    placed = place(machine, FakeDevice(sizes=(4, 4, 4)))
    vm: FakeVm = machine.vm  # type: ignore[assignment]
    notify = WINDOW.start + m.QUEUE_NOTIFY
    transport: m.VirtioMmioTransport = placed.device
    assert vm.ioeventfds == {(notify, i): fd for i, fd in enumerate(transport.queue_events)}
    vm.guest_mmio_write(machine.mmio_bus, notify, (2).to_bytes(4, "little"))
    assert os.eventfd_read(transport.queue_events[2]) == 1
    assert transport.counters()["notifications_trapped"] == 0  # served "in the hypervisor"
    vm.guest_mmio_write(machine.mmio_bus, notify, (9).to_bytes(4, "little"))  # no match: exits, dropped
    assert transport.counters()["notifications_trapped"] == 0
    transport.close()
    assert vm.ioeventfds == {}


def test_without_ioeventfds_the_transport_signals(machine: Machine) -> None:
    machine.vm.supports_ioeventfd = False  # type: ignore[union-attr]
    placed = place(machine, FakeDevice())
    transport: m.VirtioMmioTransport = placed.device
    machine.mmio_bus.write(WINDOW.start + m.QUEUE_NOTIFY, (1).to_bytes(4, "little"))
    assert os.eventfd_read(transport.queue_events[1]) == 1
    assert transport.counters()["notifications_trapped"] == 1


def test_interrupts_reach_the_allocated_line(machine: Machine) -> None:
    placed = place(machine, FakeDevice())
    placed.device.raise_interrupt(m.INT_VRING)
    assert machine.vm.lines == [(5, True), (5, False)]  # type: ignore[union-attr]


def test_unknown_transport(machine: Machine) -> None:
    with pytest.raises(DeviceError, match="unknown virtio transport 'ccw'"):
        place(machine, FakeDevice(), transport="ccw")


def test_pci_without_the_pci_transport(machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vmmkit.pci.virtio", None)
    with pytest.raises(DeviceError, match="vmmkit.pci.virtio"):
        place(machine, FakeDevice(), transport="pci")


def test_pci_is_delegated(machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    fake = types.ModuleType("vmmkit.pci.virtio")

    def attach_virtio_pci(machine: Machine, device: Any, request: DeviceRequest) -> PlacedDevice:
        calls.append((machine, device, request))
        return PlacedDevice(device, request, "virtio-pci")

    fake.attach_virtio_pci = attach_virtio_pci  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vmmkit.pci.virtio", fake)
    device = FakeDevice()
    placed = attach_virtio(machine, device, DeviceRequest("fake", "p", transport="pci"))
    assert placed.kind == "virtio-pci" and calls and calls[0][1] is device


def test_machine_reset_resets_the_transport(machine: Machine) -> None:
    device = FakeDevice()
    placed = place(machine, device)
    placed.device.write(m.STATUS, m.ACKNOWLEDGE.to_bytes(4, "little"))
    placed.device.reset()
    assert placed.device.read(m.STATUS, 4) == b"\0" * 4 and device.resets == 1


# -- end to end -------------------------------------------------------------------------------


class ReverseDevice(FakeDevice):
    """Answers each request with its bytes reversed, on the event loop thread."""

    def __init__(self) -> None:
        super().__init__("rev", sizes=(8,), features=VIRTIO_F_VERSION_1)
        self.served = threading.Event()
        self.threads: set[str] = set()

    def activate(self, ctx: ActivationContext) -> None:
        super().activate(ctx)
        ctx.event_loop.add_reader(ctx.queue_events[0], self._on_kick)

    def _on_kick(self) -> None:
        ctx = self.context
        assert ctx is not None
        self.threads.add(threading.current_thread().name)
        os.eventfd_read(ctx.queue_events[0])
        queue = ctx.queues[0]
        try:
            for chain in queue.iter_available():
                queue.add_used(chain.head, chain.write(chain.read()[::-1]))
            if queue.needs_notification():
                ctx.interrupt.trigger(VirtioInterruptType.QUEUE, 0)
        except VirtqueueError as exc:
            self.mark_broken(str(exc))
        self.served.set()

    def reset(self) -> None:
        if self.context is not None:
            self.context.event_loop.remove_reader(self.context.queue_events[0])
        super().reset()


@pytest.mark.parametrize("ioeventfd", [True, False], ids=["ioeventfd", "trapped"])
def test_a_request_end_to_end(ioeventfd: bool) -> None:
    machine = build_machine(ioeventfd=ioeventfd)
    try:
        device = ReverseDevice()
        placed = place(machine, device)
        base = WINDOW.start
        vm: FakeVm = machine.vm  # type: ignore[assignment]
        bus = machine.mmio_bus

        def r(offset: int) -> int:
            return int.from_bytes(bus.read(base + offset, 4) or b"", "little")

        def w(offset: int, value: int) -> None:
            vm.guest_mmio_write(bus, base + offset, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

        machine.event_loop.start()
        assert r(m.MAGIC) == 0x74726976 and r(m.VERSION_REG) == 2
        w(m.STATUS, m.ACKNOWLEDGE)
        w(m.STATUS, m.ACKNOWLEDGE | m.DRIVER)
        w(m.DRIVER_FEATURES_SEL, 1)
        w(m.DRIVER_FEATURES, 1)  # VIRTIO_F_VERSION_1
        w(m.STATUS, m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK)
        assert r(m.STATUS) & m.FEATURES_OK
        assert machine.memory is not None
        ring = FakeDriver(machine.memory, 8, desc=0x100000)
        w(m.QUEUE_SEL, 0)
        w(m.QUEUE_NUM, 8)
        w(m.QUEUE_DESC_LOW, ring.desc)
        w(m.QUEUE_DRIVER_LOW, ring.avail)
        w(m.QUEUE_DEVICE_LOW, ring.used)
        w(m.QUEUE_READY, 1)
        w(m.STATUS, m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK | m.DRIVER_OK)
        assert r(m.STATUS) == m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK | m.DRIVER_OK

        machine.memory.write(0x200000, b"hello, virtio")
        ring.add([(0x200000, 13, False), (0x201000, 64, True)])
        w(m.QUEUE_NOTIFY, 0)
        assert device.served.wait(5)
        assert device.threads == {"vmm-events"}
        assert ring.take_used() == [(0, 13)]
        assert machine.memory.read(0x201000, 13) == b"hello, virtio"[::-1]
        assert r(m.INTERRUPT_STATUS) == m.INT_VRING and (5, True) in vm.lines
        w(m.INTERRUPT_ACK, m.INT_VRING)
        assert r(m.INTERRUPT_STATUS) == 0
        counters = placed.device.counters()
        assert counters["notifications_trapped"] == (0 if ioeventfd else 1) and counters["interrupts"] == 1

        device.served.clear()  # a hostile request breaks the device, which asks for a reset
        ring.publish(42)
        w(m.QUEUE_NOTIFY, 0)
        assert device.served.wait(5)
        assert r(m.STATUS) & m.DEVICE_NEEDS_RESET and r(m.INTERRUPT_STATUS) & m.INT_CONFIG
        w(m.STATUS, 0)
        assert r(m.STATUS) == 0 and device.broken is None
    finally:
        for placed in machine.devices:
            placed.device.close()
        machine.devices.clear()
        machine.close()
