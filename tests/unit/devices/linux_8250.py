"""Linux's 8250 probe, register by register, as a test driver for the UART.

A Python transcription of the register sequence of ``autoconfig()``, ``autoconfig_16550a()``,
``size_fifo()`` and ``autoconfig_8250()`` in drivers/tty/serial/8250/8250_port.c (Linux 6.x).
"""

from __future__ import annotations

from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


# Linux's register names (include/uapi/linux/serial_reg.h).
RX = TX = DLL = 0
IER = DLM = 1
IIR = FCR = EFR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
LCR_CONF_MODE_A = 0x80
LCR_CONF_MODE_B = 0xBF
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR7_64BYTE = 0x20
IER_RDI, IER_THRI, IER_RLSI, IER_MSI, IER_UUE = 0x01, 0x02, 0x04, 0x08, 0x40
IIR_NO_INT = 0x01
MCR_DTR, MCR_RTS, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40


class Port:
    """``inb``/``outb`` on the UART, relative to its base."""

    def __init__(self, uart: BusDevice) -> None:
        self.uart = uart

    def inb(self, offset: int) -> int:
        return self.uart.read(offset, 1)[0]

    def outb(self, offset: int, value: int) -> None:
        self.uart.write(offset, bytes((value & 0xFF,)))

    def dl_read(self) -> int:
        return self.inb(DLL) | self.inb(DLM) << 8

    def dl_write(self, value: int) -> None:
        self.outb(DLL, value & 0xFF)
        self.outb(DLM, value >> 8)


def size_fifo(p: Port) -> int:
    old_lcr = p.inb(LCR)
    p.outb(LCR, 0)
    old_fcr = p.inb(FCR)
    old_mcr = p.inb(MCR)
    p.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
    p.outb(MCR, MCR_LOOP)
    p.outb(LCR, LCR_CONF_MODE_A)
    old_dl = p.dl_read()
    p.dl_write(0x0001)
    p.outb(LCR, 0x03)
    for count in range(256):
        p.outb(TX, count)
    count = 0
    while p.inb(LSR) & LSR_DR and count < 256:
        p.inb(RX)
        count += 1
    p.outb(FCR, old_fcr)
    p.outb(MCR, old_mcr)
    p.outb(LCR, LCR_CONF_MODE_A)
    p.dl_write(old_dl)
    p.outb(LCR, old_lcr)
    return count


def autoconfig_read_divisor_id(p: Port) -> int:
    old_lcr = p.inb(LCR)
    p.outb(LCR, LCR_CONF_MODE_A)
    old_dl = p.dl_read()
    p.dl_write(0)
    ident = p.dl_read()
    p.dl_write(old_dl)
    p.outb(LCR, old_lcr)
    return ident


def autoconfig_16550a(p: Port) -> str:
    port_type = "16550A"
    p.outb(LCR, LCR_CONF_MODE_A)
    if p.inb(EFR) == 0:
        p.outb(EFR, 0xA8)
        if p.inb(EFR) != 0:
            port_type = "16650"
        else:
            p.outb(LCR, 0)
            p.outb(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
            status1 = p.inb(IIR) >> 5
            p.outb(FCR, 0)
            p.outb(LCR, 0)
            if status1 == 7:
                port_type = "16550A_FSL64"
        p.outb(EFR, 0)
        return port_type
    p.outb(LCR, LCR_CONF_MODE_B)
    if p.inb(EFR) == 0 and not (autoconfig_read_divisor_id(p) == 0x0201 and size_fifo(p) == 16):
        return "has-EFR (16650V2/16850/16C950)"
    p.outb(LCR, 0)
    status1 = p.inb(MCR)
    p.outb(LCR, 0xE0)
    status2 = p.inb(0x02)  # EXCR1
    if not (status2 ^ status1) & MCR_LOOP:
        p.outb(LCR, 0)
        p.outb(MCR, status1 ^ MCR_LOOP)
        p.outb(LCR, 0xE0)
        status2 = p.inb(0x02)
        p.outb(LCR, 0)
        p.outb(MCR, status1)
        if (status2 ^ status1) & MCR_LOOP:
            return "NS16550A"
    p.outb(LCR, 0)
    p.outb(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    status1 = p.inb(IIR) >> 5
    p.outb(FCR, FCR_ENABLE_FIFO)
    p.outb(LCR, LCR_CONF_MODE_A)
    p.outb(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    status2 = p.inb(IIR) >> 5
    p.outb(FCR, FCR_ENABLE_FIFO)
    p.outb(LCR, 0)
    if status1 == 6 and status2 == 7:
        return "16750"
    iersave = p.inb(IER)
    p.outb(IER, iersave & ~IER_UUE)
    if not p.inb(IER) & IER_UUE:
        p.outb(IER, iersave | IER_UUE)
        if p.inb(IER) & IER_UUE:
            return "XScale"
    p.outb(IER, iersave)
    if size_fifo(p) == 64:
        return "U6_16550A"
    return port_type


def autoconfig_8250(p: Port) -> str:
    scratch = p.inb(SCR)
    p.outb(SCR, 0xA5)
    status1 = p.inb(SCR)
    p.outb(SCR, 0x5A)
    status2 = p.inb(SCR)
    p.outb(SCR, scratch)
    return "16450" if (status1, status2) == (0xA5, 0x5A) else "8250"


def autoconfig(p: Port) -> str | None:
    """Linux's probe; the port type name, or ``None`` for "no UART here"."""
    scratch = p.inb(IER)
    p.outb(IER, 0)
    scratch2 = p.inb(IER) & 0x0F
    p.outb(IER, 0x0F)
    scratch3 = p.inb(IER) & 0x0F
    p.outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return None
    save_mcr = p.inb(MCR)
    save_lcr = p.inb(LCR)
    p.outb(MCR, MCR_LOOP | 0x0A)
    status1 = p.inb(MSR) & 0xF0
    p.outb(MCR, save_mcr)
    if status1 != 0x90:
        return None
    p.outb(LCR, LCR_CONF_MODE_B)
    p.outb(EFR, 0)
    p.outb(LCR, 0)
    p.outb(FCR, FCR_ENABLE_FIFO)
    scratch = p.inb(IIR) >> 6
    port_type = {0: autoconfig_8250, 1: lambda _p: "unknown", 2: lambda _p: "16550", 3: autoconfig_16550a}[
        scratch
    ](p)
    p.outb(LCR, save_lcr)
    # "Reset the UART": serial8250_clear_fifos(), a read of RX, IER = 0.
    p.outb(MCR, save_mcr)
    p.outb(FCR, FCR_ENABLE_FIFO)
    p.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
    p.outb(FCR, 0)
    p.inb(RX)
    p.outb(IER, 0)
    return port_type
