"""The 16550A UART through its register interface, as Linux's 8250 driver drives it."""

from __future__ import annotations

import os

import pytest
from devices_support import FakeContext, RecordingLine, wait_for
from linux_8250 import (
    FCR,
    FCR_CLEAR_RCVR,
    FCR_ENABLE_FIFO,
    IER,
    IER_MSI,
    IER_RDI,
    IER_RLSI,
    IER_THRI,
    IIR,
    IIR_NO_INT,
    LCR,
    LCR_CONF_MODE_A,
    LSR,
    LSR_DR,
    LSR_OE,
    LSR_TEMT,
    LSR_THRE,
    MCR,
    MCR_DTR,
    MCR_LOOP,
    MCR_OUT2,
    MSR,
    RX,
    SCR,
    TX,
    Port,
    autoconfig,
    size_fifo,
)
from vmmkit_devices.console.backends import ConsoleBackend, FileBackend, NullBackend
from vmmkit_devices.legacy.serial import (
    FIFO_SIZE,
    RX_BUFFER,
    Serial16550,
    Serial16550Type,
)

from vmmkit.config import SerialConfig, VmConfig
from vmmkit.device import DeviceRequest
from vmmkit.hypervisor import PortSink


class RecordingBackend(ConsoleBackend):
    """Output kept in memory."""

    mode = "Test"

    def __init__(self) -> None:
        super().__init__("serial")
        self.output = bytearray()
        self.output_fd = os.open(os.devnull, os.O_WRONLY)

    def write(self, data: bytes) -> None:
        self.output += data
        self.tx_bytes += len(data)


@pytest.fixture
def uart(line: RecordingLine) -> Serial16550:
    device = Serial16550("serial0", RecordingBackend(), line, irq=4)
    yield device
    device.close()


@pytest.fixture
def port(uart: Serial16550) -> Port:
    return Port(uart)


def test_linux_autoconfig_finds_a_16550a(port: Port, uart: Serial16550) -> None:
    assert autoconfig(port) == "16550A"
    assert size_fifo(port) == FIFO_SIZE
    assert uart.backend.output == b""  # loopback bytes never leave the UART
    assert uart.errors == 0


def test_absent_uart_fails_the_ier_test() -> None:
    class OpenBus:
        def read(self, offset: int, size: int) -> bytes:
            return b"\xff" * size

        def write(self, offset: int, data: bytes) -> None:
            pass

    assert autoconfig(Port(OpenBus())) is None  # type: ignore[arg-type]


def test_power_on_registers(port: Port) -> None:
    assert port.inb(IER) == 0
    assert port.inb(IIR) == IIR_NO_INT
    assert port.inb(LCR) == 0
    assert port.inb(MCR) == 0
    assert port.inb(LSR) == LSR_THRE | LSR_TEMT
    assert port.inb(MSR) & 0xF0 == 0xB0  # a connected modem: DCD, DSR, CTS
    port.outb(LCR, LCR_CONF_MODE_A)
    assert port.dl_read() == 0x0C  # 9600 baud
    port.dl_write(0x0001)
    assert port.dl_read() == 0x0001
    port.outb(LCR, 0x03)
    assert port.inb(LCR) == 0x03


def test_loopback_modem_lines(port: Port) -> None:
    port.inb(MSR)
    port.outb(MCR, MCR_LOOP | MCR_DTR)
    msr = port.inb(MSR)
    assert msr & 0xF0 == 0x20  # DSR follows DTR
    assert msr & 0x0F  # and the deltas say the lines moved
    assert port.inb(MSR) & 0x0F == 0  # read clears the deltas
    port.outb(MCR, MCR_LOOP | 0x04)  # OUT1 -> RI
    assert port.inb(MSR) & 0x40
    port.outb(MCR, MCR_LOOP)
    assert port.inb(MSR) & 0x04  # trailing edge of RI


def test_thr_write_goes_to_the_backend(port: Port, uart: Serial16550) -> None:
    for byte in b"hello\r\n":
        assert port.inb(LSR) & LSR_THRE
        port.outb(TX, byte)
    assert uart.backend.output == b"hello\r\n"
    assert uart.counters()["tx_bytes"] == 7


# --- interrupts ------------------------------------------------------------------------------


def test_thre_interrupt_when_enabled(port: Port, line: RecordingLine) -> None:
    port.outb(FCR, FCR_ENABLE_FIFO)
    port.outb(IER, IER_THRI)
    assert line.triggers == 1
    assert port.inb(IIR) == 0xC2  # FIFOs on, THR empty
    assert port.inb(IIR) == 0xC1  # reading IIR cleared it
    port.outb(TX, ord("a"))
    assert line.triggers == 2
    assert port.inb(IIR) == 0xC2


def test_one_interrupt_per_transmit_burst(port: Port, line: RecordingLine, uart: Serial16550) -> None:
    port.outb(IER, IER_THRI)
    assert port.inb(IIR) & 0x0F == 0x02
    before = line.triggers
    for byte in b"0123456789abcdef":  # what serial8250_tx_chars() does per interrupt
        port.outb(TX, byte)
    assert line.triggers == before + 1
    assert uart.backend.output == b"0123456789abcdef"


