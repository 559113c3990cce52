"""Random, partly hostile virtio-net rings and tap traffic, served by the C queues
(``native/net_queue.c``) and by the Python reference (``NetDevice`` with ``native=False``), each
on its own guest memory and :class:`~netns_support.FakeTap`, started identical.

A case is what the driver negotiated (``MRG_RXBUF``, the checksum and GSO offloads, event-idx,
indirect descriptors), the receive chains it posts (well-formed ones of many sizes, split into
pieces, some indirect; and raw descriptor soup: indices past the table, loops, buffers outside
RAM or across regions, readable receive buffers, chains shorter than the header), the transmit
chains (headers with random flags and GSO types, frames of many sizes, chains shorter than the
header or longer than any frame, soup), sometimes an available index that runs ahead, and the
frames the host side has queued on the tap (vnet header + frame, some shorter than the header,
some larger than any buffer). Receive buffers and soup stay in the receive area and transmit
buffers in the transmit area, so the order in which a side serves the two queues cannot change
the outcome. :func:`compare` serves the case on both sides and asserts the used rings, guest
memory, the frames written to the tap, the frames left unread, counters and broken-or-not agree.

Used by ``test_net_queue_differential.py`` and, under ASan/UBSan, ``test_native_sanitizers``.
"""

from __future__ import annotations

import gc
import random
import select
import socket
import struct
import threading
import time
from contextlib import ExitStack
from typing import Any

from netns_support import FakeTap
from virtio_driver import F_INDIRECT, F_NEXT, F_WRITE, Harness, guarded_memory
from vmmkit_devices.virtio import net as vnet
from vmmkit_devices.virtio.net import NetDevice
from vmmkit_devices.virtio.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO

from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory
from vmmkit.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC

QUEUE_SIZE = 16
HDR = 12
#: Region 0 holds the rings (0x10000, 0x18000) and the data areas; region 1 is adjacent; region 2 far.
LAYOUT = [(0, 0x40000), (0x40000, 0x10000), (0x100000, 0x10000)]
RX_AREA = (0x20000, 0x30000)  # receive buffers (may spill into region 1 at 0x40000)
TX_AREA = (0x30000, 0x3F000)
MAC = bytes.fromhex("525400000001")
TAP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
OPTIONAL = (vnet.VIRTIO_NET_F_MRG_RXBUF, vnet.VIRTIO_NET_F_CSUM, vnet.VIRTIO_NET_F_GUEST_CSUM,
            vnet.VIRTIO_NET_F_HOST_TSO4, vnet.VIRTIO_NET_F_HOST_TSO6, vnet.VIRTIO_NET_F_HOST_ECN,
            vnet.VIRTIO_NET_F_HOST_UFO, vnet.VIRTIO_NET_F_GUEST_TSO4, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC)


def _sizes(rng: random.Random) -> int:
    return rng.choice([HDR, HDR + 13, 64, 100, 600, 1526, 2048, 4096, 9000])


