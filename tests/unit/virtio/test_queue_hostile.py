"""A hostile driver: every ring value is attacker-controlled. The queue must answer with
VirtqueueError (and a broken queue), never another exception, never a touch outside RAM."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vq_driver import INDIRECT, NEXT, WRITE, FakeDriver

from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.virtio.chain import ErrorKind, VirtqueueError
from vmmkit.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from vmmkit.virtio.queue import Virtqueue

MIB = 1 << 20
HOLE = 2 * MIB  # [2 MiB, 4 MiB) is not RAM
DATA = 0x40000
WITH_INDIRECT = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC


def expect(queue: Virtqueue, kind: ErrorKind) -> VirtqueueError:
    errors: list[VirtqueueError] = []
    queue.on_error = errors.append
    with pytest.raises(VirtqueueError) as info:
        queue.pop()
    assert info.value.kind is kind, info.value
    assert queue.broken and errors == [info.value]
    assert queue.pop() is None  # a broken queue stays quiet until reset
    queue.add_used(0, 0)
    assert not queue.needs_notification()
    return info.value


# -- ring placement ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("desc_table", HOLE),  # not RAM
        ("desc_table", 0x10008),  # not 16-aligned
        ("desc_table", MIB - 0x40),  # spans two regions (rings must lie in one)
        ("desc_table", 5 * MIB - 0x40),  # runs off the end of RAM
        ("desc_table", 2**64 - 16),
        ("avail_ring", 0x20001),  # not 2-aligned
        ("avail_ring", 5 * MIB - 4),
        ("used_ring", 0x21002),  # not 4-aligned
        ("used_ring", HOLE - 8),
        ("size", 3),  # not a power of two
        ("size", 32),  # above the queue's maximum (16)
        ("size", 0),
    ],
)
def test_bad_ring_placement(memory: GuestMemory, native: bool, field: str, value: int) -> None:
    driver = FakeDriver(memory, 16)
    queue = driver.queue(native=native)
    driver.add([(DATA, 8, False)])
    setattr(queue, field, value)
    expect(queue, ErrorKind.RING)
    queue.reset()
    driver.configure(queue)
    with pytest.raises(VirtqueueError):
        setattr(queue, field, value)
        queue.validate()


def test_used_ring_in_read_only_memory(memory: GuestMemory) -> None:
    driver = FakeDriver(memory, 4, desc=4 * MIB)
    memory.regions[2].readonly = True
    queue = driver.queue()
    with pytest.raises(VirtqueueError) as info:
        queue.validate()
    assert info.value.kind is ErrorKind.RING


# -- the available ring -----------------------------------------------------------------------


def test_avail_index_jumping_more_than_the_queue_size(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 8)
    queue = driver.queue(native=native)
    driver.set_avail_idx(9)
    expect(queue, ErrorKind.AVAIL_INDEX)


def test_avail_index_going_backwards(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 8)
    queue = driver.queue(native=native)
    driver.add([(DATA, 8, False)])
    assert queue.pop() is not None
    driver.set_avail_idx(0)  # 0 - 1 = 0xffff chains "available"
    expect(queue, ErrorKind.AVAIL_INDEX)


def test_head_index_out_of_range(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 8)
    queue = driver.queue(native=native)
    driver.publish(8)
    expect(queue, ErrorKind.INDEX)


# -- descriptor chains ------------------------------------------------------------------------


def test_next_index_out_of_range(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 8)
    queue = driver.queue(native=native)
    driver.write_desc(0, DATA, 8, NEXT, 0xFFFF)
    driver.publish(0)
    expect(queue, ErrorKind.INDEX)


@pytest.mark.parametrize("size", [1, 2, 8, 256])
def test_looping_chain(memory: GuestMemory, native: bool, size: int) -> None:
    driver = FakeDriver(memory, size)
    queue = driver.queue(native=native)
    for i in range(size):
        driver.write_desc(i, DATA, 8, NEXT, (i + 1) % size)
    driver.publish(0)
    expect(queue, ErrorKind.LOOP)


def test_looping_indirect_table(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native, features=WITH_INDIRECT)
    driver.write_desc(0, 0x30000, 48, INDIRECT)
    for i in range(3):
        driver.write_desc(i, DATA, 8, NEXT, (i + 1) % 3, table=0x30000)
    driver.publish(0)
    expect(queue, ErrorKind.LOOP)


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (HOLE, 1),  # in the hole
        (HOLE - 4, 8),  # runs into the hole
        (5 * MIB, 16),  # past the end of RAM
        (5 * MIB - 1, 2),
        (2**64 - 8, 16),  # wraps the address space
        (2**64 - 1, 0xFFFF_FFFF),
        (0, 0xFFFF_FFFF),  # 4 GiB: more than RAM
    ],
)
def test_buffers_outside_ram(memory: GuestMemory, native: bool, addr: int, length: int) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    driver.add([(addr, length, True)])
    expect(queue, ErrorKind.ADDRESS)


def test_writable_buffer_in_read_only_memory(memory: GuestMemory, native: bool) -> None:
    memory.regions[2].readonly = True
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    driver.add([(4 * MIB, 8, False)])  # reading ROM is fine
    assert queue.pop() is not None
    driver.add([(4 * MIB, 8, True)])
    expect(queue, ErrorKind.ADDRESS)


def test_chain_longer_than_4_gib(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    driver.add([(DATA, 16, False), (DATA, 0xFFFF_FFFF, False)])
    expect(queue, ErrorKind.TOO_LARGE)


def test_readable_after_writable(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    driver.add([(DATA, 8, True), (DATA + 8, 8, False)])
    expect(queue, ErrorKind.ORDER)


def test_readable_after_writable_across_an_indirect_table(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native, features=WITH_INDIRECT)
    driver.write_desc(0, DATA, 8, NEXT | WRITE, 1)
    driver.write_desc(1, 0x30000, 16, INDIRECT)
    driver.write_desc(0, DATA, 8, 0, table=0x30000)
    driver.publish(0)
    expect(queue, ErrorKind.ORDER)


def test_too_many_segments(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 8)
    queue = driver.queue(native=native, max_segments=2)
    driver.add([(DATA, 8, False), (DATA + 8, 8, False)])
    assert queue.pop() is not None
    driver.add([(MIB - 8, 16, False)] * 2)  # two descriptors, four segments
    expect(queue, ErrorKind.TOO_MANY)


# -- indirect misuse --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("features", "addr", "length", "flags"),
    [
        (VIRTIO_F_VERSION_1, 0x30000, 16, INDIRECT),  # not negotiated
        (WITH_INDIRECT, 0x30000, 16, INDIRECT | NEXT),  # INDIRECT with NEXT
        (WITH_INDIRECT, 0x30000, 0, INDIRECT),  # empty table
        (WITH_INDIRECT, 0x30000, 24, INDIRECT),  # not a multiple of 16
        (WITH_INDIRECT, 0x30000, 16 * 65536, INDIRECT),  # more than 65535 entries
        (WITH_INDIRECT, HOLE, 16, INDIRECT),  # table outside RAM
        (WITH_INDIRECT, MIB - 16, 32, INDIRECT),  # table spanning two regions
        (WITH_INDIRECT, 2**64 - 16, 32, INDIRECT),
    ],
)
def test_indirect_misuse(memory: GuestMemory, native: bool, features: int, addr: int, length: int,
                         flags: int) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native, features=features)
    driver.write_desc(0, DATA, 8, 0, table=0x30000)
    driver.write_desc(0, addr, length, flags, 1)
    driver.write_desc(1, DATA, 8, 0)
    driver.publish(0)
    expect(queue, ErrorKind.INDIRECT)


def test_nested_indirect_table(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native, features=WITH_INDIRECT)
    driver.write_desc(0, 0x30000, 16, INDIRECT)
    driver.write_desc(0, 0x31000, 16, INDIRECT, table=0x30000)
    driver.write_desc(0, DATA, 8, 0, table=0x31000)
    driver.publish(0)
    expect(queue, ErrorKind.INDIRECT)


# -- the device's own mistakes, recovery, memory going away ----------------------------------


def test_add_used_of_a_head_beyond_the_queue(memory: GuestMemory) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue()
    with pytest.raises(VirtqueueError) as info:
        queue.add_used(4, 0)
    assert info.value.kind is ErrorKind.DEVICE and queue.broken


def test_written_lengths_are_clamped_to_32_bits(memory: GuestMemory) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue()
    queue.add_used(1, 2**40)
    queue.add_used(2, -5)
    assert driver.take_used() == [(1, 0xFFFF_FFFF), (2, 0)]


def test_reset_recovers_a_broken_queue(memory: GuestMemory, native: bool) -> None:
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    driver.publish(7)
    expect(queue, ErrorKind.INDEX)
    queue.reset()
    driver = FakeDriver(memory, 4)
    driver.configure(queue)
    driver.add([(DATA, 8, False)])
    assert queue.pop() is not None


def test_guest_memory_closed_under_the_queue(native: bool) -> None:
    memory = GuestMemory.allocate([MemoryRange(0, MIB)])
    driver = FakeDriver(memory, 4)
    queue = driver.queue(native=native)
    driver.add([(DATA, 8, False)])
    queue.validate()
    memory.close()
    with pytest.raises(VirtqueueError):
        queue.pop()


# -- garbage everywhere -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate([MemoryRange(0, 0x10000), MemoryRange(0x10000, 0x10000),
                               MemoryRange(0x40000, 0x10000)]) as mem:
        yield mem


addresses = st.one_of(st.integers(0, 0x50000), st.sampled_from([0, 0xFFF0, 0x10000, 0x1FFF0, 0x20000,
                                                                  0x40000, 0x4FFF0, 2**64 - 16]),
                      st.integers(0, 2**64 - 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    garbage=st.binary(min_size=0x600, max_size=0x600),
    size=st.sampled_from([1, 2, 4, 8, 16, 3, 0, 64]),
    desc=st.one_of(st.just(0x1000), addresses),
    avail=st.one_of(st.just(0x1400), addresses),
    used=st.one_of(st.just(0x1800), addresses),
    features=st.sampled_from([VIRTIO_F_VERSION_1, WITH_INDIRECT, WITH_INDIRECT | VIRTIO_F_EVENT_IDX]),
    native=st.sampled_from([False, True]),
    heads=st.lists(st.integers(-1, 70000), max_size=4),
)
def test_garbage_rings_only_ever_raise_virtqueue_error(
    shared_memory: GuestMemory, garbage: bytes, size: int, desc: int, avail: int, used: int, features: int,
    native: bool, heads: list[int],
) -> None:
    from vmmkit.virtio import chain

    shared_memory.write(0x1000, garbage)  # descriptors, rings and indirect tables: all noise
    queue = Virtqueue(16, shared_memory, native=native and chain.native_available())
    queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = size, desc, avail, used
    queue.set_features(features)
    queue.ready = True
    operations: list[Callable[[], object]] = [queue.validate, queue.pending, queue.pop, queue.pop,
                                              queue.needs_notification, queue.enable_notification]
    operations += [lambda h=h: queue.add_used(h, 1) for h in heads]  # type: ignore[misc]
    operations += [queue.pop, queue.disable_notification, queue.set_avail_event]
    for operation in operations:
        try:
            result = operation()
        except VirtqueueError:
            assert queue.broken
            continue
        if result is not None and not isinstance(result, (bool, int)):
            for segment in result.segments:  # type: ignore[attr-defined]
                assert shared_memory.is_valid(segment.gpa, segment.length)
