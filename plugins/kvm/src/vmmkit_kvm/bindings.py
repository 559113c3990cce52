"""Checked bindings: every KVM ioctl vmmkit uses, with arguments validated and return codes
checked.

This is the only module that touches :mod:`vmmkit_kvm._native` (``ffi`` and ``lib``). Bad
arguments raise :class:`ValueError` before any system call; a failing ioctl raises
:class:`vmmkit.errors.HypervisorError` naming the ioctl and the errno. Register state crosses
this boundary as the neutral :mod:`vmmkit.x86` types.
"""

from __future__ import annotations

import enum
import errno as _errno
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attrs import frozen

from vmmkit.errors import HypervisorError
from vmmkit.x86 import (
    CpuIdEntry,
    DescriptorTable,
    FpuState,
    MsrEntry,
    Segment,
    SpecialRegisters,
    StandardRegisters,
)
from vmmkit_kvm._native import ffi, lib
from vmmkit_kvm.native_loop import COUNTER_NAMES, _fit

__all__ = [
    "API_VERSION",
    "Cap",
    "ExitCode",
    "KvmSystem",
    "KvmVmFd",
    "KvmVcpuFd",
    "PC_IRQ_ROUTES",
    "RawExit",
    "VcpuEventsState",
    "COUNTER_NAMES",
    "io_in_bounds",
]

API_VERSION: int = lib.KVM_API_VERSION
PAGE_SIZE = mmap.PAGESIZE
#: GSIs below this are the PC's wired interrupts (:data:`PC_IRQ_ROUTES`); MSI routes start here.
LEGACY_GSIS = 24


