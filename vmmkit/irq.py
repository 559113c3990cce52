"""Interrupt lines and MSI vectors handed to devices.

A device gets an :class:`InterruptLine` (or :class:`MsiVector` objects) as a constructor
argument and never learns how the interrupt reaches the guest: through an irqfd (no
hypervisor call on the hot path) or, where the backend has none, through ``Vm`` calls.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

from vmmkit.hypervisor import Vm


class InterruptLine(Protocol):
    def trigger(self) -> None:
        """Raise an edge-triggered interrupt (or pulse a level line)."""
        ...

    def set_level(self, high: bool) -> None:
        """Drive a level-triggered line."""
        ...


class GsiLine:
    """A wired interrupt identified by its GSI: on x86 an ISA IRQ (0-15) or IOAPIC pin (16-23),
    routed as on a PC (ISA IRQ 0 reaches IOAPIC pin 2, as the MADT says); an SPI on a GIC."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi
        self._eventfd: int | None = None
        if vm.supports_irqfd:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                vm.register_irqfd(fd, gsi)
            except Exception:
                os.close(fd)
            else:
                self._eventfd = fd

    def trigger(self) -> None:
        if self._eventfd is not None:
            os.eventfd_write(self._eventfd, 1)
        else:
            self.vm.set_irq_line(self.gsi, True)
            self.vm.set_irq_line(self.gsi, False)

    def set_level(self, high: bool) -> None:
        self.vm.set_irq_line(self.gsi, high)

    def close(self) -> None:
        if self._eventfd is not None:
            self.vm.unregister_irqfd(self._eventfd, self.gsi)
            os.close(self._eventfd)
            self._eventfd = None


class MsiVector:
    """One MSI / MSI-X vector: reprogrammed by the guest, triggered by the device.

    ``devid`` is the sending function's device ID (its PCI requester ID), passed with every
    route and message: a GICv3 ITS translates MSIs per device (:meth:`vmmkit.hypervisor.Vm.signal_msi`).
    """

    def __init__(self, vm: Vm, gsi: int | None, devid: int | None = None) -> None:
        self.vm = vm
        self.gsi = gsi
        self.devid = devid
        self.address = 0
        self.data = 0
        self.masked = True
        self.pending = False
        self._lock = threading.Lock()
        self._eventfd: int | None = None
        if gsi is not None and vm.supports_irqfd:
            self._eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    @property
    def eventfd(self) -> int | None:
        """The irqfd that sends this vector (registered while unmasked), if the backend has one."""
        return self._eventfd

    def update(self, address: int, data: int, masked: bool) -> None:
        """The guest rewrote the vector's table entry; deliver a pending message on unmask."""
        with self._lock:
            changed = (address, data) != (self.address, self.data)
            self.address, self.data = address, data
            was_masked, self.masked = self.masked, masked
            if self._eventfd is not None and self.gsi is not None and (changed or was_masked != masked):
                if not masked:
                    self.vm.set_msi_route(self.gsi, address, data, devid=self.devid)
                    if was_masked:
                        self.vm.register_irqfd(self._eventfd, self.gsi)
                elif not was_masked:
                    self.vm.unregister_irqfd(self._eventfd, self.gsi)
            fire = was_masked and not masked and self.pending
            if fire:
                self.pending = False
        if fire:
            self.trigger()

    def trigger(self) -> None:
        if self.masked:
            self.pending = True
        elif self._eventfd is not None:
            os.eventfd_write(self._eventfd, 1)
        else:
            self.vm.signal_msi(self.address, self.data, devid=self.devid)

    def close(self) -> None:
        if self._eventfd is not None:
            if not self.masked and self.gsi is not None:
                self.vm.unregister_irqfd(self._eventfd, self.gsi)
            os.close(self._eventfd)
            self._eventfd = None


class GsiAllocator:
    """Hands out GSIs above the legacy range for MSI routes; given-back ones first."""

    def __init__(self, first: int, last: int) -> None:
        self._first = first
        self._next = first
        self._last = last
        self._freed: list[int] = []
        self._lock = threading.Lock()

    def allocate(self) -> int | None:
        with self._lock:
            if self._freed:
                return self._freed.pop(0)
            if self._next > self._last:
                return None
            gsi, self._next = self._next, self._next + 1
            return gsi

    def free(self, gsi: int) -> None:
        """Give back a GSI from :meth:`allocate` (a removed device's MSI route)."""
        with self._lock:
            if self._first <= gsi < self._next and gsi not in self._freed:
                self._freed.append(gsi)
                self._freed.sort()
