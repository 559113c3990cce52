"""Checked bindings: every ``/dev/mshv`` ioctl and pass-through hypercall the backend uses.

This is the only module that touches :mod:`vmmkit_mshv._native` (``ffi``, ``lib``). Arguments
are validated before any call; a failing ioctl raises :class:`MshvError` naming the ioctl (and
the hypercall, for ``MSHV_ROOT_HVCALL``) and the errno. Every call goes through a
:class:`vmmkit_mshv.kernel.Kernel`, the backend's single seam to the kernel.

Intercept messages (``struct hv_message`` from ``MSHV_RUN_VP``) are decoded here into
:class:`Intercept`, so message layouts never leave this module.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import frozen

from vmmkit.errors import HypervisorError
from vmmkit_mshv._native import ffi, lib
from vmmkit_mshv.kernel import Kernel

__all__ = [
    "HV_PAGE_SIZE", "Hvcall", "HvStatus", "Intercept", "MessageType", "MshvDevice", "MshvError",
    "PartitionFd", "RegisterPage", "VpFd", "VpState", "ioctl_numbers",
]

HV_PAGE_SIZE = 0x1000
_U8, _U16, _U32, _U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
#: ``MSHV_MAX_VPS`` in drivers/hv/mshv_root.h.
MAX_VPS = 256
#: ``MSHV_MAX_GUEST_IRQS`` in drivers/hv/mshv_root.h.
MAX_GUEST_IRQS = 4096
#: Registers per HVCALL_{GET,SET}_VP_REGISTERS call that fit in one input page.
_MAX_REGS_PER_CALL = (HV_PAGE_SIZE - 16) // 32

# flag bits (include/uapi/linux/mshv.h)
PT_BIT_LAPIC = 0
PT_BIT_X2APIC = 1
SET_MEM_BIT_WRITABLE = 0
SET_MEM_BIT_EXECUTABLE = 1
SET_MEM_BIT_UNMAP = 2
IRQFD_BIT_DEASSIGN = 0
IRQFD_BIT_RESAMPLE = 1
IOEVENTFD_BIT_DATAMATCH = 0
IOEVENTFD_BIT_PIO = 1
IOEVENTFD_BIT_DEASSIGN = 2
GPAP_ACCESS_TYPE_ACCESSED = 0
GPAP_ACCESS_TYPE_DIRTY = 1
GPAP_ACCESS_OP_NOOP = 0
GPAP_ACCESS_OP_CLEAR = 1
GPAP_ACCESS_OP_SET = 2
VP_MMAP_OFFSET_REGISTERS = 0
VP_MMAP_OFFSET_INTERCEPT_MESSAGE = 1


def ioctl_numbers() -> dict[str, int]:
    """The ioctl request numbers as the C compiler computed them from the ``_IOW``/``_IOWR``
    expressions of ``include/uapi/linux/mshv.h``."""
    names = ("MSHV_CREATE_PARTITION", "MSHV_INITIALIZE_PARTITION", "MSHV_CREATE_VP",
             "MSHV_SET_GUEST_MEMORY", "MSHV_IRQFD", "MSHV_IOEVENTFD", "MSHV_SET_MSI_ROUTING",
             "MSHV_GET_GPAP_ACCESS_BITMAP", "MSHV_ROOT_HVCALL", "MSHV_RUN_VP", "MSHV_GET_VP_STATE",
             "MSHV_SET_VP_STATE")
    return {name: int(getattr(lib, name)) for name in names}


def layout(struct: str) -> tuple[int, dict[str, int]]:
    """``(sizeof, {field: offsetof})`` of ``struct`` as compiled (for the layout tests)."""
    ctype = ffi.typeof(struct)
    return ffi.sizeof(ctype), {name: ffi.offsetof(ctype, name) for name, _ in ctype.fields}


class Hvcall(enum.IntEnum):
    """Pass-through hypercall codes (``HVCALL_*`` in include/hyperv/hvgdk_mini.h)."""

    GET_PARTITION_PROPERTY = 0x0044
    SET_PARTITION_PROPERTY = 0x0045
    INSTALL_INTERCEPT = 0x004D
    GET_VP_REGISTERS = 0x0050
    SET_VP_REGISTERS = 0x0051
    ASSERT_VIRTUAL_INTERRUPT = 0x0094


class HvStatus(enum.IntEnum):
    """``HV_STATUS_*`` (include/hyperv/hvgdk_mini.h), the ones vmmkit names."""

    SUCCESS = 0x0
    INVALID_HYPERCALL_CODE = 0x2
    INVALID_HYPERCALL_INPUT = 0x3
    INVALID_PARAMETER = 0x5
    ACCESS_DENIED = 0x6
    UNKNOWN_PROPERTY = 0x9
    INVALID_VP_INDEX = 0xE
    INVALID_REGISTER_VALUE = 0x50


class MessageType(enum.IntEnum):
    """``enum hv_message_type`` (include/hyperv/hvgdk_mini.h), the x86 intercepts."""

    NONE = 0x00000000
    UNMAPPED_GPA = 0x80000000
    GPA_INTERCEPT = 0x80000001
    UNRECOVERABLE_EXCEPTION = 0x80000021
    X64_IO_PORT_INTERCEPT = 0x80010000
    X64_MSR_INTERCEPT = 0x80010001
    X64_CPUID_INTERCEPT = 0x80010002
    X64_EXCEPTION_INTERCEPT = 0x80010003
    X64_APIC_EOI = 0x80010004
    X64_HALT = 0x80010007


class VpState(enum.IntEnum):
    """``MSHV_VP_STATE_*`` for MSHV_GET/SET_VP_STATE."""

    LAPIC = 0
    XSAVE = 1


class InterceptType(enum.IntEnum):
    """``enum hv_intercept_type`` for HVCALL_INSTALL_INTERCEPT."""

    X64_IO_PORT = 0
    X64_MSR = 1
    X64_CPUID = 2
    EXCEPTION = 3


class MshvError(HypervisorError):
    """An MSHV ioctl or pass-through hypercall failed (``call`` names it, ``errno`` says why;
    ``hv_status`` is the hypervisor's status for hypercalls)."""

    def __init__(self, call: str, errno: int | None = None, detail: str = "", hv_status: int = 0) -> None:
        self.hv_status = hv_status
        super().__init__(call, errno, detail)


def _check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value:#x} is outside [{lo:#x}, {hi:#x}]")
    return value


def _check_fd(value: int, name: str) -> int:
    return _check_int(value, name, 0, 0x7FFF_FFFF)


def _addr(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


class _Fd:
    """An fd of the MSHV interface and the kernel it lives in."""

    def __init__(self, kernel: Kernel, fd: int) -> None:
        self.kernel = kernel
        self.fd = fd
        self._closed = False

    def _ioctl(self, name: str, arg: Any = None, detail: str = "") -> int:
        request = int(getattr(lib, name))
        try:
            return self.kernel.ioctl(self.fd, request, 0 if arg is None else _addr(arg))
        except OSError as exc:
            raise MshvError(name, exc.errno, detail) from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.kernel.close(self.fd)


class _HvcallFd(_Fd):
    """Partition and VP fds both accept MSHV_ROOT_HVCALL."""

    def hvcall(self, code: Hvcall, data: bytes, out_size: int = 0, reps: int = 0) -> bytes:
        """One pass-through hypercall: ``data`` is the input struct (its leading partition id is
        filled in by the kernel); returns ``out_size`` bytes of output."""
        if not 8 <= len(data) <= HV_PAGE_SIZE:
            raise ValueError(f"hypercall input must be 8..{HV_PAGE_SIZE} bytes, not {len(data)}")
        _check_int(out_size, "out_size", 0, HV_PAGE_SIZE)
        _check_int(reps, "reps", 0, _U16)
        in_buf = ffi.new("__u8[]", data)
        out_buf = ffi.new("__u8[]", max(out_size, 1))
        args = ffi.new("struct mshv_root_hvcall *")
        args.code = int(code)
        args.reps = reps
        args.in_sz = len(data)
        args.out_sz = out_size
        args.in_ptr = _addr(in_buf)
        args.out_ptr = _addr(out_buf) if out_size else 0
        try:
            self.kernel.ioctl(self.fd, int(lib.MSHV_ROOT_HVCALL), _addr(args))
        except OSError as exc:
            status = int(args.status)
            name = HvStatus(status).name if status in HvStatus._value2member_map_ else f"{status:#x}"
            raise MshvError(f"MSHV_ROOT_HVCALL({code.name})", exc.errno, f"HV_STATUS {name}", status) from None
        return bytes(ffi.buffer(out_buf, out_size)) if out_size else b""


# -- /dev/mshv --------------------------------------------------------------------------------


class MshvDevice(_Fd):
    """``/dev/mshv``: creates partitions."""

    @classmethod
    def open(cls, kernel: Kernel, path: str = "/dev/mshv") -> MshvDevice:
        try:
            return cls(kernel, kernel.open(path))
        except OSError as exc:
            raise MshvError(f"open({path})", exc.errno) from None

    def create_partition(self, *, lapic: bool = True, x2apic: bool = False) -> int:
        args = ffi.new("struct mshv_create_partition *")
        args.pt_flags = (int(lapic) << PT_BIT_LAPIC) | (int(x2apic) << PT_BIT_X2APIC)
        args.pt_isolation = 0  # MSHV_PT_ISOLATION_NONE
        return self._ioctl("MSHV_CREATE_PARTITION", args)


# -- partition fds ----------------------------------------------------------------------------


class PartitionFd(_HvcallFd):
    def initialize(self) -> None:
        self._ioctl("MSHV_INITIALIZE_PARTITION")

    def create_vp(self, index: int) -> int:
        _check_int(index, "vp_index", 0, MAX_VPS - 1)
        args = ffi.new("struct mshv_create_vp *")
        args.vp_index = index
        return self._ioctl("MSHV_CREATE_VP", args, f"vp {index}")

    def set_guest_memory(self, guest_addr: int, size: int, host_addr: int, *, writable: bool = True,
                         executable: bool = True, unmap: bool = False) -> None:
        for value, name in ((guest_addr, "guest_addr"), (size, "size"), (host_addr, "host_addr")):
            _check_int(value, name, 0, _U64)
            if value % HV_PAGE_SIZE:
                raise ValueError(f"{name}={value:#x} is not {HV_PAGE_SIZE:#x}-aligned")
        if size == 0:
            raise ValueError("a memory region cannot be empty")
        args = ffi.new("struct mshv_user_mem_region *")
        args.size = size
        args.guest_pfn = guest_addr // HV_PAGE_SIZE
        args.userspace_addr = host_addr
        args.flags = (int(writable) << SET_MEM_BIT_WRITABLE) | (int(executable) << SET_MEM_BIT_EXECUTABLE) \
            | (int(unmap) << SET_MEM_BIT_UNMAP)
        what = "unmap" if unmap else "map"
        self._ioctl("MSHV_SET_GUEST_MEMORY", args, f"{what} {guest_addr:#x}+{size:#x}")

    def irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None, deassign: bool = False) -> None:
        args = ffi.new("struct mshv_user_irqfd *")
        args.fd = _check_fd(fd, "fd")
        args.gsi = _check_int(gsi, "gsi", 0, MAX_GUEST_IRQS - 1)
        args.resamplefd = -1 if resample_fd is None else _check_fd(resample_fd, "resample_fd")
        args.flags = (int(deassign) << IRQFD_BIT_DEASSIGN) | (int(resample_fd is not None) << IRQFD_BIT_RESAMPLE)
        self._ioctl("MSHV_IRQFD", args, f"gsi {gsi}")

    def ioeventfd(self, fd: int, addr: int, *, length: int = 0, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"an ioeventfd length is 0, 1, 2, 4 or 8, not {length}")
        args = ffi.new("struct mshv_user_ioeventfd *")
        args.fd = _check_fd(fd, "fd")
        args.addr = _check_int(addr, "addr", 0, _U64)
        args.len = length
        args.datamatch = 0 if datamatch is None else _check_int(datamatch, "datamatch", 0, _U64)
        args.flags = (int(datamatch is not None) << IOEVENTFD_BIT_DATAMATCH) | (int(pio) << IOEVENTFD_BIT_PIO) \
            | (int(deassign) << IOEVENTFD_BIT_DEASSIGN)
        self._ioctl("MSHV_IOEVENTFD", args, f"{'port' if pio else 'mmio'} {addr:#x}")

    def set_msi_routing(self, routes: Iterable[tuple[int, int, int]]) -> None:
        """Replace the routing table: ``(gsi, address, data)`` per MSI route."""
        entries = sorted(routes)
        if len(entries) > MAX_GUEST_IRQS:
            raise ValueError(f"at most {MAX_GUEST_IRQS} MSI routes")
        head = ffi.sizeof("struct mshv_user_irq_table")
        raw = ffi.new("__u8[]", head + len(entries) * ffi.sizeof("struct mshv_user_irq_entry"))
        table = ffi.cast("struct mshv_user_irq_table *", raw)
        table.nr = len(entries)
        slots = ffi.cast("struct mshv_user_irq_entry *", raw + head)  # entries[] after the header
        for i, (gsi, address, data) in enumerate(entries):
            slots[i].gsi = _check_int(gsi, "gsi", 0, MAX_GUEST_IRQS - 1)
            slots[i].address_lo = _check_int(address, "address", 0, _U64) & _U32
            slots[i].address_hi = address >> 32
            slots[i].data = _check_int(data, "data", 0, _U32)
        self._ioctl("MSHV_SET_MSI_ROUTING", raw, f"{len(entries)} routes")

    def gpap_access_bitmap(self, base_pfn: int, pages: int, *, dirty: bool = True, clear: bool = True,
                           set_dirty: bool = False) -> bytes:
        """The dirty (or accessed) bit of ``pages`` pages from ``base_pfn``, one bit per page;
        clears them afterwards when ``clear``, sets them all when ``set_dirty`` (OP_SET)."""
        _check_int(pages, "pages", 1, 1 << 40)
        bitmap = ffi.new("__u8[]", (pages + 7) // 8)
        args = ffi.new("struct mshv_gpap_access_bitmap *")
        args.access_type = GPAP_ACCESS_TYPE_DIRTY if dirty else GPAP_ACCESS_TYPE_ACCESSED
        args.access_op = GPAP_ACCESS_OP_SET if set_dirty else GPAP_ACCESS_OP_CLEAR if clear else GPAP_ACCESS_OP_NOOP
        args.page_count = pages
        args.gpap_base = _check_int(base_pfn, "base_pfn", 0, _U64 >> 12)
        args.bitmap_ptr = _addr(bitmap)
        self._ioctl("MSHV_GET_GPAP_ACCESS_BITMAP", args, f"pfn {base_pfn:#x}+{pages}")
        return bytes(ffi.buffer(bitmap))

    # pass-through hypercalls on the partition

    def set_property(self, code: int, value: int) -> None:
        data = ffi.new("struct hv_input_set_partition_property *")
        data.property_code = _check_int(code, "property", 0, _U32)
        data.property_value = _check_int(value, "value", 0, _U64)
        self.hvcall(Hvcall.SET_PARTITION_PROPERTY, bytes(ffi.buffer(data)))

    def get_property(self, code: int) -> int:
        data = ffi.new("struct hv_input_get_partition_property *")
        data.property_code = _check_int(code, "property", 0, _U32)
        out = self.hvcall(Hvcall.GET_PARTITION_PROPERTY, bytes(ffi.buffer(data)), 8)
        return int.from_bytes(out, "little")

    def install_intercept(self, kind: InterceptType, access_mask: int, parameter: int = 0) -> None:
        data = ffi.new("struct hv_input_install_intercept *")
        data.access_type = _check_int(access_mask, "access_mask", 0, 7)
        data.intercept_type = int(kind)
        data.intercept_parameter = _check_int(parameter, "parameter", 0, _U64)
        self.hvcall(Hvcall.INSTALL_INTERCEPT, bytes(ffi.buffer(data)))

    def assert_interrupt(self, vector: int, apic_id: int, *, interrupt_type: int = 0, level: bool = False,
                         logical: bool = False) -> None:
        """HVCALL_ASSERT_VIRTUAL_INTERRUPT (``hv_input_assert_virtual_interrupt``)."""
        data = ffi.new("struct hv_input_assert_virtual_interrupt *")
        data.control = _check_int(interrupt_type, "interrupt_type", 0, 0xA) | (int(level) << 32) \
            | (int(logical) << 33)
        data.dest_addr = _check_int(apic_id, "apic_id", 0, _U32)
        data.vector = _check_int(vector, "vector", 0, _U8)
        self.hvcall(Hvcall.ASSERT_VIRTUAL_INTERRUPT, bytes(ffi.buffer(data)))


# -- intercept messages -----------------------------------------------------------------------


@frozen
class Intercept:
    """One decoded ``struct hv_message`` from MSHV_RUN_VP (x86 intercepts).

    ``rip`` and ``length`` (the instruction length) come from the intercept header; the rest
    depends on ``kind``: ports (``port``, ``size``, ``write``, ``rax``, ``string``, ``rep``),
    memory (``gpa``, ``write``, ``instruction`` bytes), CPUID (``rax``/``rcx`` the leaf and
    subleaf, ``default`` the hypervisor's answer), MSR (``msr``, ``write``, ``rax``, ``rdx``),
    exceptions (``vector``, ``error_code``, ``instruction``)."""

    kind: MessageType
    vp_index: int = 0
    rip: int = 0
    rflags: int = 0
    length: int = 0
    code_bits: int = 64
    write: bool = False
    port: int = 0
    size: int = 0
    string: bool = False
    rep: bool = False
    rax: int = 0
    rcx: int = 0
    rdx: int = 0
    rbx: int = 0
    gpa: int = 0
    gva: int = 0
    instruction: bytes = b""
    msr: int = 0
    vector: int = 0
    error_code: int | None = None
    default: tuple[int, int, int, int] = (0, 0, 0, 0)


#: ``intercept_access_type`` values (HV_INTERCEPT_ACCESS_*).
_ACCESS_WRITE = 1


def decode_message(raw: bytes) -> Intercept:
    """Decode a 256-byte ``struct hv_message``. Unknown types keep only ``kind`` (as NONE is
    never sent, an unknown type raises ValueError naming it)."""
    if len(raw) < ffi.sizeof("struct hv_message"):
        raise ValueError(f"a hv_message is {ffi.sizeof('struct hv_message')} bytes, not {len(raw)}")
    buf = ffi.from_buffer(raw)
    msg = ffi.cast("struct hv_message *", buf)
    mtype = int(msg.header.message_type)
    if mtype not in MessageType._value2member_map_:
        raise ValueError(f"unknown hv_message type {mtype:#x}")
    kind = MessageType(mtype)
    payload = ffi.cast("__u8 *", buf) + ffi.offsetof("struct hv_message", "payload")
    if kind in (MessageType.NONE, MessageType.X64_APIC_EOI):
        if kind is MessageType.X64_APIC_EOI:
            eoi = ffi.cast("struct hv_x64_apic_eoi_message *", payload)
            return Intercept(kind, vp_index=int(eoi.vp_index), vector=int(eoi.interrupt_vector))
        return Intercept(kind)
    header = ffi.cast("struct hv_x64_intercept_message_header *", payload)
    cs_attributes = int(header.cs_segment.attributes)
    common: dict[str, Any] = {
        "code_bits": 64 if cs_attributes & (1 << 13) else (32 if cs_attributes & (1 << 14) else 16),
        "vp_index": int(header.vp_index),
        "rip": int(header.rip),
        "rflags": int(header.rflags),
        "length": int(header.instruction_length_cr8) & 0xF,
        "write": int(header.intercept_access_type) == _ACCESS_WRITE,
    }
    if kind is MessageType.X64_IO_PORT_INTERCEPT:
        io = ffi.cast("struct hv_x64_io_port_intercept_message *", payload)
        info = int(io.access_info)
        count = min(int(io.instruction_byte_count), 16)
        return Intercept(kind, port=int(io.port_number), size=info & 7, string=bool(info & 8),
                         rep=bool(info & 16), rax=int(io.rax), rcx=int(io.rcx),
                         instruction=bytes(io.instruction_bytes)[:count], **common)
    if kind in (MessageType.UNMAPPED_GPA, MessageType.GPA_INTERCEPT):
        mem = ffi.cast("struct hv_x64_memory_intercept_message *", payload)
        count = min(int(mem.instruction_byte_count), 16)
        return Intercept(kind, gpa=int(mem.guest_physical_address), gva=int(mem.guest_virtual_address),
                         instruction=bytes(mem.instruction_bytes)[:count], **common)
    if kind is MessageType.X64_CPUID_INTERCEPT:
        cpuid = ffi.cast("struct hv_x64_cpuid_intercept_message *", payload)
        default = (int(cpuid.default_result_rax), int(cpuid.default_result_rbx),
                   int(cpuid.default_result_rcx), int(cpuid.default_result_rdx))
        return Intercept(kind, rax=int(cpuid.rax), rcx=int(cpuid.rcx), rdx=int(cpuid.rdx), rbx=int(cpuid.rbx),
                         default=default, **common)
    if kind is MessageType.X64_MSR_INTERCEPT:
        msr = ffi.cast("struct hv_x64_msr_intercept_message *", payload)
        return Intercept(kind, msr=int(msr.msr_number), rax=int(msr.rax), rdx=int(msr.rdx), **common)
    if kind is MessageType.X64_EXCEPTION_INTERCEPT:
        exc = ffi.cast("struct hv_x64_exception_intercept_message *", payload)
        info = int(exc.exception_info)
        count = min(int(exc.instruction_byte_count), 16)
        return Intercept(kind, vector=int(exc.exception_vector),
                         error_code=int(exc.error_code) if info & 1 else None,
                         instruction=bytes(exc.instruction_bytes)[:count], **common)
    return Intercept(kind, **common)  # HALT, UNRECOVERABLE_EXCEPTION: the header only


# -- VP fds -----------------------------------------------------------------------------------


class RegisterPage:
    """The VP's mmap'ed ``struct hv_vp_register_page`` (MSHV_VP_MMAP_OFFSET_REGISTERS).

    Valid (``isvalid``) after an intercept; writes mark their register class dirty so the
    hypervisor loads them on the next MSHV_RUN_VP (HV_X64_REGISTER_CLASS_*)."""

    CLASS_GENERAL = 1 << 0
    CLASS_IP = 1 << 1
    CLASS_FLAGS = 1 << 4

    def __init__(self, kernel: Kernel, addr: int) -> None:
        self._kernel = kernel
        self._addr = addr
        self.address = addr
        self._page = ffi.cast("struct hv_vp_register_page *", addr)

    @property
    def valid(self) -> bool:
        return bool(self._page.isvalid)

    def general(self) -> list[int]:
        """rax rcx rdx rbx rsp rbp rsi rdi r8-r15, in the hypervisor's order."""
        return [int(v) for v in self._page.gp_registers]

    def set_general(self, index: int, value: int) -> None:
        self._page.gp_registers[_check_int(index, "index", 0, 15)] = _check_int(value, "value", 0, _U64)
        self._page.dirty |= self.CLASS_GENERAL

    @property
    def rip(self) -> int:
        return int(self._page.rip)

    def set_rip(self, value: int) -> None:
        self._page.rip = _check_int(value, "rip", 0, _U64)
        self._page.dirty |= self.CLASS_IP

    @property
    def rflags(self) -> int:
        return int(self._page.rflags)

    def set_rflags(self, value: int) -> None:
        self._page.rflags = _check_int(value, "rflags", 0, _U64)
        self._page.dirty |= self.CLASS_FLAGS

    def unmap(self) -> None:
        self._kernel.munmap(self._addr, HV_PAGE_SIZE)


# -- the C run loop's ioctl seam -----------------------------------------------------------------

#: Kernels implemented in Python, by fd, for the C loop's callback (``Kernel.native_ioctl`` False).
_PYTHON_KERNELS: dict[int, Kernel] = {}
#: The last error of a kernel implemented in Python that was not an OSError, by fd.
_CALLBACK_ERRORS: dict[int, BaseException] = {}


@ffi.def_extern()  # type: ignore[untyped-decorator]
def vmk_mshv_py_ioctl(fd: int, request: int, arg: int) -> int:
    """The C loop's ioctl for a kernel implemented in Python (the simulated /dev/mshv)."""
    kernel = _PYTHON_KERNELS.get(fd)
    if kernel is None:
        return -_errno.EBADF
    try:
        return kernel.ioctl(fd, request, arg)
    except OSError as exc:
        _CALLBACK_ERRORS[fd] = exc
        return -(exc.errno or _errno.EIO)
    except BaseException as exc:  # surfaced by VpFd.run
        _CALLBACK_ERRORS[fd] = exc
        return -_errno.EIO


class PortSinks:
    """The VM's ports served by the C loop: guest writes go to an fd, reads return a constant."""

    def __init__(self) -> None:
        self.native = ffi.new("struct vmk_mshv_sinks *")
        self._lock = threading.Lock()

    def add(self, port: int, fd: int, read_value: int) -> bool:
        _check_int(port, "port", 0, _U16)
        with self._lock:
            free = None
            for i in range(int(lib.VMK_MSHV_MAX_SINKS)):
                slot = self.native.sink[i]
                if slot.used and slot.port == port:
                    free = i
                    break
                if not slot.used and free is None:
                    free = i
            if free is None:
                return False
            slot = self.native.sink[free]
            slot.port, slot.fd, slot.read_value = port, _check_fd(fd, "fd"), read_value & _U8
            slot.used = 1
            return True

    def remove(self, port: int) -> None:
        with self._lock:
            for i in range(int(lib.VMK_MSHV_MAX_SINKS)):
                slot = self.native.sink[i]
                if slot.used and slot.port == port:
                    slot.used = 0


class VpFd(_HvcallFd):
    def __init__(self, kernel: Kernel, fd: int, index: int, sinks: PortSinks | None = None,
                 register_page: int = 0) -> None:
        super().__init__(kernel, fd)
        self.index = index
        self._input = ffi.new("__u8[]", HV_PAGE_SIZE)
        self._state_buffer: Any = None
        self._sinks = sinks
        loop = ffi.new("struct vmk_mshv_vp *")
        loop.fd = fd
        if kernel.native_ioctl:
            loop.ioctl = lib.vmk_mshv_host_ioctl
        else:
            loop.ioctl = lib.vmk_mshv_py_ioctl
            _PYTHON_KERNELS[fd] = kernel
        loop.sinks = sinks.native if sinks is not None else ffi.NULL
        loop.register_page = ffi.cast("uint8_t *", register_page)
        self._loop = loop

    def use_register_page(self, page: RegisterPage | None) -> None:
        """Let the C loop complete sink intercepts through ``page``."""
        self._loop.register_page = ffi.cast("uint8_t *", page.address if page is not None else 0)

    def run(self) -> Intercept:
        """MSHV_RUN_VP (in C, serving port sinks) until an intercept for Python; raises
        InterruptedError on EINTR (a kick)."""
        ret = int(lib.vmk_mshv_run(self._loop))
        if ret < 0:
            error = _CALLBACK_ERRORS.pop(self.fd, None)
            if -ret == _errno.EINTR:
                raise InterruptedError(_errno.EINTR, "interrupted")
            if error is not None and not isinstance(error, OSError):
                raise error
            strerror = error.strerror if isinstance(error, OSError) else None
            reason = strerror if strerror and strerror != os.strerror(-ret) else ""
            raise MshvError("MSHV_RUN_VP", -ret, f"vp {self.index}" + (f": {reason}" if reason else ""))
        return decode_message(bytes(ffi.buffer(self._loop.msg)))

    def kick(self) -> None:
        """Make the C loop return EINTR before its next MSHV_RUN_VP (a signal ends one in progress)."""
        self._loop.kicked = 1

    def clear_kick(self) -> None:
        self._loop.kicked = 0

    def counts(self) -> dict[str, int]:
        loop = self._loop
        return {"runs": int(loop.runs), "sink_writes": int(loop.sink_writes), "sink_reads": int(loop.sink_reads),
                "intercepts": int(loop.returned)}

    def close(self) -> None:
        _PYTHON_KERNELS.pop(self.fd, None)
        super().close()

    def map_register_page(self) -> RegisterPage | None:
        """The register page, or None where the kernel offers none (ENODEV: encrypted
        partitions)."""
        try:
            addr = self.kernel.mmap(self.fd, HV_PAGE_SIZE, VP_MMAP_OFFSET_REGISTERS * HV_PAGE_SIZE)
        except OSError as exc:
            if exc.errno == _errno.ENODEV:
                return None
            raise MshvError("mmap(MSHV_VP_MMAP_OFFSET_REGISTERS)", exc.errno, f"vp {self.index}") from None
        return RegisterPage(self.kernel, addr)

    # registers through HVCALL_GET/SET_VP_REGISTERS

    def get_registers(self, names: Sequence[int]) -> list[bytes]:
        """The 16-byte ``hv_register_value`` of each register named (``HV_*_REGISTER_*``)."""
        values: list[bytes] = []
        for start in range(0, len(names), _MAX_REGS_PER_CALL):
            chunk = names[start : start + _MAX_REGS_PER_CALL]
            head = ffi.cast("struct hv_input_get_vp_registers *", self._input)
            head.partition_id = 0
            head.vp_index = self.index
            head.input_vtl = 0
            names_at = ffi.cast("__u32 *", self._input + ffi.sizeof("struct hv_input_get_vp_registers"))
            for i, name in enumerate(chunk):
                names_at[i] = _check_int(name, "register name", 0, _U32)
            size = ffi.sizeof("struct hv_input_get_vp_registers") + 4 * len(chunk)
            out = self.hvcall(Hvcall.GET_VP_REGISTERS, bytes(ffi.buffer(self._input, size)), 16 * len(chunk),
                              reps=len(chunk))
            values.extend(out[16 * i : 16 * i + 16] for i in range(len(chunk)))
        return values

    def set_registers(self, pairs: Sequence[tuple[int, bytes]]) -> None:
        for start in range(0, len(pairs), _MAX_REGS_PER_CALL):
            chunk = pairs[start : start + _MAX_REGS_PER_CALL]
            head = ffi.cast("struct hv_input_set_vp_registers *", self._input)
            head.partition_id = 0
            head.vp_index = self.index
            head.input_vtl = 0
            elements = ffi.cast("struct hv_register_assoc *",
                                self._input + ffi.sizeof("struct hv_input_set_vp_registers"))
            for i, (name, value) in enumerate(chunk):
                if len(value) != 16:
                    raise ValueError(f"a register value is 16 bytes, not {len(value)}")
                element = elements[i]
                element.name = _check_int(name, "register name", 0, _U32)
                element.reserved1 = 0
                element.reserved2 = 0
                ffi.memmove(ffi.addressof(element, "value"), value, 16)
            size = ffi.sizeof("struct hv_input_set_vp_registers") + ffi.sizeof("struct hv_register_assoc") * len(chunk)
            self.hvcall(Hvcall.SET_VP_REGISTERS, bytes(ffi.buffer(self._input, size)), reps=len(chunk))

    # MSHV_GET/SET_VP_STATE

    def get_state(self, kind: VpState, size: int = HV_PAGE_SIZE) -> bytes:
        buf, args = self._state_args(kind, size)
        self._ioctl("MSHV_GET_VP_STATE", args, f"{kind.name}, vp {self.index}")
        return bytes(ffi.buffer(buf, min(int(args.buf_sz), size)))

    def set_state(self, kind: VpState, data: bytes) -> None:
        size = -(-max(len(data), 1) // HV_PAGE_SIZE) * HV_PAGE_SIZE
        buf, args = self._state_args(kind, size)
        ffi.memmove(buf, data, len(data))
        self._ioctl("MSHV_SET_VP_STATE", args, f"{kind.name}, vp {self.index}")

    def _state_args(self, kind: VpState, size: int) -> tuple[Any, Any]:
        _check_int(size, "size", HV_PAGE_SIZE, 16 * HV_PAGE_SIZE)
        if size % HV_PAGE_SIZE:
            raise ValueError("a VP state buffer is a whole number of pages")
        raw = ffi.new("__u8[]", size + HV_PAGE_SIZE)
        # The kernel wants a page-aligned buffer (PAGE_ALIGNED(args.buf_ptr)).
        start = -_addr(raw) % HV_PAGE_SIZE
        buf = ffi.cast("__u8 *", raw) + start
        args = ffi.new("struct mshv_get_set_vp_state *")
        args.type = int(kind)
        args.buf_sz = size
        args.buf_ptr = _addr(buf)
        self._state_buffer = raw  # the aligned view points into ``raw``
        return buf, args