def _pieces(rng: random.Random, total: int) -> list[int]:
    count = rng.choice([1, 1, 2, 3])
    cuts = sorted(rng.randrange(0, total + 1) for _ in range(count - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def _soup(rng: random.Random, area: tuple[int, int]) -> tuple[str, list[tuple[int, int, int, int]], int]:
    descs = []
    for _ in range(rng.randrange(1, 4)):
        gpa, length = rng.choice([(rng.randrange(area[0], area[1] - 64, 16), rng.choice([0, 8, 12, 40])),
                                  (0x3FFF0 if area == RX_AREA else 0x3EFF0, 0x20), (0x50000, 16),
                                  (2**64 - 8, 16), (0x200000, 64)])
        flags = rng.choice([0, F_WRITE, F_NEXT | F_WRITE, F_NEXT, F_INDIRECT, F_WRITE | F_INDIRECT])
        descs.append((gpa, length, flags, rng.randrange(QUEUE_SIZE + 2)))
    return ("raw", descs, rng.randrange(QUEUE_SIZE + 1))


def _tx_header(rng: random.Random) -> bytes:
    flags = rng.choice([0, 0, 1, 2, 0x81])
    gso = rng.choice([0, 0, 1, 3, 4, 0x81, 5, 0x80])
    size = rng.choice([0, 1448])
    return struct.pack("<BBHHHHH", flags, gso, 54 if gso else 0, size, 34 if flags & 1 else 0,
                       16 if flags & 1 else 0, rng.randrange(3))


def _frame(rng: random.Random, length: int) -> bytes:
    return MAC + bytes.fromhex("020000000002") + struct.pack("!H", 0x88B5) + rng.randbytes(max(length - 14, 0))


def generate(rng: random.Random) -> dict[str, Any]:
    """One case: what the driver and the host side do, as plain data both sides replay."""
    features = sum(f for f in OPTIONAL if rng.random() < 0.6)
    hostile = rng.random() < 0.4  # else only well-formed chains: the cases that move frames
    rx: list[Any] = []
    for _ in range(rng.randrange(0, 9)):
        if hostile and rng.random() < 0.12:
            rx.append(_soup(rng, RX_AREA))
        else:
            size = _sizes(rng) if not hostile or rng.random() < 0.9 else rng.choice([0, 5, 11])
            rx.append(("chain", [(p, True) for p in _pieces(rng, size)], rng.random() < 0.2))
    tx: list[Any] = []
    for _ in range(rng.randrange(0, 6)):
        roll = rng.random() if hostile else 1.0
        if roll < 0.1:
            tx.append(_soup(rng, TX_AREA))
        elif roll < 0.15:
            tx.append(("chain", [(rng.choice([0, 4, 11]), False)], False))
        elif roll < 0.18:
            tx.append(("chain", [(70000, False)], False))  # longer than any frame: dropped unread
        else:
            data = _tx_header(rng) + _frame(rng, rng.choice([0, 10, 60, 600, 1514, 3000]))
            tx.append(("chain", [(piece, False) for piece in _pieces(rng, len(data))], rng.random() < 0.2, data))
    frames = []
    for _ in range(rng.randrange(0, 6)):
        length = rng.choice([4, 60, 100, 1514, 3000, 9014, 20000])
        frames.append(struct.pack("<BBHHHHH", rng.choice([0, 1, 2]), 0, 0, 0, 0, 0, 0)[:HDR]
                      + _frame(rng, length) if length >= 14 else rng.randbytes(length))
    return {"features": features, "rx": rx, "tx": tx, "frames": frames, "avail_jump": rng.random() < 0.04,
            "seed": rng.randrange(2**32)}


def _lay_out(h: Harness, index: int, chains: list[Any], area: tuple[int, int], rng: random.Random,
             jump: bool) -> None:
    driver, memory = h.driver[index], h.memory
    at = area[0]
    next_desc = 0
    heads = []

    def alloc(length: int) -> int:
        nonlocal at
        gpa = at
        at = (at + length + 15) & ~15
        return gpa

    for chain in chains:
        if chain[0] == "raw":
            _, descs, head = chain
            for gpa, length, flags, nxt in descs:
                driver.write_desc(next_desc % QUEUE_SIZE, gpa, length, flags, nxt)
                next_desc += 1
            heads.append(head)
            continue
        parts, indirect = chain[1], chain[2]
        data = chain[3] if len(chain) > 3 else None
        buffers = []
        offset = 0
        for length, writable in parts:
            if length > 0x10000:
                gpa = 0  # longer than any frame: never read, only walked
            elif index == 1:
                gpa = alloc(length)
            else:
                gpa = rng.randrange(area[0], area[1] - length, 16)
            if data is not None:
                memory.write(gpa, data[offset : offset + length])
            offset += length
            buffers.append((gpa, length, writable))
        if indirect:
            table = (0x3F800 if index == 1 else 0x3F000) + 0x80 * (len(heads) % 8)
            for i, (gpa, length, writable) in enumerate(buffers):
                flags = (F_WRITE if writable else 0) | (F_NEXT if i + 1 < len(buffers) else 0)
                driver.write_desc(i, gpa, length, flags, i + 1, table=table)
            driver.write_desc(next_desc % QUEUE_SIZE, table, 16 * len(buffers), F_INDIRECT)
            heads.append(next_desc % QUEUE_SIZE)
            next_desc += 1
            continue
        first = next_desc % QUEUE_SIZE
        for i, (gpa, length, writable) in enumerate(buffers):
            last = i + 1 == len(buffers)
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            driver.write_desc(next_desc % QUEUE_SIZE, gpa, length, flags, (next_desc + 1) % QUEUE_SIZE)
            next_desc += 1
        heads.append(first)
    for head in heads[:QUEUE_SIZE]:
        memory.write_u16(driver.avail + 4 + 2 * (driver.avail_idx % QUEUE_SIZE), head & 0xFFFF)
        driver.avail_idx = (driver.avail_idx + 1) & 0xFFFF
    if jump:
        driver.avail_idx = (driver.avail_idx + QUEUE_SIZE + 1) & 0xFFFF
    memory.write_u16(driver.avail + 2, driver.avail_idx)


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(1 << 17))
        except BlockingIOError:
            return out


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


EPOLL_WAITS = ("232", "281")  # x86-64 epoll_wait, epoll_pwait


def _idle(device: NetDevice, harness: Harness, loop: EventLoop) -> bool:
    """Whether the device has nothing left to do: the kicks were taken, and the C thread waits
    in epoll (or the event loop finished what it was doing and does not watch a readable tap)."""
    if device.broken is not None:
        return True
    if any(_readable(fd) for fd in harness.events):
        return False
    if device.native:
        thread = next((t for t in threading.enumerate() if t.name == f"{device.id}_net"), None)
        if thread is None or thread.native_id is None:
            return True
        try:
            with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
                return f.read().split()[0] in EPOLL_WAITS
        except (OSError, IndexError):
            return True  # the thread ended
    done = threading.Event()  # a callback the loop runs after the one it may be in
    loop.call_soon(done.set)
    if not done.wait(10):
        return False
    return not (device.tap.fd in device._readers and _readable(device.tap.fd))


def _serve(device: NetDevice, tap: FakeTap, memory: GuestMemory, loop: EventLoop,
           case: dict[str, Any]) -> tuple[Any, ...]:
    for data in case["frames"]:
        tap.peer.send(data)
    harness = Harness(device, memory, loop, sizes=[QUEUE_SIZE, QUEUE_SIZE],
                      features=device.features() & ~sum(OPTIONAL) | case["features"])
    rng = random.Random(case["seed"])
    _lay_out(harness, 0, case["rx"], RX_AREA, rng, case["avail_jump"] and rng.random() < 0.5)
    _lay_out(harness, 1, case["tx"], TX_AREA, rng, case["avail_jump"])
    harness.activate()
    try:
        # Settled: the device is idle and nothing changed for a while (a loaded host may leave
        # its thread unscheduled for longer than any fixed wait).
        last: Any = None
        stable_since = time.monotonic()
        deadline = stable_since + 20
        while time.monotonic() < deadline:
            now = (harness.driver[0].used_idx, harness.driver[1].used_idx, device.broken is not None)
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since > 0.03 and _idle(device, harness, loop):
                break
            time.sleep(0.005)
        sent = _drain(tap.peer)
        counters = {k: v for k, v in device.counters().items() if v}
        return last, sent, counters
    finally:
        harness.close()


def compare(case: dict[str, Any]) -> None:
    """Serve ``case`` on the C queues and on the Python reference; everything must agree."""
    with ExitStack() as stack:
        loop = EventLoop(name="net-cases")
        loop.start()
        stack.callback(loop.close)
        outcomes = []
        memories = []
        leftovers = []
        for native in (True, False):
            memory = stack.enter_context(guarded_memory(LAYOUT))
            fill = random.Random(2)
            for region in memory.regions:
                memory.write(region.start, fill.randbytes(region.size))
            tap = FakeTap(offloads=TAP_OFFLOADS)
            device = NetDevice("c" if native else "py", tap, MAC, queue_size=QUEUE_SIZE, native=native)
            assert (device._native is None) and device.native == native
            try:
                outcomes.append(_serve(device, tap, memory, loop, case))
                leftovers.append(len(_drain(tap.peer)))
            finally:
                peer = tap.peer
                device.close()
                peer.close()
                gc.collect()  # the harness's queues hold views of guest memory
            memories.append(memory)
        c_out, py_out = outcomes
        assert c_out[0] == py_out[0], ("used indices / broken", c_out[0], py_out[0])
        assert c_out[1] == py_out[1], "frames written to the tap differ"
        assert c_out[2] == py_out[2], ("counters", c_out[2], py_out[2])
        assert leftovers[0] == leftovers[1]
        c_mem, py_mem = memories
        for region in c_mem.regions:
            c_bytes = bytes(c_mem.read(region.start, region.size))
            py_bytes = bytes(py_mem.read(region.start, region.size))
            if c_bytes != py_bytes:
                at = next(i for i in range(len(c_bytes)) if c_bytes[i] != py_bytes[i])
                raise AssertionError(f"guest memory differs at {region.start + at:#x}")
