"""The C block data path against the Python reference (hypothesis).

Two levels: the data-path calls themselves (``NativeBlockIo`` vs ``PythonBlockIo``) on random,
partly forged chains (buffers outside guest RAM, host addresses that do not match, bad
skip/length/offset), and whole devices served random request sequences through real queues.
Each side has its own image file and its own guest memory (between inaccessible pages), started
identical; results, guest memory and the files must stay identical.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from blk_support import DISCARD, FLUSH, GET_ID, IN, OUT, WRITE_ZEROES, request, segment
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from virtio_driver import Harness, guarded_memory
from vmmkit_devices.virtio import blk_io
from vmmkit_devices.virtio.blk_io import DiskImage, IoStatus, NativeBlockIo, PythonBlockIo
from vmmkit_devices.virtio.block import BlockDevice

from vmmkit.memory import GuestMemory
from vmmkit.virtio.chain import DescriptorChain, Segment

pytestmark = pytest.mark.skipif(not blk_io.native_available(),
                                reason=f"native block path: {blk_io.NATIVE_UNAVAILABLE_REASON}")

SECTOR = 512
DISK_SECTORS = 64
#: Two adjacent regions and a far one: (gpa, size).
LAYOUT = [(0, 0x40000), (0x40000, 0x10000), (0x100000, 0x10000)]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _initial_disk() -> bytes:
    return random.Random(1).randbytes(DISK_SECTORS * SECTOR + 300)


def _initial_ram(memory: GuestMemory) -> None:
    rng = random.Random(2)
    for region in memory.regions:
        memory.write(region.start, rng.randbytes(region.size))


@contextmanager
def twin(*, readonly: bool = False, direct: bool = False) -> Iterator[list[tuple[DiskImage, GuestMemory, Path]]]:
    """Two identical (image, guest memory) pairs."""
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        sides = []
        for name in ("c", "py"):
            path = folder / f"{name}.img"
            path.write_bytes(_initial_disk())
            image = DiskImage(str(path), readonly=readonly, direct=direct, owner=name)
            stack.callback(image.close)
            memory = stack.enter_context(guarded_memory(LAYOUT))
            _initial_ram(memory)
            sides.append((image, memory, path))
        yield sides


def _snapshot(memory: GuestMemory) -> bytes:
    return b"".join(memory.read(r.start, r.size) for r in memory.regions)


# -- the data-path calls ----------------------------------------------------------------------


def _mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``common`` four times in five, else ``rare``."""
    return st.integers(0, 4).flatmap(lambda dice: rare if dice == 0 else common)



segments_strategy = st.lists(
    st.tuples(
        st.sampled_from([0x100, 0x3FF00, 0x40000 - 700, 0x41000, 0x100000, 0x10F000, 0x80000, 2**64 - 512]),
        st.integers(0, 3000),  # gpa offset
        st.integers(0, 5000),  # length
        _mostly(st.just(0), st.sampled_from([1, -1, 1 << 20, -(1 << 30)])),  # host address forgery
    ),
    min_size=0, max_size=6,
)


def _chain(memory: GuestMemory, spec: list[tuple[int, int, int, int]], readable: int) -> DescriptorChain:
    segments, hosts = [], []
    for index, (base, delta, length, forge) in enumerate(spec):
        gpa = (base + delta) % 2**64
        region = memory.find_region(gpa)
        host = (region.host_address + gpa - region.start) if region is not None else 0x1000 + gpa % 0x10000
        segments.append(Segment(gpa, length, index >= readable))
        hosts.append(max(0, host + forge))
    return DescriptorChain(0, tuple(segments), min(readable, len(spec)), len(spec), tuple(hosts), memory=memory)


@SETTINGS
@given(
    spec=segments_strategy,
    readable=st.integers(0, 6),
    write=st.booleans(),
    sector=_mostly(st.integers(0, DISK_SECTORS + 2), st.integers(0, 2**64 - 1)),
    misalign=_mostly(st.just(0), st.sampled_from([1, 100])),
    skip=_mostly(st.just(0), st.integers(0, 600)),
    length=_mostly(st.integers(0, 8).map(lambda n: n * SECTOR), st.integers(0, 9000)),
    readonly=_mostly(st.just(False), st.just(True)),
)
def test_transfer_agrees(spec: Any, readable: int, write: bool, sector: int, misalign: int, skip: int,
                         length: int, readonly: bool) -> None:
    with twin(readonly=readonly) as ((c_image, c_mem, c_path), (py_image, py_mem, py_path)):
        offset = sector * SECTOR + misalign
        c = NativeBlockIo(c_image, c_mem).transfer(_chain(c_mem, spec, readable), write, offset, skip, length)
        py = PythonBlockIo(py_image, py_mem).transfer(_chain(py_mem, spec, readable), write, offset, skip, length)
        assert c.status == py.status, (c, py)
        event(f"{'write' if write else 'read'} {c.status.name}")
        if c.status is IoStatus.OK:
            assert c.bytes == py.bytes == length
        assert _snapshot(c_mem) == _snapshot(py_mem)
        assert c_path.read_bytes() == py_path.read_bytes()


