"""Random, partly hostile virtio-blk request rings, served by the C queue
(``native/blk_queue.c``) and by the Python reference (``BlockDevice`` with ``native=False``),
each on its own image and guest memory, started identical.

A case is a list of chains the "driver" puts in the ring: well-formed requests of every type, and
raw descriptor soup (indices past the table, loops, buffers outside RAM or across regions,
readable after writable, indirect tables of odd sizes, no status byte), sometimes an available
index that runs ahead of the queue size, and streams of reads and writes (what the C queue's pool
serves at once). Data buffers stay out of the ring pages and the indirect tables: a C queue
serving several requests at once walks their chains before serving any, so a request writing
into a later chain's descriptors (which a driver must not change while they are available)
would be seen differently. :func:`compare` serves the case on both sides and
asserts the used rings, guest memory, image files and broken-or-not agree.

Used by ``test_blk_queue_differential.py`` and, under ASan/UBSan, ``test_blk_queue_sanitizers.py``.
"""

from __future__ import annotations

import gc
import random
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from virtio_driver import F_INDIRECT, F_NEXT, F_WRITE, Harness, guarded_memory
from vmmkit_devices.virtio.blk_io import DiskImage
from vmmkit_devices.virtio.block import BlockDevice

from vmmkit.memory import GuestMemory

SECTOR = 512
DISK_SECTORS = 64
QUEUE_SIZE = 16
#: Region 0 holds the rings (0x10000-0x18000) and the data area; region 1 is adjacent; region 2 far.
LAYOUT = [(0, 0x40000), (0x40000, 0x10000), (0x100000, 0x10000)]
DATA = 0x20000
KINDS = (0, 1, 4, 8, 11, 13, 0x99)
#: The C device's ``overlapped_requests`` of each comparison (requests its pool served at once).
OVERLAPPED: list[int] = []


def _initial_disk() -> bytes:
    return random.Random(1).randbytes(DISK_SECTORS * SECTOR + 300)


@contextmanager
def twin(readonly: bool) -> Iterator[list[tuple[DiskImage, GuestMemory, Path]]]:
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        sides = []
        for name in ("c", "py"):
            path = folder / f"{name}.img"
            path.write_bytes(_initial_disk())
            image = DiskImage(str(path), readonly=readonly, owner=name)
            stack.callback(image.close)
            memory = stack.enter_context(guarded_memory(LAYOUT))
            rng = random.Random(2)
            for region in memory.regions:
                memory.write(region.start, rng.randbytes(region.size))
            sides.append((image, memory, path))
        yield sides


def _buffer(rng: random.Random, hostile: bool) -> tuple[int, int]:
    """A (gpa, length) for a descriptor: mostly inside the data area, sometimes not."""
    if hostile and rng.random() < 0.3:
        return rng.choice([(0x3FF00, 0x200), (0x4FF00, 0x200), (0x50000, 16), (2**64 - 8, 16),
                           (0x200000, 512), (0x10FFF0, 0x20), (DATA, 2**31), (0x100000, 0x10000)])
    return DATA + rng.randrange(0, 0x18000, 16), rng.choice([0, 1, 15, 16, 17, 511, 512, 1024, 4096])


def _request(rng: random.Random, kind: int, in_disk: bool = False) -> list[tuple[int, int, bool]]:
    """A well-formed chain: header, data, status."""
    sector = rng.choice([0, 1, DISK_SECTORS - 1, DISK_SECTORS, 2**63, rng.randrange(DISK_SECTORS)])
    if in_disk:
        sector = rng.randrange(DISK_SECTORS - 3)
    header = struct.pack("<IIQ", kind, 0, sector)
    parts: list[tuple[bytes | int, bool]] = [(header, False)]
    length = rng.choice([0, SECTOR, 2 * SECTOR, 3 * SECTOR + rng.choice([0, 0, 1]), 20])
    if kind in (1, 11, 13):
        if kind == 1:
            parts.append((rng.randbytes(length), False))
        else:
            segments = b"".join(struct.pack("<QII", rng.choice([0, 5, DISK_SECTORS - 2, DISK_SECTORS]),
                                            rng.choice([0, 1, 2, 0x400000]), rng.choice([0, 0, 1, 2]))
                                for _ in range(rng.choice([1, 1, 2, 33])))
            parts.append((segments + bytes(rng.choice([0, 0, 3])), False))
    elif kind != 4 and length:
        parts.append((length, True))
    parts.append((1, True))
    return parts  # type: ignore[return-value]


def generate(rng: random.Random) -> dict[str, Any]:
    """One case: what the driver writes, as plain data both sides replay identically."""
    chains: list[Any] = []
    io_only = rng.random() < 0.3  # a stream of reads and writes: what the pool serves at once
    for _ in range(rng.randrange(1, 6)):
        roll = rng.random()
        if io_only:
            chains.append(("request", _request(rng, rng.choice((0, 1)), in_disk=True), rng.random() < 0.2,
                           rng.randrange(1, 3)))
        elif roll < 0.6:
            chains.append(("request", _request(rng, rng.choice(KINDS)), rng.random() < 0.2, rng.randrange(1, 3)))
        else:
            descs = []
            for _ in range(rng.randrange(1, 5)):
                gpa, length = _buffer(rng, True)
                flags = rng.choice([0, F_WRITE, F_NEXT, F_NEXT | F_WRITE, F_INDIRECT, F_NEXT | F_INDIRECT])
                descs.append((gpa, length, flags, rng.randrange(QUEUE_SIZE + 2)))
            chains.append(("raw", descs, rng.randrange(QUEUE_SIZE + 1)))
    return {"chains": chains, "avail_jump": rng.random() < 0.05, "readonly": rng.random() < 0.2,
            "seed": rng.randrange(2**32)}