def _pc_irq_routes() -> tuple[tuple[int, int, int], ...]:
    routes = []
    for gsi in range(LEGACY_GSIS):
        if gsi == 2:
            continue  # the PIC cascade; IOAPIC pin 2 is IRQ 0's
        if gsi < 8:
            routes.append((gsi, lib.KVM_IRQCHIP_PIC_MASTER, gsi))
        elif gsi < 16:
            routes.append((gsi, lib.KVM_IRQCHIP_PIC_SLAVE, gsi - 8))
        routes.append((gsi, lib.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
    return tuple(routes)


#: ``(gsi, irqchip, pin)`` for GSIs 0-23, the PC's wiring as QEMU installs it
#: (``kvm_pc_setup_irq_routing`` in QEMU's hw/i386/kvm/ioapic.c): GSI n is ISA IRQ n
#: (n < 16) or IOAPIC pin n (16-23); GSIs 0-15 reach the PICs (master pins 0-7, slave pins
#: 0-7) and the IOAPIC, except that GSI 0, the PIT's IRQ 0, reaches IOAPIC pin 2, as the
#: MADT's interrupt source override and the MP table say, and GSI 2 (the PIC cascade) has no
#: route at all. KVM's own default (what KVM_CREATE_IRQCHIP installs) sends GSI n to IOAPIC
#: pin n, so IRQ 0 would arrive on pin 0, where a guest that trusts those tables never looks.
PC_IRQ_ROUTES: tuple[tuple[int, int, int], ...] = _pc_irq_routes()

MAX_CPUID_ENTRIES = 256
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


class Cap(enum.IntEnum):
    """The ``KVM_CAP_*`` values vmmkit asks about (from ``<linux/kvm.h>``)."""

    IRQCHIP = lib.KVM_CAP_IRQCHIP
    HLT = lib.KVM_CAP_HLT
    USER_MEMORY = lib.KVM_CAP_USER_MEMORY
    SET_TSS_ADDR = lib.KVM_CAP_SET_TSS_ADDR
    EXT_CPUID = lib.KVM_CAP_EXT_CPUID
    NR_VCPUS = lib.KVM_CAP_NR_VCPUS
    MAX_VCPUS = lib.KVM_CAP_MAX_VCPUS
    NR_MEMSLOTS = lib.KVM_CAP_NR_MEMSLOTS
    COALESCED_MMIO = lib.KVM_CAP_COALESCED_MMIO
    COALESCED_PIO = lib.KVM_CAP_COALESCED_PIO
    SET_IDENTITY_MAP_ADDR = lib.KVM_CAP_SET_IDENTITY_MAP_ADDR
    IRQ_ROUTING = lib.KVM_CAP_IRQ_ROUTING
    IRQ_INJECT_STATUS = lib.KVM_CAP_IRQ_INJECT_STATUS
    IRQFD = lib.KVM_CAP_IRQFD
    IRQFD_RESAMPLE = lib.KVM_CAP_IRQFD_RESAMPLE
    PIT2 = lib.KVM_CAP_PIT2
    IOEVENTFD = lib.KVM_CAP_IOEVENTFD
    IOEVENTFD_ANY_LENGTH = lib.KVM_CAP_IOEVENTFD_ANY_LENGTH
    ADJUST_CLOCK = lib.KVM_CAP_ADJUST_CLOCK
    XCRS = lib.KVM_CAP_XCRS
    XSAVE = lib.KVM_CAP_XSAVE
    SIGNAL_MSI = lib.KVM_CAP_SIGNAL_MSI
    READONLY_MEM = lib.KVM_CAP_READONLY_MEM
    SYNC_REGS = lib.KVM_CAP_SYNC_REGS
    GET_TSC_KHZ = lib.KVM_CAP_GET_TSC_KHZ
    SET_GUEST_DEBUG = lib.KVM_CAP_SET_GUEST_DEBUG
    VCPU_EVENTS = lib.KVM_CAP_VCPU_EVENTS
    MP_STATE = lib.KVM_CAP_MP_STATE
    IMMEDIATE_EXIT = lib.KVM_CAP_IMMEDIATE_EXIT
    EXIT_ON_EMULATION_FAILURE = lib.KVM_CAP_EXIT_ON_EMULATION_FAILURE
    DIRTY_LOG_RING = lib.KVM_CAP_DIRTY_LOG_RING
    DIRTY_LOG_RING_ACQ_REL = lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL


class ExitCode(enum.IntEnum):
    """What the native run loop returns to Python (``VMK_EXIT_*`` in runloop.h)."""

    PIO = lib.VMK_EXIT_PIO
    MMIO = lib.VMK_EXIT_MMIO
    HLT = lib.VMK_EXIT_HLT
    SHUTDOWN = lib.VMK_EXIT_SHUTDOWN
    SYSTEM_EVENT = lib.VMK_EXIT_SYSTEM_EVENT
    INTERNAL_ERROR = lib.VMK_EXIT_INTERNAL_ERROR
    FAIL_ENTRY = lib.VMK_EXIT_FAIL_ENTRY
    DEBUG = lib.VMK_EXIT_DEBUG
    INTERRUPTED = lib.VMK_EXIT_INTERRUPTED
    UNKNOWN = lib.VMK_EXIT_UNKNOWN
    BAD_RUN = lib.VMK_EXIT_BAD_RUN
    CALLBACK_ERROR = lib.VMK_EXIT_CALLBACK_ERROR



SYSTEM_EVENT_SHUTDOWN: int = lib.KVM_SYSTEM_EVENT_SHUTDOWN
SYSTEM_EVENT_RESET: int = lib.KVM_SYSTEM_EVENT_RESET
SYSTEM_EVENT_CRASH: int = lib.KVM_SYSTEM_EVENT_CRASH
INTERNAL_ERROR_EMULATION: int = lib.KVM_INTERNAL_ERROR_EMULATION
INTERNAL_ERROR_FLAG_INSN_BYTES: int = lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
SYNC_REGS: int = lib.KVM_SYNC_X86_REGS
SYNC_SREGS: int = lib.KVM_SYNC_X86_SREGS
SYNC_EVENTS: int = lib.KVM_SYNC_X86_EVENTS
EXIT_DIRTY_RING_FULL: int = lib.KVM_EXIT_DIRTY_RING_FULL


@frozen
class RawExit:
    """A non-I/O exit as the run loop reported it: ``code`` (an :class:`ExitCode`), the
    ``kvm_run`` exit reason and the exit's data words (meaning depends on ``code``)."""

    code: int
    kvm_reason: int
    words: tuple[int, ...] = ()


@frozen
class VcpuEventsState:
    """``struct kvm_vcpu_events``: pending/injected exception, interrupt, NMI and SMI state."""

    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    sipi_vector: int = 0
    flags: int = 0
    smi_smm: int = 0
    smi_pending: int = 0
    smi_inside_nmi: int = 0
    smi_latched_init: int = 0
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0


# -- helpers ----------------------------------------------------------------------------------


def _fail(call: str, detail: str = "") -> HypervisorError:
    return HypervisorError(call, ffi.errno or None, detail)


def _check_fd(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a file descriptor (a non-negative int), not {value!r}")
    return value


def _check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value:#x} is outside [{lo:#x}, {hi:#x}]")
    return value


def _check_page_aligned(value: int, name: str) -> None:
    if value % PAGE_SIZE:
        raise ValueError(f"{name}={value:#x} is not {PAGE_SIZE}-byte aligned")


def io_in_bounds(run_size: int, size: int, count: int, data_offset: int) -> bool:
    """The native check a KVM_EXIT_IO passes before its data is touched (for tests)."""
    if not (0 <= run_size <= _U64 and 0 <= size <= _U32 and 0 <= count <= _U32 and 0 <= data_offset <= _U64):
        raise ValueError("io_in_bounds arguments out of range")
    return bool(lib.vmk_io_in_bounds(run_size, size, count, data_offset))


def kvm_run_struct_size() -> int:
    return int(lib.vmk_kvm_run_size())


# -- register translation ---------------------------------------------------------------------

_REG_NAMES = tuple(f.name for f in StandardRegisters.__attrs_attrs__)
_SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEG_FIELDS = tuple(f.name for f in Segment.__attrs_attrs__)


def _regs_from(c: Any) -> StandardRegisters:
    return StandardRegisters(**{name: getattr(c, name) for name in _REG_NAMES})


def _regs_into(c: Any, regs: StandardRegisters) -> None:
    for name in _REG_NAMES:
        value = getattr(regs, name)
        setattr(c, name, _check_int(value, name, 0, _U64))


def _segment_from(c: Any) -> Segment:
    return Segment(**{name: getattr(c, name) for name in _SEG_FIELDS})


def _segment_into(c: Any, seg: Segment, name: str) -> None:
    c.base = _check_int(seg.base, f"{name}.base", 0, _U64)
    c.limit = _check_int(seg.limit, f"{name}.limit", 0, _U32)
    c.selector = _check_int(seg.selector, f"{name}.selector", 0, _U16)
    c.type = _check_int(seg.type, f"{name}.type", 0, 15)
    for bit in ("present", "dpl", "db", "s", "l", "g", "avl", "unusable"):
        hi = 3 if bit == "dpl" else 1
        setattr(c, bit, _check_int(getattr(seg, bit), f"{name}.{bit}", 0, hi))


def _sregs_from(c: Any) -> SpecialRegisters:
    return SpecialRegisters(
        **{name: _segment_from(getattr(c, name)) for name in _SEG_NAMES},
        gdt=DescriptorTable(c.gdt.base, c.gdt.limit),
        idt=DescriptorTable(c.idt.base, c.idt.limit),
        cr0=c.cr0,
        cr2=c.cr2,
        cr3=c.cr3,
        cr4=c.cr4,
        cr8=c.cr8,
        efer=c.efer,
        apic_base=c.apic_base,
    )


def _sregs_into(c: Any, sregs: SpecialRegisters) -> None:
    for name in _SEG_NAMES:
        _segment_into(getattr(c, name), getattr(sregs, name), name)
    for name in ("gdt", "idt"):
        table = getattr(sregs, name)
        getattr(c, name).base = _check_int(table.base, f"{name}.base", 0, _U64)
        getattr(c, name).limit = _check_int(table.limit, f"{name}.limit", 0, _U16)
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        setattr(c, name, _check_int(getattr(sregs, name), name, 0, _U64))


# -- /dev/kvm ---------------------------------------------------------------------------------


class KvmSystem:
    """The ``/dev/kvm`` file descriptor: system ioctls."""

    def __init__(self, fd: int, path: str = "/dev/kvm") -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str = "/dev/kvm") -> KvmSystem:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise HypervisorError(f"open({path})", exc.errno) from None
        return cls(fd, path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def api_version(self) -> int:
        rc = lib.vmk_ioctl_int(self.fd, lib.KVM_GET_API_VERSION, 0)
        if rc < 0:
            raise _fail("KVM_GET_API_VERSION")
        return int(rc)

    def check_extension(self, cap: int) -> int:
        rc = lib.vmk_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, _check_int(int(cap), "cap", 0, _U32))
        if rc < 0:
            raise _fail("KVM_CHECK_EXTENSION")
        return int(rc)

    def create_vm(self, vm_type: int = 0) -> int:
        rc = lib.vmk_ioctl_int(self.fd, lib.KVM_CREATE_VM, _check_int(vm_type, "vm_type", 0, _U32))
        if rc < 0:
            raise _fail("KVM_CREATE_VM")
        return int(rc)

    def vcpu_mmap_size(self) -> int:
        rc = lib.vmk_ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0)
        if rc < 0:
            raise _fail("KVM_GET_VCPU_MMAP_SIZE")
        return int(rc)

    def supported_cpuid(self) -> list[CpuIdEntry]:
        nent = 64
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            rc = lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if rc >= 0:
                return [_cpuid_from(buf.entries[i]) for i in range(buf.nent)]
            if ffi.errno != _errno.E2BIG or nent >= 4096:
                raise _fail("KVM_GET_SUPPORTED_CPUID")
            nent *= 2

    def msr_index_list(self) -> list[int]:
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        rc = lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_MSR_INDEX_LIST, probe)
        if rc < 0 and ffi.errno != _errno.E2BIG:
            raise _fail("KVM_GET_MSR_INDEX_LIST")
        n = probe.nmsrs
        buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_MSR_INDEX_LIST, buf) < 0:
            raise _fail("KVM_GET_MSR_INDEX_LIST")
        return [buf.indices[i] for i in range(buf.nmsrs)]