@SETTINGS
@given(
    op=st.sampled_from(["discard", "zeroes", "zeroes-unmap", "flush"]),
    sector=st.one_of(st.integers(0, DISK_SECTORS + 2), st.integers(0, 2**64 - 1)),
    misalign=st.sampled_from([0, 0, 3]),
    sectors=st.integers(0, 70),
    readonly=st.booleans(),
)
def test_discard_zeroes_flush_agree(op: str, sector: int, misalign: int, sectors: int, readonly: bool) -> None:
    with twin(readonly=readonly) as ((c_image, c_mem, c_path), (py_image, py_mem, py_path)):
        results = []
        for io in (NativeBlockIo(c_image, c_mem), PythonBlockIo(py_image, py_mem)):
            offset, length = sector * SECTOR + misalign, sectors * SECTOR
            if op == "discard":
                results.append(io.discard(offset, length))
            elif op == "flush":
                results.append(io.flush())
            else:
                results.append(io.write_zeroes(offset, length, op == "zeroes-unmap"))
        c, py = results
        assert (c.status, c.bytes, c.emulated) == (py.status, py.bytes, py.emulated)
        assert c_path.read_bytes() == py_path.read_bytes()


def test_forged_iovecs_are_refused_in_c() -> None:
    """The C checks stand on their own: a chain whose iovecs point outside guest RAM (which the
    SDK's walker would never produce) is refused before any system call."""
    with twin() as ((image, memory, path), _):
        region = memory.regions[0]
        before = path.read_bytes()
        for host, length in ((region.host_address - 4096, 512), (region.host_address + region.size - 256, 512),
                             (region.host_address + region.size, 512), (8, 512)):
            forged = DescriptorChain(0, (Segment(0, length, False),), 1, 1, (host,), memory=memory)
            assert NativeBlockIo(image, memory).transfer(forged, True, 0, 0, length).status is IoStatus.IOVEC
            into = DescriptorChain(0, (Segment(0, length, True),), 0, 1, (host,), memory=memory)
            assert NativeBlockIo(image, memory).transfer(into, False, 0, 0, length).status is IoStatus.IOVEC
        assert path.read_bytes() == before


# -- whole devices ----------------------------------------------------------------------------

KINDS = [IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES, 0x99]

request_strategy = st.fixed_dictionaries({
    "kind": st.sampled_from(KINDS),
    "sector": _mostly(st.integers(0, DISK_SECTORS + 1), st.sampled_from([2**32, 2**63, 2**64 - 1])),
    "sectors": st.integers(0, 6),
    "extra": _mostly(st.just(0), st.sampled_from([1, 200])),
    "pieces": st.integers(1, 4),
    "align": st.sampled_from([1, 8, 512, 4096]),
    "flags": _mostly(st.sampled_from([0, 1]), st.just(2)),
    "segments": st.integers(1, 3),
    "seed": st.integers(0, 2**16),
})


def _serve(device: BlockDevice, memory: GuestMemory, requests: list[dict[str, Any]]) -> list[tuple[int, int, bytes]]:
    harness = Harness(device, memory, None, sizes=[64], data_base=0x20000)  # type: ignore[arg-type]
    harness.activate()
    replies = []
    try:
        for r in requests:
            length = r["sectors"] * SECTOR + r["extra"]
            out, in_len = b"", 0
            if r["kind"] == OUT:
                out = random.Random(r["seed"]).randbytes(length)
            elif r["kind"] in (IN, GET_ID, 0x99):
                in_len = length
            elif r["kind"] in (DISCARD, WRITE_ZEROES):
                out = b"".join(segment((r["sector"] + i) % 2**64, r["sectors"], r["flags"])
                               for i in range(r["segments"]))
                out += bytes(r["extra"] % 16)
            harness._next = 0x20000  # reuse the same buffers each time
            reply = request(harness, r["kind"], r["sector"], out=out, in_len=in_len, pieces=r["pieces"],
                            align=r["align"])
            replies.append(tuple(reply))
            event(f"kind {r['kind']} status {reply.status}")
    finally:
        harness.close()
    return replies


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request_strategy, min_size=1, max_size=5), readonly=_mostly(st.just(False), st.just(True)),
       direct=st.booleans())
def test_devices_agree(requests: list[dict[str, Any]], readonly: bool, direct: bool) -> None:
    with twin(readonly=readonly, direct=direct) as ((c_image, c_mem, c_path), (py_image, py_mem, py_path)):
        c_device = BlockDevice("c", c_image, queue_size=64, serial=b"twin", native=True)
        py_device = BlockDevice("py", py_image, queue_size=64, serial=b"twin", native=False)
        try:
            c_replies = _serve(c_device, c_mem, requests)
            py_replies = _serve(py_device, py_mem, requests)
        finally:
            c_device.close()
            py_device.close()
        assert c_replies == py_replies
        assert _snapshot(c_mem) == _snapshot(py_mem)
        assert c_path.read_bytes() == py_path.read_bytes()
        assert os.path.getsize(c_path) == len(_initial_disk())
        assert c_device.broken is None and py_device.broken is None


def test_differential_sanity() -> None:
    """The harness above would notice a difference (it compares real bytes)."""
    with twin() as ((c_image, c_mem, c_path), (py_image, py_mem, py_path)):
        c_mem.write(0x100, struct.pack("<Q", 1))
        assert _snapshot(c_mem) != _snapshot(py_mem)
