"""The i8042: reset line, and Linux's probe finishing without a single timeout."""

from __future__ import annotations

from devices_support import FakeContext, RecordingLine
from vmmkit_devices.legacy.i8042 import CTR_DEFAULT, I8042, I8042Type

from vmmkit.device import DeviceRequest

DATA, PORT_B, STATUS = 0, 1, 4
OBF, IBF, UNLOCKED, AUXDATA, TIMEOUT = 0x01, 0x02, 0x10, 0x20, 0x40
CTR_KBDINT, CTR_KBDDIS, CTR_AUXDIS = 0x01, 0x10, 0x20


class Controller:
    """Linux's i8042 helpers; every wait counts as a timeout if it would have to wait."""

    def __init__(self, dev: I8042) -> None:
        self.dev = dev
        self.timeouts = 0

    def status(self) -> int:
        return self.dev.read(STATUS, 1)[0]

    def data(self) -> int:
        return self.dev.read(DATA, 1)[0]

    def wait_write(self) -> bool:
        if self.status() & IBF:
            self.timeouts += 1
            return False
        return True

    def wait_read(self) -> bool:
        if not self.status() & OBF:
            self.timeouts += 1
            return False
        return True

    def flush(self) -> int:
        count = 0
        while self.status() & OBF:
            if count >= 16:
                return -5  # -EIO: "No controller found"
            self.data()
            count += 1
        return 0

    def command(self, command: int, params: bytes = b"", replies: int = 0) -> bytes | None:
        """__i8042_command(): None on error, like its non-zero return."""
        if not self.wait_write():
            return None
        self.dev.write(STATUS, bytes((command,)))
        for param in params:
            if not self.wait_write():
                return None
            self.dev.write(DATA, bytes((param,)))
        out = bytearray()
        for _ in range(replies):
            if not self.wait_read():
                return None
            if command == 0xD3 and not self.status() & AUXDATA:
                return None  # "auxerr"
            out.append(self.data())
        return bytes(out)


def test_power_on_status_says_empty_and_unlocked() -> None:
    dev = I8042("i8042", lambda reason: None)
    status = dev.read(STATUS, 1)[0]
    assert status & (OBF | IBF) == 0
    assert status & UNLOCKED
    assert dev.ctr == CTR_DEFAULT


def test_linux_probe_without_timeouts() -> None:
    """i8042_controller_check/selftest/init, i8042_check_aux, and the keyboard port."""
    kbd = RecordingLine()
    dev = I8042("i8042", lambda reason: None, kbd)
    c = Controller(dev)
    assert c.flush() == 0  # controller present
    assert c.command(0xAA, replies=1) == b"\x55"  # self test
    ctr = [c.command(0x20, replies=1) for _ in range(2)]  # stable CTR read
    assert ctr[0] == ctr[1] == bytes((CTR_DEFAULT,))
    new_ctr = (CTR_DEFAULT | CTR_KBDDIS) & ~CTR_KBDINT
    assert c.command(0x60, bytes((new_ctr,))) == b""
    assert dev.ctr == new_ctr
    assert c.flush() == 0

    # i8042_check_aux(): the loop test fails at once, the AUX test says "no AUX".
    assert c.flush() == 0
    assert c.command(0xD3, b"\x5a", replies=1) is None
    param = c.command(0xA9, replies=1)
    assert param is not None and param[0] not in (0x00, 0xFA, 0xFF)

    # i8042_enable_kbd_port() then atkbd's first command: answered "no device" with IRQ 1.
    ctr = (new_ctr & ~CTR_KBDDIS) | CTR_KBDINT
    assert c.command(0x60, bytes((ctr,))) == b""
    assert c.wait_write()
    dev.write(DATA, b"\xf2")  # ATKBD_CMD_GETID
    assert kbd.triggers == 1
    status = c.status()
    assert status & OBF and status & TIMEOUT and not status & AUXDATA
    assert c.data() == 0xFE
    assert not c.status() & OBF
    assert c.timeouts == 0


def test_port_enable_disable_commands() -> None:
    dev = I8042("i8042", lambda reason: None)
    c = Controller(dev)
    c.command(0xA8)
    assert not c.command(0x20, replies=1)[0] & CTR_AUXDIS  # type: ignore[index]
    c.command(0xA7)
    assert c.command(0x20, replies=1)[0] & CTR_AUXDIS  # type: ignore[index]
    c.command(0xAD)
    assert dev.ctr & CTR_KBDDIS
    c.command(0xAE)
    assert not dev.ctr & CTR_KBDDIS
    assert c.command(0xAB, replies=1) == b"\x00"
    assert c.command(0xD2, b"\x1c", replies=1) == b"\x1c"  # write keyboard output buffer
    assert c.command(0xD4, b"\xff", replies=1) == b"\xfe"  # no mouse
    assert c.timeouts == 0


def test_reset_commands() -> None:
    resets: list[str] = []
    dev = I8042("i8042", resets.append)
    dev.write(STATUS, b"\xfe")  # what Linux's reboot=k writes
    assert resets == ["i8042"]
    dev.write(STATUS, b"\xff")  # pulse nothing
    assert len(resets) == 1
    dev.write(STATUS, b"\xf0")  # pulse all lines, reset among them
    assert len(resets) == 2
    dev.write(STATUS, b"\xd1")
    dev.write(DATA, b"\x02")  # output port with the reset line low
    assert len(resets) == 3
    dev.write(STATUS, b"\xd0")
    assert dev.read(DATA, 1) == b"\x02"
    assert dev.counters()["resets"] == 3


def test_port_b_refresh_toggles_and_out2_high() -> None:
    dev = I8042("i8042", lambda reason: None)
    first, second = dev.read(PORT_B, 1)[0], dev.read(PORT_B, 1)[0]
    assert (first ^ second) & 0x10
    assert first & 0x20 and second & 0x20
    dev.write(PORT_B, b"\x03")
    assert dev.read(PORT_B, 1)[0] & 0x0F == 0x03


def test_reset_returns_to_power_on() -> None:
    dev = I8042("i8042", lambda reason: None)
    dev.write(STATUS, b"\x60")
    dev.write(DATA, b"\x00")
    dev.write(STATUS, b"\x20")
    dev.reset()
    assert dev.ctr == CTR_DEFAULT
    assert not dev.read(STATUS, 1)[0] & OBF


def test_device_type(ctx: FakeContext) -> None:
    dev = I8042Type.create(ctx, DeviceRequest("i8042", "_i8042", pio=(0x60, 5)))
    assert dev.kind == "i8042" and ctx.lines == {}
    dev.write(STATUS, b"\xfe")
    assert ctx.resets == ["i8042"]
    with_irq = I8042Type.create(ctx, DeviceRequest("i8042", "_i8042", pio=(0x60, 5), irq=1))
    with_irq.write(DATA, b"\xff")
    assert ctx.lines[1].triggers == 1
