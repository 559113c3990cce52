"""The split virtqueue against a driver that follows the spec (virtio 1.2, 2.7)."""

from __future__ import annotations

import ctypes

import pytest
from vq_driver import FakeDriver

from vmmkit.memory import GuestMemory
from vmmkit.virtio.chain import Segment
from vmmkit.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from vmmkit.virtio.queue import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY, Virtqueue

MIB = 1 << 20
DATA = 0x40000  # buffers live here, away from the rings


def test_pop_returns_a_chain_with_readable_segments_first(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 8)
    queue = driver.queue(native=native)
    memory.write(DATA, b"request!")
    head = driver.add([(DATA, 8, False), (DATA + 0x100, 16, True), (DATA + 0x200, 1, True)])
    chain = queue.pop()
    assert chain is not None and chain.head == head
    assert chain.segments == (Segment(DATA, 8, False), Segment(DATA + 0x100, 16, True),
                              Segment(DATA + 0x200, 1, True))
    assert chain.readable_count == 1 and chain.readable_bytes == 8 and chain.writable_bytes == 17
    assert chain.descriptors == 3
    assert chain.read() == b"request!"
    assert chain.write(b"x" * 20) == 17
    assert memory.read(DATA + 0x100, 16) == b"x" * 16 and memory.read(DATA + 0x200, 1) == b"x"
    assert queue.pop() is None


