"""The simulated ``/dev/mshv`` and the fds derived from it: ioctl dispatch with the argument
checks and errnos of drivers/hv/mshv_root_main.c, ``mmap`` of the VP register page, and the
kick signal. Implements :class:`vmmkit_mshv.kernel.Kernel`."""

from __future__ import annotations

import ctypes
import errno
import os
import threading

from vmmkit_mshv.simulator import abi
from vmmkit_mshv.simulator.partition import HypercallFailed, Partition
from vmmkit_mshv.simulator.vp import Vp

_PAGE = 0x1000
_MSHV_PT_FLAGS_MASK = 0b111
_MSHV_SET_MEM_FLAGS_MASK = 0b111
_MSHV_VP_STATE_COUNT = 5


class _Device:
    pass


class SimulatedKernel:
    """A contract-test stand-in for the kernel's MSHV driver and the hypervisor behind it."""

    name = "simulated"
    native_ioctl = False

    def __init__(self, device_path: str = "/dev/mshv") -> None:
        self.device_path = device_path
        self._fds: dict[int, _Device | Partition | Vp] = {}
        self._vp_partition: dict[int, Partition] = {}
        self._next_partition_id = 1
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}

    def _new_fd(self, obj: _Device | Partition | Vp) -> int:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # a real, unique descriptor number
        with self._lock:
            self._fds[fd] = obj
        return fd

    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    # -- Kernel ----------------------------------------------------------------------------------

    def open(self, path: str) -> int:
        if path != self.device_path:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return self._new_fd(_Device())

    def close(self, fd: int) -> None:
        with self._lock:
            obj = self._fds.pop(fd, None)
        if obj is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        os.close(fd)
        if isinstance(obj, Partition):
            obj.close()

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        obj = self._fds.get(fd)
        if obj is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if isinstance(obj, _Device):
            return self._device_ioctl(request, arg)
        if isinstance(obj, Partition):
            return self._partition_ioctl(obj, request, arg)
        return self._vp_ioctl(obj, request, arg)

    def mmap(self, fd: int, length: int, offset: int) -> int:
        obj = self._fds.get(fd)
        if not isinstance(obj, Vp):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        if length > _PAGE or offset % _PAGE:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        page = offset // _PAGE
        if page == 0:
            return ctypes.addressof(obj.register_page)
        if page == 1:
            return ctypes.addressof(obj.message_page)
        if page == 2:
            raise OSError(errno.ENODEV, "no GHCB page (not an encrypted partition)")
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def munmap(self, addr: int, length: int) -> None:
        """The pages belong to the VP and live as long as it does."""

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        from vmmkit_emu.x86 import supported_cpuid

        for entry in supported_cpuid():
            if entry.function == leaf and (entry.index == subleaf or not entry.flags & 1):
                return entry.eax, entry.ebx, entry.ecx, entry.edx
        return 0, 0, 0, 0

    def kick_thread(self, thread_id: int) -> None:
        for obj in list(self._fds.values()):
            if isinstance(obj, Vp) and obj.runner == thread_id:
                obj.kick()

    # -- /dev/mshv ---------------------------------------------------------------------------------

    def _device_ioctl(self, request: int, arg: int) -> int:
        if request != abi.MSHV_CREATE_PARTITION:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        self._count("MSHV_CREATE_PARTITION")
        flags, isolation = abi.CREATE_PARTITION.unpack(abi.read(arg, abi.CREATE_PARTITION.size))
        if flags & ~_MSHV_PT_FLAGS_MASK or isolation >= 1:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        with self._lock:
            partition_id = self._next_partition_id
            self._next_partition_id += 1
        return self._new_fd(Partition(partition_id, flags))

    # -- partition fds ---------------------------------------------------------------------------

    def _partition_ioctl(self, partition: Partition, request: int, arg: int) -> int:
        if request == abi.MSHV_INITIALIZE_PARTITION:
            self._count("MSHV_INITIALIZE_PARTITION")
            partition.initialized = True
            return 0
        if request == abi.MSHV_CREATE_VP:
            self._count("MSHV_CREATE_VP")
            (index,) = abi.CREATE_VP.unpack(abi.read(arg, abi.CREATE_VP.size))
            try:
                vp = partition.create_vp(index)
            except HypercallFailed as exc:
                raise OSError(abi.hv_status_errno(exc.status), str(exc)) from None
            fd = self._new_fd(vp)
            return fd
        if request == abi.MSHV_SET_GUEST_MEMORY:
            self._count("MSHV_SET_GUEST_MEMORY")
            size, gfn, uaddr, flags, rsvd = abi.USER_MEM_REGION.unpack(abi.read(arg, abi.USER_MEM_REGION.size))
            if not size or size % _PAGE or uaddr % _PAGE or flags & ~_MSHV_SET_MEM_FLAGS_MASK or any(rsvd):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            if flags & (1 << 2):
                partition.unmap(gfn, size, uaddr)
            else:
                partition.map(gfn, size, uaddr, flags)
            return 0
        if request == abi.MSHV_IRQFD:
            self._count("MSHV_IRQFD")
            fd, resamplefd, gsi, flags = abi.USER_IRQFD.unpack(abi.read(arg, abi.USER_IRQFD.size))
            partition.irqfd(fd, resamplefd, gsi, flags)
            return 0
        if request == abi.MSHV_IOEVENTFD:
            self._count("MSHV_IOEVENTFD")
            datamatch, addr, length, fd, flags, _ = abi.USER_IOEVENTFD.unpack(abi.read(arg, abi.USER_IOEVENTFD.size))
            partition.ioeventfd(datamatch, addr, length, fd, flags)
            return 0
        if request == abi.MSHV_SET_MSI_ROUTING:
            self._count("MSHV_SET_MSI_ROUTING")
            nr, rsvd = abi.USER_IRQ_TABLE.unpack(abi.read(arg, abi.USER_IRQ_TABLE.size))
            if nr > 4096 or rsvd:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            raw = abi.read(arg + abi.USER_IRQ_TABLE.size, nr * abi.USER_IRQ_ENTRY.size) if nr else b""
            entries = []
            for i in range(nr):
                gsi, lo, hi, data = abi.USER_IRQ_ENTRY.unpack_from(raw, i * abi.USER_IRQ_ENTRY.size)
                entries.append((gsi, hi << 32 | lo, data))
            partition.set_msi_routing(entries)
            return 0
        if request == abi.MSHV_GET_GPAP_ACCESS_BITMAP:
            self._count("MSHV_GET_GPAP_ACCESS_BITMAP")
            access_type, op, rsvd, count, base, ptr = abi.GPAP_ACCESS_BITMAP.unpack(
                abi.read(arg, abi.GPAP_ACCESS_BITMAP.size))
            if access_type >= 2 or op >= 3 or any(rsvd) or not count or not ptr:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            if not partition.dirty_tracking:
                raise OSError(errno.EIO, "GPA page access tracking is off")  # the hypervisor refuses
            abi.write(ptr, partition.access_bitmap(base, count, clear=op == 1, set_all=op == 2))
            return 0
        if request == abi.MSHV_ROOT_HVCALL:
            return self._hvcall(partition, None, arg, partition_fd=True)
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def _hvcall(self, partition: Partition, vp: Vp | None, arg: int, *, partition_fd: bool) -> int:
        """mshv_ioctl_passthru_hvcall: argument checks, the allow-list, status and output copied
        back whatever the result."""
        code, reps, in_sz, out_sz, status, rsvd, in_ptr, out_ptr = abi.ROOT_HVCALL.unpack(
            abi.read(arg, abi.ROOT_HVCALL.size))
        self._count(f"MSHV_ROOT_HVCALL:{code:#06x}")
        if status or not in_ptr or in_sz < 8 or any(rsvd) or in_sz > _PAGE:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if out_ptr and (not out_sz or out_sz > _PAGE):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if code not in abi.PASSTHRU_HVCALLS:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if code == abi.HVCALL_SET_PARTITION_PROPERTY and not partition_fd:
            raise OSError(errno.EINVAL, "async hypercalls only from the partition fd")
        data = bytearray(abi.read(in_ptr, in_sz))
        data[0:8] = partition.id.to_bytes(8, "little")  # the kernel fills in the partition id
        error = 0
        output = b""
        try:
            output = partition.hvcall(code, bytes(data), reps, vp)
            hv_status = abi.HV_STATUS_SUCCESS
        except HypercallFailed as exc:
            hv_status = exc.status
            error = abi.hv_status_errno(exc.status)
        except OSError as exc:  # the VP is running
            hv_status = 0x15  # HV_STATUS_INVALID_VP_STATE
            error = exc.errno or errno.EIO
        done_reps = reps if reps and not error else 0
        abi.write(arg, abi.ROOT_HVCALL.pack(code, done_reps, in_sz, out_sz, hv_status, bytes(6), in_ptr, out_ptr))
        if out_ptr:
            abi.write(out_ptr, output[:out_sz].ljust(out_sz, b"\0"))
        if error:
            raise OSError(error, os.strerror(error))
        return 0

    # -- VP fds --------------------------------------------------------------------------------

    def _vp_ioctl(self, vp: Vp, request: int, arg: int) -> int:
        if request == abi.MSHV_RUN_VP:
            self._count("MSHV_RUN_VP")
            message = vp.run(threading.get_ident())
            abi.write(arg, message[: abi.RUN_VP_SIZE])
            return 0
        if request in (abi.MSHV_GET_VP_STATE, abi.MSHV_SET_VP_STATE):
            return self._vp_state(vp, arg, request == abi.MSHV_SET_VP_STATE)
        if request == abi.MSHV_ROOT_HVCALL:
            return self._hvcall(vp.partition, vp, arg, partition_fd=False)
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def _vp_state(self, vp: Vp, arg: int, is_set: bool) -> int:
        """mshv_vp_ioctl_get_set_state: type, reserved bytes, page-aligned size and buffer."""
        self._count("MSHV_SET_VP_STATE" if is_set else "MSHV_GET_VP_STATE")
        kind, rsvd, buf_sz, buf_ptr = abi.GET_SET_VP_STATE.unpack(abi.read(arg, abi.GET_SET_VP_STATE.size))
        if kind >= _MSHV_VP_STATE_COUNT or any(rsvd) or not buf_sz or buf_sz % _PAGE or buf_ptr % _PAGE:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if kind not in (0, 1):
            raise OSError(errno.EIO, "only LAPIC and XSAVE state are simulated")
        data_sz = _PAGE
        abi.write(arg + 4, data_sz.to_bytes(4, "little"))  # buf_sz out: the size of the data
        if data_sz > buf_sz:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if kind == 0:
            if is_set:
                vp.set_lapic_state(abi.read(buf_ptr, abi.LAPIC_STATE.size))
            else:
                abi.write(buf_ptr, vp.lapic_state().ljust(data_sz, b"\0"))
        else:
            if is_set:
                vp.set_xsave(abi.read(buf_ptr, data_sz))
            else:
                abi.write(buf_ptr, vp.xsave().ljust(data_sz, b"\0"))
        return 0


_kernel: SimulatedKernel | None = None


def simulated_kernel() -> SimulatedKernel:
    """The process's simulated kernel (one, like the real one)."""
    global _kernel
    if _kernel is None:
        _kernel = SimulatedKernel()
    return _kernel
