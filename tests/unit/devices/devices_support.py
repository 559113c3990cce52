"""Helpers for the platform-device tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from vmmkit_devices.acpi.pm import AcpiPm
from vmmkit_devices.console.backends import NullBackend
from vmmkit_devices.debug.console import DebugConsole
from vmmkit_devices.debug.exit import DebugExit
from vmmkit_devices.debug.port80 import DebugPort
from vmmkit_devices.legacy.i8042 import I8042
from vmmkit_devices.legacy.rtc import CmosRtc
from vmmkit_devices.legacy.serial import Serial16550

from vmmkit.allocator import AddressAllocator
from vmmkit.config import VmConfig
from vmmkit.device import Device
from vmmkit.device_memory import DeviceMemory, DeviceMemoryRegion
from vmmkit.eventloop import EventLoop


class RecordingLine:
    """An :class:`vmmkit.irq.InterruptLine` that counts edges and records levels."""

    def __init__(self) -> None:
        self.triggers = 0
        self.levels: list[bool] = []

    def trigger(self) -> None:
        self.triggers += 1

    def set_level(self, high: bool) -> None:
        self.levels.append(high)


class FakeContext:
    """What a machine hands to device types, recording the callbacks devices make."""

    def __init__(self, loop: EventLoop, config: VmConfig | None = None) -> None:
        self.event_loop = loop
        self.config = config if config is not None else VmConfig()
        self.memory: Any = None
        self.lines: dict[int, RecordingLine] = {}
        self.shutdowns: list[str] = []
        self.resets: list[str] = []
        self.exit_statuses: list[int] = []
        self.log_fd: int | None = None
        self.device_memory: DeviceMemory | None = None

    def interrupt_line(self, irq: int | None = None) -> tuple[int, RecordingLine]:
        irq = 5 if irq is None else irq
        return irq, self.lines.setdefault(irq, RecordingLine())

    def request_shutdown(self, reason: str) -> None:
        self.shutdowns.append(reason)

    def request_reset(self, reason: str) -> None:
        self.resets.append(reason)

    def set_exit_status(self, status: int) -> None:
        self.exit_statuses.append(status)

    def map_device_memory(self, host_address: int, size: int, *, alignment: int,
                          at: int | None = None) -> DeviceMemoryRegion:
        """Device memory in a 64 GiB window at 64 GiB, with slots in :attr:`slots`."""
        if self.device_memory is None:
            self.device_memory = DeviceMemory(SlotRecorder(), AddressAllocator(64 << 30, 64 << 30))  # type: ignore[arg-type]
        return self.device_memory.map(host_address, size, alignment=alignment, at=at)


class SlotRecorder:
    """The memory-slot half of a :class:`vmmkit.hypervisor.Vm`: ``slots`` maps each slot in use
    to ``(guest_addr, size, host_addr)``."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int]] = {}

    def add_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int, *,
                          readonly: bool = False, log_dirty: bool = False) -> None:
        assert slot not in self.slots
        self.slots[slot] = (guest_addr, size, host_addr)

    def remove_memory_region(self, slot: int) -> None:
        del self.slots[slot]


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _ignore(*_args: object) -> None:
    pass


#: One device of each type, with do-nothing dependencies, by type name.
FACTORIES: dict[str, Callable[[], Device]] = {
    "serial-16550": lambda: Serial16550("serial", NullBackend("serial"), RecordingLine()),
    "rtc-cmos": lambda: CmosRtc("rtc", line=RecordingLine()),
    "i8042": lambda: I8042("i8042", _ignore, RecordingLine()),
    "debug-port": lambda: DebugPort("debug-port"),
    "debug-console": lambda: DebugConsole("debug-console", NullBackend("debug_console")),
    "debug-exit": lambda: DebugExit("debug-exit", _ignore),
    "acpi-pm": lambda: AcpiPm("acpi-pm", _ignore, _ignore),
}
