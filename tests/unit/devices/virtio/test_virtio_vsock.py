"""virtio-vsock with the hybrid (Unix socket) backend, driven by a fake guest driver on real
guest memory and eventfds, against real Unix sockets on the host side: handshakes both ways,
refusals, data both ways with credit accounting, shutdown, many streams, hostile headers."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from virtio_driver import Harness, wait_for
from vmmkit_devices.virtio.vsock.connection import BUF_ALLOC, CREDIT_UPDATE_THRESHOLD
from vmmkit_devices.virtio.vsock.device import VirtioVsockType, VsockDevice
from vmmkit_devices.virtio.vsock.muxer import FIRST_LOCAL_PORT
from vmmkit_devices.virtio.vsock.packet import (
    HEADER_SIZE,
    HOST_CID,
    MAX_PAYLOAD,
    SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
    Header,
    Op,
)
from vsock_guest import GUEST_CID, FakeGuest

from vmmkit.config import VmConfig, VsockConfig
from vmmkit.errors import DeviceError


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vsk", dir="/tmp"))  # short: AF_UNIX paths are < 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vsock(sock_dir: Path, activate: Callable[..., Harness]) -> Iterator[tuple[VsockDevice, FakeGuest, Path]]:
    path = sock_dir / "v.sock"
    device = VsockDevice("_vsock0", GUEST_CID, str(path))
    h = activate(device, sizes=[64, 64, 8])
    yield device, FakeGuest(h), path


def host_connect(path: Path, port: int, extra: bytes = b"") -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(path))
    client.sendall(b"CONNECT %d\n" % port + extra)
    return client


def read_line(stream: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = stream.recv(1)
        if not byte:
            break
        line += byte
    return line


def recv_exactly(stream: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = stream.recv(size - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def closed_by_peer(stream: socket.socket) -> bool:
    """Whether the device closed ``stream`` (EOF, or a reset when it left bytes unread)."""
    try:
        return stream.recv(100) == b""
    except ConnectionResetError:
        return True


def accept_host_stream(guest: FakeGuest, path: Path, port: int) -> tuple[socket.socket, int]:
    """A host CONNECT to guest ``port`` the guest accepts: (the host stream, the host port)."""
    client = host_connect(path, port)
    request, _ = guest.expect(Op.REQUEST, dst_port=port)
    guest.send(Op.RESPONSE, port, request.src_port)
    assert read_line(client) == b"OK %d\n" % request.src_port
    return client, request.src_port


# -- the device ---------------------------------------------------------------------------------


def test_config_space_features_and_type(sock_dir: Path) -> None:
    device = VsockDevice("_vsock0", 0x1_0000_0003 & 0xFFFF_FFFF, str(sock_dir / "a.sock"))
    try:
        assert device.device_type == 19 and device.queue_max_sizes == (256, 256, 256)
        assert device.config_space() == (3).to_bytes(8, "little")
        assert device.describe() == {"cid": 3, "socket": str(sock_dir / "a.sock")}
        assert (sock_dir / "a.sock").is_socket()
    finally:
        device.close()
    assert not (sock_dir / "a.sock").exists()  # removed when the device goes


def test_an_existing_socket_path_is_refused_by_name(sock_dir: Path) -> None:
    (sock_dir / "taken").write_bytes(b"")
    with pytest.raises(DeviceError, match="taken exists"):
        VsockDevice("_vsock0", 3, str(sock_dir / "taken"))
    with pytest.raises(DeviceError, match="reserved"):
        VsockDevice("_vsock0", 2, str(sock_dir / "x"))


def test_requested_from_the_vsock_section(sock_dir: Path) -> None:
    assert VirtioVsockType.requests(VmConfig()) == []
    config = VmConfig(vsock=VsockConfig(cid=5, socket=str(sock_dir / "s"), id="vs"))
    (request,) = VirtioVsockType.requests(config)
    assert (request.type, request.id, request.config.cid) == ("virtio-vsock", "vs", 5)


# -- host-initiated -----------------------------------------------------------------------------


def test_host_connect_handshake_and_data_both_ways(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    device, guest, path = vsock
    client = host_connect(path, 1234, extra=b"early")  # bytes after the line wait for the guest
    request, _ = guest.expect(Op.REQUEST)
    assert (request.src_cid, request.dst_cid, request.dst_port) == (HOST_CID, GUEST_CID, 1234)
    assert request.src_port >= FIRST_LOCAL_PORT and request.type == 1 and request.buf_alloc == BUF_ALLOC
    assert guest.quiet() == []  # no data before the guest answers
    guest.send(Op.RESPONSE, 1234, request.src_port)
    assert read_line(client) == b"OK %d\n" % request.src_port
    header, payload = guest.expect(Op.RW)
    assert payload == b"early" and (header.src_port, header.dst_port) == (request.src_port, 1234)
    guest.send(Op.RW, 1234, request.src_port, b"hello host")
    assert recv_exactly(client, 10) == b"hello host"
    assert device.counters()["connections"] == 1
    assert device.counters()["tx_bytes"] == 10 and device.counters()["rx_bytes"] == 5


def test_host_connect_refused_by_the_guest(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    _, guest, path = vsock
    client = host_connect(path, 99)
    request, _ = guest.expect(Op.REQUEST)
    guest.send(Op.RST, 99, request.src_port)
    assert client.recv(100) == b""  # closed, no OK


@pytest.mark.parametrize("line", [b"HELLO\n", b"CONNECT\n", b"CONNECT -1\n", b"CONNECT 4294967296\n",
                                  b"CONNECT 12 \n", b"connect 12\n", b"CONNECT " + b"1" * 40 + b"\n"])
def test_a_bad_connect_line_closes_the_stream(vsock: tuple[VsockDevice, FakeGuest, Path], line: bytes) -> None:
    _, guest, path = vsock
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(path))
    client.sendall(line)
    assert closed_by_peer(client)
    assert guest.quiet() == []


def test_a_connect_line_in_pieces(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    _, guest, path = vsock
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    client.sendall(b"CONN")
    assert guest.quiet() == []
    client.sendall(b"ECT 77\n")
    request, _ = guest.expect(Op.REQUEST, dst_port=77)


def test_a_guest_that_never_answers_is_reset(vsock: tuple[VsockDevice, FakeGuest, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from vmmkit_devices.virtio.vsock import connection

    monkeypatch.setattr(connection, "CONNECT_TIMEOUT", 0.3)
    _, guest, path = vsock
    client = host_connect(path, 5)
    request, _ = guest.expect(Op.REQUEST)
    rst, _ = guest.expect(Op.RST, timeout=5)
    assert (rst.src_port, rst.dst_port) == (request.src_port, 5)
    assert client.recv(10) == b""


# -- guest-initiated ----------------------------------------------------------------------------


def test_guest_connect_reaches_socket_underscore_port(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    _, guest, path = vsock
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{path}_5000")
    listener.listen()
    listener.settimeout(5)
    guest.send(Op.REQUEST, 40000, 5000)
    response, _ = guest.expect(Op.RESPONSE)
    assert (response.src_port, response.dst_port, response.src_cid, response.dst_cid) == (5000, 40000, 2, GUEST_CID)
    server, _ = listener.accept()
    server.settimeout(5)
    guest.send(Op.RW, 40000, 5000, b"from the guest")
    assert recv_exactly(server, 14) == b"from the guest"
    server.sendall(b"from the host")
    _, payload = guest.expect(Op.RW)
    assert payload == b"from the host"


def test_guest_connect_with_nobody_listening_gets_rst(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    device, guest, _ = vsock
    guest.send(Op.REQUEST, 40001, 6000)
    rst, _ = guest.expect(Op.RST)
    assert (rst.src_port, rst.dst_port, rst.dst_cid) == (6000, 40001, GUEST_CID)
    assert device.counters()["connections_refused"] == 1


# -- credit -------------------------------------------------------------------------------------


def test_host_to_guest_data_stops_at_the_guest_credit(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    _, guest, path = vsock
    guest.buf_alloc = 10000
    client, host_port = accept_host_stream(guest, path, 7)
    client.sendall(os.urandom(30000))
    got = 0
    while got < 10000:
        header, payload = guest.expect(Op.RW)
        got += len(payload)
    assert got == 10000
    guest.expect(Op.CREDIT_REQUEST)  # out of credit: asks once
    assert [h.op for h, _ in guest.quiet()] == []
    guest.consume(7, 10000)
    guest.credit_update(7, host_port)
    while got < 20000:
        got += len(guest.expect(Op.RW)[1])
    assert got == 20000


def test_guest_to_host_credit_updates_and_overrun(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    device, guest, path = vsock
    client, host_port = accept_host_stream(guest, path, 8)
    chunk = os.urandom(MAX_PAYLOAD)
    for _ in range(2):  # 128 KiB, read by the host at once: the device reports fwd_cnt unasked
        guest.send(Op.RW, 8, host_port, chunk)
    assert recv_exactly(client, 2 * MAX_PAYLOAD) == chunk * 2
    update, _ = guest.expect(Op.CREDIT_UPDATE)
    assert update.fwd_cnt >= CREDIT_UPDATE_THRESHOLD and update.buf_alloc == BUF_ALLOC
    guest.send(Op.CREDIT_REQUEST, 8, host_port)
    assert guest.expect(Op.CREDIT_UPDATE)[0].fwd_cnt == 2 * MAX_PAYLOAD

    # The host stops reading: the device buffers up to BUF_ALLOC, then a guest that ignores
    # its credit is reset.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = 0
    while True:
        guest.send(Op.RW, 8, host_port, chunk)
        sent += len(chunk)
        packets = guest.quiet(0.05)
        if any(h.op == Op.RST for h, _ in packets):
            break
        assert sent < 64 * BUF_ALLOC, "the device never refused the overrun"
    assert device.counters()["connections_reset"] == 1
    assert not device.broken


# -- closing ------------------------------------------------------------------------------------


def test_guest_shutdown_both_is_answered_with_rst_after_the_flush(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    _, guest, path = vsock
    client, host_port = accept_host_stream(guest, path, 9)
    guest.send(Op.RW, 9, host_port, b"last words")
    guest.send(Op.SHUTDOWN, 9, host_port, flags=SHUTDOWN_BOTH)
    rst, _ = guest.expect(Op.RST)
    assert (rst.src_port, rst.dst_port) == (host_port, 9)
    assert recv_exactly(client, 100) == b"last words"  # then EOF


def test_guest_half_close_shuts_the_host_side_for_writing(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    _, guest, path = vsock
    client, host_port = accept_host_stream(guest, path, 10)
    guest.send(Op.SHUTDOWN, 10, host_port, flags=SHUTDOWN_SEND)
    assert client.recv(10) == b""  # EOF for the host reader
    client.sendall(b"reply")  # the other direction still works
    assert guest.expect(Op.RW)[1] == b"reply"


def test_host_half_close_and_close(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    device, guest, path = vsock
    client, host_port = accept_host_stream(guest, path, 11)
    client.sendall(b"bye")
    client.shutdown(socket.SHUT_WR)
    assert guest.expect(Op.RW)[1] == b"bye"
    assert guest.expect(Op.SHUTDOWN)[0].flags == SHUTDOWN_SEND
    guest.send(Op.RW, 11, host_port, b"answer")  # the guest may still write
    assert recv_exactly(client, 6) == b"answer"
    client.close()
    guest.send(Op.SHUTDOWN, 11, host_port, flags=SHUTDOWN_BOTH)
    guest.expect(Op.RST)
    wait_for(lambda: not device.muxer.connections, what="the connection to go")


def test_host_close_sends_shutdown_both_then_guest_rst_ends_it(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    device, guest, path = vsock
    client, host_port = accept_host_stream(guest, path, 12)
    client.close()
    assert guest.expect(Op.SHUTDOWN)[0].flags == SHUTDOWN_BOTH
    guest.send(Op.RST, 12, host_port)
    wait_for(lambda: not device.muxer.connections, what="the connection to go")


def test_device_reset_closes_every_host_stream(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    device, guest, path = vsock
    client, _ = accept_host_stream(guest, path, 13)
    device.reset()
    assert client.recv(10) == b""
    assert not device.muxer.connections


# -- many streams -------------------------------------------------------------------------------


def test_many_concurrent_streams_echo(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    """Eight host streams at once, each 256 KiB each way, through a guest that echoes."""
    device, guest, path = vsock
    streams = 8
    size = 256 * 1024
    clients = {}
    for index in range(streams):
        client, host_port = accept_host_stream(guest, path, 100 + index)
        clients[100 + index] = (client, host_port)
    received: dict[int, bytearray] = {port: bytearray() for port in clients}
    datas = {port: os.urandom(size) for port in clients}
    errors: list[BaseException] = []
    deadline = time.monotonic() + 60

    def host(port: int) -> None:
        client = clients[port][0]
        client.settimeout(30)
        try:
            client.sendall(datas[port])
            client.shutdown(socket.SHUT_WR)
            received[port] += recv_exactly(client, size + 1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(port,)) for port in clients]
    for thread in threads:
        thread.start()
    echoed = dict.fromkeys(clients, 0)
    pending: dict[int, bytes] = {port: b"" for port in clients}
    eof: set[int] = set()
    while any(count <= size for count in echoed.values()) and time.monotonic() < deadline:
        guest.poll()
        inbox, guest.inbox = guest.inbox, []
        for header, payload in inbox:
            port = header.dst_port
            if header.op == Op.RW:
                pending[port] += payload
                guest.consume(port, len(payload))
            elif header.op == Op.SHUTDOWN:
                eof.add(port)
        for port, data in pending.items():  # echo within the device's credit to the guest
            if data:
                piece = data[:MAX_PAYLOAD]
                guest.send(Op.RW, port, clients[port][1], piece)
                pending[port] = data[len(piece):]
                echoed[port] += len(piece)
            elif port in eof and echoed[port] == size:
                guest.send(Op.SHUTDOWN, port, clients[port][1], flags=SHUTDOWN_BOTH)
                echoed[port] += 1  # once
        if not inbox:
            time.sleep(0.001)
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    for port in clients:
        assert bytes(received[port]) == datas[port], port
    wait_for(lambda: not device.muxer.connections, what="every stream to close")
    assert device.counters()["rx_bytes"] == device.counters()["tx_bytes"] == streams * size


# -- hostile headers ----------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "answered"), [
    ({"dst_cid": 7}, True),
    ({"type_": 2}, True),  # SEQPACKET was not offered
    ({"op": 0}, True),
    ({"op": 99}, True),
    ({"src_cid": 9}, False),  # forged source: dropped, not answered
])
def test_bad_headers_get_rst_or_are_dropped(vsock: tuple[VsockDevice, FakeGuest, Path],
                                            fields: dict[str, int], answered: bool) -> None:
    device, guest, _ = vsock
    op = fields.pop("op", Op.REQUEST)
    guest.send_raw(guest.header(op, 40000, 5000, **fields).pack())
    got = guest.quiet(0.3)
    assert [h.op for h, _ in got] == ([Op.RST] if answered else [])
    assert device.broken is None and device.counters()["tx_refused"] == 1


def test_lengths_beyond_the_buffer_or_limit_reset_the_stream(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    device, guest, path = vsock
    client, host_port = accept_host_stream(guest, path, 14)
    guest.send_raw(guest.header(Op.RW, 14, host_port, length=100).pack() + b"x" * 10)
    guest.expect(Op.RST)
    assert client.recv(10) == b""
    guest.send_raw(guest.header(Op.RW, 14, 1, length=MAX_PAYLOAD + 1).pack() + b"x" * 10)
    guest.expect(Op.RST)
    guest.send_raw(guest.header(Op.CREDIT_UPDATE, 14, 1, length=5).pack() + b"x" * 5)
    guest.expect(Op.RST)
    assert device.broken is None


def test_packets_of_no_connection_get_rst_but_rst_does_not(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    _, guest, _ = vsock
    for op in (Op.RW, Op.RESPONSE, Op.SHUTDOWN, Op.CREDIT_UPDATE, Op.CREDIT_REQUEST):
        guest.send(op, 1, 2)
    guest.send(Op.RST, 1, 2)
    assert [h.op for h, _ in guest.quiet(0.3)] == [Op.RST] * 5


def test_a_tx_chain_shorter_than_a_header_fails_the_device(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    device, guest, _ = vsock
    guest.send_raw(b"\x00" * (HEADER_SIZE - 1), split=False)
    wait_for(lambda: device.broken is not None, what="the device to fail")
    assert guest.h.errors


def test_an_rx_chain_too_small_for_a_header_fails_the_device(sock_dir: Path,
                                                            activate: Callable[..., Harness]) -> None:
    device = VsockDevice("_vsock0", GUEST_CID, str(sock_dir / "v.sock"))
    h = activate(device, sizes=[8, 8, 8])
    small = h.alloc(16)
    h.submit(0, [(small, 16, True)])
    guest_tx = h.alloc(HEADER_SIZE)
    h.memory.write(guest_tx, Header(GUEST_CID, HOST_CID, 1, 2, 0, 1, Op.RW, 0, 0, 0).pack())
    h.submit(1, [(guest_tx, HEADER_SIZE, False)])  # owed an RST, which does not fit
    wait_for(lambda: device.broken is not None, what="the device to fail")


def test_pause_holds_host_streams_until_resume(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    device, guest, path = vsock
    client, host_port = accept_host_stream(guest, path, 15)
    device.pause()
    client.sendall(b"while paused")
    late = host_connect(path, 16)
    assert guest.quiet(0.3) == []
    device.resume()
    assert guest.expect(Op.RW)[1] == b"while paused"
    guest.expect(Op.REQUEST, dst_port=16)
    late.close()


def test_rst_waits_until_the_guest_data_reached_a_slow_host(vsock: tuple[VsockDevice, FakeGuest, Path]) -> None:
    device, guest, path = vsock
    client, host_port = accept_host_stream(guest, path, 17)
    client.shutdown(socket.SHUT_WR)
    assert guest.expect(Op.SHUTDOWN)[0].flags == SHUTDOWN_SEND
    data = os.urandom(BUF_ALLOC)  # the whole credit: more than a Unix socket buffer holds
    for offset in range(0, len(data), MAX_PAYLOAD):
        guest.send(Op.RW, 17, host_port, data[offset:offset + MAX_PAYLOAD])
    guest.send(Op.SHUTDOWN, 17, host_port, flags=SHUTDOWN_SEND)  # nothing flows either way now
    assert Op.RST not in [h.op for h, _ in guest.quiet(0.2)]  # credit updates at most: data is waiting
    assert recv_exactly(client, len(data) + 1) == data  # the host reads it all, then EOF
    guest.expect(Op.RST)
    assert "connections_reset" not in device.counters()  # a clean end, not a reset
