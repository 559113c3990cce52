"""Guest-physical memory a device brings with it (virtio-pmem's file), outside guest RAM.

As Cloud Hypervisor's ``DeviceManager::make_virtio_pmem_device``: the range comes from the
64-bit device window (``layout.pci_mmio64``, above RAM and above the memory hotplug area, so
the two never meet), with the alignment the device asks for (2 MiB for pmem), from the same
allocator as 64-bit PCI BARs (:class:`vmmkit.pci.host.PciRoot` takes it from the device
manager); the host memory becomes a hypervisor memory slot of its own (CH's
``create_userspace_mapping``). The range is not RAM: it is in no e820 table or memory node and
not in :class:`vmmkit.memory.GuestMemory` (no device DMAs into it, a snapshot does not copy it);
only the device that asked for it tells the guest where it is.

Slots: guest RAM, hot-plugged DIMMs and the virtio-mem region number theirs upwards from 0
(``GuestMemory`` regions, at most a dozen); device memory takes slots from
:data:`FIRST_SLOT` up, so the two never pick the same number.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Final

from attrs import define, field

from vmmkit.allocator import AddressAllocator
from vmmkit.errors import BusError, DeviceError
from vmmkit.log import get_logger
from vmmkit.memory import MemoryRange

if TYPE_CHECKING:
    from vmmkit.hypervisor import Vm

log = get_logger()

#: The first hypervisor memory slot of device memory (KVM has 509 slots or more per VM).
FIRST_SLOT: Final = 256


@define(eq=False)
class DeviceMemoryRegion:
    """One device's mapping: where the guest sees it (:attr:`range`), its hypervisor slot."""

    range: MemoryRange
    slot: int
    host_address: int
    _owner: DeviceMemory | None = field(default=None, repr=False)

    @property
    def start(self) -> int:
        return self.range.start

    @property
    def size(self) -> int:
        return self.range.size

    def unmap(self) -> bool:
        """Take the range out of the guest and give it back to the window (idempotent). True
        when the guest no longer reaches the host memory: only then may the caller unmap it."""
        owner, self._owner = self._owner, None
        return owner is None or owner.unmap(self)


class DeviceMemory:
    """The device memory of one VM: a window allocator and the hypervisor's slots.

    :param vm: the backend's VM.
    :param allocator: the 64-bit device window's allocator (``None``: the layout has none).
    """

    def __init__(self, vm: Vm, allocator: AddressAllocator | None) -> None:
        self._vm = vm
        self.allocator = allocator
        self._lock = threading.Lock()
        self._slots: dict[int, DeviceMemoryRegion] = {}

    @property
    def regions(self) -> list[DeviceMemoryRegion]:
        with self._lock:
            return list(self._slots.values())

    def map(self, host_address: int, size: int, *, alignment: int, at: int | None = None) -> DeviceMemoryRegion:
        """Give ``size`` bytes of host memory at ``host_address`` a guest-physical range aligned
        to ``alignment`` (``at``: exactly there, a restore) and a hypervisor slot.

        :raises DeviceError: no window, no room in it, or the hypervisor refuses the slot.
        """
        if self.allocator is None:
            raise DeviceError("this architecture's layout has no 64-bit device window for device memory")
        try:
            start = self.allocator.allocate(size, alignment, at=at)
        except BusError as exc:
            raise DeviceError(f"no room for {size:#x} bytes of device memory: {exc}") from None
        with self._lock:
            slot = FIRST_SLOT
            while slot in self._slots:
                slot += 1
            region = DeviceMemoryRegion(MemoryRange(start, size), slot, host_address, owner=self)
            self._slots[slot] = region
        try:
            self._vm.add_memory_region(slot, start, size, host_address)
        except Exception as exc:
            with self._lock:
                del self._slots[slot]
            self.allocator.free(start)
            raise DeviceError(f"the hypervisor refused memory slot {slot} at {start:#x}+{size:#x}: {exc}") from None
        log.info("device_memory.mapped", slot=slot, start=start, size=size)
        return region

    def unmap(self, region: DeviceMemoryRegion) -> bool:
        """Remove ``region``'s slot and free its range (:meth:`DeviceMemoryRegion.unmap`).
        False when the backend refuses (emu, once vCPUs exist): the slot and the range stay, and
        the host memory must stay mapped until the VM is gone."""
        with self._lock:
            if self._slots.get(region.slot) is not region:
                return True
        try:
            self._vm.remove_memory_region(region.slot)
        except Exception as exc:
            log.warning("device_memory.unmap_failed", slot=region.slot, start=region.start, error=str(exc))
            return False
        with self._lock:
            del self._slots[region.slot]
        if self.allocator is not None:
            try:
                self.allocator.free(region.start)
            except BusError:
                pass
        log.info("device_memory.unmapped", slot=region.slot, start=region.start, size=region.size)
        return True
