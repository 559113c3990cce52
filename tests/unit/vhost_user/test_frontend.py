"""Contract tests of vmmkit's vhost-user frontends (blk, net, fs) against a scripted backend:
a thread speaking the protocol on a real Unix socket, receiving real descriptors (the guest
RAM's memfd, the kick and call eventfds) and checking what a backend can check with them. This
is a simulation of a backend (labelled so): the real peer for blk is qemu-storage-daemon in
tests/integration/test_vhost_user_blk.py; net and fs have no real backend on this host."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from vmmkit_devices.vhost_user import blk, fs, net
from vmmkit_devices.vhost_user.device import VhostUserDevice

from vmmkit.config import DiskConfig, NetConfig
from vmmkit.errors import DeviceError
from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.vhost_user import protocol as p
from vmmkit.vhost_user.protocol import FrontendRequest as Req
from vmmkit.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, ActivationContext, VirtioInterruptType
from vmmkit.virtio.queue import Virtqueue

PF = p.ProtocolFeature
BLK_CONFIG = struct.pack("<QII", 8192, 0, 126) + bytes(48)  # capacity 8192 sectors, seg_max 126
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_CONFIG_WCE = 1 << 11


class ScriptedBackend:
    """A vhost-user backend on ``path``: answers what a frontend asks, records every request
    (code, payload, descriptors) and keeps the descriptors it needs. ``refuse``: requests
    acknowledged with a failure status; ``hang_up_on``: a request it closes the connection on."""

    def __init__(self, path: Path, *, features: int, protocol: int, config: bytes = BLK_CONFIG,
                 queue_num: int = 1) -> None:
        self.path = path
        self.features = features | (1 << p.F_PROTOCOL_FEATURES)
        self.protocol = protocol
        self.config = config
        self.queue_num = queue_num
        self.refuse: set[Req] = set()
        self.hang_up_on: Req | None = None
        #: request -> (reply message, descriptors) sent instead of the right answer (hostile backends)
        self.tamper: dict[Req, tuple[p.Message, list[int]]] = {}
        self.log: list[tuple[Req, bytes, int]] = []
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        self.memory: list[tuple[p.MemoryRegion, int]] = []
        self.inflight_fds: list[int] = []  # the ones it received with SET_INFLIGHT_FD
        self.connections = 0
        self.error: BaseException | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def requests(self) -> list[Req]:
        return [request for request, _, _ in self.log]

    def _serve(self) -> None:
        try:
            while True:
                try:
                    conn, _ = self._listener.accept()
                except OSError:
                    return
                self.connections += 1
                self._conn = conn
                self._session(conn)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _session(self, conn: socket.socket) -> None:
        acked = 0
        while True:
            try:
                msg, fds = p.recv(conn)
            except (p.VhostUserDisconnected, OSError):
                conn.close()
                return
            request = Req(msg.request)
            self.log.append((request, msg.payload, len(fds)))
            if request in self.tamper:
                for fd in fds:
                    os.close(fd)
                bad, bad_fds = self.tamper[request]
                p.send(conn, bad, bad_fds)
                continue
            if request == self.hang_up_on:
                for fd in fds:
                    os.close(fd)
                conn.close()
                return
            if request == Req.GET_INFLIGHT_FD:
                asked = p.Inflight.unpack(msg.payload)
                buffer = os.memfd_create("inflight")
                os.ftruncate(buffer, 4096)
                os.pwrite(buffer, b"in flight", 0)
                p.send(conn, msg.reply(p.Inflight(4096, 0, asked.num_queues, asked.queue_size).pack()), [buffer])
                os.close(buffer)
                continue
            reply = self._answer(request, msg.payload, fds, acked)
            if request == Req.SET_PROTOCOL_FEATURES:
                acked = p.unpack_u64(msg.payload)
            if reply is not None:
                p.send(conn, msg.reply(reply))
            elif msg.need_reply:
                status = 1 if request in self.refuse else 0
                p.send(conn, msg.reply(p.pack_u64(status)))

    def _answer(self, request: Req, payload: bytes, fds: list[int], acked: int) -> bytes | None:
        if request == Req.GET_FEATURES:
            return p.pack_u64(self.features)
        if request == Req.GET_PROTOCOL_FEATURES:
            return p.pack_u64(self.protocol)
        if request == Req.GET_QUEUE_NUM:
            return p.pack_u64(self.queue_num)
        if request == Req.GET_CONFIG:
            asked = p.ConfigSpace.unpack(payload)
            return p.ConfigSpace(asked.offset, asked.size, 0, self.config[:asked.size]).pack()
        if request == Req.GET_VRING_BASE:
            state = p.VringState.unpack(payload)
            return p.VringState(state.index, 7).pack()
        if request == Req.SET_MEM_TABLE:
            regions = p.unpack_memory_table(payload)
            assert len(regions) == len(fds)
            self.memory = list(zip(regions, fds, strict=True))
            return None
        if request == Req.SET_INFLIGHT_FD:
            assert len(fds) == 1
            self.inflight_fds.append(fds[0])
            return None
        if request in (Req.SET_VRING_KICK, Req.SET_VRING_CALL):
            index, no_fd = p.unpack_vring_file(payload)
            assert not no_fd and len(fds) == 1
            (self.kick if request == Req.SET_VRING_KICK else self.call)[index] = fds[0]
            return None
        for fd in fds:
            os.close(fd)
        return None

    def guest_bytes(self, gpa: int, length: int) -> bytes:
        """Read guest memory through the memfd the frontend sent, as a backend does."""
        for region, fd in self.memory:
            if region.guest_phys_addr <= gpa < region.guest_phys_addr + region.memory_size:
                with mmap.mmap(fd, region.memory_size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                    offset = gpa - region.guest_phys_addr + region.mmap_offset
                    return m[offset:offset + length]
        raise AssertionError(f"{gpa:#x} is in no region")

    def drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in (self._listener, self._conn):  # shutdown wakes the serving thread's accept / recv
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        for fd in [*self.kick.values(), *self.call.values(), *(fd for _, fd in self.memory), *self.inflight_fds]:
            try:
                os.close(fd)
            except OSError:
                pass


class Interrupts:
    def __init__(self) -> None:
        self.events: list[tuple[VirtioInterruptType, int]] = []
        self.arrived = threading.Event()

    def trigger(self, kind: VirtioInterruptType, queue_index: int = 0) -> None:
        self.events.append((kind, queue_index))
        self.arrived.set()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    event_loop = EventLoop("vhost-user-test")
    event_loop.start()
    yield event_loop
    event_loop.close()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate([MemoryRange(0, 1 << 20), MemoryRange(1 << 32, 1 << 20)], shared=True) as mem:
        yield mem


@pytest.fixture
def backend_factory(tmp_path: Path) -> Iterator[Callable[..., ScriptedBackend]]:
    made: list[ScriptedBackend] = []

    def make(**kwargs: Any) -> ScriptedBackend:
        backend = ScriptedBackend(tmp_path / f"b{len(made)}.sock", **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
        assert backend.error is None, backend.error


def _context(memory: GuestMemory, loop: EventLoop, sizes: list[int], interrupts: Interrupts) -> ActivationContext:
    queues = []
    for index, size in enumerate(sizes):
        queue = Virtqueue(size, memory, index)
        base = 0x10000 * (index + 1)
        queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = size, base, base + 0x4000, base + 0x8000
        queue.ready = True
        queues.append(queue)
    events = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in sizes]
    return ActivationContext(memory=memory, queues=queues, queue_events=events, interrupt=interrupts,
                             event_loop=loop)


def _wait(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


BLK_FEATURES = (VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH
                | VIRTIO_BLK_F_CONFIG_WCE)
ALL_PROTOCOL = p.protocol_mask(PF.MQ, PF.REPLY_ACK, PF.CONFIG, PF.INFLIGHT_SHMFD, PF.BACKEND_REQ)


def test_blk_negotiation_and_activation_sequence(backend_factory: Callable[..., ScriptedBackend],
                                                 memory: GuestMemory, loop: EventLoop) -> None:
    backend = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
    device = blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
    try:
        # The guest is offered the backend's features within the blk mask: CONFIG_WCE and the
        # vhost-user bit 30 are not passed on.
        assert device.features() == VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH
        assert device.device_type == 2
        assert device.read_config(0, 8) == struct.pack("<Q", 8192)
        assert device.read_config(34, 2) == struct.pack("<H", 1)  # num_queues written by the frontend
        assert backend.requests() == [Req.SET_OWNER, Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES,
                                      Req.SET_PROTOCOL_FEATURES, Req.GET_CONFIG]
        chosen = p.unpack_u64(backend.log[3][1])
        # Only what vmmkit uses (not BACKEND_REQ): blk tracks in-flight requests too.
        assert chosen == p.protocol_mask(PF.REPLY_ACK, PF.CONFIG, PF.MQ, PF.INFLIGHT_SHMFD)

        memory.write(0x10000, b"descriptor table")
        interrupts = Interrupts()
        ctx = _context(memory, loop, [128], interrupts)
        device.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH)
        device.activate(ctx)
        start = backend.requests()[5:]
        assert start == [Req.GET_INFLIGHT_FD, Req.SET_INFLIGHT_FD, Req.SET_FEATURES, Req.SET_MEM_TABLE,
                         Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.SET_VRING_ADDR, Req.SET_VRING_KICK,
                         Req.SET_VRING_CALL, Req.SET_VRING_ENABLE]
        assert p.Inflight.unpack(backend.log[5][1]) == p.Inflight(0, 0, 1, 128)
        assert p.Inflight.unpack(backend.log[6][1]) == p.Inflight(4096, 0, 1, 128)
        assert os.pread(backend.inflight_fds[0], 9, 0) == b"in flight"  # its own buffer came back
        log = backend.log[7:]
        assert p.unpack_u64(log[0][1]) == VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | (1 << p.F_PROTOCOL_FEATURES)
        regions = [region for region, _ in backend.memory]
        assert [(r.guest_phys_addr, r.memory_size) for r in regions] == [(0, 1 << 20), (1 << 32, 1 << 20)]
        assert regions[0].userspace_addr == memory.host_address(0)
        assert backend.guest_bytes(0x10000, 16) == b"descriptor table"  # the memfd is the guest's RAM
        assert p.VringState.unpack(log[2][1]) == p.VringState(0, 128)
        assert p.VringState.unpack(log[3][1]) == p.VringState(0, 0)
        address = p.VringAddress.unpack(log[4][1])
        assert (address.desc_user_addr, address.avail_user_addr, address.used_user_addr) == (
            memory.host_address(0x10000), memory.host_address(0x14000), memory.host_address(0x18000))
        assert p.VringState.unpack(log[7][1]) == p.VringState(0, 1)

        # The kick descriptor is the transport's queue eventfd: a guest notification reaches it.
        os.eventfd_write(ctx.queue_events[0], 1)
        assert os.eventfd_read(backend.kick[0]) == 1
        # The backend's call becomes the queue's interrupt through the transport.
        os.eventfd_write(backend.call[0], 1)
        assert interrupts.arrived.wait(5)
        assert interrupts.events == [(VirtioInterruptType.QUEUE, 0)]

        device.reset()
        assert backend.requests()[-1] == Req.GET_VRING_BASE
        assert p.VringState.unpack(backend.log[-1][1]) == p.VringState(0, 0)
    finally:
        device.close()


def test_hotplugged_memory_reaches_a_running_backend(backend_factory: Callable[..., ScriptedBackend],
                                                    memory: GuestMemory, loop: EventLoop) -> None:
    from vmmkit.memory import close_region, map_region

    backend = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
    device = blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
    try:
        device.ack_features(VIRTIO_F_VERSION_1)
        device.activate(_context(memory, loop, [128], Interrupts()))
        dimm = map_region(MemoryRange(1 << 33, 2 << 20), 7, shared=True, hugepages=False, hugepage_size=None,
                          thp=False, mergeable=False, prefault=False)
        memory.add_region(dimm)  # as ACPI memory hotplug does
        assert backend.requests().count(Req.SET_MEM_TABLE) == 2
        assert [r.guest_phys_addr for r, _ in backend.memory] == [0, 1 << 32, 1 << 33]
        memory.write(1 << 33, b"hotplugged")
        assert backend.guest_bytes(1 << 33, 10) == b"hotplugged"
        assert device.counters()["memory_updates"] == 1
        device.reset()  # not running: a change waits for the next activation
        memory.remove_region(1 << 33)
        assert backend.requests().count(Req.SET_MEM_TABLE) == 2
    finally:
        device.close()
        if "dimm" in locals():
            close_region(dimm)


def test_pause_disables_the_rings_and_resume_enables_and_kicks_them(
    backend_factory: Callable[..., ScriptedBackend], memory: GuestMemory, loop: EventLoop
) -> None:
    backend = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
    device = blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
    try:
        device.ack_features(VIRTIO_F_VERSION_1)
        device.activate(_context(memory, loop, [128], Interrupts()))
        device.pause()
        assert backend.log[-1][0] == Req.SET_VRING_ENABLE
        assert p.VringState.unpack(backend.log[-1][1]) == p.VringState(0, 0)
        device.resume()
        assert p.VringState.unpack(backend.log[-1][1]) == p.VringState(0, 1)
        assert _readable(backend.kick[0])
    finally:
        device.close()


def test_a_refused_request_fails_activation_with_a_clear_error(backend_factory: Callable[..., ScriptedBackend],
                                                               memory: GuestMemory, loop: EventLoop) -> None:
    backend = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
    backend.refuse.add(Req.SET_MEM_TABLE)
    device = blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
    try:
        device.ack_features(VIRTIO_F_VERSION_1)
        with pytest.raises(DeviceError, match="refused SET_MEM_TABLE"):
            device.activate(_context(memory, loop, [128], Interrupts()))
    finally:
        device.close()


def test_without_reply_ack_nothing_waits_for_acknowledgements(backend_factory: Callable[..., ScriptedBackend],
                                                              memory: GuestMemory, loop: EventLoop) -> None:
    backend = backend_factory(features=BLK_FEATURES, protocol=p.protocol_mask(PF.CONFIG))
    device = blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
    try:
        device.ack_features(VIRTIO_F_VERSION_1)
        device.activate(_context(memory, loop, [128], Interrupts()))
        assert _wait(lambda: Req.SET_VRING_ENABLE in backend.requests())
        assert Req.SET_VRING_CALL in backend.requests()
    finally:
        device.close()


@pytest.mark.parametrize(
    ("request_", "reply", "match"),
    [
        (Req.GET_FEATURES, p.Message(Req.GET_PROTOCOL_FEATURES, p.pack_u64(0), p.VERSION | p.FLAG_REPLY),
         "answered GET_FEATURES with request 15"),
        (Req.GET_FEATURES, p.Message(Req.GET_FEATURES, p.pack_u64(0)), "answered GET_FEATURES with request 1 flags"),
        (Req.GET_FEATURES, p.Message(Req.GET_FEATURES, b"\0" * 4, p.VERSION | p.FLAG_REPLY), "u64 payload of 4"),
        (Req.GET_CONFIG, p.Message(Req.GET_CONFIG, p.ConfigSpace(0, 8, 0, bytes(8)).pack(), p.VERSION | p.FLAG_REPLY),
         "GET_CONFIG of 60 bytes answered with 8"),
        (Req.GET_CONFIG, p.Message(Req.GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(10),
                                   p.VERSION | p.FLAG_REPLY), "says 60 bytes and carries 10"),
    ],
)
def test_hostile_replies_are_refused_clearly(backend_factory: Callable[..., ScriptedBackend], loop: EventLoop,
                                             request_: Req, reply: p.Message, match: str) -> None:
    backend = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
    backend.tamper[request_] = (reply, [])
    with pytest.raises(DeviceError, match=match):
        blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)


def test_a_reply_with_unasked_descriptors_is_refused_and_they_are_closed(
    backend_factory: Callable[..., ScriptedBackend], loop: EventLoop
) -> None:
    backend = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
    memfd = os.memfd_create("smuggled")
    try:
        backend.tamper[Req.GET_FEATURES] = (p.Message(Req.GET_FEATURES, p.pack_u64(BLK_FEATURES),
                                                      p.VERSION | p.FLAG_REPLY), [memfd])
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(DeviceError, match="sent descriptors with its GET_FEATURES reply"):
            blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
        assert _wait(lambda: len(os.listdir("/proc/self/fd")) <= before)
    finally:
        os.close(memfd)


def test_a_blk_backend_without_config_is_refused(backend_factory: Callable[..., ScriptedBackend],
                                                 loop: EventLoop) -> None:
    backend = backend_factory(features=BLK_FEATURES, protocol=p.protocol_mask(PF.REPLY_ACK))
    with pytest.raises(DeviceError, match="CONFIG protocol feature"):
        blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)


def test_blk_multiqueue_is_bounded_by_the_backend(backend_factory: Callable[..., ScriptedBackend],
                                                  loop: EventLoop) -> None:
    backend = backend_factory(features=BLK_FEATURES | (1 << 12), protocol=ALL_PROTOCOL, queue_num=2)
    with pytest.raises(DeviceError, match="serves 2 queues"):
        blk.create_device("d0", str(backend.path), num_queues=4, queue_size=128, event_loop=loop)
    device = blk.create_device("d1", str(backend.path), num_queues=2, queue_size=64, event_loop=loop)
    try:
        assert device.queue_max_sizes == (64, 64)
        assert device.read_config(34, 2) == struct.pack("<H", 2)
        assert device.features() & (1 << 12)
    finally:
        device.close()


def test_local_image_options_are_refused_for_a_vhost_user_disk() -> None:
    for option in ("readonly=on", "direct=on", "serial=abc", "image_type=raw"):
        disk = DiskConfig.parse(f"vhost_user=on,socket=/s,{option}")
        with pytest.raises(DeviceError, match=f"--disk {option.split('=')[0]}= does not apply"):
            blk.check_disk(disk, "d0")
    blk.check_disk(DiskConfig.parse("vhost_user=on,socket=/s,num_queues=2,queue_size=256"), "d0")


def test_a_backend_lost_under_a_running_device_is_reconnected_where_the_used_ring_says(
    backend_factory: Callable[..., ScriptedBackend], memory: GuestMemory, loop: EventLoop
) -> None:
    backend = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
    device = blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
    broken: list[str] = []
    device.on_broken = broken.append
    try:
        device.ack_features(VIRTIO_F_VERSION_1)
        ctx = _context(memory, loop, [128], Interrupts())
        device.activate(ctx)
        memory.write_u16(0x18000 + 2, 5)  # the old backend had completed 5 requests
        backend.drop_connection()
        assert _wait(lambda: backend.requests().count(Req.SET_VRING_ENABLE) == 2)
        assert backend.connections == 2 and not broken and device.broken is None
        assert device.counters()["reconnections"] == 1
        bases = [p.VringState.unpack(payload) for request, payload, _ in backend.log if request == Req.SET_VRING_BASE]
        assert bases == [p.VringState(0, 0), p.VringState(0, 5)]
        # The restarted backend gets the in-flight buffer its predecessor filled.
        assert backend.requests().count(Req.GET_INFLIGHT_FD) == 1
        assert len(backend.inflight_fds) == 2
        assert os.fstat(backend.inflight_fds[0]).st_ino == os.fstat(backend.inflight_fds[1]).st_ino
        # The new backend is kicked: it looks at the ring without waiting for the guest.
        assert _wait(lambda: _readable(backend.kick[0]))
        # The call relay still raises the queue's interrupt.
        os.eventfd_write(backend.call[0], 1)
        assert cast(Interrupts, ctx.interrupt).arrived.wait(5)
    finally:
        device.close()


def _readable(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


def test_a_backend_that_does_not_come_back_breaks_the_device_and_the_next_reset_tries_again(
    backend_factory: Callable[..., ScriptedBackend], memory: GuestMemory, loop: EventLoop,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmmkit_devices.vhost_user import device as device_module

    monkeypatch.setattr(device_module, "RECONNECT_TIMEOUT", 0.6)
    backend = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
    device = blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
    broken: list[str] = []
    device.on_broken = broken.append
    try:
        device.ack_features(VIRTIO_F_VERSION_1)
        device.activate(_context(memory, loop, [128], Interrupts()))
        backend.close()  # the listener too: nothing to reconnect to
        assert _wait(lambda: bool(broken))
        assert "closed the connection; no backend came back within" in broken[0]
        device.reset()
        assert device.broken is not None and "reconnecting failed" in device.broken
        with pytest.raises(DeviceError, match="reconnecting failed"):
            device.activate(_context(memory, loop, [128], Interrupts()))
        # A backend back on the same socket: the next reset connects to it.
        backend.path.unlink()
        again = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
        again.path.rename(backend.path)
        device.reset()
        assert device.broken is None and again.connections == 1
    finally:
        device.close()


def test_a_backend_that_hangs_up_mid_request_is_an_error_not_a_crash(
    backend_factory: Callable[..., ScriptedBackend], memory: GuestMemory, loop: EventLoop
) -> None:
    backend = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
    backend.hang_up_on = Req.SET_VRING_ADDR
    device = blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
    try:
        device.ack_features(VIRTIO_F_VERSION_1)
        with pytest.raises(DeviceError, match="hung up"):
            device.activate(_context(memory, loop, [128], Interrupts()))
    finally:
        device.close()


def test_private_guest_memory_is_refused_naming_the_option(backend_factory: Callable[..., ScriptedBackend],
                                                           loop: EventLoop) -> None:
    backend = backend_factory(features=BLK_FEATURES, protocol=ALL_PROTOCOL)
    device = blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
    try:
        with GuestMemory.allocate([MemoryRange(0, 1 << 20)]) as private:
            device.ack_features(VIRTIO_F_VERSION_1)
            with pytest.raises(DeviceError, match="--memory shared=on"):
                device.activate(_context(private, loop, [128], Interrupts()))
    finally:
        device.close()


NET_BACKEND = VIRTIO_F_VERSION_1 | (1 << 0) | (1 << 1) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 22)


def test_net_frontend_config_and_features(backend_factory: Callable[..., ScriptedBackend], memory: GuestMemory,
                                          loop: EventLoop) -> None:
    backend = backend_factory(features=NET_BACKEND, protocol=p.protocol_mask(PF.REPLY_ACK, PF.MQ))
    config = NetConfig.parse(f"vhost_user=on,socket={backend.path},mac=12:34:56:78:9a:bc,offload_ufo=off")
    device = net.create_device("n0", config, loop)
    try:
        assert device.device_type == 1 and device.queue_max_sizes == (256, 256)
        mac, status, pairs, _mtu = net.CONFIG.unpack(device.config_space())
        assert (mac, status, pairs) == (bytes.fromhex("123456789abc"), 1, 1)
        offered = device.features()
        assert offered & net.VIRTIO_NET_F_MAC and offered & net.VIRTIO_NET_F_STATUS  # the frontend's own
        assert offered & (1 << 11) and not offered & (1 << 14)  # TSO kept, UFO off by the option
        assert not offered & (1 << 22)  # MQ: needs the control queue
        device.ack_features(VIRTIO_F_VERSION_1 | net.VIRTIO_NET_F_MAC | net.VIRTIO_NET_F_STATUS | (1 << 15))
        device.activate(_context(memory, loop, [256, 256], Interrupts()))
        set_features = next(payload for request, payload, _ in backend.log if request == Req.SET_FEATURES)
        # MAC and STATUS are not the backend's: they are not sent.
        assert p.unpack_u64(set_features) == VIRTIO_F_VERSION_1 | (1 << 15) | (1 << p.F_PROTOCOL_FEATURES)
        assert backend.requests().count(Req.SET_VRING_KICK) == 2
        assert Req.GET_CONFIG not in backend.requests()
    finally:
        device.close()


def test_net_server_mode_waits_for_the_backend_to_connect(tmp_path: Path, loop: EventLoop) -> None:
    path = tmp_path / "net.sock"
    config = NetConfig.parse(f"vhost_user=on,socket={path},vhost_mode=server")
    served: list[Req] = []

    def backend() -> None:
        deadline = time.monotonic() + 5
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(path))
            for _ in range(2):
                msg, _ = p.recv(conn)
                served.append(Req(msg.request))
                if msg.request == Req.GET_FEATURES:
                    p.send(conn, msg.reply(p.pack_u64(VIRTIO_F_VERSION_1)))
            time.sleep(0.2)

    thread = threading.Thread(target=backend)
    thread.start()
    device = net.create_device("n0", config, loop, accept_timeout=5)
    try:
        assert served == [Req.SET_OWNER, Req.GET_FEATURES]
        assert device.features() == VIRTIO_F_VERSION_1 | net.VIRTIO_NET_F_MAC | net.VIRTIO_NET_F_STATUS
    finally:
        thread.join()
        device.close()


def test_net_server_mode_times_out_with_a_clear_error(tmp_path: Path, loop: EventLoop) -> None:
    config = NetConfig.parse(f"vhost_user=on,socket={tmp_path / 'net.sock'},vhost_mode=server")
    with pytest.raises(DeviceError, match="no backend connected within"):
        net.create_device("n0", config, loop, accept_timeout=0.2)


@pytest.mark.parametrize(("option", "key"), [("tap=tap0", "tap"), ("mtu=1400", "mtu"), ("host_mac=12:34:56:78:9a:bd",
                                             "host_mac"), ("ip=10.0.0.1", "ip"), ("num_queues=4", "num_queues")])
def test_net_options_that_do_not_apply_are_refused(option: str, key: str) -> None:
    config = NetConfig.parse(f"vhost_user=on,socket=/s,{option}")
    with pytest.raises(DeviceError, match=key):
        net.check_net(config, "n0")


def test_fs_frontend_queues_and_config(backend_factory: Callable[..., ScriptedBackend], memory: GuestMemory,
                                       loop: EventLoop) -> None:
    backend = backend_factory(features=VIRTIO_F_VERSION_1 | 1, protocol=p.protocol_mask(PF.REPLY_ACK))
    device = fs.create_device("f0", "myfs", str(backend.path), num_queues=2, queue_size=512, event_loop=loop)
    try:
        assert isinstance(device, VhostUserDevice)
        assert device.device_type == 26
        assert device.queue_max_sizes == (512, 512, 512)  # hiprio + 2 request queues
        tag, queues = fs.CONFIG.unpack(device.config_space())
        assert (tag.rstrip(b"\0"), queues) == (b"myfs", 2)
        assert device.features() == VIRTIO_F_VERSION_1  # no NOTIFICATION: no notification queue
        device.ack_features(VIRTIO_F_VERSION_1)
        device.activate(_context(memory, loop, [512, 512, 512], Interrupts()))
        assert sorted(backend.call) == [0, 1, 2]
    finally:
        device.close()
