"""The modern virtio-pci transport, driven the way Linux's virtio_pci_modern driver drives it:
capability discovery, feature negotiation, queue setup, DRIVER_OK, notifications and
interrupts (MSI-X and INTx), reset, and hostile accesses."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pci_support import (
    AVAIL,
    DESC,
    MSI_ADDRESS,
    S_ACK,
    S_DRIVER,
    S_DRIVER_OK,
    S_FAILED,
    S_FEATURES_OK,
    S_NEEDS_RESET,
    USED,
    Driver,
    FakeDevice,
    FakeMachine,
    FakeVm,
    eventfd_count,
    virtio_request,
    wait_for,
    write_ring,
)

from vmmkit.errors import DeviceError
from vmmkit.memory import GuestMemory
from vmmkit.pci import config as c
from vmmkit.pci import virtio as vp
from vmmkit.pci.virtio import VirtioPciDevice
from vmmkit.virtio.device import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    ActivationContext,
    VirtioInterruptType,
)
from vmmkit.virtio.queue import Virtqueue


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice(sizes=(256, 128))


def attach(machine: FakeMachine, device: FakeDevice, **config: object) -> tuple[VirtioPciDevice, int]:
    placed = machine.place(device, virtio_request(device.id, **config))  # type: ignore[arg-type]
    return placed.device, placed.properties["slot"]


# -- identity and discovery -------------------------------------------------------------------


def test_identity_and_placement(machine: FakeMachine, device: FakeDevice) -> None:
    placed = machine.place(device, virtio_request("rng0"))
    assert placed.kind == "virtio-pci"
    assert placed.properties["bdf"] == "0000:00:01.0"
    assert placed.irq == placed.device.config.get(c.INTERRUPT_LINE, 1)
    fn = machine.guest.function(1)
    assert fn.read16(0) == 0x1AF4 and fn.read16(2) == 0x1044  # 0x1040 + entropy
    assert fn.read8(c.REVISION_ID) == 1
    assert fn.read32(c.SUBSYSTEM_VENDOR_ID) == 0x1044_1AF4
    assert fn.read8(c.INTERRUPT_PIN) == 1
    hosts = [p for p in machine.devices if p.kind == "pci-host"]
    assert len(hosts) == 1
    assert machine.pci_segment().intx_routes() == ((1, 1, placed.irq),)


def test_second_device_and_requested_slot(machine: FakeMachine) -> None:
    _, first = attach(machine, FakeDevice("a"))
    _, second = attach(machine, FakeDevice("b"), pci_device_id=9)
    _, third = attach(machine, FakeDevice("c"))
    assert (first, second, third) == (1, 9, 2)
    assert len([p for p in machine.devices if p.kind == "pci-host"]) == 1
    with pytest.raises(DeviceError):
        machine.place(FakeDevice("d"), virtio_request("d", pci_device_id=9))
    with pytest.raises(DeviceError, match="segment"):
        machine.place(FakeDevice("e"), virtio_request("e", pci_segment=1))
    with pytest.raises(DeviceError, match="VERSION_1"):
        machine.place(FakeDevice("f", offered=1), virtio_request("f"))
    with pytest.raises(DeviceError, match="power of two"):
        machine.place(FakeDevice("g", sizes=(100,)), virtio_request("g"))


@pytest.mark.parametrize("ecam", [False, True])
def test_capabilities_as_linux_finds_them(machine: FakeMachine, device: FakeDevice, ecam: bool) -> None:
    _, slot = attach(machine, device)
    drv = Driver(machine, slot, ecam=ecam)
    assert list(drv.bars) == [0]
    bar = drv.bars[0]
    assert (bar.size, bar.mem64, bar.io) == (vp.BAR_SIZE, True, False)
    assert all(drv.caps.values()), drv.caps
    fn = drv.fn
    expect = {1: (0x0000, 0x38), 2: (0x6000, 0x1000), 3: (0x2000, 1), 4: (0x4000, 0x1000)}
    for cfg_type, (offset, length) in expect.items():
        pos = drv.caps[cfg_type]
        assert fn.read8(pos + 4) == 0 and fn.read32(pos + 8) == offset and fn.read32(pos + 12) == length
        # vp_modern_map_capability: minlen fits in the BAR
        assert fn.read32(pos + 8) + {1: 0x38, 2: 2, 3: 1, 4: 0}[cfg_type] <= bar.size
    assert fn.read8(drv.caps[2] + 2) == 20  # virtio_pci_notify_cap
    assert drv.multiplier == 4
    assert drv.msix_cap
    assert fn.read16(drv.msix_cap + 2) & 0x7FF == 2  # queues + 1 vectors
    assert fn.read32(drv.msix_cap + 4) == 0x8000 and fn.read32(drv.msix_cap + 8) == 0x48000
    assert drv.r(vp.NUM_QUEUES, 2) == 2
    for index in range(2):
        drv.w(vp.QUEUE_SELECT, 2, index)
        assert drv.r(vp.QUEUE_NOTIFY_OFF, 2) == index


def test_device_config_window(machine: FakeMachine, device: FakeDevice) -> None:
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    assert drv.guest.read(drv.device, 4) == 0x4433_2211
    assert drv.guest.read(drv.device + 4, 2) == 0x6655
    assert drv.guest.read(drv.device + 8, 4) == 0
    drv.guest.write(drv.device + 2, 2, 0xBEEF)
    assert device.config_writes == [(2, b"\xef\xbe")]


# -- features and status ----------------------------------------------------------------------


def test_feature_negotiation(machine: FakeMachine) -> None:
    device = FakeDevice(offered=VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED | (1 << 40) | 0x5)
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    assert drv.features() == VIRTIO_F_VERSION_1 | 0x5  # packed ring and ring reset hidden
    drv.w(vp.DEVICE_FEATURE_SELECT, 4, 7)
    assert drv.r(vp.DEVICE_FEATURE, 4) == 0
    assert drv.negotiate(VIRTIO_F_VERSION_1 | 0x1)
    assert device.acked_features == VIRTIO_F_VERSION_1 | 0x1
    drv.w(vp.DRIVER_FEATURE_SELECT, 4, 0)
    assert drv.r(vp.DRIVER_FEATURE, 4) == 1
    drv.w(vp.DRIVER_FEATURE, 4, 0x5)  # after FEATURES_OK: ignored
    assert drv.r(vp.DRIVER_FEATURE, 4) == 1
    assert not drv.negotiate(VIRTIO_F_VERSION_1 | 0x2)  # not offered
    assert drv.status == S_ACK | S_DRIVER
    assert not drv.negotiate(0x1)  # no VERSION_1
    assert not drv.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED)


def test_status_state_machine(machine: FakeMachine, device: FakeDevice) -> None:
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    drv.w(vp.DEVICE_STATUS, 1, S_DRIVER)  # DRIVER before ACKNOWLEDGE
    assert drv.status == 0
    drv.w(vp.DEVICE_STATUS, 1, S_ACK | S_DRIVER)  # both at once, in order
    assert drv.status == S_ACK | S_DRIVER
    drv.w(vp.DEVICE_STATUS, 1, S_ACK)  # clearing a bit: ignored
    assert drv.status == S_ACK | S_DRIVER
    drv.add_status(S_DRIVER_OK)  # without FEATURES_OK
    assert drv.status == S_ACK | S_DRIVER and not device.contexts
    drv.add_status(S_FAILED)
    assert drv.status & S_FAILED
    drv.add_status(S_FEATURES_OK)
    drv.w(vp.DRIVER_FEATURE_SELECT, 4, 1)
    drv.reset()
    assert device.resets >= 1
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.add_status(S_DRIVER_OK | S_NEEDS_RESET)  # the device's bit is not the driver's to set
    assert drv.status == S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    assert len(device.contexts) == 1


def test_needs_reset_when_device_broken(machine: FakeMachine, device: FakeDevice) -> None:
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    device.mark_broken("bad request")
    assert drv.status & S_NEEDS_RESET
    drv.reset()
    assert drv.status == 0 and device.broken is None


def test_a_device_broken_after_driver_ok_sends_a_config_interrupt(machine: FakeMachine, device: FakeDevice,
                                                                  vm: FakeVm) -> None:
    """virtio 1.2, 2.1.2: DEVICE_NEEDS_RESET, then a configuration-change notification, once."""
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    drv.enable_msix(3)
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.w(vp.MSIX_CONFIG, 2, 2)
    assert drv.setup_queue(0, 8, DESC, AVAIL, USED, vector=0) == 0
    drv.enable_queue(0)
    drv.add_status(S_DRIVER_OK)
    device.mark_broken("backend gone")
    assert drv.status & S_NEEDS_RESET
    assert vm.delivered() == [(MSI_ADDRESS, 0x42)]
    device.mark_broken("still gone")
    assert vm.delivered() == []


def test_config_generation(machine: FakeMachine, device: FakeDevice) -> None:
    transport, slot = attach(machine, device)
    drv = Driver(machine, slot)
    first = drv.r(vp.CONFIG_GENERATION, 1)
    assert drv.r(vp.CONFIG_GENERATION, 1) == first
    device.config[0] = 0x99
    second = drv.r(vp.CONFIG_GENERATION, 1)
    assert second != first and drv.r(vp.CONFIG_GENERATION, 1) == second
    transport.signal(VirtioInterruptType.CONFIG)
    assert drv.r(vp.CONFIG_GENERATION, 1) == (second + 1) & 0xFF


# -- queues, activation, notifications, interrupts --------------------------------------------


def test_queue_registers(machine: FakeMachine, device: FakeDevice) -> None:
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    drv.w(vp.QUEUE_SELECT, 2, 1)
    assert drv.r(vp.QUEUE_SIZE, 2) == 128
    for bad in (0, 100, 256):  # stored as written; refused when validated at DRIVER_OK
        drv.w(vp.QUEUE_SIZE, 2, bad)
        assert drv.r(vp.QUEUE_SIZE, 2) == bad
    drv.w(vp.QUEUE_SIZE, 2, 64)
    assert drv.r(vp.QUEUE_SIZE, 2) == 64
    drv.w(vp.QUEUE_DESC, 8, 0x1_2345_6780)
    assert drv.r(vp.QUEUE_DESC, 4) == 0x2345_6780 and drv.r(vp.QUEUE_DESC + 4, 4) == 1
    assert drv.r(vp.QUEUE_DESC, 8) == 0x1_2345_6780
    drv.w(vp.QUEUE_DESC + 2, 4, 0)  # misaligned: ignored
    assert drv.r(vp.QUEUE_DESC, 8) == 0x1_2345_6780
    assert drv.setup_queue(1, 64, DESC, AVAIL, USED, vector=1) == 1
    assert drv.setup_queue(1, 64, DESC, AVAIL, USED, vector=3) == vp.VIRTIO_MSI_NO_VECTOR  # only 3 vectors
    drv.w(vp.MSIX_CONFIG, 2, 2)
    assert drv.r(vp.MSIX_CONFIG, 2) == 2
    drv.enable_queue(1)
    assert drv.r(vp.QUEUE_ENABLE, 2) == 1
    drv.w(vp.QUEUE_SIZE, 2, 32)  # enabled: locked
    drv.w(vp.QUEUE_ENABLE, 2, 0)  # the driver may not disable a queue
    assert drv.r(vp.QUEUE_SIZE, 2) == 64 and drv.r(vp.QUEUE_ENABLE, 2) == 1
    drv.w(vp.QUEUE_SELECT, 2, 5)  # no such queue
    assert drv.r(vp.QUEUE_SIZE, 2) == 0 and drv.r(vp.QUEUE_MSIX_VECTOR, 2) == vp.VIRTIO_MSI_NO_VECTOR
    drv.w(vp.QUEUE_SIZE, 2, 8)
    drv.reset()
    drv.w(vp.QUEUE_SELECT, 2, 1)
    assert drv.r(vp.QUEUE_SIZE, 2) == 128 and drv.r(vp.QUEUE_ENABLE, 2) == 0
    assert drv.r(vp.QUEUE_MSIX_VECTOR, 2) == vp.VIRTIO_MSI_NO_VECTOR and drv.r(vp.QUEUE_DESC, 8) == 0


def test_driver_ok_activates_with_virtqueues(machine: FakeMachine, device: FakeDevice, vm: FakeVm) -> None:
    transport, slot = attach(machine, device)
    drv = Driver(machine, slot)
    assert drv.negotiate(VIRTIO_F_VERSION_1 | (1 << 28))
    drv.setup_queue(0, 8, DESC, AVAIL, USED)
    drv.enable_queue(0)
    drv.add_status(S_DRIVER_OK)
    assert drv.status == S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    (ctx,) = device.contexts
    assert isinstance(ctx, ActivationContext)
    assert ctx.memory is machine.memory and ctx.event_loop is machine.event_loop
    assert len(ctx.queues) == 2 and len(ctx.queue_events) == 2
    q0, q1 = ctx.queues
    assert isinstance(q0, Virtqueue)
    assert (q0.size, q0.desc_table, q0.avail_ring, q0.used_ring, q0.ready) == (8, DESC, AVAIL, USED, True)
    assert q0.indirect and not q0.event_idx and q0.index == 0
    assert not q1.ready and q1.index == 1
    # the notify ioeventfds sit on each queue's notify address in BAR0
    base = drv.bars[0].address
    assert {addr: fd for (addr, _pio), (fd, _len, _dm) in vm.ioeventfds.items()} == {
        base + 0x6000: ctx.queue_events[0], base + 0x6004: ctx.queue_events[1]}
    drv.w(vp.QUEUE_SELECT, 2, 0)
    drv.w(vp.QUEUE_SIZE, 2, 4)  # after DRIVER_OK: locked
    assert q0.size == 8
    # reset resets the queues and the device
    drv.reset()
    assert device.resets and not q0.ready and transport.virtqueues == []


def test_bad_ring_sets_needs_reset(machine: FakeMachine, device: FakeDevice) -> None:
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.setup_queue(0, 8, DESC + 8, AVAIL, USED)  # descriptor table not 16-byte aligned
    drv.enable_queue(0)
    drv.add_status(S_DRIVER_OK)
    assert drv.status & S_NEEDS_RESET and not device.contexts
    drv.reset()
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.setup_queue(0, 8, 0x7FFF_0000, AVAIL, USED)  # outside guest RAM
    drv.enable_queue(0)
    drv.add_status(S_DRIVER_OK)
    assert drv.status & S_NEEDS_RESET and not device.contexts


def test_failed_activation_sets_needs_reset(machine: FakeMachine, device: FakeDevice) -> None:
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    device.fail_activate = True
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.add_status(S_DRIVER_OK)
    assert drv.status & S_NEEDS_RESET


def test_queue_error_after_driver_ok_raises_config_interrupt(machine: FakeMachine, device: FakeDevice,
                                                             vm: FakeVm) -> None:
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    drv.enable_msix(3)
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.w(vp.MSIX_CONFIG, 2, 2)
    drv.setup_queue(0, 8, DESC, AVAIL, USED, vector=0)
    drv.enable_queue(0)
    drv.add_status(S_DRIVER_OK)
    vm.delivered()
    q0 = device.contexts[0].queues[0]
    q0.mark_broken("the guest lied")
    assert drv.status & S_NEEDS_RESET
    assert vm.delivered() == [(MSI_ADDRESS, 0x42)]  # the config vector


def test_notifications_through_ioeventfd_and_trap(make_machine: Callable[..., FakeMachine]) -> None:
    for with_ioeventfd in (True, False):
        vm = FakeVm(ioeventfd=with_ioeventfd)
        machine = make_machine(vm)
        device = FakeDevice(sizes=(8, 8))
        transport, slot = attach(machine, device)
        drv = Driver(machine, slot)
        assert bool(vm.ioeventfds) == with_ioeventfd
        events = transport.queue_events
        drv.kick(1)
        assert eventfd_count(events[1]) == 1 and eventfd_count(events[0]) == 0
        trapped = transport.counters()["notifications_trapped"]
        assert trapped == (0 if with_ioeventfd else 1)
        drv.guest.cpu.mmio_write(drv.notify + 8, b"\x02\x00")  # beyond the last queue
        drv.guest.cpu.mmio_write(drv.notify + 2, b"\x00\x00")  # between notify addresses
        assert eventfd_count(events[0]) == 0 and eventfd_count(events[1]) == 0


def test_ioeventfd_registration_failure_falls_back(machine: FakeMachine, vm: FakeVm) -> None:
    # something else already holds the address queue 0 would get
    base = 0x10_0000_0000  # the first BAR of the 64-bit window
    vm.register_ioeventfd(os.eventfd(0), base + 0x6000, pio=False)
    transport, slot = attach(machine, FakeDevice(sizes=(8, 8)))
    drv = Driver(machine, slot)
    assert drv.bars[0].address == base
    assert [addr for _fd, addr in transport.ioeventfds] == [base + 0x6004]
    drv.guest.cpu.mmio_write(base + 0x6000, b"\x00\x00")  # the trap path still works
    assert eventfd_count(transport.queue_events[0]) == 1


def test_bar_relocation_moves_ioeventfds(machine: FakeMachine, device: FakeDevice, vm: FakeVm) -> None:
    transport, slot = attach(machine, device)
    drv = Driver(machine, slot)
    old = drv.bars[0].address
    new = 0x18_0000_0000
    fn = drv.fn
    cmd = fn.read16(c.COMMAND)
    fn.write16(c.COMMAND, cmd & ~c.COMMAND_MEMORY)
    assert vm.ioeventfds == {} and transport.ioeventfds == ()
    fn.write32(0x10, (new & 0xFFFF_FFFF) | 4)
    fn.write32(0x14, new >> 32)
    fn.write16(c.COMMAND, cmd)
    assert sorted(addr for addr, _ in vm.ioeventfds) == [new + 0x6000, new + 0x6004]
    assert machine.mmio_bus.lookup(old) is None
    assert machine.guest.read(new + vp.NUM_QUEUES, 2) == 2
    machine.pci_segment().remap(transport)  # type: ignore[union-attr]  # idempotent
    assert len(vm.ioeventfds) == 2


def test_msix_interrupts(machine: FakeMachine, device: FakeDevice, vm: FakeVm) -> None:
    transport, slot = attach(machine, device)
    drv = Driver(machine, slot)
    drv.enable_msix(3)
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.w(vp.MSIX_CONFIG, 2, 2)
    assert drv.setup_queue(0, 8, DESC, AVAIL, USED, vector=0) == 0
    assert drv.setup_queue(1, 8, DESC + 0x4000, AVAIL + 0x4000, USED + 0x4000) == vp.VIRTIO_MSI_NO_VECTOR
    drv.enable_queue(0)
    drv.enable_queue(1)
    drv.add_status(S_DRIVER_OK)
    interrupt = device.contexts[0].interrupt
    interrupt.trigger(VirtioInterruptType.QUEUE, 0)
    assert vm.delivered() == [(MSI_ADDRESS, 0x40)]
    interrupt.trigger(VirtioInterruptType.QUEUE, 1)  # VIRTIO_MSI_NO_VECTOR: nothing
    interrupt.trigger(VirtioInterruptType.QUEUE, 7)  # no such queue
    assert vm.delivered() == []
    interrupt.trigger(VirtioInterruptType.CONFIG)
    assert vm.delivered() == [(MSI_ADDRESS, 0x42)]
    assert drv.read_isr() == 0  # MSI-X: the ISR is not used
    # a masked vector's message waits in the PBA
    drv.guest.write(drv.table + 12, 4, 1)
    interrupt.trigger(VirtioInterruptType.QUEUE, 0)
    assert vm.delivered() == []
    assert drv.guest.read(drv.bars[0].address + 0x48000, 8) == 1
    drv.guest.write(drv.table + 12, 4, 0)
    assert vm.delivered() == [(MSI_ADDRESS, 0x40)]
    assert transport.counters()["interrupts"] == 5


def test_intx_interrupts(machine: FakeMachine, device: FakeDevice) -> None:
    vm = FakeVm(irqfd=False)  # INTx levels are visible as set_irq_line calls
    machine.vm = vm
    transport, slot = attach(machine, device)
    gsi = transport.config.get(c.INTERRUPT_LINE, 1)
    drv = Driver(machine, slot)
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.add_status(S_DRIVER_OK)
    interrupt = device.contexts[0].interrupt
    interrupt.trigger(VirtioInterruptType.QUEUE, 0)
    assert vm.lines[gsi] is True
    assert drv.fn.read16(c.STATUS) & c.STATUS_INTERRUPT
    interrupt.trigger(VirtioInterruptType.CONFIG)
    assert drv.read_isr() == 3
    assert vm.lines[gsi] is False and drv.read_isr() == 0
    assert not drv.fn.read16(c.STATUS) & c.STATUS_INTERRUPT
    # INTx disable in the command register keeps the line low, the ISR still records it
    drv.fn.write16(c.COMMAND, drv.fn.read16(c.COMMAND) | c.COMMAND_INTX_DISABLE)
    interrupt.trigger(VirtioInterruptType.QUEUE, 0)
    assert vm.lines[gsi] is False and drv.fn.read16(c.STATUS) & c.STATUS_INTERRUPT
    drv.fn.write16(c.COMMAND, drv.fn.read16(c.COMMAND) & ~c.COMMAND_INTX_DISABLE)
    assert vm.lines[gsi] is True
    assert drv.read_isr() == 1 and vm.lines[gsi] is False


def test_pci_cfg_window(machine: FakeMachine, device: FakeDevice) -> None:
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    fn, cap = drv.fn, drv.caps[vp.VIRTIO_PCI_CAP_PCI_CFG]
    fn.write8(cap + 4, 0)
    fn.write32(cap + 8, vp.NUM_QUEUES)
    fn.write32(cap + 12, 2)
    assert fn.read32(cap + 16) & 0xFFFF == 2
    fn.write32(cap + 8, vp.DEVICE_STATUS)
    fn.write32(cap + 12, 1)
    fn.write32(cap + 16, S_ACK)
    assert drv.status == S_ACK
    fn.write32(cap + 8, vp.DEVICE_CFG_OFFSET)
    fn.write32(cap + 12, 4)
    assert fn.read32(cap + 16) == 0x4433_2211
    fn.write32(cap + 12, 3)  # not 1, 2 or 4: nothing happens
    fn.write32(cap + 16, 0)
    assert drv.status == S_ACK


def test_end_to_end_with_a_real_virtqueue(machine: FakeMachine, vm: FakeVm) -> None:
    """The device serves a chain on the event loop after an ioeventfd kick and interrupts
    through the queue's MSI-X vector."""

    class Filler(FakeDevice):
        def activate(self, ctx: ActivationContext) -> None:
            super().activate(ctx)
            queue, fd = ctx.queues[0], ctx.queue_events[0]

            def serve() -> None:
                eventfd_count(fd)
                while (chain := queue.pop()) is not None:
                    queue.add_used(chain.head, chain.write(b"virtio-pci works"))
                if queue.needs_notification():
                    ctx.interrupt.trigger(VirtioInterruptType.QUEUE, 0)

            ctx.event_loop.add_reader(fd, serve)

    machine.event_loop.start()
    device = Filler(sizes=(8,))
    _, slot = attach(machine, device)
    drv = Driver(machine, slot)
    drv.enable_msix(2)
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    write_ring(machine.memory)
    drv.setup_queue(0, 8, DESC, AVAIL, USED, vector=1)
    drv.enable_queue(0)
    drv.add_status(S_DRIVER_OK)
    drv.kick(0)
    assert wait_for(lambda: machine.memory.read_u16(USED + 2) == 1)
    assert machine.memory.read(0x20000, 16) == b"virtio-pci works"
    assert struct.unpack("<II", machine.memory.read(USED + 4, 8)) == (0, 16)
    delivered: list[tuple[int, int]] = []

    def interrupted() -> bool:
        delivered.extend(vm.delivered())
        return bool(delivered)

    assert wait_for(interrupted)
    assert delivered == [(MSI_ADDRESS, 0x41)]


