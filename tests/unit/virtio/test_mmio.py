"""The virtio-mmio version 2 transport, register by register (virtio 1.2, 4.2)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vq_driver import FakeDevice, FakeDriver, FakeEventLoop, FakeLine

from vmmkit.errors import DeviceError
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.virtio import mmio as m
from vmmkit.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VirtioInterruptType,
)
from vmmkit.virtio.mmio import VirtioMmioTransport

DATA = 0x40000
FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | (1 << 5)


class Driver:
    """A virtio-mmio driver doing 32-bit register accesses, as Linux's virtio_mmio does."""

    def __init__(self, transport: VirtioMmioTransport) -> None:
        self.t = transport

    def r(self, offset: int) -> int:
        return int.from_bytes(self.t.read(offset, 4), "little")

    def w(self, offset: int, value: int) -> None:
        self.t.write(offset, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def status(self) -> int:
        return self.r(m.STATUS)

    def add_status(self, bits: int) -> None:
        self.w(m.STATUS, self.status() | bits)

    def negotiate(self, features: int) -> bool:
        self.add_status(m.ACKNOWLEDGE)
        self.add_status(m.DRIVER)
        for sel in (0, 1):
            self.w(m.DRIVER_FEATURES_SEL, sel)
            self.w(m.DRIVER_FEATURES, features >> (32 * sel))
        self.add_status(m.FEATURES_OK)
        return bool(self.status() & m.FEATURES_OK)

    def setup_queue(self, index: int, ring: FakeDriver) -> None:
        self.w(m.QUEUE_SEL, index)
        assert self.r(m.QUEUE_READY) == 0
        self.w(m.QUEUE_NUM, ring.size)
        for low, value in ((m.QUEUE_DESC_LOW, ring.desc), (m.QUEUE_DRIVER_LOW, ring.avail),
                           (m.QUEUE_DEVICE_LOW, ring.used)):
            self.w(low, value)
            self.w(low + 4, value >> 32)
        self.w(m.QUEUE_READY, 1)


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice(sizes=(16, 8), features=FEATURES | VIRTIO_F_RING_PACKED)


@pytest.fixture
def line() -> FakeLine:
    return FakeLine()


@pytest.fixture
def transport(memory: GuestMemory, device: FakeDevice, line: FakeLine) -> Iterator[VirtioMmioTransport]:
    transport = VirtioMmioTransport(device, memory=memory, line=line, event_loop=FakeEventLoop())  # type: ignore[arg-type]
    yield transport
    transport.close()


@pytest.fixture
def drv(transport: VirtioMmioTransport) -> Driver:
    return Driver(transport)


def bring_up(drv: Driver, memory: GuestMemory, features: int = VIRTIO_F_VERSION_1) -> FakeDriver:
    assert drv.negotiate(features)
    ring = FakeDriver(memory, 16, desc=0x10000)
    drv.setup_queue(0, ring)
    drv.add_status(m.DRIVER_OK)
    return ring


# -- identification and features --------------------------------------------------------------


def test_identification_registers(drv: Driver, device: FakeDevice) -> None:
    assert drv.r(m.MAGIC) == 0x74726976
    assert drv.t.read(0, 4) == b"virt"
    assert drv.r(m.VERSION_REG) == 2
    assert drv.r(m.DEVICE_ID) == device.device_type == 4
    assert drv.r(m.VENDOR_ID_REG) == 0


def test_device_features_by_selector(drv: Driver) -> None:
    drv.w(m.DEVICE_FEATURES_SEL, 0)
    low = drv.r(m.DEVICE_FEATURES)
    drv.w(m.DEVICE_FEATURES_SEL, 1)
    high = drv.r(m.DEVICE_FEATURES)
    assert low | high << 32 == FEATURES  # RING_PACKED is withheld: this transport has no packed rings
    drv.w(m.DEVICE_FEATURES_SEL, 2)
    assert drv.r(m.DEVICE_FEATURES) == 0


def test_a_device_without_version_1_is_refused(memory: GuestMemory) -> None:
    with pytest.raises(DeviceError, match="VERSION_1"):
        VirtioMmioTransport(FakeDevice(features=1 << 5), memory=memory, line=FakeLine(),
                            event_loop=FakeEventLoop())  # type: ignore[arg-type]


def test_bad_queue_sizes_are_refused(memory: GuestMemory) -> None:
    with pytest.raises(DeviceError, match="power of two"):
        VirtioMmioTransport(FakeDevice(sizes=(16, 100)), memory=memory, line=FakeLine(),
                            event_loop=FakeEventLoop())  # type: ignore[arg-type]


# -- the status state machine -----------------------------------------------------------------


def test_bring_up_activates_the_device(drv: Driver, memory: GuestMemory, device: FakeDevice,
                                       transport: VirtioMmioTransport) -> None:
    ring = bring_up(drv, memory, VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    assert drv.status() == m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK | m.DRIVER_OK
    assert device.acked_features == VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX
    ctx = device.context
    assert ctx is not None and device.activations == 1
    assert ctx.memory is memory and ctx.queue_events == tuple(transport.queue_events)
    assert [q.ready for q in ctx.queues] == [True, False]
    q = ctx.queues[0]
    assert (q.size, q.desc_table, q.avail_ring, q.used_ring) == (16, ring.desc, ring.avail, ring.used)
    assert q.event_idx and not q.indirect


@pytest.mark.parametrize(
    "features",
    [
        VIRTIO_F_VERSION_1 | (1 << 6),  # a feature not offered
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED,  # offered by the device, withheld by the transport
        1 << 5,  # no VERSION_1: a legacy driver
    ],
)
def test_feature_negotiation_failure(drv: Driver, device: FakeDevice, features: int) -> None:
    assert not drv.negotiate(features)
    assert drv.status() == m.ACKNOWLEDGE | m.DRIVER
    drv.add_status(m.DRIVER_OK)
    assert drv.status() == m.ACKNOWLEDGE | m.DRIVER and device.activations == 0


def test_driver_features_are_frozen_after_features_ok(drv: Driver, device: FakeDevice) -> None:
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.w(m.DRIVER_FEATURES_SEL, 0)
    drv.w(m.DRIVER_FEATURES, 1 << 5)
    assert drv.t.driver_features == VIRTIO_F_VERSION_1


def test_driver_features_before_driver_are_ignored(drv: Driver) -> None:
    drv.w(m.DRIVER_FEATURES_SEL, 1)
    drv.w(m.DRIVER_FEATURES, 1)
    assert drv.t.driver_features == 0


@pytest.mark.parametrize(
    ("writes", "expected"),
    [
        ([m.DRIVER], 0),  # DRIVER before ACKNOWLEDGE
        ([m.ACKNOWLEDGE, m.ACKNOWLEDGE | m.FEATURES_OK], m.ACKNOWLEDGE),  # FEATURES_OK before DRIVER
        ([m.ACKNOWLEDGE, m.ACKNOWLEDGE | m.DRIVER, m.ACKNOWLEDGE | m.DRIVER | m.DRIVER_OK],
         m.ACKNOWLEDGE | m.DRIVER),  # DRIVER_OK without FEATURES_OK
        ([m.ACKNOWLEDGE | m.DRIVER, m.ACKNOWLEDGE], m.ACKNOWLEDGE | m.DRIVER),  # clearing a bit
    ],
)
def test_out_of_order_status_writes_are_ignored(drv: Driver, device: FakeDevice, writes: list[int],
                                                expected: int) -> None:
    for value in writes:
        drv.w(m.STATUS, value)
    assert drv.status() == expected
    assert device.activations == 0


def test_several_steps_in_one_write(drv: Driver) -> None:
    drv.w(m.STATUS, m.ACKNOWLEDGE | m.DRIVER)
    assert drv.status() == m.ACKNOWLEDGE | m.DRIVER


def test_failed_sticks_until_reset(drv: Driver, device: FakeDevice) -> None:
    drv.add_status(m.ACKNOWLEDGE)
    drv.add_status(m.FAILED)
    drv.add_status(m.DRIVER)
    assert drv.status() == m.ACKNOWLEDGE | m.FAILED
    drv.w(m.STATUS, 0)
    assert drv.status() == 0 and device.resets == 1


def test_writing_zero_resets(drv: Driver, memory: GuestMemory, device: FakeDevice,
                             transport: VirtioMmioTransport) -> None:
    bring_up(drv, memory)
    transport.notify(0)
    device.context.interrupt.trigger(VirtioInterruptType.QUEUE)  # type: ignore[union-attr]
    drv.w(m.QUEUE_SEL, 1)
    drv.w(m.STATUS, 0)
    assert drv.status() == 0 and device.resets == 1 and device.acked_features == 0
    assert drv.r(m.INTERRUPT_STATUS) == 0
    assert all(not q.ready and q.desc_table == 0 for q in transport.queues)
    assert drv.t.queue_sel == 0 and drv.t.driver_features == 0
    with pytest.raises(BlockingIOError):  # the stale kick was drained
        os.eventfd_read(transport.queue_events[0])
    bring_up(drv, memory)  # and the device comes up again
    assert device.activations == 2


def test_activation_failure_sets_needs_reset(drv: Driver, memory: GuestMemory, device: FakeDevice,
                                             line: FakeLine) -> None:
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    ring = FakeDriver(memory, 16, desc=0x10000)
    drv.setup_queue(0, ring)
    drv.w(m.QUEUE_SEL, 1)
    drv.w(m.QUEUE_NUM, 8)
    drv.w(m.QUEUE_DESC_LOW, 0x10008)  # misaligned descriptor table
    drv.w(m.QUEUE_READY, 1)
    drv.add_status(m.DRIVER_OK)
    assert drv.status() & m.DEVICE_NEEDS_RESET and device.activations == 0
    assert drv.r(m.INTERRUPT_STATUS) == m.INT_CONFIG and line.pulses == 1
    drv.w(m.STATUS, 0)
    assert drv.status() == 0


def test_device_refusing_activation(drv: Driver, memory: GuestMemory, device: FakeDevice) -> None:
    device.fail_activation = True
    bring_up(drv, memory)
    assert drv.status() & m.DEVICE_NEEDS_RESET


def test_a_queue_breaking_at_runtime_sets_needs_reset(drv: Driver, memory: GuestMemory, device: FakeDevice,
                                                      line: FakeLine) -> None:
    ring = bring_up(drv, memory)
    queue = device.context.queues[0]  # type: ignore[union-attr]
    ring.publish(99)  # a head beyond the queue
    with pytest.raises(Exception) as info:
        queue.pop()
    device.mark_broken(str(info.value))
    assert drv.status() & m.DEVICE_NEEDS_RESET
    assert drv.r(m.INTERRUPT_STATUS) & m.INT_CONFIG and line.pulses == 1


def test_a_device_marked_broken_reads_needs_reset(drv: Driver, memory: GuestMemory,
                                                  device: FakeDevice, line: FakeLine) -> None:
    bring_up(drv, memory)
    device.mark_broken("backend gone")
    assert drv.status() & m.DEVICE_NEEDS_RESET
    # virtio 1.2, 2.1.2: after DRIVER_OK the device tells the driver, once
    assert drv.r(m.INTERRUPT_STATUS) & m.INT_CONFIG and line.pulses == 1
    device.mark_broken("still gone")
    assert line.pulses == 1
    drv.w(m.STATUS, 0)
    assert drv.status() == 0 and device.broken is None


def test_a_device_broken_before_driver_ok_sends_no_interrupt(drv: Driver, device: FakeDevice,
                                                             line: FakeLine) -> None:
    drv.w(m.STATUS, m.ACKNOWLEDGE | m.DRIVER)
    device.mark_broken("backend gone")
    assert drv.status() & m.DEVICE_NEEDS_RESET
    assert not drv.r(m.INTERRUPT_STATUS) & m.INT_CONFIG and line.pulses == 0


# -- queue registers --------------------------------------------------------------------------


def test_queue_num_max_per_selected_queue(drv: Driver) -> None:
    for sel, expected in ((0, 16), (1, 8), (2, 0), (0xFFFF_FFFF, 0)):
        drv.w(m.QUEUE_SEL, sel)
        assert drv.r(m.QUEUE_NUM_MAX) == expected


def test_queue_addresses_are_64_bit(drv: Driver, transport: VirtioMmioTransport) -> None:
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.w(m.QUEUE_SEL, 1)
    for offset, value in ((m.QUEUE_DESC_LOW, 0x1111_0000), (m.QUEUE_DESC_HIGH, 0x2),
                          (m.QUEUE_DRIVER_LOW, 0x3333_0000), (m.QUEUE_DRIVER_HIGH, 0x4),
                          (m.QUEUE_DEVICE_LOW, 0x5555_0000), (m.QUEUE_DEVICE_HIGH, 0x6)):
        drv.w(offset, value)
    drv.w(m.QUEUE_NUM, 4)
    q = transport.queues[1]
    assert (q.desc_table, q.avail_ring, q.used_ring) == (0x2_1111_0000, 0x4_3333_0000, 0x6_5555_0000)
    assert q.size == 4
    assert drv.r(m.QUEUE_DESC_LOW) == 0 and drv.r(m.QUEUE_NUM) == 0  # write-only registers read 0


def test_queue_registers_only_between_features_ok_and_driver_ok(drv: Driver, memory: GuestMemory,
                                                                transport: VirtioMmioTransport) -> None:
    drv.w(m.QUEUE_NUM, 4)
    drv.w(m.QUEUE_DESC_LOW, 0x1000)
    drv.w(m.QUEUE_READY, 1)
    assert transport.queues[0].size == 16 and transport.queues[0].desc_table == 0
    assert not transport.queues[0].ready
    bring_up(drv, memory)
    drv.w(m.QUEUE_SEL, 0)
    drv.w(m.QUEUE_DESC_LOW, 0x2000)
    drv.w(m.QUEUE_READY, 1)
    assert transport.queues[0].desc_table == 0x10000 and transport.queues[0].ready
    drv.w(m.QUEUE_READY, 0)  # "to stop using the queue": allowed at any time
    assert drv.r(m.QUEUE_READY) == 0 and transport.queues[0].pop() is None
    drv.w(m.QUEUE_READY, 1)  # but it cannot come back before a reset
    assert drv.r(m.QUEUE_READY) == 0


def test_a_ready_queue_keeps_its_layout(drv: Driver, memory: GuestMemory,
                                        transport: VirtioMmioTransport) -> None:
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.setup_queue(0, FakeDriver(memory, 16, desc=0x10000))
    drv.w(m.QUEUE_NUM, 2)
    drv.w(m.QUEUE_DESC_LOW, 0x3000)
    assert transport.queues[0].size == 16 and transport.queues[0].desc_table == 0x10000
    drv.w(m.QUEUE_READY, 0)
    drv.w(m.QUEUE_NUM, 2)
    assert transport.queues[0].size == 2


# -- accesses of the wrong size or place ------------------------------------------------------


@pytest.mark.parametrize("offset", [m.MAGIC, m.STATUS, m.QUEUE_NUM_MAX, m.CONFIG_GENERATION])
@pytest.mark.parametrize("size", [1, 2, 8])
def test_registers_answer_only_32_bit_reads(drv: Driver, offset: int, size: int) -> None:
    assert drv.t.read(offset, size) == b"\0" * size


@pytest.mark.parametrize("offset", [0x1, 0x2, 0x3, 0x71, 0xFE])
def test_misaligned_register_reads_are_zero(drv: Driver, offset: int) -> None:
    assert drv.t.read(offset, 4) == b"\0" * 4


def test_odd_writes_are_ignored(drv: Driver) -> None:
    drv.t.write(m.STATUS, b"\x01")
    drv.t.write(m.STATUS, b"\x01\x00")
    drv.t.write(m.STATUS + 1, b"\x01\x00\x00\x00")
    drv.t.write(m.STATUS, b"\x01" * 8)
    drv.t.write(-4, b"\x01\x00\x00\x00")
    drv.t.write(m.STATUS, b"")
    assert drv.status() == 0


def test_unknown_and_shared_memory_registers(drv: Driver) -> None:
    for offset in (0x018, 0x028, 0x03C, 0x040, 0x048, 0x0A8, 0x0C0, 0x0C4, 0x0F8):
        assert drv.r(offset) == 0
    drv.w(m.SHM_SEL, 0)
    for offset in range(m.SHM_LEN_LOW, m.SHM_BASE_HIGH + 4, 4):
        assert drv.r(offset) == 0xFFFF_FFFF  # no shared memory region: length -1


# -- configuration space ----------------------------------------------------------------------


def test_config_space_reads(drv: Driver) -> None:
    t = drv.t
    assert t.read(m.CONFIG, 1) == b"\x01"
    assert t.read(m.CONFIG + 2, 2) == b"\x03\x04"
    assert t.read(m.CONFIG + 4, 4) == b"\x05\x06\x07\x08"
    assert t.read(m.CONFIG, 8) == bytes(range(1, 9))
    assert t.read(m.CONFIG + 8, 4) == b"\0" * 4  # past the device's config: zeros
    assert t.read(m.CONFIG + 1, 2) == b"\0\0"  # misaligned
    assert t.read(m.CONFIG + 4, 3) == b"\0" * 3  # odd size
    assert t.read(0xFFC, 4) == b"\0" * 4
    assert t.read(0x1000, 4) == b"\0" * 4 and t.read(0xFFFF_FFFF, 2) == b"\0\0"


def test_config_space_writes_reach_the_device(drv: Driver, device: FakeDevice) -> None:
    drv.t.write(m.CONFIG + 2, b"\xAA\xBB")
    drv.t.write(m.CONFIG + 5, b"\xCC\xDD")  # misaligned: ignored
    drv.t.write(0x1000, b"\xEE")  # outside the window
    assert bytes(device.config) == b"\x01\x02\xAA\xBB\x05\x06\x07\x08"


def test_config_generation_changes_with_the_config(drv: Driver, device: FakeDevice, line: FakeLine) -> None:
    first = drv.r(m.CONFIG_GENERATION)
    assert drv.r(m.CONFIG_GENERATION) == first
    device.config[0] = 0x99
    second = drv.r(m.CONFIG_GENERATION)
    assert second != first and drv.r(m.CONFIG_GENERATION) == second
    drv.t.interrupt.trigger(VirtioInterruptType.CONFIG)
    assert drv.r(m.CONFIG_GENERATION) != second
    assert drv.r(m.INTERRUPT_STATUS) == m.INT_CONFIG and line.pulses == 1


# -- interrupts and notifications -------------------------------------------------------------


def test_used_buffer_interrupt_and_ack(drv: Driver, memory: GuestMemory, device: FakeDevice,
                                       line: FakeLine) -> None:
    bring_up(drv, memory)
    interrupt = device.context.interrupt  # type: ignore[union-attr]
    interrupt.trigger(VirtioInterruptType.QUEUE, 0)
    interrupt.trigger(VirtioInterruptType.QUEUE, 0)  # every event is a new edge
    assert drv.r(m.INTERRUPT_STATUS) == m.INT_VRING and line.pulses == 2
    drv.w(m.INTERRUPT_ACK, m.INT_VRING)
    assert drv.r(m.INTERRUPT_STATUS) == 0 and line.pulses == 2


def test_a_partial_ack_pulses_again(drv: Driver, memory: GuestMemory, device: FakeDevice,
                                    line: FakeLine) -> None:
    bring_up(drv, memory)
    interrupt = device.context.interrupt  # type: ignore[union-attr]
    interrupt.trigger(VirtioInterruptType.QUEUE)
    interrupt.trigger(VirtioInterruptType.CONFIG)
    drv.w(m.INTERRUPT_ACK, m.INT_VRING)
    assert drv.r(m.INTERRUPT_STATUS) == m.INT_CONFIG and line.pulses == 3
    drv.w(m.INTERRUPT_ACK, m.INT_CONFIG)
    assert line.pulses == 3


def test_queue_notify_signals_the_queue_eventfd(drv: Driver, memory: GuestMemory,
                                                transport: VirtioMmioTransport) -> None:
    bring_up(drv, memory)
    drv.w(m.QUEUE_NOTIFY, 1)
    drv.w(m.QUEUE_NOTIFY, 1)
    drv.w(m.QUEUE_NOTIFY, 7)  # no such queue
    assert os.eventfd_read(transport.queue_events[1]) == 2
    with pytest.raises(BlockingIOError):
        os.eventfd_read(transport.queue_events[0])
    assert transport.counters()["notifications_trapped"] == 2  # the bogus index is dropped


def test_kicks_before_driver_ok_stay_pending(drv: Driver, transport: VirtioMmioTransport) -> None:
    drv.w(m.QUEUE_NOTIFY, 0)
    assert os.eventfd_read(transport.queue_events[0]) == 1


def test_a_full_request_through_the_transport(drv: Driver, memory: GuestMemory, device: FakeDevice,
                                              line: FakeLine) -> None:
    ring = bring_up(drv, memory, VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC)
    memory.write(DATA, b"ping")
    ring.add([(DATA, 4, False), (DATA + 0x100, 4, True)], indirect_table=0x30000)
    drv.w(m.QUEUE_NOTIFY, 0)
    ctx = device.context
    assert ctx is not None and os.eventfd_read(ctx.queue_events[0]) == 1
    queue = ctx.queues[0]
    chain = queue.pop()
    assert chain is not None and chain.read() == b"ping"
    queue.add_used(chain.head, chain.write(b"pong"))
    if queue.needs_notification():
        ctx.interrupt.trigger(VirtioInterruptType.QUEUE, 0)
    assert ring.take_used() == [(chain.head, 4)] and memory.read(DATA + 0x100, 4) == b"pong"
    assert drv.r(m.INTERRUPT_STATUS) == m.INT_VRING and line.pulses == 1


def test_close_releases_everything(memory: GuestMemory, device: FakeDevice) -> None:
    transport = VirtioMmioTransport(device, memory=memory, line=FakeLine(), event_loop=FakeEventLoop())  # type: ignore[arg-type]
    fds = list(transport.queue_events)
    cleaned: list[bool] = []
    transport.add_cleanup(lambda: cleaned.append(True))
    transport.close()
    transport.close()
    assert device.closed and cleaned == [True]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    transport.write(m.QUEUE_NOTIFY, b"\0\0\0\0")  # a late kick is dropped


# -- anything at all --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate([MemoryRange(0, 0x100000)]) as mem:
        yield mem


access = st.tuples(
    st.booleans(),
    st.one_of(st.integers(0, 0x1100), st.sampled_from([m.STATUS, m.QUEUE_SEL, m.QUEUE_NUM, m.QUEUE_READY,
                                                       m.QUEUE_NOTIFY, m.INTERRUPT_ACK, m.DRIVER_FEATURES,
                                                       m.QUEUE_DESC_LOW, m.CONFIG_GENERATION]),
              st.integers(-(2**63), 2**64)),
    st.sampled_from([1, 2, 4, 4, 4, 8, 3, 0, 16]),
    st.integers(0, 2**64 - 1),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accesses=st.lists(access, max_size=60))
def test_random_accesses_never_raise(module_memory: GuestMemory,
                                     accesses: list[tuple[bool, int, int, int]]) -> None:
    device = FakeDevice()
    transport = VirtioMmioTransport(device, memory=module_memory, line=FakeLine(), event_loop=FakeEventLoop())  # type: ignore[arg-type]
    try:
        for is_write, offset, size, value in accesses:
            if is_write:
                transport.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            else:
                assert len(transport.read(offset, size)) == size
    finally:
        transport.close()
