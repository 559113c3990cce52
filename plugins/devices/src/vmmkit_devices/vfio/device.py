"""A VFIO-assigned PCI function as a :class:`vmmkit.pci.PciFunction` (``--device path=``).

Built from the device fd (:class:`~vmmkit_devices.vfio.container.VfioDeviceFd`): the guest sees
the device's IDs, class and BAR sizes in a shadowed, filtered configuration space
(:mod:`vmmkit_devices.vfio.config_space`). BARs move where the guest programs them (the PCI
root re-places them); at each placement the parts of a BAR the kernel lets userspace mmap
become a memory slot of the VM (guest accesses never leave the guest), and the rest is
trapped: :meth:`bar_read` / :meth:`bar_write` forward them with ``pread``/``pwrite`` at the
region's offset in the device fd. The MSI-X table and PBA are always trapped and emulated
(:class:`vmmkit.pci.msix.MsixTable`), so the guest's vectors go through vmmkit's MSI routes:
each vector's irqfd eventfd is what ``VFIO_DEVICE_SET_IRQS`` arms, so a device interrupt is
an eventfd signal the hypervisor turns into the guest's MSI with no exit to userspace. MSI is
virtualized the same way; INTx uses a resampling irqfd (the guest's EOI unmasks the line in
vfio-pci through the resample eventfd). Cloud Hypervisor's ``pci/src/vfio.rs`` and QEMU's
``hw/vfio/pci.c`` are the peers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vmmkit.errors import DeviceError
from vmmkit.irq import MsiVector
from vmmkit.log import get_logger
from vmmkit.pci import config as c
from vmmkit.pci.function import PciFunction
from vmmkit.pci.msix import MsixTable, backend_routes_msi, pba_bytes, table_bytes
from vmmkit_devices.vfio import uapi
from vmmkit_devices.vfio.config_space import MsiLayout, MsixLayout, Source, build_shadow
from vmmkit_devices.vfio.container import VfioDeviceFd
from vmmkit_devices.vfio.kernel import MappedArea

if TYPE_CHECKING:
    from vmmkit.eventloop import EventLoop
    from vmmkit.hypervisor import Vm
    from vmmkit.irq import InterruptLine

log = get_logger()

_PAGE = 4096
_COMMAND_FORWARDED = (c.COMMAND_IO | c.COMMAND_MEMORY | c.COMMAND_MASTER | c.COMMAND_PARITY | c.COMMAND_SERR
                      | c.COMMAND_INTX_DISABLE)


class MemorySlots(Protocol):
    """Memory slot numbers for BAR mappings (one allocator per VM)."""

    def allocate(self) -> int: ...

    def free(self, slot: int) -> None: ...


class VfioHostLink(Protocol):
    """What a placed function uses of the VM (given by the ``vfio-pci`` transport)."""

    @property
    def vm(self) -> Vm: ...

    @property
    def event_loop(self) -> EventLoop: ...

    def allocate_msi_gsi(self) -> int | None: ...

    def release_msi_gsi(self, gsi: int) -> None: ...


def _round_pow2(size: int, minimum: int) -> int:
    size = max(size, minimum)
    return 1 << (size - 1).bit_length()


def _page_round(start: int, end: int) -> tuple[int, int]:
    return start & ~(_PAGE - 1), (end + _PAGE - 1) & ~(_PAGE - 1)


class VfioPciFunction(PciFunction):
    """One passed-through PCI function."""

    kind: ClassVar[str] = "vfio-pci"
    transport_family: ClassVar[str] = "vfio"

    def __init__(self, name: str, device: VfioDeviceFd, *, exclude_mmap: frozenset[int] = frozenset(),
                 on_close: Callable[[], None] | None = None) -> None:
        self.device = device
        self._on_close = on_close
        self._lock = threading.RLock()
        self.regions: dict[int, uapi.RegionInfo] = {}
        self.config_region = device.region_info(uapi.VFIO_PCI_CONFIG_REGION_INDEX)
        raw = device.read(self.config_region, 0, c.LEGACY_CONFIG_SIZE)
        header_type = raw[c.HEADER_TYPE] & 0x7F
        if header_type != c.HEADER_TYPE_NORMAL:
            raise DeviceError(f"{device.name} has header type {header_type}: only type-0 functions (not bridges) "
                              "can be passed through")
        config = c.PciConfigSpace(
            vendor_id=int.from_bytes(raw[0:2], "little"), device_id=int.from_bytes(raw[2:4], "little"),
            class_code=raw[c.CLASS_BASE], subclass=raw[c.CLASS_DEVICE], prog_if=raw[c.CLASS_PROG],
            revision=raw[c.REVISION_ID], subsystem_vendor_id=int.from_bytes(raw[0x2C:0x2E], "little"),
            subsystem_id=int.from_bytes(raw[0x2E:0x30], "little"))
        super().__init__(name, config)
        self._add_bars(raw)
        self.sources, self.msi_layout, self.msix_layout = build_shadow(raw, config)
        self.intx_info = device.irq_info(uapi.VFIO_PCI_INTX_IRQ_INDEX)
        self.exclude_mmap = exclude_mmap
        self.mappable: dict[int, list[tuple[int, int]]] = {index: self._mmap_areas(index) for index in config.bars}
        self._mapped_areas: dict[int, list[tuple[int, MappedArea]]] = {}
        self._bar_slots: dict[int, list[int]] = {}
        self._bar_bases: dict[int, int] = {}  # where each BAR decodes now
        self.host: VfioHostLink | None = None
        self.slots: MemorySlots | None = None
        self.msix: MsixTable | None = None
        self.msi_vectors: list[MsiVector] = []
        self._own_fds: dict[int, int] = {}  # eventfd -> vector for vectors without an irqfd
        self._msi_enabled_count = 0
        self._msix_enabled = False
        self._intx_fds: tuple[int, int] | None = None  # (trigger, resample)
        self._intx_gsi: int | None = None
        self._intx_irqfd_gsi: int | None = None
        self._intx_asserted = False
        self._intx_on = False
        self.counts = {"config_reads": 0, "config_writes": 0, "bar_traps": 0, "msi_changes": 0}

    # -- building --------------------------------------------------------------------------------

    def _add_bars(self, raw: bytes) -> None:
        index = 0
        while index < c.NUM_BARS:
            info = self.device.region_info(uapi.VFIO_PCI_BAR0_REGION_INDEX + index)
            low = int.from_bytes(raw[c.BAR0 + 4 * index: c.BAR0 + 4 * index + 4], "little")
            if info.size == 0:
                index += 1
                continue
            self.regions[index] = info
            if low & c.BAR_SPACE_IO:
                if info.size > 256:
                    raise DeviceError(f"{self.device.name}: I/O BAR {index} has {info.size} ports (more than 256)")
                self.config.add_bar(c.PciBar(index, _round_pow2(info.size, 4), c.BarKind.IO))
                index += 1
                continue
            mem64 = (low >> 1) & 3 == 2
            if mem64 and index == c.NUM_BARS - 1:
                raise DeviceError(f"{self.device.name}: 64-bit BAR {index} has no upper half")
            size = _round_pow2(info.size, 16)
            kind = c.BarKind.MEM64 if mem64 else c.BarKind.MEM32
            if kind is c.BarKind.MEM32 and size > 1 << 31:
                raise DeviceError(f"{self.device.name}: 32-bit BAR {index} is larger than 2 GiB")
            self.config.add_bar(c.PciBar(index, size, kind, prefetchable=bool(low & c.BAR_MEM_PREFETCH)))
            index += 2 if mem64 else 1

    def _mmap_areas(self, index: int) -> list[tuple[int, int]]:
        """The page-aligned ``(offset, size)`` parts of BAR ``index`` to map into the guest: what
        the kernel lets userspace mmap, without the pages of the MSI-X table and PBA."""
        info = self.regions.get(index)
        if info is None or index in self.exclude_mmap or self.config.bars[index].is_io:
            return []
        holes: list[tuple[int, int]] = []
        msix = self.msix_layout
        if msix is not None:
            if msix.table_bar == index:
                holes.append(_page_round(msix.table_offset, msix.table_offset + table_bytes(msix.vectors)))
            if msix.pba_bar == index:
                holes.append(_page_round(msix.pba_offset, msix.pba_offset + pba_bytes(msix.vectors)))
        areas: list[tuple[int, int]] = []
        for offset, size in info.mmap_areas():
            start, end = _page_round(offset, offset + size)
            start, end = max(start, offset), min(end, offset + size)  # the kernel's area, page aligned inside
            start = (start + _PAGE - 1) & ~(_PAGE - 1)
            end &= ~(_PAGE - 1)
            pieces = [(start, end)]
            for hole_start, hole_end in holes:
                pieces = [part for s, e in pieces for part in ((s, min(e, hole_start)), (max(s, hole_end), e))]
            areas.extend((s, e - s) for s, e in pieces if e > s)
        return areas

    def attach(self, host: VfioHostLink, slots: MemorySlots) -> None:
        """Take the VM's resources: mmap the mappable BAR parts, create the MSI-X table and the
        MSI vectors (before the root places the BARs, which calls :meth:`bar_mapped`)."""
        self.host, self.slots = host, slots
        vm = host.vm
        for index, areas in self.mappable.items():
            mapped: list[tuple[int, MappedArea]] = []
            for offset, size in areas:
                try:
                    mapped.append((offset, self.device.kernel.mmap(self.device.fd, size,
                                                                   self.regions[index].offset + offset)))
                except OSError as exc:
                    log.warning("vfio.mmap_refused", device=self.name, bar=index, offset=offset,
                                error=os.strerror(exc.errno or 0))
            self._mapped_areas[index] = mapped
        if self.msix_layout is not None:
            self.msix = MsixTable(vm, self.msix_layout.vectors, host.allocate_msi_gsi, host.release_msi_gsi)
        if self.msi_layout is not None:
            routes = backend_routes_msi(vm)
            self.msi_vectors = [MsiVector(vm, host.allocate_msi_gsi() if routes else None)
                                for _ in range(self.msi_layout.vectors)]

    def set_requester_id(self, requester_id: int) -> None:
        super().set_requester_id(requester_id)
        if self.msix is not None:
            self.msix.set_requester_id(requester_id)
        for vector in self.msi_vectors:
            vector.devid = requester_id

    def connect_intx(self, line: InterruptLine | None, irq: int | None) -> None:
        if self.intx_info.count == 0 or not self.intx_info.eventfd:
            line, irq = None, None  # the device has no INTx: the pin reads as none
        super().connect_intx(line, irq)
        self._intx_gsi = irq if line is not None else None
        if self._intx_gsi is not None:
            self._intx_enable()

    def placement_properties(self) -> Mapping[str, Any]:
        return {"host_device": self.device.name,
                "mmap_bars": sorted(index for index, areas in self._mapped_areas.items() if areas)}

    # -- configuration space ---------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        config = self.config
        if not config.valid_access(offset, size):
            return (1 << (8 * size)) - 1 if 0 < size <= 4 else 0
        with self._lock:
            self.counts["config_reads"] += 1
            self._intx_eoi()
            value = config.read(offset, size)
            kinds = set(self.sources[offset: offset + size])
            if kinds == {Source.SHADOW}:
                return value
            data = bytearray(value.to_bytes(size, "little"))
            physical = self.device.read(self.config_region, offset, size) if Source.DEVICE in kinds else bytes(size)
            for i in range(size):
                source = self.sources[offset + i]
                if source == Source.DEVICE:
                    data[i] = physical[i]
                elif source == Source.ZERO:
                    data[i] = 0
            return int.from_bytes(data, "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        config = self.config
        if not config.valid_access(offset, size):
            return
        with self._lock:
            self.counts["config_writes"] += 1
            self._intx_eoi()
            config.write(offset, size, value)  # shadow bytes through their masks; others have none
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            run: list[int] = [i for i in range(size) if self.sources[offset + i] == Source.DEVICE]
            if run:
                first, last = run[0], run[-1]
                self.device.write(self.config_region, offset + first, data[first: last + 1])
            if c.overlaps(offset, size, c.COMMAND, 2):
                command = config.get(c.COMMAND, 2) & _COMMAND_FORWARDED
                self.device.write(self.config_region, c.COMMAND, command.to_bytes(2, "little"))
            msi = self.msi_layout
            if msi is not None and c.overlaps(offset, size, msi.offset + 2, msi.length - 2):
                self._msi_update(msi)
            msix = self.msix_layout
            if msix is not None and c.overlaps(offset, size, msix.offset + 2, 2):
                self._msix_update(msix)

    # -- MSI ----------------------------------------------------------------------------------

    def _msi_update(self, msi: MsiLayout) -> None:
        self.counts["msi_changes"] += 1
        config = self.config
        control = config.get(msi.offset + 2, 2)
        enabled = bool(control & 1)
        count = min(1 << ((control & 0x70) >> 4), msi.vectors) if enabled else 0
        address = config.get(msi.offset + 4, 4)
        if msi.is_64bit:
            address |= config.get(msi.offset + 8, 4) << 32
        data = config.get(msi.data_offset, 2)
        mask = config.get(msi.mask_offset, 4) if msi.mask_offset is not None else 0
        for index, vector in enumerate(self.msi_vectors):
            masked = index >= count or bool(mask >> index & 1)
            vector_data = (data & ~(count - 1)) | index if count else data
            try:
                vector.update(address, vector_data, masked)
            except Exception as exc:  # a backend refusing a route must not kill the vCPU thread
                log.warning("vfio.msi_route_failed", device=self.name, vector=index, error=str(exc))
        if count != self._msi_enabled_count:
            previous, self._msi_enabled_count = self._msi_enabled_count > 0, count
            self._arm(uapi.VFIO_PCI_MSI_IRQ_INDEX, self.msi_vectors[:count], previous=previous)

    def _msix_update(self, msix: MsixLayout) -> None:
        assert self.msix is not None
        self.counts["msi_changes"] += 1
        control = self.config.get(msix.offset + 2, 2)
        enabled = bool(control & 0x8000)
        self.msix.set_control(enabled, bool(control & 0x4000))
        if enabled != self._msix_enabled:
            previous, self._msix_enabled = self._msix_enabled, enabled
            self._arm(uapi.VFIO_PCI_MSIX_IRQ_INDEX, self.msix.vectors if enabled else [], previous=previous)

    def _arm(self, index: int, vectors: list[MsiVector], *, previous: bool) -> None:
        """Hand the vectors' eventfds to VFIO for ``index`` (none: disable it). INTx is off while
        MSI or MSI-X is on (vfio-pci takes one interrupt type at a time) and back after."""
        try:
            if previous:
                self.device.set_eventfds(index, [])
                self._drop_own_fds()
            if vectors:
                self._intx_disable()
                self.device.set_eventfds(index, [self._vector_fd(vector) for vector in vectors])
            elif self.intx is not None:
                self._intx_enable()
        except DeviceError as exc:
            log.warning("vfio.set_irqs_failed", device=self.name, index=index, error=str(exc))

    def _vector_fd(self, vector: MsiVector) -> int:
        """The eventfd VFIO signals for ``vector``: its irqfd when the backend routes MSIs, else
        an eventfd of ours that the event loop turns into :meth:`MsiVector.trigger`."""
        if vector.irqfd is not None:
            return vector.irqfd
        assert self.host is not None
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._own_fds[fd] = id(vector)

        def fire() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            vector.trigger()

        self.host.event_loop.add_reader(fd, fire)
        return fd

    def _drop_own_fds(self) -> None:
        for fd in list(self._own_fds):
            if self.host is not None:
                self.host.event_loop.remove_reader(fd)
            os.close(fd)
        self._own_fds.clear()

    # -- INTx -------------------------------------------------------------------------------------

    def _intx_enable(self) -> None:
        """Arm INTx: the trigger eventfd raises the line, vfio-pci masks it until it is unmasked.
        With irqfds, a resampling irqfd on the line's GSI does both in the kernel (the guest's
        EOI signals the resample eventfd, which VFIO takes as its unmask eventfd)."""
        gsi = self._intx_gsi
        if (self._intx_on or gsi is None or self.intx is None or self.host is None or self._msi_enabled_count
                or self._msix_enabled):
            return
        vm = self.host.vm
        trigger = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        resample = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._intx_fds = (trigger, resample)
        try:
            # the trigger first: vfio-pci takes an unmask eventfd only while INTx is enabled
            # (vfio_pci_set_intx_unmask: EINVAL otherwise; QEMU's vfio_intx_enable_kvm comes after too)
            self.device.set_eventfds(uapi.VFIO_PCI_INTX_IRQ_INDEX, [trigger])
            self._intx_on = True
            if vm.supports_irqfd:
                try:
                    vm.register_irqfd(trigger, gsi, resample_fd=resample)
                except Exception as exc:  # KVM arm64 takes resample irqfds only once its vGIC is initialized
                    log.info("vfio.intx_in_userspace", device=self.name, reason=str(exc))
                else:
                    self._intx_irqfd_gsi = gsi
                    self.device.set_irqs(uapi.VFIO_PCI_INTX_IRQ_INDEX,
                                         uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_UNMASK, 0, 1,
                                         uapi.eventfd_data([resample]))
            if self._intx_irqfd_gsi is None:
                self.host.event_loop.add_reader(trigger, self._intx_fired)
        except Exception as exc:
            log.warning("vfio.intx_unavailable", device=self.name, error=str(exc))
            self._intx_disable()

    def _intx_fired(self) -> None:
        """No resampling irqfd: the device asserted INTx (vfio-pci masked it); the line goes
        high until the guest next touches the device, and so that the touch is seen, the BARs'
        memory slots leave while it is high (QEMU's ``vfio_intx_interrupt``, ``vfio_eoi`` and
        its mmap toggling do the same)."""
        if self._intx_fds is None:
            return
        try:
            os.eventfd_read(self._intx_fds[0])
        except BlockingIOError:
            return
        with self._lock:
            self._intx_asserted = True
            for index in list(self._bar_slots):
                self._remove_slots(index)
            if self.intx is not None:
                self.intx.set_level(True)

    def _intx_eoi(self) -> None:
        if not self._intx_asserted:
            return
        with self._lock:
            if not self._intx_asserted:
                return
            self._intx_asserted = False
            if self.intx is not None:
                self.intx.set_level(False)
            try:
                self.device.set_irqs(uapi.VFIO_PCI_INTX_IRQ_INDEX,
                                     uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_UNMASK, 0, 1)
            except DeviceError as exc:
                log.warning("vfio.intx_unmask_failed", device=self.name, error=str(exc))
            for index, base in self._bar_bases.items():
                if index not in self._bar_slots:
                    self._add_slots(index, base)

    def _intx_disable(self) -> None:
        if self._intx_on:
            try:
                self.device.set_eventfds(uapi.VFIO_PCI_INTX_IRQ_INDEX, [])
            except DeviceError as exc:
                log.warning("vfio.intx_disable_failed", device=self.name, error=str(exc))
        self._intx_release()

    def _intx_release(self) -> None:
        self._intx_on = False
        if self._intx_asserted:
            self._intx_asserted = False
            if self.intx is not None:
                self.intx.set_level(False)
            for index, base in self._bar_bases.items():
                if index not in self._bar_slots:
                    self._add_slots(index, base)
        if self._intx_fds is None:
            return
        trigger, resample = self._intx_fds
        self._intx_fds = None
        if self.host is not None:
            if self._intx_irqfd_gsi is not None:
                try:
                    self.host.vm.unregister_irqfd(trigger, self._intx_irqfd_gsi)
                except Exception as exc:
                    log.warning("vfio.intx_irqfd_release_failed", device=self.name, error=str(exc))
                self._intx_irqfd_gsi = None
            else:
                self.host.event_loop.remove_reader(trigger)
        os.close(trigger)
        os.close(resample)

    # -- BARs -------------------------------------------------------------------------------------

    def _msix_target(self, index: int, offset: int, size: int) -> tuple[str, int] | None:
        msix = self.msix_layout
        if msix is None or self.msix is None:
            return None
        if msix.table_bar == index and msix.table_offset <= offset < msix.table_offset + table_bytes(msix.vectors):
            return "table", offset - msix.table_offset
        if msix.pba_bar == index and msix.pba_offset <= offset < msix.pba_offset + pba_bytes(msix.vectors):
            return "pba", offset - msix.pba_offset
        return None

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        self.counts["bar_traps"] += 1
        self._intx_eoi()
        target = self._msix_target(index, offset, size)
        if target is not None:
            assert self.msix is not None
            where, at = target
            if where == "table":
                return self.msix.read_table(at, size)
            self._collect_pending()
            return self.msix.read_pba(at, size)
        region = self.regions.get(index)
        if region is None or not region.readable or offset + size > region.size:
            return b"\xff" * size
        return self.device.read(region, offset, size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self.counts["bar_traps"] += 1
        self._intx_eoi()
        target = self._msix_target(index, offset, len(data))
        if target is not None:
            assert self.msix is not None
            where, at = target
            if where == "table":
                self.msix.write_table(at, data)
            return  # the PBA is read-only
        region = self.regions.get(index)
        if region is None or not region.writable or offset + len(data) > region.size:
            return
        self.device.write(region, offset, data)

    def _collect_pending(self) -> None:
        """Masked MSI-X vectors whose eventfd the device signalled are pending: take the count
        (their irqfd is not registered while masked) into the vector's pending bit, which the
        unmask delivers (:meth:`vmmkit.irq.MsiVector.update`)."""
        assert self.msix is not None
        if not self._msix_enabled:
            return
        for vector in self.msix.vectors:
            fd = vector.irqfd
            if fd is not None and vector.masked:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                vector.pending = True

    def bar_mapped(self, index: int, base: int) -> None:
        """BAR ``index`` decodes at ``base``: its mmapped parts become memory slots there (a base
        that is not page aligned keeps the whole BAR trapped)."""
        with self._lock:
            self._bar_bases[index] = base
            if not self._intx_asserted:
                self._add_slots(index, base)

    def bar_unmapped(self, index: int, base: int) -> None:
        with self._lock:
            self._bar_bases.pop(index, None)
            self._remove_slots(index)

    def _add_slots(self, index: int, base: int) -> None:
        if self.host is None or self.slots is None or base % _PAGE:
            return
        slots: list[int] = []
        for offset, area in self._mapped_areas.get(index, []):
            slot = self.slots.allocate()
            try:
                self.host.vm.add_memory_region(slot, base + offset, area.size, area.address)
            except Exception as exc:
                self.slots.free(slot)
                log.warning("vfio.bar_slot_refused", device=self.name, bar=index, address=hex(base + offset),
                            error=str(exc))
                continue
            slots.append(slot)
        if slots:
            self._bar_slots[index] = slots

    def _remove_slots(self, index: int) -> None:
        if self.host is None or self.slots is None:
            return
        for slot in self._bar_slots.pop(index, []):
            try:
                self.host.vm.remove_memory_region(slot)
            except Exception as exc:
                log.warning("vfio.bar_slot_release_failed", device=self.name, bar=index, error=str(exc))
            self.slots.free(slot)

    # -- lifecycle --------------------------------------------------------------------------------

    def reset(self) -> None:
        """VM reset: interrupts off, ``VFIO_DEVICE_RESET`` (if the device has a reset), the
        shadow back to power-on (BARs where vmmkit placed them), INTx armed again."""
        with self._lock:
            self._disarm_all()
            try:
                self.device.reset()
            except DeviceError as exc:
                log.warning("vfio.reset_failed", device=self.name, error=str(exc))
            if self.msix is not None:
                self.msix.reset()
            for vector in self.msi_vectors:
                vector.pending = False
                vector.update(0, 0, True)
            super().reset()
            command = self.config.get(c.COMMAND, 2) & _COMMAND_FORWARDED
            self.device.write(self.config_region, c.COMMAND, command.to_bytes(2, "little"))
            self._intx_enable()

    def _disarm_all(self) -> None:
        if self._msix_enabled:
            self._msix_enabled = False
            self._arm(uapi.VFIO_PCI_MSIX_IRQ_INDEX, [], previous=True)
        if self._msi_enabled_count:
            self._msi_enabled_count = 0
            self._arm(uapi.VFIO_PCI_MSI_IRQ_INDEX, [], previous=True)
        self._intx_disable()

    def counters(self) -> Mapping[str, int]:
        return dict(self.counts)

    def close(self) -> None:
        """Hot-remove or exit: interrupts off, BAR slots and mappings gone, vectors released,
        the device fd closed, and its group given back (the last one closes the container)."""
        with self._lock:
            if self.host is None and self.device.fd < 0:
                return
            self._disarm_all()
            for index in list(self._bar_bases):
                self.bar_unmapped(index, 0)
            for areas in self._mapped_areas.values():
                for _offset, area in areas:
                    area.close()
            self._mapped_areas.clear()
            if self.msix is not None:
                self.msix.close()
            for vector in self.msi_vectors:
                vector.close()
                if vector.gsi is not None and self.host is not None:
                    self.host.release_msi_gsi(vector.gsi)
                    vector.gsi = None
            self.msi_vectors = []
            if self.device.fd >= 0:
                self.device.close()
                self.device.fd = -1
            self.host = None
            on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def describe(self) -> Mapping[str, Any]:
        return {"host_device": self.device.name}
