"""virtio-pmem (virtio 1.2, 5.19) driven by the fake driver: the configuration space, the backing
file mapped as device memory (writes through the mapping reach the file, or not with
``discard_writes``), FLUSH answered after ``fsync``, the backing-file rules (Cloud Hypervisor's,
plus extending a short file), and hostile chains: every one is answered with EIO or fails the
device, never the VMM. Linux's virtio_pmem driver using it is tests/linux/test_linux_pmem.py."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from devices_support import FakeContext
from virtio_driver import Harness, wait_for
from vmmkit_devices.virtio.pmem import (
    ALIGNMENT,
    REQ_TYPE_FLUSH,
    RESP_EIO,
    RESP_OK,
    PmemDevice,
    VirtioPmemType,
    create,
)

from vmmkit.config import ConfigError, PmemConfig, VmConfig
from vmmkit.device import DeviceRequest
from vmmkit.device_memory import FIRST_SLOT
from vmmkit.memory import GuestMemory
from vmmkit.state import StateError
from vmmkit.virtio.device import VIRTIO_F_VERSION_1

MiB = 1 << 20
WINDOW = 64 << 30  #: FakeContext's device memory window starts here


def image(path: Path, size: int = 4 * MiB, fill: bytes = b"") -> Path:
    with path.open("wb") as out:
        out.write(fill)
        out.truncate(size)
    return path


def make(ctx: FakeContext, **options: object) -> PmemDevice:
    return create(ctx, DeviceRequest("virtio-pmem", "_pmem0", PmemConfig(**options)))  # type: ignore[arg-type]


def ask(h: Harness, request: bytes, *, response: int = 4) -> tuple[int, int]:
    """One chain: ``request`` device-readable (none when empty), a ``response``-byte writable
    buffer. Returns (used length, ret)."""
    buffers = []
    if request:
        buffers.append((h.alloc(len(request), data=request), len(request), False))
    answer = h.alloc(response)
    buffers.append((answer, response, True))
    h.submit(0, buffers)
    ((_head, length),) = h.wait_used(0, 1)
    return length, int.from_bytes(h.memory.read(answer, 4), "little")


FLUSH = REQ_TYPE_FLUSH.to_bytes(4, "little")


def test_the_configuration_space_says_where_the_file_is(ctx: FakeContext, tmp_path: Path) -> None:
    dev = make(ctx, file=str(image(tmp_path / "p.img")))
    try:
        assert dev.device_type == 27 and len(dev.queue_max_sizes) == 1 and dev.features() & VIRTIO_F_VERSION_1
        assert dev.start % ALIGNMENT == 0 and dev.start >= WINDOW and dev.size == 4 * MiB
        assert dev.config_space() == dev.start.to_bytes(8, "little") + (4 * MiB).to_bytes(8, "little")
        assert dev.read_config(8, 8) == (4 * MiB).to_bytes(8, "little")
        assert ctx.device_memory is not None
        recorder = ctx.device_memory._vm
        assert recorder.slots == {FIRST_SLOT: (dev.start, 4 * MiB, dev.region.host_address)}  # type: ignore[attr-defined]
        assert dev.own_threads  # FLUSH (an fsync) runs on the device's worker, not the event loop
    finally:
        dev.close()
    assert recorder.slots == {}  # type: ignore[attr-defined]  # closing unmaps the region


def test_guest_writes_reach_the_file_and_flush_answers_ok(
        ctx: FakeContext, tmp_path: Path, activate: Callable[..., Harness]) -> None:
    path = image(tmp_path / "p.img", fill=b"host data")
    dev = make(ctx, file=str(path))
    host = dev.region.host_address
    assert ctypes.string_at(host, 9) == b"host data"  # the guest sees the file
    ctypes.memmove(host + 3 * MiB, b"guest data", 10)  # a guest store through the mapping
    h = activate(dev, sizes=[16])
    assert ask(h, FLUSH) == (4, RESP_OK)
    assert dev.counters()["flushes"] == 1 and dev.counters()["flush_errors"] == 0
    with path.open("rb") as f:
        f.seek(3 * MiB)
        assert f.read(10) == b"guest data"


def test_discard_writes_maps_a_private_copy_of_a_read_only_file(
        ctx: FakeContext, tmp_path: Path, activate: Callable[..., Harness]) -> None:
    path = image(tmp_path / "p.img", fill=b"original")
    path.chmod(0o444)  # discard_writes opens it read-only: it need not be writable
    dev = make(ctx, file=str(path), discard_writes=True)
    ctypes.memmove(dev.region.host_address, b"scribble", 8)
    assert ctypes.string_at(dev.region.host_address, 8) == b"scribble"
    h = activate(dev, sizes=[16])
    assert ask(h, FLUSH) == (4, RESP_OK)
    assert path.read_bytes()[:8] == b"original"


def test_a_short_file_is_extended_to_size(ctx: FakeContext, tmp_path: Path) -> None:
    path = image(tmp_path / "p.img", size=2 * MiB)
    dev = make(ctx, file=str(path), size=6 * MiB)
    try:
        assert path.stat().st_size == 6 * MiB and dev.size == 6 * MiB
        assert ctypes.string_at(dev.region.host_address + 5 * MiB, 16) == bytes(16)  # the new tail reads zeros
    finally:
        dev.close()


def test_a_directory_with_size_gets_an_unnamed_file(ctx: FakeContext, tmp_path: Path) -> None:
    dev = make(ctx, file=str(tmp_path), size=2 * MiB)
    try:
        assert dev.size == 2 * MiB and list(tmp_path.iterdir()) == []  # O_TMPFILE: nothing to clean up
    finally:
        dev.close()


@pytest.mark.parametrize(("setup", "options", "said"), [
    ("dir", {}, "is a directory: give size="),
    ("3M", {}, "has size 3145728, not a positive multiple of 2 MiB"),
    ("empty", {}, "has size 0"),
    ("missing", {}, "cannot be opened"),
    ("2M", {"size": 4 * MiB, "discard_writes": True}, "shorter than size=4194304 (and cannot grow"),
    ("char", {}, "neither a regular file nor a block device"),
])
def test_bad_backing_files_are_refused_by_name(
        ctx: FakeContext, tmp_path: Path, setup: str, options: dict[str, object], said: str) -> None:
    path = {"dir": tmp_path, "missing": tmp_path / "nope", "char": Path("/dev/null")}.get(setup)
    if path is None:
        path = image(tmp_path / "p.img", size={"3M": 3 * MiB, "empty": 0, "2M": 2 * MiB}[setup])
    with pytest.raises(ConfigError) as info:
        make(ctx, file=str(path), **options)
    assert str(info.value).startswith(f"--pmem: {path} ") and said in str(info.value), str(info.value)
    assert ctx.device_memory is None or ctx.device_memory.regions == []  # nothing left mapped


# -- hostile chains ---------------------------------------------------------------------------------


@pytest.mark.parametrize("request_bytes", [
    b"",  # no request at all, only a response buffer
    b"\0\0",  # a short request
    FLUSH + b"\0\0\0\0",  # a long one
    (1).to_bytes(4, "little"),  # a type that does not exist
    (0xFFFF_FFFF).to_bytes(4, "little"),
])
def test_requests_that_are_not_a_flush_get_eio(
        ctx: FakeContext, tmp_path: Path, activate: Callable[..., Harness], request_bytes: bytes) -> None:
    dev = make(ctx, file=str(image(tmp_path / "p.img")))
    h = activate(dev, sizes=[16])
    assert ask(h, request_bytes) == (4, RESP_EIO)
    assert dev.counters()["bad_requests"] == 1 and dev.counters()["flushes"] == 0 and dev.broken is None
    assert ask(h, FLUSH) == (4, RESP_OK)  # the device still works


@pytest.mark.parametrize("response", [0, 2])
def test_a_chain_without_room_for_the_answer_fails_the_device(
        ctx: FakeContext, tmp_path: Path, activate: Callable[..., Harness], response: int) -> None:
    dev = make(ctx, file=str(image(tmp_path / "p.img")))
    h = activate(dev, sizes=[16])
    buffers = [(h.alloc(4, data=FLUSH), 4, False)]
    if response:
        buffers.append((h.alloc(response), response, True))
    h.submit(0, buffers)
    wait_for(lambda: dev.broken is not None, what="the device to fail")
    assert "response buffer" in str(dev.broken) and h.errors  # the transport is told (NEEDS_RESET)


def test_a_descriptor_outside_guest_memory_fails_the_device(
        ctx: FakeContext, tmp_path: Path, activate: Callable[..., Harness], memory: GuestMemory) -> None:
    dev = make(ctx, file=str(image(tmp_path / "p.img")))
    h = activate(dev, sizes=[16])
    outside = memory.last_address + 1 + 4 * MiB  # not RAM; the pmem region is not DMA-able either
    h.submit(0, [(outside, 4, False), (h.alloc(4), 4, True)])
    wait_for(lambda: dev.broken is not None, what="the device to fail")
    assert dev.counters()["flushes"] == 0


def test_a_failing_fsync_answers_eio(tmp_path: Path, ctx: FakeContext, activate: Callable[..., Harness]) -> None:
    """A backing fd whose fsync fails for real (a pipe: EINVAL)."""
    read_end, write_end = os.pipe()
    os.close(write_end)
    dev = make(ctx, file=str(image(tmp_path / "p.img")))
    real_fd, dev.fd = dev.fd, read_end
    try:
        h = activate(dev, sizes=[16])
        assert ask(h, FLUSH) == (4, RESP_EIO)
        assert dev.counters()["flush_errors"] == 1 and dev.broken is None
    finally:
        os.close(real_fd)


# -- lifetime, snapshots, the type --------------------------------------------------------------------


def test_closing_gives_the_range_back(ctx: FakeContext, tmp_path: Path) -> None:
    first = make(ctx, file=str(image(tmp_path / "a.img")))
    second = make(ctx, file=str(image(tmp_path / "b.img")))
    assert second.start >= first.start + first.size  # no overlap
    start = first.start
    first.close()
    third = make(ctx, file=str(image(tmp_path / "c.img", size=2 * MiB)))
    try:
        assert third.start == start  # the freed range is used again
    finally:
        second.close()
        third.close()


def test_the_snapshot_state_is_where_the_region_is(ctx: FakeContext, tmp_path: Path) -> None:
    dev = make(ctx, file=str(image(tmp_path / "p.img")))
    try:
        state = dev.save_state()
        assert state == {"start": dev.start, "size": 4 * MiB}
        dev.restore_state(state)
        with pytest.raises(StateError):
            dev.restore_state({"start": dev.start + ALIGNMENT, "size": 4 * MiB})
    finally:
        dev.close()


def test_the_type_claims_pmem_and_requests_a_device_per_section(tmp_path: Path) -> None:
    assert VirtioPmemType.sections == ("pmem",)
    config = VmConfig.from_cli(pmem=[f"file={tmp_path}/a.img,id=p0", f"file={tmp_path}/b.img,transport=mmio"])
    config = config.assign_ids()
    requests = VirtioPmemType.requests(config)
    assert [r.id for r in requests] == ["p0", config.pmem[1].id] and requests[1].transport == "mmio"
    assert all(r.type == "virtio-pmem" for r in requests)