def test_vm_reset_restores_power_on_state(machine: FakeMachine, device: FakeDevice, vm: FakeVm) -> None:
    transport, slot = attach(machine, device)
    drv = Driver(machine, slot)
    base = drv.bars[0].address
    drv.enable_msix(3)
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.add_status(S_DRIVER_OK)
    drv.fn.write16(c.COMMAND, 0)
    drv.fn.write32(0x10, 0xC000_0004)
    transport.reset()
    assert transport.config.bar_address(0) == base
    assert machine.mmio_bus.lookup(base) is not None
    assert sorted(addr for addr, _ in vm.ioeventfds) == [base + 0x6000, base + 0x6004]
    assert drv.status == 0 and not transport.msix.enabled
    assert set(vm.irqfds) == {transport.config.get(c.INTERRUPT_LINE, 1)}  # only the INTx line's
    assert drv.fn.read16(c.COMMAND) == c.COMMAND_MEMORY


def test_close_releases_everything(machine: FakeMachine, device: FakeDevice, vm: FakeVm) -> None:
    transport, slot = attach(machine, device)
    drv = Driver(machine, slot)
    drv.enable_msix(3)
    events = list(transport.queue_events)
    transport.close()
    transport.close()
    assert device.closed and vm.ioeventfds == {}
    assert set(vm.irqfds) == {transport.config.get(c.INTERRUPT_LINE, 1)}  # the machine closes INTx lines
    for fd in events:
        with pytest.raises(OSError):
            os.fstat(fd)
    drv.guest.cpu.mmio_write(drv.notify, b"\x00\x00")  # a late kick does not touch closed fds


