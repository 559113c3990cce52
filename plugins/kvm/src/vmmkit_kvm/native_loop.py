"""The native run loop (``runloop.c`` through ``vmmkit_kvm._native``) as every architecture uses
it: the exit counters' names, the ``extern "Python"`` callback of callback dispatch, and
:class:`NativeVcpuLoop`, the MMIO-only vCPU loop of the arm64 backend (:mod:`vmmkit_kvm.arm64`).
x86-64's :class:`vmmkit_kvm.bindings.KvmVcpuFd` drives the same C loop and adds port I/O, the
coalesced ring and the sync registers.

``vmk_run()`` is entered with the GIL released (cffi releases it for every call); an MMIO exit
comes back to :meth:`NativeVcpuLoop.run` (return dispatch, the default), or, with
:meth:`NativeVcpuLoop.set_callback`, the C loop calls :func:`vmk_py_io` for it and stays in C.
Kicks set ``kvm_run->immediate_exit`` and signal the thread inside ``vmk_run()`` (the C handler,
installed by ``vmk_install_kick_handler()`` from any thread, has no ``SA_RESTART``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from vmmkit.errors import HypervisorError
from vmmkit_kvm._native import ffi, lib

#: Names of the native exit counters, in ``VMK_COUNT_*`` order (``runloop.h``).
COUNTER_NAMES: tuple[str, ...] = (
    "io",
    "io-native",
    "mmio",
    "coalesced",
    "coalesced-native",
    "hlt",
    "intr",
    "shutdown",
    "system-event",
    "internal-error",
    "fail-entry",
    "debug",
    "other",
)
assert len(COUNTER_NAMES) == lib.VMK_NCOUNTS

_MMIO: int = lib.VMK_EXIT_MMIO
_PIO: int = lib.VMK_EXIT_PIO
_CALLBACK_ERROR: int = lib.VMK_EXIT_CALLBACK_ERROR
_IO_MMIO_READ: int = lib.VMK_IO_MMIO_READ
_IO_MMIO_WRITE: int = lib.VMK_IO_MMIO_WRITE
_PACKED_MIN: int = lib.VMK_PACKED_MIN
_SIZE_SHIFT: int = lib.VMK_PACKED_SIZE_SHIFT
_ADDR_SHIFT: int = lib.VMK_PACKED_ADDR_SHIFT


@ffi.def_extern()  # type: ignore[untyped-decorator]
def vmk_py_io(handle: Any, kind: int, addr: int, size: int, count: int, data: Any) -> int:
    """Called by the native loop (callback mode) on the vCPU thread, with the GIL taken."""
    return int(ffi.from_handle(handle)._callback(kind, addr, size, count, data))


def install_kick_handler() -> None:
    """The kick signal's no-op handler (no ``SA_RESTART``); idempotent, from any thread."""
    rc = lib.vmk_install_kick_handler()
    if rc < 0:
        raise HypervisorError("sigaction(kick signal)", -rc)


def _fit(value: bytes | bytearray | memoryview, size: int) -> bytes:
    """A device answered with the wrong number of bytes: pad with ones or truncate."""
    data = bytes(value)[:size]
    return data + b"\xff" * (size - len(data))


class NativeVm:
    """The run loop's per-VM state (``struct vmk_vm``: port sinks, the coalesced ring's lock)."""

    def __init__(self, vm_fd: int) -> None:
        native = lib.vmk_vm_new(vm_fd)
        if native == ffi.NULL:
            raise HypervisorError("vmk_vm_new", ffi.errno or None)
        self.native: Any = native

    def close(self) -> None:
        if self.native is not None:
            lib.vmk_vm_free(self.native)
            self.native = None


