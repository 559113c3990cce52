"""Guest-controlled offsets, sizes and values never raise out of a device."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import structlog
from devices_support import FACTORIES, RecordingLine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from linux_8250 import Port, autoconfig
from vmmkit_devices._regs import MAX_ACCESS
from vmmkit_devices.console.backends import NullBackend
from vmmkit_devices.legacy.serial import Serial16550

from vmmkit.device import Device


@pytest.fixture(params=sorted(FACTORIES))
def device(request: pytest.FixtureRequest) -> Iterator[Device]:
    dev = FACTORIES[request.param]()
    with structlog.testing.capture_logs():
        yield dev
    dev.close()


def _length(dev: Device) -> int:
    return int(getattr(dev, "length", 1))


def test_every_offset_and_size(device: Device) -> None:
    length = _length(device)
    offsets = [*range(-2, length + 3), 0xFF, 0xFFFF, 2**32, 2**64 + 1]
    for offset in offsets:
        for size in (-1, 0, 1, 2, 3, 4, 8, 9, 16, 2**31):
            data = device.read(offset, size)
            assert isinstance(data, bytes)
            assert len(data) == min(max(size, 0), MAX_ACCESS)
        for width in range(0, 10):
            for fill in (0x00, 0xFF, 0xA5):
                device.write(offset, bytes((fill,)) * width)
    assert getattr(device, "errors", 0) == 0


access = st.tuples(
    st.booleans(),
    st.integers(min_value=-1, max_value=9),
    st.sampled_from([1, 2, 4, 8, 1, 1, 1]),
    st.binary(min_size=1, max_size=8),
)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(access, max_size=200))
def test_random_accesses(kind: str, ops: list[tuple[bool, int, int, bytes]]) -> None:
    dev = FACTORIES[kind]()
    try:
        with structlog.testing.capture_logs():
            for is_read, offset, size, data in ops:
                if is_read:
                    assert len(dev.read(offset, size)) == size
                else:
                    dev.write(offset, data[:size])
            dev.reset()
        assert getattr(dev, "errors", 0) == 0
    finally:
        dev.close()


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 255)), max_size=300))
def test_serial_after_random_writes_and_reset_is_a_16550a(ops: list[tuple[int, int]]) -> None:
    uart = Serial16550("serial", NullBackend("serial"), RecordingLine())
    try:
        for offset, value in ops:
            uart.write(offset, bytes((value,)))
            uart.receive(bytes((value,)))
        uart.reset()
        assert autoconfig(Port(uart)) == "16550A"
    finally:
        uart.close()


def test_serial_host_input_races_the_guest() -> None:
    """Event-loop input and vCPU reads at once: no byte lost, duplicated or reordered."""
    uart = Serial16550("serial", NullBackend("serial"), RecordingLine())
    port = Port(uart)
    port.outb(1, 0x0F)
    payload = bytes(i % 256 for i in range(20000))
    got = bytearray()

    def host() -> None:
        sent = 0
        while sent < len(payload):
            room = uart.room()
            if room:
                chunk = payload[sent : sent + min(room, 97)]
                uart.receive(chunk)
                sent += len(chunk)

    thread = threading.Thread(target=host)
    thread.start()
    while len(got) < len(payload):
        port.inb(2)
        if port.inb(5) & 0x01:
            got.append(port.inb(0))
        port.outb(0, 0x41)
    thread.join()
    uart.close()
    assert bytes(got) == payload
    assert uart.errors == 0