def test_linux_startup_thre_tests(port: Port) -> None:
    """serial8250_do_startup(): THRE must be re-asserted when THRI is toggled (else the
    driver sets UART_BUG_THRE), and enabling THRI must raise it at once (else UART_BUG_TXEN)."""
    port.outb(IER, IER_THRI)
    iir1 = port.inb(IIR)
    port.outb(IER, 0)
    port.outb(IER, IER_THRI)
    iir = port.inb(IIR)
    port.outb(IER, 0)
    assert not iir1 & IIR_NO_INT and not iir & IIR_NO_INT
    port.outb(IER, IER_THRI)
    lsr = port.inb(LSR)
    iir = port.inb(IIR)
    port.outb(IER, 0)
    assert lsr & LSR_TEMT and not iir & IIR_NO_INT


def test_rx_interrupt_and_read(port: Port, uart: Serial16550, line: RecordingLine) -> None:
    port.outb(FCR, FCR_ENABLE_FIFO)
    port.outb(IER, IER_RDI | IER_RLSI)
    assert line.triggers == 0
    uart.receive(b"ok")
    assert line.triggers == 1
    assert port.inb(IIR) == 0xC4
    assert port.inb(LSR) & LSR_DR
    assert port.inb(RX) == ord("o")
    uart.receive(b"!")  # still pending: no new edge
    assert line.triggers == 1
    assert bytes(port.inb(RX) for _ in range(2)) == b"k!"
    assert not port.inb(LSR) & LSR_DR
    assert port.inb(IIR) == 0xC1
    uart.receive(b"x")
    assert line.triggers == 2


def test_interrupt_priority(port: Port, uart: Serial16550) -> None:
    port.outb(IER, IER_RDI | IER_THRI | IER_RLSI | IER_MSI)
    uart.receive(b"z")
    assert port.inb(IIR) & 0x0F == 0x04  # RX data before THR empty
    port.inb(RX)
    assert port.inb(IIR) & 0x0F == 0x02
    port.outb(MCR, MCR_LOOP)  # modem lines move: MSI pending, lowest priority
    assert port.inb(IIR) & 0x0F == 0x00
    port.inb(MSR)
    assert port.inb(IIR) & 0x0F == 0x01


def test_loopback_overrun_reports_line_status(port: Port, line: RecordingLine) -> None:
    port.outb(FCR, FCR_ENABLE_FIFO)
    port.outb(MCR, MCR_LOOP)
    port.outb(IER, IER_RLSI)
    for value in range(FIFO_SIZE + 1):
        port.outb(TX, value)
    assert port.inb(IIR) & 0x0F == 0x06
    assert line.triggers == 1
    assert port.inb(LSR) & LSR_OE
    assert not port.inb(LSR) & LSR_OE  # read clears it
    assert bytes(port.inb(RX) for _ in range(FIFO_SIZE)) == bytes(range(FIFO_SIZE))


def test_fcr_clears_the_receive_fifo(port: Port, uart: Serial16550) -> None:
    uart.receive(b"abc")
    port.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR)
    assert not port.inb(LSR) & LSR_DR


def test_reset_returns_to_power_on(port: Port, uart: Serial16550) -> None:
    port.outb(LCR, 0x83)
    port.outb(IER, 0x0F)
    port.outb(SCR, 0x42)
    uart.receive(b"q")
    uart.reset()
    assert port.inb(LCR) == 0 and port.inb(IER) == 0 and port.inb(SCR) == 0
    assert port.inb(LSR) == LSR_THRE | LSR_TEMT


# --- flow control ----------------------------------------------------------------------------


def test_input_buffer_is_bounded(uart: Serial16550, port: Port) -> None:
    assert uart.room() == RX_BUFFER
    uart.receive(b"x" * (RX_BUFFER + 100))
    assert uart.room() == 0
    assert sum(1 for _ in iter(lambda: port.inb(LSR) & LSR_DR and port.inb(RX), 0)) == RX_BUFFER
    assert uart.room() == RX_BUFFER


def test_no_host_input_in_loopback(uart: Serial16550, port: Port) -> None:
    port.outb(MCR, MCR_LOOP)
    assert uart.room() == 0
    uart.receive(b"lost")
    assert not port.inb(LSR) & LSR_DR
    port.outb(MCR, 0)
    assert uart.room() == RX_BUFFER


# --- the native fast path ----------------------------------------------------------------------


class SinkTable:
    """What the owner of the device keeps: the sinks currently served."""

    def __init__(self) -> None:
        self.sinks: tuple[PortSink, ...] = ()
        self.calls = 0

    def update(self, sinks: object) -> bool:
        self.sinks = tuple(sinks)  # type: ignore[arg-type]
        self.calls += 1
        return True


