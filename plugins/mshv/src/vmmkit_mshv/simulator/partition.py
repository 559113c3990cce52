"""A simulated partition: guest memory regions, VPs, properties, intercepts, MSI routing,
irqfds and ioeventfds, and the pass-through hypercalls (the hypervisor's side of them).

Validation and errno follow drivers/hv/mshv_root_main.c and mshv_eventfd.c: what the kernel
rejects, this rejects with the same errno; hypercall failures carry an HV status and the errno
``hv_result_to_errno`` gives it.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import threading
from collections.abc import Callable

from vmmkit_mshv.simulator import abi
from vmmkit_mshv.simulator.engine import EngineVm
from vmmkit_mshv.simulator.vp import UnknownRegister, Vp

_PAGE = 0x1000
#: MSHV_MAX_VPS and MSHV_MAX_GUEST_IRQS (drivers/hv/mshv_root.h).
MAX_VPS = 256
MAX_GUEST_IRQS = 4096
PROPERTY_GPA_PAGE_ACCESS_TRACKING = 0x00050005
PROPERTY_UNIMPLEMENTED_MSR_ACTION = 0x00050017
PROPERTY_PROCESSOR_CLOCK_FREQUENCY = 0x00060009
_KNOWN_PROPERTIES = {PROPERTY_GPA_PAGE_ACCESS_TRACKING: 0, PROPERTY_UNIMPLEMENTED_MSR_ACTION: 0,
                     PROPERTY_PROCESSOR_CLOCK_FREQUENCY: 1_000_000_000}


class HypercallFailed(Exception):
    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(detail or f"HV status {status:#x}")
        self.status = status


class Region:
    __slots__ = ("gfn", "pages", "uaddr", "flags")

    def __init__(self, gfn: int, pages: int, uaddr: int, flags: int) -> None:
        self.gfn = gfn
        self.pages = pages
        self.uaddr = uaddr
        self.flags = flags


class Partition:
    def __init__(self, partition_id: int, flags: int) -> None:
        self.id = partition_id
        self.flags = flags
        self.initialized = False
        self.regions: list[Region] = []
        self.vps: dict[int, Vp] = {}
        self.properties = dict(_KNOWN_PROPERTIES)
        self.cpuid_intercept = False
        self.msi_routes: dict[int, tuple[int, int]] = {}
        self.irqfds: dict[int, int] = {}  # eventfd -> gsi
        self.ioeventfds: list[tuple[int, int, int, int | None]] = []  # addr, len, fd, datamatch
        self.asserted: list[tuple[int, int, int]] = []  # (vector, apic id, type)
        self.dirty: set[int] = set()
        self._dirty_lock = threading.Lock()
        self._engine_vm: EngineVm | None = None
        self._irqfd_thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False

    # -- memory (MSHV_SET_GUEST_MEMORY) ----------------------------------------------------

    @property
    def dirty_tracking(self) -> bool:
        return bool(self.properties[PROPERTY_GPA_PAGE_ACCESS_TRACKING])

    def ram(self) -> list[tuple[int, int, int, bool]]:
        """``(guest address, size, host address, writable)`` per region."""
        return [(r.gfn * _PAGE, r.pages * _PAGE, r.uaddr, bool(r.flags & 1)) for r in self.regions]

    def map(self, gfn: int, size: int, uaddr: int, flags: int) -> None:
        """mshv_map_user_memory: overlapping guest frames or user addresses are EEXIST."""
        pages = size // _PAGE
        for r in self.regions:
            if r.gfn <= gfn < r.gfn + r.pages or r.gfn <= gfn + pages - 1 < r.gfn + r.pages:
                raise OSError(errno.EEXIST, "guest frames overlap a mapped region")
            end = r.uaddr + r.pages * _PAGE
            if r.uaddr <= uaddr < end or r.uaddr <= uaddr + size - 1 < end:
                raise OSError(errno.EEXIST, "user memory overlaps a mapped region")
        if self.vps:
            # unicorn maps memory into each engine while it is stopped; the simulator only
            # supports the layout fixed before the first VP (a simulator limit, not the kernel's)
            raise OSError(errno.EBUSY, "the simulator maps memory only before the first VP")
        self.regions.append(Region(gfn, pages, uaddr, flags))

    def unmap(self, gfn: int, size: int, uaddr: int) -> None:
        """mshv_unmap_user_memory: the region must match exactly, else EINVAL."""
        for r in self.regions:
            if r.gfn <= gfn < r.gfn + r.pages:
                if r.uaddr != uaddr or r.gfn != gfn or r.pages != size // _PAGE:
                    raise OSError(errno.EINVAL, "unmap does not match the mapped region")
                if self.vps:
                    raise OSError(errno.EBUSY, "the simulator unmaps memory only before the first VP")
                self.regions.remove(r)
                return
        raise OSError(errno.EINVAL, "no region at that guest frame")

    def mark_dirty(self, address: int, size: int) -> None:
        with self._dirty_lock:
            for page in range(address // _PAGE, (address + size - 1) // _PAGE + 1):
                self.dirty.add(page)

    def access_bitmap(self, base: int, count: int, clear: bool, set_all: bool = False) -> bytes:
        """The dirty bits of ``count`` pages from ``base`` as they were, then cleared
        (``clear``, MSHV_GPAP_ACCESS_OP_CLEAR) or all set (``set_all``, OP_SET)."""
        bits = bytearray((count + 7) // 8)
        with self._dirty_lock:
            for i in range(count):
                if base + i in self.dirty:
                    bits[i // 8] |= 1 << (i % 8)
                    if clear:
                        self.dirty.discard(base + i)
            if set_all:
                self.dirty.update(range(base, base + count))
        return bytes(bits)

    # -- VPs ---------------------------------------------------------------------------------

    @property
    def engine_vm(self) -> EngineVm:
        if self._engine_vm is None:
            self._engine_vm = EngineVm(self)
        return self._engine_vm

    def create_vp(self, index: int) -> Vp:
        if index >= MAX_VPS:
            raise OSError(errno.EINVAL, "vp_index >= MSHV_MAX_VPS")
        if index in self.vps:
            raise OSError(errno.EEXIST, "the VP exists")
        if not self.initialized:
            raise HypercallFailed(0x7, "HvCallCreateVp before HvCallInitializePartition")  # INVALID_PARTITION_STATE
        vp = Vp(self, index)
        self.vps[index] = vp
        return vp

    def default_cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        from vmmkit_emu.x86 import supported_cpuid

        for entry in supported_cpuid():
            if entry.function == leaf and (entry.index == subleaf or not entry.flags & 1):
                return entry.eax, entry.ebx, entry.ecx, entry.edx
        return 0, 0, 0, 0

    # -- eventfds ----------------------------------------------------------------------------

    def ioeventfd(self, datamatch: int, addr: int, length: int, fd: int, flags: int) -> None:
        """mshv_set_unset_ioeventfd / mshv_assign_ioeventfd."""
        if flags & ~0b111:
            raise OSError(errno.EINVAL, "unknown ioeventfd flags")
        if flags & 0b100:  # DEASSIGN
            match = 0 if flags & 1 else None
            for entry in list(self.ioeventfds):
                if entry[0] == addr and entry[1] == length and entry[2] == fd and \
                        (match is None or entry[3] == datamatch):
                    self.ioeventfds.remove(entry)
                    return
            raise OSError(errno.ENOENT, "no such ioeventfd")
        if flags & 0b010:
            raise OSError(errno.EOPNOTSUPP, "port ioeventfds are not supported")
        if length not in (0, 1, 2, 4, 8):
            raise OSError(errno.EINVAL, "ioeventfd length")
        if addr + length < addr:
            raise OSError(errno.EINVAL, "ioeventfd range overflows")
        if not (flags & 1) and length == 0:
            pass
        try:
            os.fstat(fd)
        except OSError:
            raise OSError(errno.EBADF, "not an fd") from None
        dm = datamatch if flags & 1 else None
        for a, n, _, m in self.ioeventfds:
            if a == addr and n == length and (m is None or dm is None or m == dm):
                raise OSError(errno.EEXIST, "ioeventfd collision")
        self.ioeventfds.append((addr, length, fd, dm))

    def ioeventfd_hit(self, addr: int, size: int, value: int) -> bool:
        for a, n, fd, m in self.ioeventfds:
            if a == addr and (n == 0 or n == size) and (m is None or m == value):
                os.eventfd_write(fd, 1)
                return True
        return False

    def irqfd(self, fd: int, resamplefd: int, gsi: int, flags: int) -> None:
        """mshv_set_unset_irqfd: unknown flags EINVAL; an eventfd used twice EBUSY."""
        if flags & ~0b11:
            raise OSError(errno.EINVAL, "unknown irqfd flags")
        if flags & 1:
            if self.irqfds.get(fd) == gsi:
                del self.irqfds[fd]
            return
        try:
            os.fstat(fd)
        except OSError:
            raise OSError(errno.EBADF, "not an fd") from None
        if flags & 2:
            raise OSError(errno.EINVAL, "resample irqfds need a level-triggered route (none here)")
        if fd in self.irqfds:
            raise OSError(errno.EBUSY, "the eventfd is used for another irq")
        self.irqfds[fd] = gsi
        self._start_irqfd_thread()
        os.write(self._wake_w, b"x")

    def _start_irqfd_thread(self) -> None:
        if self._irqfd_thread is None:
            self._irqfd_thread = threading.Thread(target=self._irqfd_loop, name="mshv-sim-irqfd", daemon=True)
            self._irqfd_thread.start()

    def _irqfd_loop(self) -> None:
        while not self._closed:
            fds = [self._wake_r, *self.irqfds]
            try:
                ready, _, _ = select.select(fds, [], [], 0.5)
            except (OSError, ValueError):
                continue
            for fd in ready:
                if fd == self._wake_r:
                    try:
                        os.read(fd, 64)
                    except OSError:
                        return  # the partition is closing
                    continue
                gsi = self.irqfds.get(fd)
                try:
                    os.eventfd_read(fd)
                except OSError:
                    continue
                route = self.msi_routes.get(gsi) if gsi is not None else None
                if route is not None:
                    address, data = route
                    self.assert_interrupt(data & 0xFF, (address >> 12) & 0xFF, (data >> 8) & 7,
                                          level=bool(data & 1 << 15), logical=bool(address & 4))

    def set_msi_routing(self, entries: list[tuple[int, int, int]]) -> None:
        self.msi_routes = {gsi: (address, data) for gsi, address, data in entries}

    def assert_interrupt(self, vector: int, apic_id: int, interrupt_type: int, level: bool = False,
                         logical: bool = False) -> None:
        """HvCallAssertVirtualInterrupt: the target local APICs (the engines' LAPIC model) accept
        it and deliver it through the guest's IDT (fixed, lowest priority, NMI)."""
        self.asserted.append((vector, apic_id, interrupt_type))
        if self._engine_vm is not None:
            self._engine_vm.deliver_interrupt(vector, apic_id, interrupt_type, logical, level, -1)

    # -- hypercalls (MSHV_ROOT_HVCALL) ----------------------------------------------------------

    def hvcall(self, code: int, data: bytes, reps: int, vp: Vp | None) -> bytes:
        handler: dict[int, Callable[[bytes, int], bytes]] = {
            abi.HVCALL_GET_PARTITION_PROPERTY: self._get_property,
            abi.HVCALL_SET_PARTITION_PROPERTY: self._set_property,
            abi.HVCALL_INSTALL_INTERCEPT: self._install_intercept,
            abi.HVCALL_GET_VP_REGISTERS: self._get_vp_registers,
            abi.HVCALL_SET_VP_REGISTERS: self._set_vp_registers,
            abi.HVCALL_ASSERT_VIRTUAL_INTERRUPT: self._assert_virtual_interrupt,
        }
        call = handler.get(code)
        if call is None:
            raise HypercallFailed(abi.HV_STATUS_INVALID_HYPERCALL_CODE, f"hypercall {code:#x} is not simulated")
        return call(data, reps)

    def _get_property(self, data: bytes, reps: int) -> bytes:
        _, code, _ = abi.GET_PARTITION_PROPERTY.unpack_from(data.ljust(abi.GET_PARTITION_PROPERTY.size, b"\0"))
        if code not in self.properties:
            raise HypercallFailed(abi.HV_STATUS_UNKNOWN_PROPERTY)
        return struct.pack("<Q", self.properties[code])

    def _set_property(self, data: bytes, reps: int) -> bytes:
        _, code, _, value = abi.SET_PARTITION_PROPERTY.unpack_from(data.ljust(abi.SET_PARTITION_PROPERTY.size, b"\0"))
        if code not in self.properties or code == PROPERTY_PROCESSOR_CLOCK_FREQUENCY:
            raise HypercallFailed(abi.HV_STATUS_UNKNOWN_PROPERTY)
        self.properties[code] = value
        if code == PROPERTY_GPA_PAGE_ACCESS_TRACKING and self._engine_vm is not None:
            # The engines add or drop their RAM write hooks before their next turn, and the
            # turn in progress is cut short; it cannot be waited for here (an engine parked in
            # an intercept holds its turn until the VMM resumes the VP), so stores in the rest
            # of its translation block may go unrecorded: a simulator limit.
            self._engine_vm.token.end_turn()
        return b""

    def _install_intercept(self, data: bytes, reps: int) -> bytes:
        _, access, kind, _ = abi.INSTALL_INTERCEPT.unpack_from(data.ljust(abi.INSTALL_INTERCEPT.size, b"\0"))
        if kind != abi.HV_INTERCEPT_TYPE_X64_CPUID:
            raise HypercallFailed(abi.HV_STATUS_INVALID_PARAMETER, f"intercept type {kind} is not simulated")
        self.cpuid_intercept = True
        return b""

    def _vp_of(self, data: bytes) -> tuple[Vp, int]:
        _, index, vtl, _, _ = abi.VP_REGISTERS_HEADER.unpack_from(data)
        vp = self.vps.get(index)
        if vp is None:
            raise HypercallFailed(abi.HV_STATUS_INVALID_VP_INDEX)
        return vp, vtl

    def _get_vp_registers(self, data: bytes, reps: int) -> bytes:
        vp, _ = self._vp_of(data)
        count = (len(data) - abi.VP_REGISTERS_HEADER.size) // 4
        if reps != count or count == 0:
            raise HypercallFailed(abi.HV_STATUS_INVALID_HYPERCALL_INPUT, "rep count and names differ")
        names = list(struct.unpack_from(f"<{count}I", data, abi.VP_REGISTERS_HEADER.size))
        try:
            return b"".join(vp.get_registers(names))
        except UnknownRegister as exc:
            raise HypercallFailed(abi.HV_STATUS_INVALID_PARAMETER, f"register {exc}") from None

    def _set_vp_registers(self, data: bytes, reps: int) -> bytes:
        vp, _ = self._vp_of(data)
        count = (len(data) - abi.VP_REGISTERS_HEADER.size) // abi.REGISTER_ASSOC.size
        if reps != count or count == 0:
            raise HypercallFailed(abi.HV_STATUS_INVALID_HYPERCALL_INPUT, "rep count and elements differ")
        pairs = []
        for i in range(count):
            name, _, _, value = abi.REGISTER_ASSOC.unpack_from(data, abi.VP_REGISTERS_HEADER.size + i * 32)
            pairs.append((name, value))
        try:
            vp.set_registers(pairs)
        except UnknownRegister as exc:
            raise HypercallFailed(abi.HV_STATUS_INVALID_PARAMETER, f"register {exc}") from None
        return b""

    def _assert_virtual_interrupt(self, data: bytes, reps: int) -> bytes:
        _, control, dest, vector, _, _, _ = abi.ASSERT_VIRTUAL_INTERRUPT.unpack_from(
            data.ljust(abi.ASSERT_VIRTUAL_INTERRUPT.size, b"\0"))
        kind = control & 0xFFFF_FFFF
        if kind > 0xA:
            raise HypercallFailed(abi.HV_STATUS_INVALID_PARAMETER, "interrupt type")
        self.assert_interrupt(vector, dest, kind, level=bool(control >> 32 & 1), logical=bool(control >> 33 & 1))
        return b""

    def close(self) -> None:
        self._closed = True
        if self._irqfd_thread is not None:
            os.write(self._wake_w, b"x")
            self._irqfd_thread.join(1.0)
        for vp in self.vps.values():
            vp.close()
        if self._engine_vm is not None:
            self._engine_vm.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
