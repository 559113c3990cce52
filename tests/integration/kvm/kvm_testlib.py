"""Helpers shared by the KVM backend's tests (imported by name: pytest puts this folder on
``sys.path``): guest memory layout constants, a recording VcpuOps, and a Guest wrapper."""

from __future__ import annotations

import os
import threading
from typing import Any

from attrs import define, field

from vmmkit.hypervisor import ExitReason, VmExit
from vmmkit.memory import GuestMemory

RAM_SIZE = 2 << 20
CODE_BASE = 0x1000
STACK_TOP = 0x8000
#: A guest-physical address with no memory behind it: accesses there are MMIO exits.
MMIO_BASE = 0x1000_0000
#: Port the test guests write to when they are done; RecordingOps kicks the vCPU on it.
DONE_PORT = 0xF4


class RecordingOps:
    """A :class:`vmmkit.hypervisor.VcpuOps` that records every access.

    ``reads`` maps a port or address to a callable ``(size) -> bytes`` or to fixed bytes; other
    reads answer all ones. A write to :data:`DONE_PORT` kicks the vCPU given to :meth:`bind`,
    so :meth:`Vcpu.run` returns ``INTERRUPTED`` right after the guest says it is done.
    """

    def __init__(self, reads: dict[int, Any] | None = None, mmio_reads: dict[int, Any] | None = None) -> None:
        self.events: list[tuple[str, int, bytes]] = []
        self.pio_reads = dict(reads or {})
        self.mmio_reads = dict(mmio_reads or {})
        self.vcpus: list[Any] = []
        self.done = threading.Event()
        self.lock = threading.Lock()

    def bind(self, vcpu: Any) -> None:
        self.vcpus.append(vcpu)

    def _answer(self, table: dict[int, Any], key: int, size: int) -> bytes:
        value = table.get(key)
        if value is None:
            return b"\xff" * size
        if callable(value):
            return value(size)
        return bytes(value)[:size]

    def pio_read(self, port: int, size: int) -> bytes:
        data = self._answer(self.pio_reads, port, size)
        with self.lock:
            self.events.append(("pio_read", port, data))
        return data

    def pio_write(self, port: int, data: bytes) -> None:
        with self.lock:
            self.events.append(("pio_write", port, bytes(data)))
        if port == DONE_PORT:
            self.done.set()
            for vcpu in self.vcpus:
                vcpu.kick()

    def mmio_read(self, addr: int, size: int) -> bytes:
        data = self._answer(self.mmio_reads, addr, size)
        with self.lock:
            self.events.append(("mmio_read", addr, data))
        return data

    def mmio_write(self, addr: int, data: bytes) -> None:
        with self.lock:
            self.events.append(("mmio_write", addr, bytes(data)))

    def of(self, kind: str) -> list[tuple[int, bytes]]:
        return [(addr, data) for k, addr, data in self.events if k == kind]


@define
class Guest:
    """One VM with RAM at 0 and the test's code loaded at :data:`CODE_BASE`."""

    vm: Any
    memory: GuestMemory
    vcpus: list[Any]
    ops: RecordingOps
    symbols: dict[str, int]
    _timers: list[threading.Timer] = field(factory=list)

    @property
    def vcpu(self) -> Any:
        return self.vcpus[0]

    def run(self, index: int = 0, *, timeout: float = 20.0) -> VmExit:
        """Run vCPU ``index`` to its next exit; a watchdog kicks it after ``timeout`` s."""
        vcpu = self.vcpus[index]
        timer = threading.Timer(timeout, vcpu.kick)
        timer.daemon = True
        timer.start()
        try:
            return vcpu.run()
        finally:
            timer.cancel()

    def run_to_done(self, index: int = 0, *, timeout: float = 20.0) -> VmExit:
        """Run until the guest writes :data:`DONE_PORT` (the vCPU comes back INTERRUPTED)."""
        exit_ = self.run(index, timeout=timeout)
        assert exit_.reason is ExitReason.INTERRUPTED, exit_
        assert self.ops.done.is_set(), "watchdog fired before the guest was done"
        self.vcpus[index].clear_kick()
        return exit_


def lab_qemu_older_than(major: int, minor: int) -> str | None:
    """The QEMU version the lab's emulated host runs under (``lab/lab.py`` exports
    ``VMMKIT_LAB_QEMU``) if it is older than ``major.minor``; None outside the lab or if newer."""
    version = os.environ.get("VMMKIT_LAB_QEMU")
    if not version:
        return None
    numbers = tuple(int(part) for part in version.split(".")[:2])
    return version if numbers < (major, minor) else None