def test_add_used_publishes_the_element_then_the_index(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    heads = [driver.add([(DATA + 0x1000 * i, 64, True)]) for i in range(3)]
    chains = list(queue.iter_available())
    assert [c.head for c in chains] == heads
    for chain in chains:
        queue.add_used(chain.head, 10 + chain.head)
    assert driver.take_used() == [(h, 10 + h) for h in heads]
    assert driver.used_idx == 3 and queue.next_used == 3


def test_indices_wrap_around_16_bits(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    start = 0xFFFE
    driver.set_avail_idx(start)
    driver.last_used = start
    queue.last_avail_idx = start
    queue.next_used = start
    memory.write_u16(driver.used + 2, start)
    for _ in range(6):  # crosses 0xffff -> 0 in both rings
        head = driver.add([(DATA, 32, False)])
        chain = queue.pop()
        assert chain is not None and chain.head == head
        queue.add_used(chain.head, 0)
        assert driver.take_used() == [(head, 0)]
    assert queue.last_avail_idx == (start + 6) & 0xFFFF == 4
    assert driver.used_idx == 4


def test_a_full_ring_is_drained(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 8)
    queue = driver.queue(native=native)
    for i in range(8):
        driver.add([(DATA + 16 * i, 16, False)])
    assert queue.pending() == 8
    assert len(list(queue.iter_available())) == 8
    assert queue.pending() == 0


def test_indirect_table(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native, features=VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC)
    buffers = [(DATA, 16, False), (DATA + 0x100, 512, False), (DATA + 0x1000, 4096, True)]
    head = driver.add(buffers, indirect_table=0x30000)
    chain = queue.pop()
    assert chain is not None and chain.head == head
    assert chain.segments == tuple(Segment(*b) for b in buffers)
    assert chain.descriptors == 4  # the indirect descriptor and its three entries


def test_direct_descriptors_then_an_indirect_table(memory: GuestMemory, native: bool) -> None:
    """"Zero or more normal chained descriptors followed by a single descriptor with
    VIRTQ_DESC_F_INDIRECT" (2.7.5.3.2)."""
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native, features=VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC)
    driver.write_desc(0, DATA, 8, 1, 1)  # readable, NEXT -> 1
    driver.write_desc(1, 0x30000, 32, 4 | 2)  # INDIRECT (its WRITE flag is ignored)
    driver.write_desc(0, DATA + 8, 8, 1, 1, table=0x30000)  # readable, NEXT -> 1
    driver.write_desc(1, DATA + 0x100, 64, 2, 0, table=0x30000)  # writable, last
    driver.publish(0)
    chain = queue.pop()
    assert chain is not None
    assert chain.segments == (Segment(DATA, 8, False), Segment(DATA + 8, 8, False),
                              Segment(DATA + 0x100, 64, True))


def test_a_buffer_spanning_adjacent_regions_is_split(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 2)
    queue = driver.queue(native=native)
    driver.add([(MIB - 0x10, 0x30, True)])
    chain = queue.pop()
    assert chain is not None
    assert chain.segments == (Segment(MIB - 0x10, 0x10, True), Segment(MIB, 0x20, True))
    assert chain.host_addresses == (memory.host_address(MIB - 0x10), memory.host_address(MIB))
    assert chain.write(bytes(range(0x30))) == 0x30
    assert memory.read(MIB - 0x10, 0x10) + memory.read(MIB, 0x20) == bytes(range(0x30))


def test_zero_length_buffers_yield_no_segment(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    driver.add([(DATA, 0, False), (0xDEAD_0000_0000, 0, True), (DATA + 0x10, 4, True)])
    chain = queue.pop()
    assert chain is not None and chain.segments == (Segment(DATA + 0x10, 4, True),)
    assert chain.descriptors == 3


def test_iovecs_point_at_guest_memory(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    memory.write(DATA, b"hdr!")
    memory.write(4 * MIB + 0x10, b"payload")
    driver.add([(DATA, 4, False), (4 * MIB + 0x10, 7, False), (DATA + 0x800, 1, True)])
    chain = queue.pop()
    assert chain is not None
    iov = chain.iovecs
    assert (iov.count, iov.readable, iov.readable_bytes, iov.writable_bytes) == (3, 2, 11, 1)

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    entries = (Iovec * iov.count).from_address(iov.address)
    gpas = (ctypes.c_uint64 * iov.count).from_address(iov.gpa_address)
    assert [ctypes.string_at(e.base, e.len) for e in entries[:2]] == [b"hdr!", b"payload"]
    assert list(gpas) == [DATA, 4 * MIB + 0x10, DATA + 0x800]
    ctypes.memmove(entries[2].base, b"!", 1)  # a C data path writes the status byte
    assert memory.read(DATA + 0x800, 1) == b"!"


def test_no_interrupt_flag_without_event_idx(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    driver.add([(DATA, 8, True)])
    chain = queue.pop()
    assert chain is not None
    queue.add_used(chain.head, 8)
    assert queue.needs_notification()
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not queue.needs_notification()


def test_used_event_suppresses_interrupts(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 8)
    queue = driver.queue(native=native, features=VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    for _ in range(6):
        driver.add([(DATA, 8, True)])
    chains = list(queue.iter_available())
    driver.set_used_event(2)  # interrupt me once used idx passes 2, i.e. reaches 3
    queue.add_used(chains[0].head, 0)
    assert queue.needs_notification()  # the first call always notifies
    queue.add_used(chains[1].head, 0)
    assert not queue.needs_notification()  # used idx 2: not past used_event yet
    queue.add_used(chains[2].head, 0)
    assert queue.needs_notification()  # used idx 3 = used_event + 1
    queue.add_used(chains[3].head, 0)
    assert not queue.needs_notification()
    driver.set_used_event(5)
    queue.add_used(chains[4].head, 0)
    queue.add_used(chains[5].head, 0)  # 4 -> 6 passes 5 in one batch
    assert queue.needs_notification()
    assert not queue.needs_notification()  # nothing new since


def test_used_event_across_the_16_bit_wrap(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native, features=VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    queue.next_used = 0xFFFE
    queue._signalled_used = 0xFFFE
    driver.add([(DATA, 8, True)])
    driver.add([(DATA, 8, True)])
    driver.set_used_event(0xFFFF)
    a, b = list(queue.iter_available())
    queue.add_used(a.head, 0)  # used idx 0xffff: not past 0xffff
    assert not queue.needs_notification()
    queue.add_used(b.head, 0)  # used idx 0: past it
    assert queue.needs_notification()


def test_pop_publishes_avail_event(memory: GuestMemory, native: bool) -> None:
    """With EVENT_IDX the device asks for a kick at the next entry it will pop (as QEMU does)."""
    driver = FakeDriver(memory, 8)
    queue = driver.queue(native=native, features=VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    for _ in range(3):
        driver.add([(DATA, 8, False)])
    assert queue.pop() is not None
    assert driver.avail_event == 1
    queue.disable_notification()
    assert queue.pop() is not None
    assert driver.avail_event == 1  # not moved while notifications are off
    assert queue.enable_notification() is True  # one chain is still waiting
    assert driver.avail_event == 2
    queue.set_avail_event(7)
    assert driver.avail_event == 7


def test_notification_flags_without_event_idx(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    queue.disable_notification()
    assert driver.used_flags == VIRTQ_USED_F_NO_NOTIFY
    assert queue.enable_notification() is False
    assert driver.used_flags == 0
    driver.add([(DATA, 8, False)])
    queue.disable_notification()
    assert queue.enable_notification() is True


def test_a_queue_not_ready_pops_nothing(memory: GuestMemory) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue()
    driver.add([(DATA, 8, False)])
    queue.ready = False
    assert queue.pop() is None and queue.pending() == 0 and not queue.needs_notification()
    queue.add_used(0, 1)
    assert driver.used_idx == 0


def test_reset_forgets_everything(memory: GuestMemory) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(max_size=16, features=VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    driver.add([(DATA, 8, False)])
    assert queue.pop() is not None
    queue.reset()
    assert (queue.size, queue.ready) == (16, False)
    assert (queue.desc_table, queue.avail_ring, queue.used_ring) == (0, 0, 0)
    assert (queue.last_avail_idx, queue.next_used, queue.event_idx, queue.broken) == (0, 0, False, None)


def test_the_walker_choice_is_honoured(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    queue.validate()
    assert queue.describe()["native"] is native


@pytest.mark.parametrize("max_size", [0, 3, 65536])
def test_max_size_must_be_a_power_of_two(memory: GuestMemory, max_size: int) -> None:
    with pytest.raises(ValueError):
        Virtqueue(max_size, memory)


def test_native_walker_is_built() -> None:
    """``pip install -e .`` builds vmmkit.virtio._native: a broken build must not pass quietly."""
    import os

    from vmmkit.virtio import chain

    if os.environ.get("VMMKIT_VIRTIO_NATIVE") == "0":
        pytest.skip("the native walker is disabled by VMMKIT_VIRTIO_NATIVE=0")
    assert chain.native_available(), chain.NATIVE_UNAVAILABLE_REASON
