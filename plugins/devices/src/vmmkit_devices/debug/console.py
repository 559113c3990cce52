"""The Bochs/QEMU debug console (device type ``debug-console``), port 0xe9 by default.

Bytes the guest writes go to the configured output (``DebugConsoleConfig.mode``: ``Tty``,
``File``, ``Pty``, ``Null``; ``Off`` creates no device, as in Cloud Hypervisor). Reads return
0xe9 so a guest can detect the port (the Bochs convention). Only the low byte of a wider write
is a character (as QEMU's isa-debugcon). Output only: host input is ignored.

The port is offered to the backend as a native sink (:meth:`DebugConsole.port_sinks`): writes
then go to the same output fd without a trip through Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from vmmkit.device import Device, DeviceContext, DeviceRequest
from vmmkit.hypervisor import PortSink
from vmmkit_devices._regs import MAX_ACCESS, open_bus
from vmmkit_devices.console.backends import ConsoleBackend, console_mode, open_backend
from vmmkit_devices.device_types import DebugConsoleType as DebugConsoleType  # declared there, re-exported

READBACK = 0xE9


class DebugConsole(Device):
    """Writes each byte to ``backend``."""

    kind: ClassVar[str] = "debug-console"
    length: ClassVar[int] = 1

    def __init__(self, device_id: str, backend: ConsoleBackend) -> None:
        super().__init__(device_id)
        self.backend = backend
        self.native = False

    def read(self, offset: int, size: int) -> bytes:
        if offset != 0 or not 1 <= size <= MAX_ACCESS:
            return open_bus(size)
        return bytes((READBACK,)) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and 1 <= len(data) <= MAX_ACCESS:
            self.backend.write(bytes(data[:1]))

    def port_sinks(self) -> Sequence[PortSink]:
        fd = self.backend.output_fd
        return (PortSink(port=0, fd=fd, label=self.id, read_value=READBACK),) if fd >= 0 else ()

    def native_path_changed(self, port: int, served: bool) -> None:
        self.native = served

    def close(self) -> None:
        self.backend.close()

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """Nothing: a write-only port."""
        return {}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        pass

    def counters(self) -> Mapping[str, int]:
        return {**self.backend.counters(), "native": int(self.native)}


def create(ctx: DeviceContext, request: DeviceRequest) -> DebugConsole | None:
    """``DebugConsoleType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    config = request.config if request.config is not None else getattr(ctx.config, "debug_console", None)
    mode = console_mode(config, default="Off")
    if mode == "Off":
        return None
    backend = open_backend(
        mode,
        name="debug_console",
        file=getattr(config, "file", None),
        socket_path=getattr(config, "socket", None),
        input=False,
    )
    return DebugConsole(request.id, backend)
