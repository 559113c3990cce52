"""An i8042 keyboard controller with nothing plugged in (device type ``i8042``), at (0x60, 5).

It exists for two things: the reset line (command 0xfe, or any pulse command with bit 0 clear,
or writing the output port with bit 0 clear, calls ``request_reset("i8042")``) and letting a
guest's PS/2 probe finish at once. Cloud Hypervisor and Firecracker do not answer the
controller commands (CH's status reads 0, Firecracker answers only CTR and output-port
commands), so Linux's probe waits out a 10000 x 50 µs timeout per command; on a slow guest that
is the "probe spins" of the host notes. Here every command Linux sends is answered at once:

- status (0x64): input buffer always empty, keyboard not locked, system flag set; output
  buffer full only while there is a byte to read from 0x60.
- self-test 0xaa -> 0x55, keyboard interface test 0xab -> 0x00, read/write of the command
  byte (CTR, 0x20/0x60) and the rest of the controller RAM, enable/disable of both ports,
  read/write of the output port (0xd0/0xd1), 0xd2 (write keyboard output buffer).
- There is no AUX port: an AUX loopback (0xd3) byte comes back as keyboard data and the AUX
  interface test (0xa9) reports a stuck clock line, so Linux's ``i8042_check_aux()`` gives up
  without waiting for IRQ 12.
- There is no keyboard: every byte sent to it is answered with 0xfe and the status TIMEOUT bit
  (what a controller reports for an absent device), with an IRQ 1 pulse when the architecture
  gave the device an interrupt (``DeviceRequest.irq``) and the command byte enables it. Without
  an IRQ, Linux's atkbd probe (asynchronous, in kseriod) waits for its own timeouts.

Port 0x61 (offset 1, "port B") is here because it sits in the range: bits 0-3 read back, bit 4
(refresh) toggles on every read and bit 5 (PIT channel 2 output) reads as 1, as in Cloud
Hypervisor and kvmtool, so a calibration loop waiting for it ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.acpi import aml
from vmmkit.device import DeviceContext, DeviceRequest, PlacedDevice
from vmmkit.irq import InterruptLine
from vmmkit.log import get_logger
from vmmkit.state import StateError, restore_fields, save_named
from vmmkit_devices._regs import ByteRegisters
from vmmkit_devices.device_types import I8042Type as I8042Type  # declared there, re-exported

if TYPE_CHECKING:
    from vmmkit.firmware import AcpiScope

log = get_logger()

DATA = 0
PORT_B = 1
STATUS = COMMAND = 4

STR_OBF = 0x01
STR_IBF = 0x02
STR_SYS = 0x04
STR_CMD = 0x08
STR_UNLOCKED = 0x10
STR_AUXDATA = 0x20
STR_TIMEOUT = 0x40

CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
#: The command byte a BIOS leaves: translation, system flag, keyboard interrupt; no AUX.
CTR_DEFAULT = CTR_XLATE | CTR_AUXDIS | CTR_SYS | CTR_KBDINT

CMD_READ_RAM = 0x20  # 0x20-0x3f: read controller RAM byte (0 is the CTR)
CMD_WRITE_RAM = 0x60  # 0x60-0x7f: write controller RAM byte
CMD_PASSWORD_TEST = 0xA4
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_WRITE_KBD_BUFFER = 0xD2
CMD_WRITE_AUX_BUFFER = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_A20_DISABLE = 0xDD
CMD_A20_ENABLE = 0xDF
CMD_PULSE = 0xF0  # 0xf0-0xff: pulse output lines whose bit is 0; bit 0 is the reset line
CMD_RESET = 0xFE

SELF_TEST_OK = 0x55
PASSWORD_NONE = 0xF1
AUX_CLOCK_STUCK_LOW = 0x01
NO_DEVICE = 0xFE

OUTPUT_RESET = 0x01  # 0: CPU reset asserted
OUTPUT_A20 = 0x02
OUTPUT_DEFAULT = OUTPUT_RESET | OUTPUT_A20

PORT_B_REFRESH = 0x10
PORT_B_OUT2 = 0x20


class I8042(ByteRegisters):
    """The controller. ``request_reset`` is the machine's reset callback; ``kbd_line`` (IRQ 1)
    is optional."""

    kind: ClassVar[str] = "i8042"
    length: ClassVar[int] = 5

    def __init__(
        self,
        device_id: str,
        request_reset: Callable[[str], None],
        kbd_line: InterruptLine | None = None,
    ) -> None:
        super().__init__(device_id)
        self._request_reset = request_reset
        self._kbd_line = kbd_line
        self._lock = threading.Lock()
        self.resets = 0
        self._power_on()

    def _power_on(self) -> None:
        self._ram = bytearray(32)
        self._ram[0] = CTR_DEFAULT
        self._output = OUTPUT_DEFAULT
        self._out: tuple[int, int] | None = None  # the output buffer: (byte, status bits)
        self._last = 0
        self._pending: int | None = None
        self._cmd_flag = 0
        self._port_b = 0
        self._refresh = 0

    @property
    def ctr(self) -> int:
        """The command byte (controller RAM byte 0)."""
        return self._ram[0]

    def read_byte(self, offset: int) -> int:
        with self._lock:
            if offset == STATUS:
                status = STR_SYS | STR_UNLOCKED | self._cmd_flag
                if self._out is not None:
                    status |= STR_OBF | self._out[1]
                return status
            if offset == DATA:
                if self._out is not None:
                    self._last, self._out = self._out[0], None
                return self._last
            if offset == PORT_B:
                self._refresh ^= PORT_B_REFRESH
                return self._port_b | self._refresh | PORT_B_OUT2
            return 0xFF

    def write_byte(self, offset: int, value: int) -> None:
        reset = False
        with self._lock:
            if offset == COMMAND:
                self._cmd_flag = STR_CMD
                reset = self._command(value)
            elif offset == DATA:
                self._cmd_flag = 0
                reset = self._data(value)
            elif offset == PORT_B:
                self._port_b = value & 0x0F
        if reset:
            self.resets += 1
            log.debug("i8042.reset", device=self.id)
            self._request_reset("i8042")

    def _push(self, value: int, status: int = 0, *, irq: bool = False) -> None:
        """Fill the one-byte output buffer (a reply replaces a byte nobody read)."""
        self._out = (value & 0xFF, status)
        if irq and self._kbd_line is not None and self._ram[0] & CTR_KBDINT:
            self._kbd_line.trigger()

    def _command(self, command: int) -> bool:
        """Run a controller command; ``True`` asks for a reset."""
        self._pending = None
        ctr = self._ram[0]
        if CMD_READ_RAM <= command < CMD_READ_RAM + 0x20:
            self._push(self._ram[command & 0x1F])
        elif CMD_WRITE_RAM <= command < CMD_WRITE_RAM + 0x20 or command in (
            CMD_WRITE_OUTPUT,
            CMD_WRITE_KBD_BUFFER,
            CMD_WRITE_AUX_BUFFER,
            CMD_WRITE_AUX,
        ):
            self._pending = command
        elif command == CMD_SELF_TEST:
            self._push(SELF_TEST_OK)
        elif command == CMD_KBD_TEST:
            self._push(0x00)
        elif command == CMD_AUX_TEST:
            self._push(AUX_CLOCK_STUCK_LOW)
        elif command == CMD_PASSWORD_TEST:
            self._push(PASSWORD_NONE)
        elif command == CMD_AUX_DISABLE:
            self._ram[0] = ctr | CTR_AUXDIS
        elif command == CMD_AUX_ENABLE:
            self._ram[0] = ctr & ~CTR_AUXDIS
        elif command == CMD_KBD_DISABLE:
            self._ram[0] = ctr | CTR_KBDDIS
        elif command == CMD_KBD_ENABLE:
            self._ram[0] = ctr & ~CTR_KBDDIS
        elif command == CMD_READ_OUTPUT:
            self._push(self._output)
        elif command == CMD_A20_DISABLE:
            self._output &= ~OUTPUT_A20
        elif command == CMD_A20_ENABLE:
            self._output |= OUTPUT_A20
        elif command >= CMD_PULSE:
            return not command & OUTPUT_RESET
        return False

    def _data(self, value: int) -> bool:
        """A byte written to 0x60: a command's parameter, or a byte for the (absent) keyboard."""
        pending, self._pending = self._pending, None
        if pending is None:
            self._push(NO_DEVICE, STR_TIMEOUT, irq=True)
        elif pending == CMD_WRITE_OUTPUT:
            self._output = value
            return not value & OUTPUT_RESET
        elif pending == CMD_WRITE_KBD_BUFFER:
            self._push(value, irq=True)
        elif pending == CMD_WRITE_AUX_BUFFER:
            self._push(value)  # no AUX port: the byte comes back as keyboard data
        elif pending == CMD_WRITE_AUX:
            self._push(NO_DEVICE, STR_AUXDATA | STR_TIMEOUT)
        else:
            self._ram[pending & 0x1F] = value
        return False

    def reset(self) -> None:
        with self._lock:
            self._power_on()

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1
    _STATE: ClassVar[dict[str, str]] = {"_ram": "bytes", "_output": "int", "_last": "int", "_pending": "int?",
                                        "_cmd_flag": "int", "_port_b": "int", "_refresh": "int"}

    def save_state(self) -> dict[str, Any]:
        with self._lock:
            return {**save_named(self, self._STATE), "out": list(self._out) if self._out else None}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        out = state.get("out")
        if out is not None and (not isinstance(out, list) or len(out) != 2
                                or not all(isinstance(v, int) for v in out)):
            raise StateError(f"{self.id}.out: expected [byte, status] or null")
        with self._lock:
            restore_fields(self, state, self._STATE, self.id)
            self._out = None if out is None else (out[0], out[1])

    def counters(self) -> Mapping[str, int]:
        return {"resets": self.resets, **super().counters()}

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """``PNP0303`` (a PS/2 keyboard controller): the data port, the command/status port 4
        above it (0x60 / 0x64) and the keyboard interrupt, ``\\_SB_.PS2K``."""
        if placed.pio is None:
            return
        index = scope.next_index("i8042")
        base, size = placed.pio
        ports: list[aml.AmlObject] = [aml.Io(base, base, 1, 1)]
        if size > 4:
            ports.append(aml.Io(base + 4, base + 4, 1, 1))
        scope.add(aml.simple_device("PS2K" if index == 0 else f"PS2{index:X}", aml.EisaId("PNP0303"), index,
                                    [*ports, *aml.legacy_irq(placed.irq)]))


def create(ctx: DeviceContext, request: DeviceRequest) -> I8042:
    """``I8042Type.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    line = ctx.interrupt_line(request.irq)[1] if request.irq is not None else None
    return I8042(request.id, ctx.request_reset, line)
