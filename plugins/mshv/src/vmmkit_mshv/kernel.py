"""The one seam between the MSHV backend and the kernel: open, close, ioctl, mmap, munmap and the
kick signal, with raw addresses for ioctl arguments exactly as the system calls take them.

:class:`HostKernel` is the real thing (libc through cffi). A simulated ``/dev/mshv``
(:mod:`vmmkit_mshv.simulator`, a contract test of this backend) implements the same
:class:`Kernel` protocol; every other line of the backend is the same in both cases.

The simulator is selected only by naming it: ``VMMKIT_MSHV_KERNEL=simulated`` in the
environment (the ``py311-mshv-x86_64`` tox environment and the MSHV tests set it). Even then,
``--hypervisor auto`` never picks it (:meth:`MshvHypervisor.is_available` says
``auto=False``); a VM runs on it only with ``--hypervisor mshv``.
"""

from __future__ import annotations

import os
import signal
from typing import Protocol

from vmmkit_mshv._native import ffi, lib
from vmmkit_mshv.selection import DEVICE, KERNEL_ENV, SIMULATED, simulator_selected

__all__ = ["DEVICE", "KERNEL_ENV", "SIMULATED", "HostKernel", "Kernel", "kernel_from_environment",
           "simulator_selected"]
#: The signal that kicks a vCPU thread out of MSHV_RUN_VP (EINTR). KVM's plugin uses its own.
KICK_SIGNAL = signal.SIGRTMIN + 5


class Kernel(Protocol):
    """What the backend asks of the kernel. Failures raise :class:`OSError` with the errno."""

    #: ``"host"`` or ``"simulated"`` (shown in errors and ``vmmkit plugins``).
    name: str
    #: Whether ioctls are system calls the C run loop may make itself; False for a kernel
    #: implemented in Python, which the loop reaches through a callback (the function-pointer
    #: form of this seam).
    native_ioctl: bool

    def open(self, path: str) -> int: ...

    def close(self, fd: int) -> None: ...

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        """``ioctl(fd, request, (void *)arg)``; the return value (a new fd for create calls)."""
        ...

    def mmap(self, fd: int, length: int, offset: int) -> int:
        """A shared read/write mapping of ``fd`` at ``offset``; its address."""
        ...

    def munmap(self, addr: int, length: int) -> None: ...

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """The machine's CPU: what CPUID returns (the host's; the simulator's engine)."""
        ...

    def kick_thread(self, thread_id: int) -> None:
        """Interrupt thread ``thread_id`` (``threading.get_ident()``) in MSHV_RUN_VP (EINTR)."""
        ...


class HostKernel:
    """The real ``/dev/mshv``: system calls through libc."""

    name = "host"
    native_ioctl = True
    _handler_installed = False

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        ret = int(lib.vmk_ioctl(fd, request, arg))
        if ret < 0:
            err = ffi.errno
            raise OSError(err, os.strerror(err))
        return ret

    def mmap(self, fd: int, length: int, offset: int) -> int:
        addr = int(lib.vmk_mmap_shared(fd, length, offset))
        if addr == 0:
            err = ffi.errno
            raise OSError(err, os.strerror(err))
        return addr

    def munmap(self, addr: int, length: int) -> None:
        if lib.vmk_munmap(addr, length) != 0:
            err = ffi.errno
            raise OSError(err, os.strerror(err))

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        out = ffi.new("uint32_t[4]")
        lib.vmk_cpuid(leaf, subleaf, out)
        return int(out[0]), int(out[1]), int(out[2]), int(out[3])

    def kick_thread(self, thread_id: int) -> None:
        if not HostKernel._handler_installed:
            if lib.vmk_install_kick_handler(int(KICK_SIGNAL)) != 0:
                err = ffi.errno
                raise OSError(err, os.strerror(err))
            HostKernel._handler_installed = True
        signal.pthread_kill(thread_id, KICK_SIGNAL)

    @staticmethod
    def install_kick_handler() -> None:
        """Install the no-op kick handler (before vCPU threads start, so no kick kills them)."""
        if not HostKernel._handler_installed:
            if lib.vmk_install_kick_handler(int(KICK_SIGNAL)) != 0:
                err = ffi.errno
                raise OSError(err, os.strerror(err))
            HostKernel._handler_installed = True


def kernel_from_environment() -> Kernel:
    """The kernel the environment selects: the host's, or the simulator when named."""
    value = os.environ.get(KERNEL_ENV, "host")
    if value == "host":
        return HostKernel()
    if value == SIMULATED:
        from vmmkit_mshv.simulator import simulated_kernel

        return simulated_kernel()
    raise ValueError(f"{KERNEL_ENV}={value!r}: expected 'host' or {SIMULATED!r}")