# -- hostile accesses ---------------------------------------------------------------------------

_bar_ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, vp.BAR_SIZE + 8), st.sampled_from([0, 1, 2, 3, 4, 8, 16]),
              st.integers(0, (1 << 128) - 1)),
    max_size=120,
)
_interesting = st.sampled_from([0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1A, 0x1C, 0x1E,
                                0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x2000, 0x4000, 0x6000, 0x6004, 0x8000,
                                0x800C, 0x48000])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_bar_ops, st.lists(st.tuples(_interesting, st.sampled_from([1, 2, 4, 8]),
                                    st.integers(0, (1 << 64) - 1)), max_size=80))
def test_hostile_bar_accesses_never_raise(memory: GuestMemory, random_ops: list[tuple[bool, int, int, int]],
                                          register_ops: list[tuple[int, int, int]]) -> None:
    vm = FakeVm()
    machine = FakeMachine(vm, memory)
    try:
        device = FakeDevice(sizes=(8, 4))
        placed = machine.place(device, virtio_request("h"))
        transport = placed.device
        base = transport.config.bar_address(0)
        cpu = machine.guest.cpu
        ops = [(True, off, size, value) for off, size, value in register_ops] + random_ops
        for is_write, offset, size, value in ops:
            if is_write:
                cpu.mmio_write(base + offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            else:
                assert len(cpu.mmio_read(base + offset, size)) == size
            assert len(transport.bar_read(0, offset, size)) == size
        transport.signal(VirtioInterruptType.QUEUE, 0)
        transport.signal(VirtioInterruptType.CONFIG)
        transport.reset()
    finally:
        machine.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 0x10FF), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF)),
                max_size=100))
