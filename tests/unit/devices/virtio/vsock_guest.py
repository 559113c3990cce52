"""A fake guest vsock driver for the device tests: it keeps the RX queue stocked with buffers,
sends packets on the TX queue from a small pool of reused buffers, and parses what the device
puts in the RX buffers. Drives :class:`VsockDevice` through the fake split-virtqueue driver of
:mod:`virtio_driver`, against real Unix sockets on the host side."""

from __future__ import annotations

import time
from typing import Any

from virtio_driver import Harness
from vmmkit_devices.virtio.vsock.connection import BUF_ALLOC
from vmmkit_devices.virtio.vsock.packet import HEADER_SIZE, HOST_CID, TYPE_STREAM, Header, Op

RX, TX, EVENT = 0, 1, 2
GUEST_CID = 3


class FakeGuest:
    def __init__(self, h: Harness, *, rx_buffers: int = 32, rx_payload: int = 4096, tx_buffers: int = 16,
                 buf_alloc: int = BUF_ALLOC) -> None:
        self.h = h
        self.buf_alloc = buf_alloc
        self.rx_size = HEADER_SIZE + rx_payload
        self.rx_heads: dict[int, int] = {}
        for _ in range(rx_buffers):
            self._post_rx(h.alloc(self.rx_size))
        h.kick(RX)
        self.tx_free = [h.alloc(HEADER_SIZE + 65536) for _ in range(tx_buffers)]
        self.tx_heads: dict[int, int] = {}
        self.inbox: list[tuple[Header, bytes]] = []
        self.fwd: dict[int, int] = {}  # guest port -> bytes the guest consumed (its fwd_cnt)

    def _post_rx(self, gpa: int) -> None:
        head = self.h.driver[RX].add([(gpa, self.rx_size, True)])
        self.rx_heads[head] = gpa

    # -- sending -------------------------------------------------------------------------

    def header(self, op: int, src_port: int, dst_port: int, *, length: int = 0, flags: int = 0,
               src_cid: int = GUEST_CID, dst_cid: int = HOST_CID, type_: int = TYPE_STREAM,
               buf_alloc: int | None = None, fwd_cnt: int | None = None) -> Header:
        return Header(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags,
                      self.buf_alloc if buf_alloc is None else buf_alloc,
                      self.fwd.get(src_port, 0) if fwd_cnt is None else fwd_cnt)

    def send_raw(self, data: bytes, *, split: bool = True) -> None:
        gpa = self._tx_buffer()
        self.h.memory.write(gpa, data)
        if split and len(data) > HEADER_SIZE:
            buffers = [(gpa, HEADER_SIZE, False), (gpa + HEADER_SIZE, len(data) - HEADER_SIZE, False)]
        else:
            buffers = [(gpa, max(len(data), 1), False)]
        head = self.h.driver[TX].add(buffers)
        self.tx_heads[head] = gpa
        self.h.kick(TX)

    def send(self, op: int, src_port: int, dst_port: int, payload: bytes = b"", **fields: Any) -> None:
        fields.setdefault("length", len(payload))
        self.send_raw(self.header(op, src_port, dst_port, **fields).pack() + payload)

    def _tx_buffer(self, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while not self.tx_free:
            self.reclaim_tx()
            if time.monotonic() > deadline:
                raise AssertionError("the device does not consume TX buffers")
            time.sleep(0.001)
        return self.tx_free.pop()

    def reclaim_tx(self) -> None:
        for head, _ in self.h.driver[TX].take_used():
            self.tx_free.append(self.tx_heads.pop(head))

    # -- receiving -----------------------------------------------------------------------

    def poll(self) -> None:
        used = self.h.driver[RX].take_used()
        for head, length in used:
            gpa = self.rx_heads.pop(head)
            data = self.h.memory.read(gpa, length)
            header = Header.unpack(data)
            payload = data[HEADER_SIZE:HEADER_SIZE + header.len]
            assert length == HEADER_SIZE + header.len, (length, header)
            self.inbox.append((header, payload))
            self._post_rx(gpa)
        if used:
            self.h.kick(RX)
        self.reclaim_tx()

    def expect(self, op: int | None = None, timeout: float = 5.0, **match: int) -> tuple[Header, bytes]:
        """The first received packet (of ``op`` with the ``match`` fields) not yet taken."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            for index, (header, payload) in enumerate(self.inbox):
                if (op is None or header.op == op) and all(getattr(header, k) == v for k, v in match.items()):
                    del self.inbox[index]
                    return header, payload
            if time.monotonic() > deadline:
                raise AssertionError(f"no packet op={op} {match} from the device; got {self.inbox}")
            time.sleep(0.001)

    def quiet(self, seconds: float = 0.2) -> list[tuple[Header, bytes]]:
        """What arrives within ``seconds``."""
        time.sleep(seconds)
        self.poll()
        got, self.inbox = self.inbox, []
        return got

    def consume(self, port: int, count: int) -> None:
        """The guest application read ``count`` bytes on ``port``: its fwd_cnt moves."""
        self.fwd[port] = (self.fwd.get(port, 0) + count) & 0xFFFF_FFFF

    def credit_update(self, port: int, peer_port: int) -> None:
        self.send(Op.CREDIT_UPDATE, port, peer_port)