def test_fast_path_follows_the_plain_state(uart: Serial16550, port: Port) -> None:
    table = SinkTable()
    uart.bind_native_ports(table.update)
    assert {s.port for s in table.sinks} == {0, 5}
    thr = next(s for s in table.sinks if s.port == 0)
    lsr = next(s for s in table.sinks if s.port == 5)
    assert thr.fd == uart.backend.output_fd and not thr.timestamp
    assert lsr.read_value == LSR_THRE | LSR_TEMT
    assert uart.native and uart.counters()["native"] == 1

    port.outb(IER, IER_RDI)  # receive interrupts do not matter
    assert table.sinks
    port.outb(IER, IER_RDI | IER_THRI)  # a transmit interrupt needs the device
    assert table.sinks == ()
    port.outb(IER, IER_RDI)
    assert table.sinks

    port.outb(LCR, LCR_CONF_MODE_A)  # the divisor latch shares offset 0
    assert table.sinks == ()
    port.outb(LCR, 0x03)
    assert table.sinks

    port.outb(MCR, MCR_LOOP)
    assert table.sinks == ()
    port.outb(MCR, MCR_OUT2)
    assert table.sinks

    uart.receive(b"k")  # RBR and LSR.DR must be read from the device
    assert table.sinks == ()
    port.inb(RX)
    assert table.sinks
    calls = table.calls
    port.outb(SCR, 1)
    assert table.calls == calls  # no change, no call

    uart.close()
    assert table.sinks == ()


def test_fast_path_is_off_while_a_line_error_waits(uart: Serial16550, port: Port) -> None:
    table = SinkTable()
    uart.bind_native_ports(table.update)
    port.outb(FCR, FCR_ENABLE_FIFO)
    port.outb(MCR, MCR_LOOP)
    for value in range(FIFO_SIZE + 1):
        port.outb(TX, value)
    port.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR)
    port.outb(MCR, 0)
    assert table.sinks == ()  # OE still set until LSR is read
    assert port.inb(LSR) & LSR_OE
    assert table.sinks


def test_native_port_sinks_query(uart: Serial16550, port: Port) -> None:
    assert {s.port for s in uart.native_port_sinks()} == {0, 5}
    port.outb(IER, IER_THRI)
    assert uart.native_port_sinks() == ()


# --- the device type ---------------------------------------------------------------------------


def test_off_means_no_device(ctx: FakeContext) -> None:
    request = DeviceRequest("serial-16550", "_serial", SerialConfig(mode="Off"), pio=(0x3F8, 8), irq=4)
    assert Serial16550Type.create(ctx, request) is None
    ctx.config = VmConfig(serial=SerialConfig(mode="Off"))
    request = DeviceRequest("serial-16550", "_serial", pio=(0x3F8, 8), irq=4)
    assert Serial16550Type.create(ctx, request) is None
    assert ctx.lines == {}


def test_create_from_vm_config(ctx: FakeContext, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "serial.log")
    ctx.config = VmConfig(serial=SerialConfig(mode="File", file=path))
    device = Serial16550Type.create(ctx, DeviceRequest("serial-16550", "_serial", pio=(0x3F8, 8), irq=4))
    assert isinstance(device, Serial16550)
    try:
        assert isinstance(device.backend, FileBackend)
        assert device.kind == "serial-16550" and device.irq == 4
        assert device.firmware_properties() == {"irq": 4}
        Port(device).outb(TX, ord("Z"))
    finally:
        device.close()
    with open(path, "rb") as f:
        assert f.read() == b"Z"


def test_null_mode_discards(ctx: FakeContext) -> None:
    request = DeviceRequest("serial-16550", "_serial", SerialConfig(mode="Null"), pio=(0x3F8, 8), irq=4)
    device = Serial16550Type.create(ctx, request)
    assert device is not None and isinstance(device.backend, NullBackend)
    try:
        for byte in b"gone":
            Port(device).outb(TX, byte)
        assert device.counters()["tx_bytes"] == 4
        Port(device).outb(IER, IER_THRI)
        assert ctx.lines[4].triggers == 1
    finally:
        device.close()


def test_input_through_the_event_loop(ctx: FakeContext) -> None:
    """Host input arrives on the event loop and raises the interrupt (a pipe as stdin)."""
    from vmmkit_devices.console.backends import TtyBackend

    read_end, write_end = os.pipe()
    out_read, out_write = os.pipe()
    backend = TtyBackend("serial", stdin_fd=read_end, stdout_fd=out_write)
    line = RecordingLine()
    device = Serial16550("serial0", backend, line)
    try:
        device.attach_input(ctx.event_loop)
        port = Port(device)
        port.outb(IER, IER_RDI)
        os.write(write_end, b"typed")
        wait_for(lambda: line.triggers, what="RX interrupt")
        got = bytearray()

        def read_some() -> bool:
            while port.inb(LSR) & LSR_DR:
                got.append(port.inb(RX))
            return len(got) >= 5

        wait_for(read_some, what="input")
        assert bytes(got) == b"typed"
        port.outb(TX, ord("!"))
        assert os.read(out_read, 10) == b"!"
        os.close(write_end)  # EOF on stdin: input stops, the UART carries on
        wait_for(lambda: not backend.has_input, what="EOF handling")
    finally:
        device.close()
        for fd in (read_end, out_read, out_write):
            os.close(fd)
