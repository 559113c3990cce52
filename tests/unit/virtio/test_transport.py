"""The device manager's virtio-mmio transport: transport choice, placement in the device MMIO
window, interrupts and ioeventfds, removal, and a request served end to end through the
manager's real bus and event loop."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from vq_driver import FakeDevice, FakeDriver, FakeVm

from vmmkit.arch import MemoryLayout
from vmmkit.config import VmConfig
from vmmkit.device import DeviceRequest, PlacedDevice
from vmmkit.device_manager import DeviceManager
from vmmkit.errors import DeviceError
from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.registry import Registries
from vmmkit.virtio import mmio as m
from vmmkit.virtio.chain import VirtqueueError
from vmmkit.virtio.device import VIRTIO_F_VERSION_1, ActivationContext, VirtioInterruptType

WINDOW = MemoryRange(0xD000_0000, 0x10_0000)
MIB = 1 << 20


class ClosableVm(FakeVm):
    def close(self) -> None:
        pass


def build_manager(transport: str = "mmio", ioeventfd: bool = True) -> DeviceManager:
    layout = MemoryLayout(ram=(MemoryRange(0, 4 * MIB),), device_mmio=WINDOW)
    return DeviceManager(
        vm=ClosableVm(ioeventfd),  # type: ignore[arg-type]
        memory=GuestMemory.allocate(layout.ram), layout=layout, config=VmConfig(),
        event_loop=EventLoop(), registries=Registries(),
        context=None,  # type: ignore[arg-type]  # these tests place built devices
        virtio_transport=transport,
    )


def close_manager(manager: DeviceManager) -> None:
    manager.close()
    manager.event_loop.close()
    manager.memory.close()


@pytest.fixture
def machine() -> Iterator[DeviceManager]:
    manager = build_manager()
    yield manager
    close_manager(manager)


def place(manager: DeviceManager, device: Any, **request: Any) -> PlacedDevice:
    return manager.place(device, DeviceRequest("fake", device.id, **request))


def test_mmio_placement(machine: DeviceManager) -> None:
    first = place(machine, FakeDevice("a"))
    second = place(machine, FakeDevice("b"))
    assert first.kind == "virtio-mmio" and isinstance(first.device, m.VirtioMmioTransport)
    assert first.transport == "virtio-mmio"
    assert first.mmio == (WINDOW.start, 0x1000) and second.mmio == (WINDOW.start + 0x1000, 0x1000)
    assert (first.irq, second.irq) == (5, 6)
    assert first.properties["virtio_device_type"] == 4
    assert machine.mmio_bus.read(WINDOW.start + 0x1000, 4) == b"virt"


def test_the_default_virtio_transport_is_the_managers() -> None:
    for name, expected in (("mmio", "virtio-mmio"), ("virtio-mmio", "virtio-mmio"), ("pci", "virtio-pci")):
        manager = build_manager(transport=name)
        try:
            assert manager.transport_for(FakeDevice(), DeviceRequest("fake", "x")).name == expected
        finally:
            close_manager(manager)


def test_removal_frees_the_window_and_the_line(machine: DeviceManager) -> None:
    first = place(machine, FakeDevice("a"))
    place(machine, FakeDevice("b"))
    vm: FakeVm = machine.vm  # type: ignore[assignment]
    assert vm.ioeventfds
    removed = machine.remove("a")
    assert removed is first and "a" not in machine and [p.id for p in machine.devices] == ["b"]
    assert machine.mmio_bus.read(WINDOW.start, 4) is None  # off the bus
    assert all(addr != WINDOW.start + m.QUEUE_NOTIFY for addr, _ in vm.ioeventfds)
    again = place(machine, FakeDevice("c"))
    assert again.mmio == first.mmio and again.irq == first.irq  # both reusable
    with pytest.raises(DeviceError, match="no device with id 'a'"):
        machine.remove("a")


def test_ids_are_unique(machine: DeviceManager) -> None:
    place(machine, FakeDevice("a"))
    with pytest.raises(DeviceError, match="'a' already exists"):
        place(machine, FakeDevice("a"))


def test_the_request_chooses_the_transport_and_placement(machine: DeviceManager) -> None:
    placed = place(machine, FakeDevice("fixed"), transport="mmio", mmio=(WINDOW.start + 0x8000, 0x1000),
                   irq=11)
    assert placed.mmio == (WINDOW.start + 0x8000, 0x1000) and placed.irq == 11
    following = place(machine, FakeDevice("next"))
    assert following.mmio is not None and following.mmio[0] == WINDOW.start


def test_ranges_already_on_the_bus_are_skipped(machine: DeviceManager) -> None:
    machine.mmio_bus.insert(object(), WINDOW.start, 0x2000)  # type: ignore[arg-type]
    placed = place(machine, FakeDevice())
    assert placed.mmio == (WINDOW.start + 0x2000, 0x1000)


def test_ioeventfds_on_queue_notify(machine: DeviceManager) -> None:
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


def test_without_ioeventfds_the_transport_signals(machine: DeviceManager) -> None:
    machine.vm.supports_ioeventfd = False  # type: ignore[union-attr]
    placed = place(machine, FakeDevice())
    transport: m.VirtioMmioTransport = placed.device
    machine.mmio_bus.write(WINDOW.start + m.QUEUE_NOTIFY, (1).to_bytes(4, "little"))
    assert os.eventfd_read(transport.queue_events[1]) == 1
    assert transport.counters()["notifications_trapped"] == 1


def test_interrupts_reach_the_allocated_line(machine: DeviceManager) -> None:
    placed = place(machine, FakeDevice())
    placed.device.raise_interrupt(m.INT_VRING)
    assert machine.vm.lines == [(5, True), (5, False)]  # type: ignore[union-attr]


def test_unknown_transport(machine: DeviceManager) -> None:
    known = r"known: virtio-mmio \(mmio\), virtio-pci \(pci\)"
    with pytest.raises(DeviceError, match=rf"unknown virtio transport 'ccw' \({known}\)"):
        place(machine, FakeDevice(), transport="ccw")


def test_a_transport_of_another_family_is_refused(machine: DeviceManager) -> None:
    with pytest.raises(DeviceError, match="unknown virtio transport 'platform'"):
        place(machine, FakeDevice(), transport="platform")


def test_machine_reset_resets_the_transport(machine: DeviceManager) -> None:
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
    machine = build_manager(ioeventfd=ioeventfd)
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
        close_manager(machine)


def test_pci_placement_fields_are_refused_on_mmio(machine: DeviceManager) -> None:
    with pytest.raises(DeviceError, match="pci_device_id place a PCI device"):
        machine.place(FakeDevice("a"), DeviceRequest("fake", "a", pci_slot=3))
    assert machine.devices == []