def _write_case(h: Harness, case: dict[str, Any]) -> int:
    """Lay the case's chains out in the ring; the number of entries made available."""
    rng = random.Random(case["seed"])
    driver = h.driver[0]
    memory = h.memory
    next_desc = 0
    heads = []
    for chain in case["chains"]:
        if chain[0] == "request":
            _, parts, indirect, pieces = chain
            buffers = []
            for data, writable in parts:
                if isinstance(data, bytes):
                    gpa = DATA + rng.randrange(0, 0x13000, 16)  # below the indirect tables
                    memory.write(gpa, data)
                    buffers.append((gpa, len(data), writable))
                else:
                    for piece in [data // pieces] * (pieces - 1) + [data - data // pieces * (pieces - 1)]:
                        buffers.append((DATA + rng.randrange(0, 0x13000, 16), piece, writable))
            if indirect:
                table = DATA + 0x14000 + rng.randrange(0, 0x1000, 16)
                for i, (gpa, length, writable) in enumerate(buffers):
                    flags = (F_WRITE if writable else 0) | (F_NEXT if i + 1 < len(buffers) else 0)
                    driver.write_desc(i, gpa, length, flags, i + 1, table=table)
                driver.write_desc(next_desc % QUEUE_SIZE, table, 16 * len(buffers), F_INDIRECT)
                heads.append(next_desc % QUEUE_SIZE)
                next_desc += 1
            else:
                first = next_desc % QUEUE_SIZE
                for i, (gpa, length, writable) in enumerate(buffers):
                    last = i + 1 == len(buffers)
                    flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
                    driver.write_desc(next_desc % QUEUE_SIZE, gpa, length, flags, (next_desc + 1) % QUEUE_SIZE)
                    next_desc += 1
                heads.append(first)
        else:
            _, descs, head = chain
            for gpa, length, flags, nxt in descs:
                if flags & F_INDIRECT:
                    gpa = DATA + 0x15000 if rng.random() < 0.5 else gpa
                driver.write_desc(next_desc % QUEUE_SIZE, gpa, length, flags, nxt)
                next_desc += 1
            heads.append(head)
    for head in heads:
        memory.write_u16(driver.avail + 4 + 2 * (driver.avail_idx % QUEUE_SIZE), head & 0xFFFF)
        driver.avail_idx = (driver.avail_idx + 1) & 0xFFFF
    if case["avail_jump"]:
        driver.avail_idx = (driver.avail_idx + QUEUE_SIZE + 1) & 0xFFFF
    memory.write_u16(driver.avail + 2, driver.avail_idx)
    return len(heads)


def _serve(device: BlockDevice, memory: GuestMemory, case: dict[str, Any]) -> tuple[int, bool]:
    harness = Harness(device, memory, None, sizes=[QUEUE_SIZE], data_base=DATA)  # type: ignore[arg-type]
    count = _write_case(harness, case)
    harness.activate()
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            if device.broken is not None or harness.driver[0].used_idx == count:
                break
            time.sleep(0.002)
        time.sleep(0.01)  # nothing more may happen; give a wrong implementation the chance
        return harness.driver[0].used_idx, device.broken is not None
    finally:
        harness.close()


def _image_bytes(path: Path) -> bytes:
    return path.read_bytes()


def compare(case: dict[str, Any]) -> None:
    """Serve ``case`` on the C queue and on the Python reference; everything must agree."""
    with twin(case["readonly"]) as ((c_image, c_mem, c_path), (py_image, py_mem, py_path)):
        c_device = BlockDevice("c", c_image, queue_size=QUEUE_SIZE, serial=b"twin", native=True)
        py_device = BlockDevice("py", py_image, queue_size=QUEUE_SIZE, serial=b"twin", native=False)
        assert c_device.native_queue and not py_device.native_queue
        try:
            c_out = _serve(c_device, c_mem, case)
            py_out = _serve(py_device, py_mem, case)
        finally:
            c_device.close()
            py_device.close()
            gc.collect()  # the harnesses' queues hold views of guest memory
        assert c_out == py_out, (c_out, py_out, c_device.broken, py_device.broken)
        for region in c_mem.regions:
            c_bytes = bytes(c_mem.read(region.start, region.size))
            py_bytes = bytes(py_mem.read(region.start, region.size))
            if c_bytes != py_bytes:
                at = next(i for i in range(len(c_bytes)) if c_bytes[i] != py_bytes[i])
                raise AssertionError(f"guest memory differs at {region.start + at:#x}")
        assert _image_bytes(c_path) == _image_bytes(py_path)
        c_counts, py_counts = dict(c_device.counters()), py_device.counters()
        OVERLAPPED.append(c_counts.pop("overlapped_requests", 0))
        assert {k: v for k, v in c_counts.items() if v} == {k: v for k, v in py_counts.items() if v}