class NativeVcpuLoop:
    """One vCPU's ``kvm_run`` mapping and run loop, for guests whose only I/O exits are MMIO
    (arm64). ``ops`` supplies ``mmio_read``/``mmio_write`` (a :class:`vmmkit.hypervisor.VcpuOps`)."""

    def __init__(self, vm: NativeVm, fd: int, mmap_size: int, ops: Any) -> None:
        install_kick_handler()
        native = lib.vmk_vcpu_new(vm.native, fd, mmap_size, 0, 0)
        if native == ffi.NULL:
            raise HypervisorError("mmap(kvm_run)", ffi.errno or None)
        self._native: Any = native
        self._exit = ffi.new("struct vmk_exit *")
        # A packed access's data (vmk_exit.buf), sliced to bytes and assigned from them (no
        # ffi.unpack/ffi.memmove: their keyword parsing costs more than the slice).
        self._buf = ffi.buffer(self._exit.buf)
        lib.vmk_vcpu_set_exit(self._native, self._exit)
        self._counts = ffi.new("uint64_t[]", lib.VMK_NCOUNTS)
        self._handle: Any = None
        self._error: BaseException | None = None
        self.callback = False
        self.set_ops(ops)

    def set_ops(self, ops: Any) -> None:
        self._mmio_read: Callable[[int, int], bytes] = ops.mmio_read
        self._mmio_write: Callable[[int, bytes], None] = ops.mmio_write

    def set_callback(self, enabled: bool) -> None:
        """Dispatch MMIO from inside the native loop (``extern "Python"``) or by returning."""
        if enabled:
            self._handle = ffi.new_handle(self)
            lib.vmk_vcpu_set_callback(self._native, self._handle)
        else:
            lib.vmk_vcpu_set_callback(self._native, ffi.NULL)
            self._handle = None
        self.callback = enabled

    def run(self) -> tuple[int, int, tuple[int, ...]]:
        """Run until an exit the caller must see: ``(VMK_EXIT_* code, kvm_run exit reason, data
        words)``. MMIO goes to ``ops`` on the way; a device's exception propagates, and the
        access it interrupted is completed (a read with all ones) by the next run. A single
        access comes back packed into the return value (``VMK_PACKED_MIN`` in runloop.h)."""
        native_run = lib.vmk_vcpu_run  # one argument: no argument tuple per exit
        v = self._native
        ex = self._exit
        buf = self._buf
        unpack, memmove = ffi.unpack, ffi.memmove
        mmio_read, mmio_write = self._mmio_read, self._mmio_write
        while True:
            code = native_run(v)
            if code >= _PACKED_MIN:
                kind = code & 3
                size = code >> _SIZE_SHIFT & 15
                if kind == _IO_MMIO_WRITE:
                    mmio_write(code >> _ADDR_SHIFT, buf[0:size])
                elif kind == _IO_MMIO_READ:
                    value = mmio_read(code >> _ADDR_SHIFT, size)
                    if len(value) != size:
                        value = _fit(value, size)
                    buf[0:size] = value
                else:
                    raise HypervisorError("KVM_RUN", None,
                                          f"port I/O exit (port {code >> _ADDR_SHIFT:#x}) on an MMIO-only vCPU")
            elif code == _MMIO:
                size = ex.size
                if ex.is_write:
                    mmio_write(ex.addr, unpack(ex.data, size))
                else:
                    value = mmio_read(ex.addr, size)
                    if len(value) != size:
                        value = _fit(value, size)
                    memmove(ex.data, value, size)
            elif code < 0:
                raise HypervisorError("KVM_RUN", -code)
            elif code == _CALLBACK_ERROR:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                raise HypervisorError("KVM_RUN", None, "MMIO callback failed")
            elif code == _PIO:
                raise HypervisorError("KVM_RUN", None, f"port I/O exit (port {ex.addr:#x}) on an MMIO-only vCPU")
            else:
                return int(code), int(ex.kvm_reason), tuple(ex.words[0 : ex.nwords])

    def _callback(self, kind: int, addr: int, size: int, count: int, data: Any) -> int:
        try:
            if kind == _IO_MMIO_WRITE:
                self._mmio_write(addr, ffi.unpack(data, size))
            elif kind == _IO_MMIO_READ:
                value = self._mmio_read(addr, size)
                if len(value) != size:
                    value = _fit(value, size)
                ffi.memmove(data, value, size)
            else:
                raise HypervisorError("KVM_RUN", None, f"port I/O exit (port {addr:#x}) on an MMIO-only vCPU")
        except BaseException as exc:  # re-raised by run() on the vCPU's own thread
            self._error = exc
            return -1
        return 0

    def kick(self) -> None:
        if self._native is not None:
            lib.vmk_vcpu_kick(self._native)

    def clear_kick(self) -> None:
        if self._native is not None:
            lib.vmk_vcpu_clear_kick(self._native)

    def kicked(self) -> bool:
        return self._native is not None and bool(lib.vmk_vcpu_kicked(self._native))

    def counts(self) -> dict[str, int]:
        if self._native is None:
            return {}
        lib.vmk_vcpu_counts(self._native, self._counts, lib.VMK_NCOUNTS)
        return {name: int(self._counts[i]) for i, name in enumerate(COUNTER_NAMES)}

    def close(self) -> None:
        if self._native is not None:
            if lib.vmk_vcpu_running(self._native):
                # Unmapping kvm_run under a running loop would crash the process.
                lib.vmk_vcpu_kick(self._native)
                raise HypervisorError("close", errno.EBUSY, "the vCPU is inside run(); kick, then wait")
            lib.vmk_vcpu_free(self._native)
            self._native = None
            self._handle = None
