"""The migration wire protocol's framing (vmmkit.migration.protocol), over real socket pairs."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from vmmkit.migration import protocol
from vmmkit.migration.protocol import Command, PeerError, ProtocolError


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_a_request_and_its_ok(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    protocol.send_request(a, Command.CONFIG, b'{"x":1}')
    command, length, fds = protocol.read_request(b)
    assert (command, length, fds) == (Command.CONFIG, 7, [])
    assert protocol.read_json(b, length, "CONFIG") == {"x": 1}
    b.sendall(protocol.pack_response(protocol.OK))
    protocol.read_response(a, "CONFIG")


def test_the_header_layout() -> None:
    header = protocol.pack_request(Command.MEMORY, 0x1122)
    assert len(header) == protocol.HEADER_SIZE == 16
    assert header == b"VMKQ" + struct.pack("<HHQ", 3, 0, 0x1122)
    assert protocol.pack_response(protocol.ERROR, "no") == b"VMKA" + struct.pack("<HHQ", 1, 0, 2) + b"no"


def test_an_error_answer_carries_the_message(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(protocol.pack_response(protocol.ERROR, "slot 3 was not announced"))
    with pytest.raises(PeerError, match="the destination refused MEMORY: slot 3 was not announced"):
        protocol.read_response(a, "MEMORY")


@pytest.mark.parametrize(("header", "message"), [
    (b"VMKX" + struct.pack("<HHQ", 1, 0, 0), "not a vmmkit migration request"),
    (b"VMKQ" + struct.pack("<HHQ", 99, 0, 0), "unknown command 99"),
    (b"VMKQ" + struct.pack("<HHQ", 1, 4, 0), "reserved"),
    (b"VMKQ" + b"\0" * 4, "16 bytes"),
])
def test_malformed_requests_are_refused(header: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        protocol.unpack_request(header)


def test_lengths_are_bounded_before_anything_is_read(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with pytest.raises(ProtocolError, match="more than"):
        protocol.read_json(b, protocol.MAX_JSON + 1, "STATE")
    a.sendall(b"VMKA" + struct.pack("<HHQ", 0, 0, protocol.MAX_MESSAGE + 1))
    with pytest.raises(ProtocolError, match="announces"):
        protocol.read_response(b, "START")
    a.sendall(b"VMKA" + struct.pack("<HHQ", 7, 0, 0))
    with pytest.raises(ProtocolError, match="not a vmmkit migration response"):
        protocol.read_response(b, "START")


def test_end_of_stream_in_the_middle_is_named(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"VMKQ\x01")
    a.close()
    with pytest.raises(ProtocolError, match="closed the connection in the middle of a request header"):
        protocol.read_request(b)


@pytest.mark.parametrize(("document", "message"), [
    ({"protocol": "qemu", "version": 1, "local": False}, "not a vmmkit-migration stream"),
    ({"protocol": "vmmkit-migration", "version": 2, "vmmkit": "9.0", "local": False},
     "protocol version 2 .*this receiver speaks version 1"),
    ({"protocol": "vmmkit-migration", "version": 1, "local": "yes"}, "'local' must be true or false"),
])
def test_start_checks_protocol_and_version(document: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        protocol.check_start(document)
    assert protocol.check_start(protocol.decode_json(protocol.start_payload("1", local=True), "START")) is True


def test_json_payloads_must_be_objects() -> None:
    with pytest.raises(ProtocolError, match="expected a JSON object"):
        protocol.decode_json(b"[1]", "CONFIG")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        protocol.decode_json(b"{", "CONFIG")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        protocol.decode_json(b"[" * 100000, "CONFIG")


def test_memory_tables() -> None:
    table = [(0, 0x10000), (0x100000, 0x30000)]
    assert protocol.unpack_ranges(protocol.pack_ranges(table)) == table
    with pytest.raises(ProtocolError, match="whole number"):
        protocol.unpack_ranges(bytes(17))
    assert protocol.unpack_memory_fd(protocol.pack_memory_fd(2, 0x1000, 0x2000)) == (2, 0x1000, 0x2000, 0)
    assert len(protocol.pack_memory_fd(2, 0x1000, 0x2000)) == 24  # the common case keeps its old size
    at = protocol.pack_memory_fd(3, 1 << 32, 0x2000, 1 << 30)  # a memory zone's second piece
    assert len(at) == 32 and protocol.unpack_memory_fd(at) == (3, 1 << 32, 0x2000, 1 << 30)
    with pytest.raises(ProtocolError, match="expected 24"):
        protocol.unpack_memory_fd(bytes(8))


def test_a_memfd_travels_with_its_request() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    fd = os.memfd_create("test-ram")
    try:
        os.write(fd, b"guest ram")
        sender = threading.Thread(target=protocol.send_request,
                                  args=(a, Command.MEMORY_FD, protocol.pack_memory_fd(0, 0, 4096)),
                                  kwargs={"fds": [fd]})
        sender.start()
        command, length, fds = protocol.read_request(b, allow_fds=True)
        sender.join()
        assert command is Command.MEMORY_FD and len(fds) == 1
        assert os.pread(fds[0], 9, 0) == b"guest ram"
        assert os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino
        assert protocol.unpack_memory_fd(protocol.recv_exact(b, length, "MEMORY_FD")) == (0, 0, 4096, 0)
        protocol.close_fds(fds)
    finally:
        os.close(fd)
        a.close()
        b.close()
