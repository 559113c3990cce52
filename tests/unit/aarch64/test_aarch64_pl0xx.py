"""The PL011 UART and the PL031 RTC, register by register."""

from __future__ import annotations

import struct

from vmmkit_devices.legacy import pl011 as U
from vmmkit_devices.legacy import rtc_pl031 as R


class Backend:
    """A console backend that keeps what the guest writes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ready = 0

    def write(self, data: bytes) -> None:
        self.out += data

    def input_ready(self) -> None:
        self.ready += 1

    def attach(self, loop, sink) -> None:
        pass

    def close(self) -> None:
        pass

    def counters(self) -> dict:
        return {}


class Line:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def trigger(self) -> None:
        pass

    def set_level(self, high: bool) -> None:
        self.levels.append(high)


def r32(dev, offset: int) -> int:
    return struct.unpack("<I", dev.read(offset, 4))[0]


def w32(dev, offset: int, value: int) -> None:
    dev.write(offset, struct.pack("<I", value))


def uart() -> tuple[U.Pl011, Backend, Line]:
    backend, line = Backend(), Line()
    return U.Pl011("_serial", backend, line, irq=33), backend, line  # type: ignore[arg-type]


def test_pl011_transmits_and_reports_an_empty_fifo() -> None:
    dev, backend, _ = uart()
    for ch in b"hi\n":
        assert not r32(dev, U.FR) & U.FR_TXFF
        w32(dev, U.DR, ch)
    assert bytes(backend.out) == b"hi\n"
    assert r32(dev, U.FR) & (U.FR_TXFE | U.FR_RXFE) == U.FR_TXFE | U.FR_RXFE


def test_pl011_primecell_ids() -> None:
    dev, _, _ = uart()
    ids = [r32(dev, 0xFE0 + 4 * i) for i in range(8)]
    assert ids == [0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]


def test_pl011_receive_and_its_interrupt() -> None:
    dev, backend, line = uart()
    w32(dev, U.IMSC, U.INT_RX)
    dev.receive(b"ab")
    assert line.levels[-1] is True
    assert r32(dev, U.MIS) & U.INT_RX
    assert r32(dev, U.FR) & U.FR_RXFF  # FIFO off: one byte fills it
    assert r32(dev, U.DR) == ord("a")
    assert r32(dev, U.DR) == ord("b")
    assert r32(dev, U.FR) & U.FR_RXFE
    assert line.levels[-1] is False
    assert backend.ready >= 1


def test_pl011_tx_interrupt_is_cleared_by_icr() -> None:
    dev, _, line = uart()
    w32(dev, U.IMSC, U.INT_TX)
    w32(dev, U.DR, 0x41)
    assert line.levels[-1] is True
    w32(dev, U.ICR, U.INT_TX)
    assert line.levels[-1] is False
    assert r32(dev, U.RIS) & U.INT_TX == 0


def test_pl011_narrow_and_bad_accesses() -> None:
    dev, _, _ = uart()
    w32(dev, U.IBRD, 0x1234)
    assert dev.read(U.IBRD, 1) == b"\x34"
    assert dev.read(U.IBRD + 1, 1) == b"\x12"
    assert dev.read(U.IBRD + 2, 4) == b"\xff" * 4  # straddles two registers
    assert dev.read(0x1000, 4) == b"\xff" * 4
    dev.write(0x2000, b"\0")  # ignored, no exception


def test_pl031_counts_host_seconds_and_can_be_set() -> None:
    now = [1_700_000_000.2]
    dev = R.Pl031("_rtc", Line(), irq=34, clock=lambda: now[0])
    assert r32(dev, R.DR) == 1_700_000_000
    w32(dev, R.LR, 1000)
    now[0] += 5
    assert r32(dev, R.DR) == 1005
    assert r32(dev, R.CR) == 1
    assert [r32(dev, 0xFE0 + 4 * i) for i in range(4)] == [0x31, 0x10, 0x14, 0x00]


def test_pl031_match_interrupt() -> None:
    now = [100.0]
    line = Line()
    dev = R.Pl031("_rtc", line, irq=34, clock=lambda: now[0])
    w32(dev, R.LR, 50)
    w32(dev, R.MR, 52)
    w32(dev, R.IMSC, 1)
    assert r32(dev, R.RIS) == 0
    now[0] += 2
    assert r32(dev, R.RIS) == 1 and r32(dev, R.MIS) == 1
    assert line.levels[-1] is True
    w32(dev, R.ICR, 1)
    assert r32(dev, R.RIS) == 0 and line.levels[-1] is False
    dev.close()
