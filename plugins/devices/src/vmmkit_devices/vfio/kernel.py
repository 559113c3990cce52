"""The system calls VFIO is driven with, behind one small interface.

:class:`VfioKernel` is what the rest of the plugin calls: ``open`` a ``/dev/vfio`` node,
``ioctl`` with an integer or a buffer the kernel reads and writes (the ``struct vfio_*`` bytes
of :mod:`vmmkit_devices.vfio.uapi`), ``pread``/``pwrite`` a device region, ``mmap`` one.
:class:`HostKernel` makes the real calls. :mod:`vmmkit_devices.vfio.simulator` implements the
same interface with the kernel's semantics for contract tests, so everything above this line
(struct packing included) is the code that runs on a real ``/dev/vfio``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Any, Protocol


class MappedArea(Protocol):
    """A shared mapping of part of a device fd."""

    @property
    def address(self) -> int:
        """Where it starts in this process."""
        ...

    @property
    def size(self) -> int: ...

    def close(self) -> None:
        """Unmap it."""
        ...


class VfioKernel(Protocol):
    """The calls the VFIO plugin makes; each raises :class:`OSError` with the kernel's errno."""

    def open(self, path: str) -> int:
        """``open(path, O_RDWR | O_CLOEXEC)``."""
        ...

    def close(self, fd: int) -> None: ...

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        """An ioctl whose argument is an integer or a buffer (passed by address; the kernel's
        writes land in it). Returns the call's non-negative result."""
        ...

    def pread(self, fd: int, size: int, offset: int) -> bytes: ...

    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...

    def mmap(self, fd: int, size: int, offset: int) -> MappedArea:
        """``mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)``."""
        ...


class _HostMapping:
    def __init__(self, area: mmap.mmap, address: int, pin: Any) -> None:
        self._area: mmap.mmap | None = area
        self._pin = pin
        self.address = address
        self.size = len(area)

    def close(self) -> None:
        if self._area is not None:
            self._pin = None
            self._area.close()
            self._area = None


class HostKernel:
    """The host's VFIO: real ``open``, ``ioctl``, ``pread``, ``pwrite`` and ``mmap``."""

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def mmap(self, fd: int, size: int, offset: int) -> MappedArea:
        import cffi

        area = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        ffi = cffi.FFI()
        pin = ffi.from_buffer(area)
        return _HostMapping(area, int(ffi.cast("uintptr_t", pin)), pin)