def _cpuid_from(c: Any) -> CpuIdEntry:
    return CpuIdEntry(c.function, c.index, c.flags, c.eax, c.ebx, c.ecx, c.edx)


def _cpuid_into(c: Any, entry: CpuIdEntry) -> None:
    c.function = _check_int(entry.function, "cpuid function", 0, _U32)
    c.index = _check_int(entry.index, "cpuid index", 0, _U32)
    c.flags = _check_int(entry.flags, "cpuid flags", 0, _U32)
    for reg in ("eax", "ebx", "ecx", "edx"):
        setattr(c, reg, _check_int(getattr(entry, reg), f"cpuid {reg}", 0, _U32))


# -- the VM -----------------------------------------------------------------------------------


class KvmVmFd:
    """A VM file descriptor plus the native per-VM state (port sinks, ring lock)."""

    def __init__(self, fd: int, system: KvmSystem) -> None:
        self.fd = fd
        self.system = system
        native = lib.vmk_vm_new(fd)
        if native == ffi.NULL:
            os.close(fd)
            raise MemoryError("vmk_vm_new")
        self._native = native
        self._lock = threading.Lock()
        self.max_gsi = 1024

    @property
    def native(self) -> Any:
        return self._native

    def close(self) -> None:
        if self._native is not None:
            lib.vmk_vm_free(self._native)
            self._native = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        rc = lib.vmk_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, _check_int(int(cap), "cap", 0, _U32))
        if rc < 0:
            raise _fail("KVM_CHECK_EXTENSION")
        return int(rc)

    def enable_cap(self, cap: int, *args: int) -> None:
        req = ffi.new("struct kvm_enable_cap *")
        req.cap = _check_int(int(cap), "cap", 0, _U32)
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        for i, arg in enumerate(args):
            req.args[i] = _check_int(arg, "cap argument", 0, _U64)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_ENABLE_CAP, req) < 0:
            raise _fail("KVM_ENABLE_CAP", f"capability {int(cap)}")

    # memory

    def set_user_memory_region(
        self, slot: int, guest_addr: int, size: int, host_addr: int, *, readonly: bool = False,
        log_dirty: bool = False,
    ) -> None:
        """Create, move or (with ``size == 0``) delete memory slot ``slot``."""
        _check_int(slot, "slot", 0, 0x7FFF)
        _check_int(guest_addr, "guest_addr", 0, _U64)
        _check_int(size, "size", 0, _U64)
        _check_int(host_addr, "host_addr", 0, _U64)
        _check_page_aligned(guest_addr, "guest_addr")
        _check_page_aligned(size, "size")
        _check_page_aligned(host_addr, "host_addr")
        if size and not host_addr:
            raise ValueError("host_addr must not be NULL")
        if guest_addr + size > _U64 + 1:
            raise ValueError("guest range wraps around")
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = (lib.KVM_MEM_READONLY if readonly else 0) | (
            lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        )
        region.guest_phys_addr = guest_addr
        region.memory_size = size
        region.userspace_addr = host_addr
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region) < 0:
            raise _fail("KVM_SET_USER_MEMORY_REGION", f"slot {slot} at {guest_addr:#x}+{size:#x}")

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: re-arm logging of the ring entries marked RESET; their count."""
        rc = lib.vmk_ioctl_int(self.fd, lib.KVM_RESET_DIRTY_RINGS, 0)
        if rc < 0:
            raise _fail("KVM_RESET_DIRTY_RINGS")
        return int(rc)

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        """The dirty bitmap of ``slot`` (one bit per page of its ``size`` bytes), cleared."""
        _check_int(slot, "slot", 0, 0x7FFF)
        _check_int(size, "size", 1, _U64)
        pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
        nbytes = (pages + 63) // 64 * 8
        bitmap = ffi.new("char[]", nbytes)
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = bitmap
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_DIRTY_LOG, log) < 0:
            raise _fail("KVM_GET_DIRTY_LOG", f"slot {slot}")
        return bytes(ffi.buffer(bitmap, nbytes)[:])

    # vCPUs

    def create_vcpu(self, vcpu_id: int) -> int:
        rc = lib.vmk_ioctl_int(self.fd, lib.KVM_CREATE_VCPU, _check_int(vcpu_id, "vcpu id", 0, _U32))
        if rc < 0:
            raise _fail("KVM_CREATE_VCPU", f"vCPU {vcpu_id}")
        return int(rc)

    # x86 platform

    def set_tss_addr(self, addr: int) -> None:
        _check_int(addr, "tss address", 0, _U32 - 3 * PAGE_SIZE + 1)
        _check_page_aligned(addr, "tss address")
        if lib.vmk_ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, addr) < 0:
            raise _fail("KVM_SET_TSS_ADDR", f"{addr:#x}")

    def set_identity_map_addr(self, addr: int) -> None:
        _check_int(addr, "identity map address", 0, _U32 - PAGE_SIZE + 1)
        _check_page_aligned(addr, "identity map address")
        value = ffi.new("uint64_t *", addr)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, value) < 0:
            raise _fail("KVM_SET_IDENTITY_MAP_ADDR", f"{addr:#x}")

    def create_irqchip(self) -> None:
        if lib.vmk_ioctl_int(self.fd, lib.KVM_CREATE_IRQCHIP, 0) < 0:
            raise _fail("KVM_CREATE_IRQCHIP")

    def create_pit2(self, *, speaker_dummy: bool = True) -> None:
        config = ffi.new("struct kvm_pit_config *")
        config.flags = lib.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_CREATE_PIT2, config) < 0:
            raise _fail("KVM_CREATE_PIT2")

    # interrupts

    def irq_line(self, gsi: int, level: bool) -> int:
        """Drive ``gsi``; returns KVM's delivery status (KVM_IRQ_LINE_STATUS)."""
        _check_int(gsi, "gsi", 0, self.max_gsi - 1)
        req = ffi.new("struct kvm_irq_level *")
        req.irq = gsi
        req.level = 1 if level else 0
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_IRQ_LINE_STATUS, req) < 0:
            raise _fail("KVM_IRQ_LINE_STATUS", f"gsi {gsi}")
        return int(req.status)

    def irq_line_nostatus(self, gsi: int, level: bool) -> None:
        _check_int(gsi, "gsi", 0, self.max_gsi - 1)
        req = ffi.new("struct kvm_irq_level *")
        req.irq = gsi
        req.level = 1 if level else 0
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_IRQ_LINE, req) < 0:
            raise _fail("KVM_IRQ_LINE", f"gsi {gsi}")

    def irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None, deassign: bool = False) -> None:
        _check_fd(fd, "irqfd")
        _check_int(gsi, "gsi", 0, self.max_gsi - 1)
        req = ffi.new("struct kvm_irqfd *")
        req.fd = fd
        req.gsi = gsi
        if deassign:
            if resample_fd is not None:
                raise ValueError("a resample fd is not given when deassigning an irqfd")
            req.flags = lib.KVM_IRQFD_FLAG_DEASSIGN
        elif resample_fd is not None:
            req.flags = lib.KVM_IRQFD_FLAG_RESAMPLE
            req.resamplefd = _check_fd(resample_fd, "resample fd")
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_IRQFD, req) < 0:
            raise _fail("KVM_IRQFD", f"fd {fd} gsi {gsi}{' deassign' if deassign else ''}")

    def ioeventfd(
        self, fd: int, addr: int, *, pio: bool, length: int = 0, datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        _check_fd(fd, "ioeventfd")
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd length must be 0, 1, 2, 4 or 8, not {length!r}")
        if pio:
            if length == 8:
                raise ValueError("port I/O is at most 4 bytes wide")
            _check_int(addr, "port", 0, _U16)
            if addr + max(length, 1) > 0x10000:
                raise ValueError(f"port range {addr:#x}+{length} leaves the port space")
        else:
            _check_int(addr, "address", 0, _U64 - max(length, 1) + 1)
        flags = 0
        match = 0
        if datamatch is not None:
            if length == 0:
                raise ValueError("a datamatch ioeventfd needs a length")
            match = _check_int(datamatch, "datamatch", 0, (1 << (8 * length)) - 1)
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = ffi.new("struct kvm_ioeventfd *")
        req.datamatch = match
        req.addr = addr
        req.len = length
        req.fd = fd
        req.flags = flags
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_IOEVENTFD, req) < 0:
            kind = "port" if pio else "mmio"
            raise _fail("KVM_IOEVENTFD", f"{kind} {addr:#x} len {length}{' deassign' if deassign else ''}")

    def signal_msi(self, address: int, data: int) -> int:
        """Inject one MSI; > 0 delivered, 0 blocked by the guest."""
        _check_int(address, "msi address", 0, _U64)
        _check_int(data, "msi data", 0, _U32)
        msi = ffi.new("struct kvm_msi *")
        msi.address_lo = address & _U32
        msi.address_hi = address >> 32
        msi.data = data
        rc = lib.vmk_ioctl_ptr(self.fd, lib.KVM_SIGNAL_MSI, msi)
        if rc < 0:
            raise _fail("KVM_SIGNAL_MSI", f"address {address:#x} data {data:#x}")
        return int(rc)

    def set_gsi_routing(self, msi_routes: Mapping[int, tuple[int, int]]) -> None:
        """Replace the VM's whole routing table: the PC's PIC/IOAPIC routes for GSIs 0-23
        (:data:`PC_IRQ_ROUTES`) plus ``msi_routes`` (``gsi -> (address, data)``, GSIs from 24)."""
        entries: list[tuple[int, int, int, int]] = [  # (gsi, type, a, b)
            (gsi, lib.KVM_IRQ_ROUTING_IRQCHIP, chip, pin) for gsi, chip, pin in PC_IRQ_ROUTES
        ]
        for gsi, (address, data) in sorted(msi_routes.items()):
            _check_int(gsi, "msi gsi", LEGACY_GSIS, self.max_gsi - 1)
            _check_int(address, "msi address", 0, _U64)
            _check_int(data, "msi data", 0, _U32)
            entries.append((gsi, lib.KVM_IRQ_ROUTING_MSI, address, data))
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(entries), "entries": len(entries)})
        for i, (gsi, kind, a, b) in enumerate(entries):
            entry = table.entries[i]
            entry.gsi = gsi
            entry.type = kind
            if kind == lib.KVM_IRQ_ROUTING_MSI:
                entry.u.msi.address_lo = a & _U32
                entry.u.msi.address_hi = a >> 32
                entry.u.msi.data = b
            else:
                entry.u.irqchip.irqchip = a
                entry.u.irqchip.pin = b
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_GSI_ROUTING, table) < 0:
            raise _fail("KVM_SET_GSI_ROUTING", f"{len(entries)} routes")

    # coalesced I/O

    def coalesced_zone(self, addr: int, size: int, *, pio: bool, register: bool = True) -> None:
        _check_int(size, "zone size", 1, _U32)
        if pio:
            _check_int(addr, "port", 0, _U16)
            if addr + size > 0x10000:
                raise ValueError(f"port range {addr:#x}+{size:#x} leaves the port space")
        else:
            _check_int(addr, "address", 0, _U64 - size + 1)
        zone = ffi.new("struct kvm_coalesced_mmio_zone *")
        zone.addr = addr
        zone.size = size
        zone.pio = 1 if pio else 0
        call = "KVM_REGISTER_COALESCED_MMIO" if register else "KVM_UNREGISTER_COALESCED_MMIO"
        req = lib.KVM_REGISTER_COALESCED_MMIO if register else lib.KVM_UNREGISTER_COALESCED_MMIO
        if pio:
            call = call.replace("MMIO", "PIO")
        if lib.vmk_ioctl_ptr(self.fd, req, zone) < 0:
            raise _fail(call, f"{addr:#x}+{size:#x}")

    # clock

    def get_clock(self) -> int:
        data = ffi.new("struct kvm_clock_data *")
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_CLOCK, data) < 0:
            raise _fail("KVM_GET_CLOCK")
        return int(data.clock)

    def set_clock(self, ns: int) -> None:
        data = ffi.new("struct kvm_clock_data *")
        data.clock = _check_int(ns, "clock", 0, _U64)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_CLOCK, data) < 0:
            raise _fail("KVM_SET_CLOCK")

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: the 512-byte state of chip ``chip_id`` (``struct kvm_pic_state`` or
        ``struct kvm_ioapic_state``, as <linux/kvm.h> lays them out)."""
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = _check_int(chip_id, "chip id", 0, 2)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_IRQCHIP, chip) < 0:
            raise _fail("KVM_GET_IRQCHIP")
        return bytes(ffi.buffer(chip)[8:])

    def set_irqchip(self, chip_id: int, state: bytes) -> None:
        chip = ffi.new("struct kvm_irqchip *")
        size = ffi.sizeof(chip[0]) - 8
        if len(state) != size:
            raise ValueError(f"irqchip state is {size} bytes, not {len(state)}")
        chip.chip_id = _check_int(chip_id, "chip id", 0, 2)
        ffi.buffer(chip)[8:] = state
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_IRQCHIP, chip) < 0:
            raise _fail("KVM_SET_IRQCHIP")

    def get_pit2(self) -> bytes:
        """KVM_GET_PIT2: ``struct kvm_pit_state2`` as bytes."""
        state = ffi.new("struct kvm_pit_state2 *")
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_PIT2, state) < 0:
            raise _fail("KVM_GET_PIT2")
        return bytes(ffi.buffer(state)[:])

    def set_pit2(self, value: bytes) -> None:
        state = ffi.new("struct kvm_pit_state2 *")
        size = ffi.sizeof(state[0])
        if len(value) != size:
            raise ValueError(f"PIT state is {size} bytes, not {len(value)}")
        ffi.buffer(state)[:] = value
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_PIT2, state) < 0:
            raise _fail("KVM_SET_PIT2")

    # port sinks

    def add_sink(self, port: int, fd: int, *, timestamp: bool, read_value: int, label: str,
                 json: bool = False) -> bool:
        """Serve ``port`` natively; ``False`` if the port already has a sink or the table is
        full. With ``timestamp``, each byte is a line (a JSON object with ``json``)."""
        _check_int(port, "port", 0, _U16)
        _check_fd(fd, "sink fd")
        _check_int(read_value, "read value", 0, 0xFF)
        raw = label.encode("utf-8", "replace")[:31]
        if b"\0" in raw:
            raise ValueError("sink label contains NUL")
        sink_format = (lib.VMK_SINK_JSON if json else lib.VMK_SINK_TEXT) if timestamp else lib.VMK_SINK_RAW
        rc = lib.vmk_vm_add_sink(self._native, port, fd, sink_format, read_value, raw)
        if rc == -_errno.EEXIST or rc == -_errno.ENOSPC:
            return False
        if rc < 0:
            raise HypervisorError("vmk_vm_add_sink", -rc)
        return True

    def remove_sink(self, port: int) -> bool:
        _check_int(port, "port", 0, _U16)
        return bool(lib.vmk_vm_remove_sink(self._native, port) == 0)


# -- vCPUs ------------------------------------------------------------------------------------

_PIO: int = lib.VMK_EXIT_PIO
_MMIO: int = lib.VMK_EXIT_MMIO
_CALLBACK_ERROR: int = lib.VMK_EXIT_CALLBACK_ERROR
_IO_PIO_READ: int = lib.VMK_IO_PIO_READ
_IO_PIO_WRITE: int = lib.VMK_IO_PIO_WRITE
_IO_MMIO_READ: int = lib.VMK_IO_MMIO_READ
_IO_MMIO_WRITE: int = lib.VMK_IO_MMIO_WRITE
_PACKED_MIN: int = lib.VMK_PACKED_MIN
_SIZE_SHIFT: int = lib.VMK_PACKED_SIZE_SHIFT
_ADDR_SHIFT: int = lib.VMK_PACKED_ADDR_SHIFT


class KvmVcpuFd:
    """A vCPU file descriptor, its ``kvm_run`` mapping and the native run loop.

    ``ops`` supplies ``pio_read/pio_write/mmio_read/mmio_write`` (a
    :class:`vmmkit.hypervisor.VcpuOps`). ``callback=True`` makes the native loop call into
    Python for each access instead of returning to :meth:`run` (see ``bench/exits.py``).
    """

    def __init__(
        self,
        vm: KvmVmFd,
        fd: int,
        mmap_size: int,
        ops: Any,
        *,
        ring_page: int = 0,
        sync_regs: int = SYNC_REGS | SYNC_SREGS,
        callback: bool = False,
    ) -> None:
        _check_int(ring_page, "ring page", 0, 64)
        _check_int(sync_regs, "sync regs", 0, SYNC_REGS | SYNC_SREGS | SYNC_EVENTS)
        rc = lib.vmk_install_kick_handler()
        if rc < 0:
            raise HypervisorError("sigaction(kick signal)", -rc)
        native = lib.vmk_vcpu_new(vm.native, fd, mmap_size, ring_page, sync_regs)
        if native == ffi.NULL:
            raise _fail("mmap(kvm_run)")
        self.vm = vm
        self.fd = fd
        self._native = native
        #: The KVM_SYNC_X86_* bits each KVM_RUN asks KVM to store (see :meth:`set_sync_regs`).
        self.sync_regs = sync_regs
        self._exit = ffi.new("struct vmk_exit *")
        # A packed access's data (vmk_exit.buf), sliced to bytes and assigned from them (no
        # ffi.unpack/ffi.memmove: their keyword parsing costs more than the slice).
        self._buf = ffi.buffer(self._exit.buf)
        lib.vmk_vcpu_set_exit(self._native, self._exit)
        self._handle: Any = None
        self._error: BaseException | None = None
        self._counts = ffi.new("uint64_t[]", lib.VMK_NCOUNTS)
        self.set_ops(ops)
        self.callback = False
        if callback:
            self.set_callback(True)

    def set_ops(self, ops: Any) -> None:
        self._pio_read: Callable[[int, int], bytes] = ops.pio_read
        self._pio_write: Callable[[int, bytes], None] = ops.pio_write
        self._mmio_read: Callable[[int, int], bytes] = ops.mmio_read
        self._mmio_write: Callable[[int, bytes], None] = ops.mmio_write

    def set_callback(self, enabled: bool) -> None:
        """Dispatch I/O from inside the native loop (``extern "Python"``) or by returning."""
        if enabled:
            self._handle = ffi.new_handle(self)
            lib.vmk_vcpu_set_callback(self._native, self._handle)
        else:
            lib.vmk_vcpu_set_callback(self._native, ffi.NULL)
            self._handle = None
        self.callback = enabled

    def close(self) -> None:
        if self._native is not None:
            if lib.vmk_vcpu_running(self._native):
                # Unmapping kvm_run under a running loop would crash the process.
                lib.vmk_vcpu_kick(self._native)
                raise HypervisorError("close", _errno.EBUSY, "the vCPU is inside run(); kick, then wait")
            lib.vmk_vcpu_free(self._native)
            self._native = None
            self._handle = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # running

    def run(self) -> RawExit:
        """Run until an exit Python's caller must see; port and MMIO accesses are dispatched
        to ``ops`` on the way. A device exception propagates; the access it interrupted is
        completed (reads with all ones) by the next :meth:`run`.

        A single access comes back packed into the return value (``VMK_PACKED_MIN`` in
        runloop.h): kind, size and address without reading the struct, the data in
        ``vmk_exit.buf``; string I/O still comes as ``VMK_EXIT_PIO`` with the struct filled in."""
        native_run = lib.vmk_vcpu_run  # one argument: no argument tuple per exit
        v = self._native
        ex = self._exit
        buf = self._buf
        unpack = ffi.unpack
        memmove = ffi.memmove
        pio_read, pio_write = self._pio_read, self._pio_write
        mmio_read, mmio_write = self._mmio_read, self._mmio_write
        while True:
            code = native_run(v)
            if code >= _PACKED_MIN:
                kind = code & 3
                size = code >> _SIZE_SHIFT & 15
                if kind == _IO_PIO_WRITE:
                    pio_write(code >> _ADDR_SHIFT, buf[0:size])
                elif kind == _IO_MMIO_WRITE:
                    mmio_write(code >> _ADDR_SHIFT, buf[0:size])
                else:
                    value = (pio_read if kind == _IO_PIO_READ else mmio_read)(code >> _ADDR_SHIFT, size)
                    if len(value) != size:
                        value = _fit(value, size)
                    buf[0:size] = value
            elif code == _PIO:
                port = ex.addr
                size = ex.size
                data = ex.data
                n = ex.count
                if ex.is_write:
                    if n == 1:
                        pio_write(port, unpack(data, size))
                    else:
                        elements = unpack(data, size * n)
                        for off in range(0, size * n, size):
                            pio_write(port, elements[off : off + size])
                else:
                    for i in range(n):
                        value = pio_read(port, size)
                        if len(value) != size:
                            value = _fit(value, size)
                        memmove(data + i * size, value, size)
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
                raise HypervisorError("KVM_RUN", None, "I/O callback failed")
            else:
                return RawExit(code, ex.kvm_reason, tuple(ex.words[0 : ex.nwords]))

    def _callback(self, kind: int, addr: int, size: int, count: int, data: Any) -> int:
        try:
            if kind == _IO_PIO_WRITE:
                if count == 1:
                    self._pio_write(addr, ffi.unpack(data, size))
                else:
                    buf = ffi.unpack(data, size * count)
                    for off in range(0, size * count, size):
                        self._pio_write(addr, buf[off : off + size])
            elif kind == _IO_PIO_READ:
                for i in range(count):
                    value = self._pio_read(addr, size)
                    if len(value) != size:
                        value = _fit(value, size)
                    ffi.memmove(data + i * size, value, size)
            elif kind == _IO_MMIO_READ:
                value = self._mmio_read(addr, size)
                if len(value) != size:
                    value = _fit(value, size)
                ffi.memmove(data, value, size)
            else:
                self._mmio_write(addr, ffi.unpack(data, size))
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
        return bool(lib.vmk_vcpu_kicked(self._native))

    def counts(self) -> dict[str, int]:
        lib.vmk_vcpu_counts(self._native, self._counts, lib.VMK_NCOUNTS)
        return {name: int(self._counts[i]) for i, name in enumerate(COUNTER_NAMES)}

    # registers: through kvm_run's sync area once the vCPU has run, else by ioctl

    def set_sync_regs(self, bits: int) -> None:
        """The registers KVM stores into ``kvm_run`` on every exit from the next run on (not
        while the vCPU runs). Each costs every exit (SREGS ~0.16 us here: KVM reads every
        segment), so ask only for what the exits will read; reads of the others are ioctls."""
        _check_int(bits, "sync regs", 0, SYNC_REGS | SYNC_SREGS | SYNC_EVENTS)
        lib.vmk_vcpu_set_valid_regs(self._native, bits)
        self.sync_regs = bits

    def _sync(self, bit: int) -> bool:
        v = self._native
        return bool(lib.vmk_vcpu_sync_valid(v)) and bool(lib.vmk_vcpu_valid_regs(v) & bit)

    def get_regs(self) -> StandardRegisters:
        if self._sync(SYNC_REGS):
            return _regs_from(lib.vmk_vcpu_sync_regs(self._native))
        regs = ffi.new("struct kvm_regs *")
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_REGS, regs) < 0:
            raise _fail("KVM_GET_REGS")
        return _regs_from(regs)

    def set_regs(self, value: StandardRegisters) -> None:
        if self._sync(SYNC_REGS):
            staged = ffi.new("struct kvm_regs *")
            _regs_into(staged, value)  # validate everything before touching kvm_run
            ffi.memmove(lib.vmk_vcpu_sync_regs(self._native), staged, ffi.sizeof(staged[0]))
            lib.vmk_vcpu_mark_dirty(self._native, SYNC_REGS)
            return
        regs = ffi.new("struct kvm_regs *")
        _regs_into(regs, value)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_REGS, regs) < 0:
            raise _fail("KVM_SET_REGS")

    def _get_sregs_raw(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        if self._sync(SYNC_SREGS):
            ffi.memmove(sregs, lib.vmk_vcpu_sync_sregs(self._native), ffi.sizeof(sregs[0]))
        elif lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_SREGS, sregs) < 0:
            raise _fail("KVM_GET_SREGS")
        return sregs

    def get_sregs(self) -> SpecialRegisters:
        return _sregs_from(self._get_sregs_raw())

    def set_sregs(self, value: SpecialRegisters) -> None:
        # Start from the current state so fields the neutral type lacks (the pending
        # interrupt bitmap) are kept.
        sregs = self._get_sregs_raw()
        _sregs_into(sregs, value)
        if self._sync(SYNC_SREGS):
            ffi.memmove(lib.vmk_vcpu_sync_sregs(self._native), sregs, ffi.sizeof(sregs[0]))
            lib.vmk_vcpu_mark_dirty(self._native, SYNC_SREGS)
            return
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_SREGS, sregs) < 0:
            raise _fail("KVM_SET_SREGS")

    def get_fpu(self) -> FpuState:
        fpu = ffi.new("struct kvm_fpu *")
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_FPU, fpu) < 0:
            raise _fail("KVM_GET_FPU")
        return FpuState(fcw=fpu.fcw, mxcsr=fpu.mxcsr)

    def set_fpu(self, value: FpuState) -> None:
        fpu = ffi.new("struct kvm_fpu *")
        fpu.fcw = _check_int(value.fcw, "fcw", 0, _U16)
        fpu.mxcsr = _check_int(value.mxcsr, "mxcsr", 0, _U32)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_FPU, fpu) < 0:
            raise _fail("KVM_SET_FPU")

    def get_msrs(self, indices: Sequence[int]) -> list[MsrEntry]:
        indices = list(indices)
        n = len(indices)
        if n == 0:
            return []
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, index in enumerate(indices):
            msrs.entries[i].index = _check_int(index, "msr index", 0, _U32)
        rc = lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_MSRS, msrs)
        if rc < 0:
            raise _fail("KVM_GET_MSRS")
        if rc != n:
            raise HypervisorError("KVM_GET_MSRS", None, f"MSR {indices[rc]:#x} cannot be read")
        return [MsrEntry(msrs.entries[i].index, msrs.entries[i].data) for i in range(n)]

    def set_msrs(self, entries: Sequence[MsrEntry]) -> None:
        entries = list(entries)
        n = len(entries)
        if n == 0:
            return
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, entry in enumerate(entries):
            msrs.entries[i].index = _check_int(entry.index, "msr index", 0, _U32)
            msrs.entries[i].data = _check_int(entry.data, "msr data", 0, _U64)
        rc = lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_MSRS, msrs)
        if rc < 0:
            raise _fail("KVM_SET_MSRS")
        if rc != n:
            raise HypervisorError("KVM_SET_MSRS", None, f"MSR {entries[rc].index:#x} was refused")

    def set_cpuid(self, entries: Iterable[CpuIdEntry]) -> None:
        entries = list(entries)
        n = len(entries)
        if n > MAX_CPUID_ENTRIES:
            raise ValueError(f"{n} CPUID entries; KVM takes at most {MAX_CPUID_ENTRIES}")
        table = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": max(n, 1)})
        table.nent = n
        for i, entry in enumerate(entries):
            _cpuid_into(table.entries[i], entry)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_CPUID2, table) < 0:
            raise _fail("KVM_SET_CPUID2")

    def get_cpuid(self) -> list[CpuIdEntry]:
        table = ffi.new("struct kvm_cpuid2 *", {"nent": MAX_CPUID_ENTRIES, "entries": MAX_CPUID_ENTRIES})
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_CPUID2, table) < 0:
            raise _fail("KVM_GET_CPUID2")
        return [_cpuid_from(table.entries[i]) for i in range(table.nent)]

    def get_lapic(self) -> bytes:
        state = ffi.new("struct kvm_lapic_state *")
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_LAPIC, state) < 0:
            raise _fail("KVM_GET_LAPIC")
        return bytes(ffi.buffer(state)[:])

    def set_lapic(self, value: bytes) -> None:
        state = ffi.new("struct kvm_lapic_state *")
        size = ffi.sizeof(state[0])
        if len(value) != size:
            raise ValueError(f"LAPIC state is {size} bytes, not {len(value)}")
        ffi.memmove(state, value, size)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_LAPIC, state) < 0:
            raise _fail("KVM_SET_LAPIC")

    def get_xcrs(self) -> dict[int, int]:
        xcrs = ffi.new("struct kvm_xcrs *")
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_XCRS, xcrs) < 0:
            raise _fail("KVM_GET_XCRS")
        count = min(xcrs.nr_xcrs, len(xcrs.xcrs))
        return {xcrs.xcrs[i].xcr: xcrs.xcrs[i].value for i in range(count)}

    def set_xcrs(self, values: Mapping[int, int]) -> None:
        xcrs = ffi.new("struct kvm_xcrs *")
        if len(values) > len(xcrs.xcrs):
            raise ValueError(f"at most {len(xcrs.xcrs)} XCRs")
        for i, (xcr, value) in enumerate(sorted(values.items())):
            xcrs.xcrs[i].xcr = _check_int(xcr, "xcr", 0, _U32)
            xcrs.xcrs[i].value = _check_int(value, "xcr value", 0, _U64)
        xcrs.nr_xcrs = len(values)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_XCRS, xcrs) < 0:
            raise _fail("KVM_SET_XCRS")

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: the 4 KiB XSAVE area (Intel SDM vol. 1, 13.4: the legacy FXSAVE region,
        the XSAVE header, then the extended components at their CPUID-reported offsets)."""
        area = ffi.new("struct kvm_xsave *")
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_XSAVE, area) < 0:
            raise _fail("KVM_GET_XSAVE")
        return bytes(ffi.buffer(area)[:])

    def set_xsave(self, value: bytes) -> None:
        area = ffi.new("struct kvm_xsave *")
        size = ffi.sizeof(area[0])
        if len(value) != size:
            raise ValueError(f"XSAVE area is {size} bytes, not {len(value)}")
        ffi.buffer(area)[:] = value
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_XSAVE, area) < 0:
            raise _fail("KVM_SET_XSAVE")

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_MP_STATE, state) < 0:
            raise _fail("KVM_GET_MP_STATE")
        return int(state.mp_state)

    def set_mp_state(self, value: int) -> None:
        state = ffi.new("struct kvm_mp_state *")
        state.mp_state = _check_int(value, "mp state", 0, 16)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_MP_STATE, state) < 0:
            raise _fail("KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> VcpuEventsState:
        ev = ffi.new("struct kvm_vcpu_events *")
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_GET_VCPU_EVENTS, ev) < 0:
            raise _fail("KVM_GET_VCPU_EVENTS")
        return VcpuEventsState(
            exception_injected=ev.exception.injected,
            exception_nr=ev.exception.nr,
            exception_has_error_code=ev.exception.has_error_code,
            exception_pending=ev.exception.pending,
            exception_error_code=ev.exception.error_code,
            interrupt_injected=ev.interrupt.injected,
            interrupt_nr=ev.interrupt.nr,
            interrupt_soft=ev.interrupt.soft,
            interrupt_shadow=ev.interrupt.shadow,
            nmi_injected=ev.nmi.injected,
            nmi_pending=ev.nmi.pending,
            nmi_masked=ev.nmi.masked,
            sipi_vector=ev.sipi_vector,
            flags=ev.flags,
            smi_smm=ev.smi.smm,
            smi_pending=ev.smi.pending,
            smi_inside_nmi=ev.smi.smm_inside_nmi,
            smi_latched_init=ev.smi.latched_init,
            triple_fault_pending=ev.triple_fault.pending,
            exception_has_payload=ev.exception_has_payload,
            exception_payload=ev.exception_payload,
        )

    def set_vcpu_events(self, value: VcpuEventsState) -> None:
        ev = ffi.new("struct kvm_vcpu_events *")
        byte = (0, 0xFF)
        ev.exception.injected = _check_int(value.exception_injected, "exception_injected", *byte)
        ev.exception.nr = _check_int(value.exception_nr, "exception_nr", 0, 31)
        ev.exception.has_error_code = _check_int(value.exception_has_error_code, "has_error_code", *byte)
        ev.exception.pending = _check_int(value.exception_pending, "exception_pending", *byte)
        ev.exception.error_code = _check_int(value.exception_error_code, "error_code", 0, _U32)
        ev.interrupt.injected = _check_int(value.interrupt_injected, "interrupt_injected", *byte)
        ev.interrupt.nr = _check_int(value.interrupt_nr, "interrupt_nr", *byte)
        ev.interrupt.soft = _check_int(value.interrupt_soft, "interrupt_soft", *byte)
        ev.interrupt.shadow = _check_int(value.interrupt_shadow, "interrupt_shadow", *byte)
        ev.nmi.injected = _check_int(value.nmi_injected, "nmi_injected", *byte)
        ev.nmi.pending = _check_int(value.nmi_pending, "nmi_pending", *byte)
        ev.nmi.masked = _check_int(value.nmi_masked, "nmi_masked", *byte)
        ev.sipi_vector = _check_int(value.sipi_vector, "sipi_vector", 0, _U32)
        ev.flags = _check_int(value.flags, "flags", 0, _U32)
        ev.smi.smm = _check_int(value.smi_smm, "smi_smm", *byte)
        ev.smi.pending = _check_int(value.smi_pending, "smi_pending", *byte)
        ev.smi.smm_inside_nmi = _check_int(value.smi_inside_nmi, "smi_inside_nmi", *byte)
        ev.smi.latched_init = _check_int(value.smi_latched_init, "smi_latched_init", *byte)
        ev.triple_fault.pending = _check_int(value.triple_fault_pending, "triple_fault_pending", *byte)
        ev.exception_has_payload = _check_int(value.exception_has_payload, "has_payload", *byte)
        ev.exception_payload = _check_int(value.exception_payload, "exception_payload", 0, _U64)
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_VCPU_EVENTS, ev) < 0:
            raise _fail("KVM_SET_VCPU_EVENTS")

    def get_tsc_khz(self) -> int:
        return self.tsc_khz_of(self.fd)

    @staticmethod
    def tsc_khz_of(fd: int) -> int:
        """KVM_GET_TSC_KHZ on a vCPU file descriptor."""
        rc = lib.vmk_ioctl_int(_check_fd(fd, "vcpu fd"), lib.KVM_GET_TSC_KHZ, 0)
        if rc < 0:
            raise _fail("KVM_GET_TSC_KHZ")
        return int(rc)

    def set_guest_debug(
        self, *, enable: bool, single_step: bool = False, software_breakpoints: bool = False,
        hw_breakpoints: Sequence[int] = (),
    ) -> None:
        """Program guest debugging: up to four execution breakpoints in DR0-3 (global enable,
        R/W=00 LEN=00 in DR7), single step and ``int3`` interception."""
        if len(hw_breakpoints) > 4:
            raise ValueError("x86 has four hardware breakpoints")
        dbg = ffi.new("struct kvm_guest_debug *")
        control = 0
        if enable:
            control = lib.KVM_GUESTDBG_ENABLE
            if single_step:
                control |= lib.KVM_GUESTDBG_SINGLESTEP
            if software_breakpoints:
                control |= lib.KVM_GUESTDBG_USE_SW_BP
            if hw_breakpoints:
                control |= lib.KVM_GUESTDBG_USE_HW_BP
                dr7 = 0x400  # bit 10 is reserved-one
                for i, addr in enumerate(hw_breakpoints):
                    dbg.arch.debugreg[i] = _check_int(addr, "breakpoint address", 0, _U64)
                    dr7 |= 2 << (2 * i)  # Gi: global enable, R/W and LEN stay 0 (execute)
                dbg.arch.debugreg[7] = dr7
        elif single_step or software_breakpoints or hw_breakpoints:
            raise ValueError("debug features need enable=True")
        dbg.control = control
        if lib.vmk_ioctl_ptr(self.fd, lib.KVM_SET_GUEST_DEBUG, dbg) < 0:
            raise _fail("KVM_SET_GUEST_DEBUG")
