"""virtio-mem (virtio 1.2, 5.15) driven by the fake driver over real guest memory: the
configuration space, PLUG / UNPLUG / UNPLUG_ALL / STATE with the spec's ACK, NACK and ERROR,
unplugged memory given back (reads zeros), a resize's configuration interrupt, hostile requests.
Linux's virtio_mem driver using it is tests/linux/test_linux_memory_hotplug.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from virtio_driver import Harness, wait_for
from vmmkit_devices.virtio.mem import (
    CONFIG,
    REQ_PLUG,
    REQ_STATE,
    REQ_UNPLUG,
    REQ_UNPLUG_ALL,
    REQUEST,
    RESP_ACK,
    RESP_ERROR,
    RESP_NACK,
    RESPONSE,
    STATE_MIXED,
    STATE_PLUGGED,
    STATE_UNPLUGGED,
    MemDevice,
    VirtioMemType,
)

from vmmkit.errors import DeviceError
from vmmkit.memory import GuestMemory
from vmmkit.virtio.device import VIRTIO_F_VERSION_1, VirtioInterruptType

MiB = 1 << 20
BASE = 8 * MiB  #: the device's region: 8-16 MiB of the test memory, four 2 MiB blocks
SIZE = 8 * MiB


def device(memory: GuestMemory, requested: int = 0) -> MemDevice:
    return MemDevice("_mem0", memory, BASE, SIZE, requested)


def ask(h: Harness, kind: int, addr: int = 0, blocks: int = 0) -> tuple[int, int]:
    request = h.alloc(REQUEST.size, data=REQUEST.pack(kind, addr, blocks))
    response = h.alloc(RESPONSE.size)
    h.submit(0, [(request, REQUEST.size, False), (response, RESPONSE.size, True)])
    ((_head, length),) = h.wait_used(0, 1)
    assert length == RESPONSE.size
    result, state = RESPONSE.unpack(h.memory.read(response, RESPONSE.size))
    return result, state


def config(dev: MemDevice) -> tuple[int, ...]:
    return CONFIG.unpack(dev.config_space())


def test_the_configuration_space_describes_the_region(memory: GuestMemory) -> None:
    dev = device(memory, requested=4 * MiB)
    assert dev.features() & VIRTIO_F_VERSION_1 and dev.device_type == 24 and len(dev.queue_max_sizes) == 1
    block, node, addr, region, usable, plugged, requested = config(dev)
    assert (block, node, addr, region, usable, plugged, requested) == (2 * MiB, 0, BASE, SIZE, SIZE, 0, 4 * MiB)
    assert dev.read_config(16, 8) == BASE.to_bytes(8, "little")  # addr, after block_size, node_id, padding
    assert len(dev.config_space()) == 56


def test_plug_up_to_the_requested_size_then_nack(memory: GuestMemory, activate: Callable[..., Harness]) -> None:
    dev = device(memory, requested=4 * MiB)
    h = activate(dev, sizes=[16])
    assert ask(h, REQ_PLUG, BASE, 1) == (RESP_ACK, 0)
    assert ask(h, REQ_PLUG, BASE + 2 * MiB, 1) == (RESP_ACK, 0)
    assert ask(h, REQ_PLUG, BASE + 4 * MiB, 1) == (RESP_NACK, 0)  # beyond requested_size
    assert ask(h, REQ_PLUG, BASE, 1) == (RESP_ERROR, 0)  # plugged already
    assert config(dev)[5] == 4 * MiB and dev.counters()["nacks"] == 1
    assert ask(h, REQ_STATE, BASE, 2) == (RESP_ACK, STATE_PLUGGED)
    assert ask(h, REQ_STATE, BASE + 2 * MiB, 2) == (RESP_ACK, STATE_MIXED)
    assert ask(h, REQ_STATE, BASE + 4 * MiB, 2) == (RESP_ACK, STATE_UNPLUGGED)


def test_unplug_gives_the_memory_back(memory: GuestMemory, activate: Callable[..., Harness]) -> None:
    dev = device(memory, requested=SIZE)
    h = activate(dev, sizes=[16])
    assert ask(h, REQ_PLUG, BASE, 4) == (RESP_ACK, 0)
    memory.write(BASE + 2 * MiB, b"guest data")
    memory.write(BASE + 4 * MiB, b"kept")
    assert ask(h, REQ_UNPLUG, BASE + 2 * MiB, 1) == (RESP_ACK, 0)
    assert memory.read(BASE + 2 * MiB, 10) == bytes(10)  # discarded: zeros
    assert memory.read(BASE + 4 * MiB, 4) == b"kept"
    assert ask(h, REQ_UNPLUG, BASE + 2 * MiB, 1) == (RESP_ERROR, 0)  # not plugged
    assert config(dev)[5] == 6 * MiB
    assert ask(h, REQ_UNPLUG_ALL) == (RESP_ACK, 0)
    assert config(dev)[5] == 0 and memory.read(BASE + 4 * MiB, 4) == bytes(4)


@pytest.mark.parametrize(("addr", "blocks"), [
    (BASE + 4096, 1),  # not block aligned
    (BASE - 2 * MiB, 1),  # below the region
    (BASE + 6 * MiB, 2),  # runs past its end
    (BASE, 0),  # no blocks
    (BASE, 0xFFFF),
    ((1 << 64) - 2 * MiB, 1),
])
def test_bad_ranges_are_errors(memory: GuestMemory, activate: Callable[..., Harness], addr: int, blocks: int) -> None:
    dev = device(memory, requested=SIZE)
    h = activate(dev, sizes=[16])
    for kind in (REQ_PLUG, REQ_UNPLUG, REQ_STATE):
        assert ask(h, kind, addr, blocks) == (RESP_ERROR, 0)
    assert ask(h, 9, BASE, 1) == (RESP_ERROR, 0)  # an unknown type
    assert config(dev)[5] == 0 and dev.broken is None


def test_a_short_request_breaks_the_device(memory: GuestMemory, activate: Callable[..., Harness]) -> None:
    dev = device(memory, requested=SIZE)
    h = activate(dev, sizes=[16])
    h.submit(0, [(h.alloc(8), 8, False), (h.alloc(RESPONSE.size), RESPONSE.size, True)])
    wait_for(lambda: dev.broken is not None, what="the device to fail")
    assert h.errors


def test_a_resize_tells_the_driver(memory: GuestMemory, activate: Callable[..., Harness]) -> None:
    dev = device(memory)
    h = activate(dev, sizes=[16])
    dev.resize(6 * MiB)
    assert config(dev)[6] == 6 * MiB and h.interrupt.count(VirtioInterruptType.CONFIG) == 1
    for bad in (SIZE + 2 * MiB, 3 * MiB, -2 * MiB):
        with pytest.raises(DeviceError):
            dev.resize(bad)
    assert config(dev)[6] == 6 * MiB


def test_a_region_not_in_blocks_is_refused(memory: GuestMemory) -> None:
    with pytest.raises(DeviceError, match="blocks"):
        MemDevice("_mem0", memory, BASE + 4096, SIZE)
    with pytest.raises(DeviceError, match="blocks"):
        MemDevice("_mem0", memory, BASE, SIZE - 4096)


def test_the_type_claims_the_memory_options_and_requests_nothing_itself() -> None:
    from vmmkit.config import VmConfig

    assert VirtioMemType.sections == ("memory.hotplug_method", "memory.hotplugged_size")
    assert list(VirtioMemType.requests(VmConfig())) == []