def test_hostile_config_writes_never_raise(memory: GuestMemory, ops: list[tuple[int, int, int]]) -> None:
    machine = FakeMachine(FakeVm(), memory)
    try:
        machine.place(FakeDevice(sizes=(8,)), virtio_request("h"))
        ecam = machine.guest.ecam
        for offset, size, value in ops:
            ecam.write(0, 1, 0, offset, size, value & ((1 << (8 * size)) - 1))
            ecam.read(0, 1, 0, offset, size)
        assert ecam.read(0, 1, 0, 0, 4) == 0x1044_1AF4
    finally:
        machine.close()


def test_every_offset_and_size(machine: FakeMachine) -> None:
    """A sweep rather than a sample: every configuration-space offset through ECAM and
    0xCF8/0xCFC, and every BAR offset around each structure plus a stride over the whole BAR,
    with every access size, read and written with all ones."""
    placed = machine.place(FakeDevice(sizes=(8, 8, 8)), virtio_request("sweep"))
    transport = placed.device
    guest = machine.guest
    sizes = (1, 2, 3, 4, 8)
    for offset in range(0x1000):
        for size in sizes:
            ecam = guest.ecam.base + (1 << 15) + offset
            assert len(guest.cpu.mmio_read(ecam, size)) == size
            guest.cpu.mmio_write(ecam, b"\xff" * size)
    for offset in range(0x100):
        guest.cf8.write(0, 1, 0, offset & 0xFC, 4, 0xFFFF_FFFF)
        for size in sizes:
            assert len(guest.cpu.pio_read(0xCF8 + (offset & 7), size)) == size
    assert guest.function(1).read16(0) == 0x1AF4  # still there, still itself
    base = transport.config.bar_address(0)
    if machine.mmio_bus.lookup(base) is None:  # the sweep may have turned decoding off
        transport.config.write(c.COMMAND, 2, c.COMMAND_MEMORY)
        transport.config.write(0x10, 4, base & 0xFFFF_FFFF | 4)
        transport.config.write(0x14, 4, base >> 32)
        transport.remap()
    edges = (vp.COMMON_CFG_OFFSET, vp.COMMON_CFG_OFFSET + vp.COMMON_CFG_SIZE, vp.ISR_CFG_OFFSET,
             vp.DEVICE_CFG_OFFSET, vp.DEVICE_CFG_OFFSET + vp.DEVICE_CFG_SIZE, vp.NOTIFY_OFFSET,
             vp.NOTIFY_OFFSET + vp.NOTIFY_SIZE, vp.MSIX_TABLE_OFFSET, vp.MSIX_TABLE_OFFSET + 64,
             vp.MSIX_PBA_OFFSET, vp.MSIX_PBA_OFFSET + 8, vp.BAR_SIZE)
    offsets = sorted({o for edge in edges for o in range(max(edge - 16, 0), min(edge + 64, vp.BAR_SIZE))}
                     | set(range(0, vp.BAR_SIZE, 0x40)))
    for offset in offsets:
        for size in sizes:
            assert len(transport.bar_read(0, offset, size)) == size
            transport.bar_write(0, offset, b"\xff" * size)
            transport.bar_write(0, offset, b"\x00" * size)
    assert len(transport.bar_read(0, vp.BAR_SIZE - 1, 8)) == 8
