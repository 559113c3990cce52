"""The boot-progress port (device type ``debug-port``), at 0x80 on x86.

Each byte the guest writes is a POST / boot-progress code (Cloud Hypervisor's convention:
0x00-0x1f firmware, 0x20-0x3f boot loader, 0x40-0x5f kernel, 0x60-0x7f user space). It is
logged with the time since the VM started: ``log.info("guest.progress", code="0x41",
elapsed="1.234567")``. Only the first byte of a wider write is a code (the next port is not
ours). Reads return 0xff.

A backend may serve the port natively (:meth:`DebugPort.port_sinks`): it then writes
``[seconds.micros] guest.progress 0xNN`` lines to the log fd (the VMM's stderr unless given)
itself (JSON objects when the log is JSON: :func:`vmmkit.log.native_format`), and this device
sees nothing. With no log fd (the VMM logs below info level) the
native sink discards the codes, as the Python path's filtered ``log.info`` does.

Note: Linux's ``outb_p`` (``io_delay=0x80``, the default) writes to port 0x80 too; a guest that
does not know it runs on KVM (``KVM_FEATURE_NOP_IO_DELAY``) or was not booted with
``io_delay=none`` fills the log with those writes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from vmmkit.device import Device, DeviceContext, DeviceRequest
from vmmkit.hypervisor import PortSink
from vmmkit.log import get_logger, native_format
from vmmkit_devices._regs import MAX_ACCESS, open_bus
from vmmkit_devices.device_types import DebugPortType as DebugPortType  # declared there, re-exported

log = get_logger()

LABEL = "guest.progress"


def format_elapsed(seconds: float) -> str:
    """``seconds`` as ``S.UUUUUU`` (the native sinks' timestamp format)."""
    micros = max(0, int(seconds * 1_000_000))
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"


class DebugPort(Device):
    """Logs boot-progress codes. ``start`` is the VM's start (``time.monotonic()``);
    ``log_fd`` is where a native sink writes (default: nowhere, /dev/null)."""

    kind: ClassVar[str] = "debug-port"
    length: ClassVar[int] = 1

    def __init__(self, device_id: str, *, start: float | None = None, log_fd: int | None = None) -> None:
        super().__init__(device_id)
        self.start = time.monotonic() if start is None else start
        self._log_fd = log_fd
        self._own_fd = -1
        self.codes = 0
        self.last_code: int | None = None
        self.native = False

    def read(self, offset: int, size: int) -> bytes:
        return open_bus(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or not 1 <= len(data) <= MAX_ACCESS:
            return
        code = data[0]
        self.codes += 1
        self.last_code = code
        log.info(LABEL, code=f"0x{code:02x}", elapsed=format_elapsed(time.monotonic() - self.start))

    def port_sinks(self) -> Sequence[PortSink]:
        """Offer the port to the backend: timestamped lines to the log fd."""
        fd = self._sink_fd()
        json = self._log_fd is not None and native_format() == "json"  # the log is JSON: so are these lines
        return (PortSink(port=0, fd=fd, timestamp=True, label=LABEL, json=json),) if fd >= 0 else ()

    def native_path_changed(self, port: int, served: bool) -> None:
        """The machine says whether the backend serves the port natively."""
        self.native = served

    def _sink_fd(self) -> int:
        if self._log_fd is not None:
            return self._log_fd
        if self._own_fd < 0:
            try:
                self._own_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            except OSError:
                return -1
        return self._own_fd

    def reset(self) -> None:
        self.last_code = None

    def close(self) -> None:
        if self._own_fd >= 0:
            os.close(self._own_fd)
            self._own_fd = -1

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """Nothing the guest can read back: port 0x80 is write-only."""
        return {}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        pass

    def counters(self) -> Mapping[str, int]:
        out = {"codes": self.codes, "native": int(self.native)}
        if self.last_code is not None:
            out["last_code"] = self.last_code
        return out


def create(ctx: DeviceContext, request: DeviceRequest) -> DebugPort:
    """``DebugPortType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    return DebugPort(request.id, log_fd=ctx.log_fd)
