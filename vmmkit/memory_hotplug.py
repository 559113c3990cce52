"""Guest RAM plugged while the guest runs (``--memory hotplug_method=acpi,hotplug_size=``,
``vm.resize desired_ram``), as Cloud Hypervisor's memory manager does it with ACPI.

The layout reserves guest-physical space for it (``MemoryLayout.memory_hotplug``). Each
``resize`` to more RAM maps one new region (a "DIMM") at the end of what is plugged: host
memory (``mmap``, with the options of ``--memory``), a new memory slot of the hypervisor, a
region of :class:`vmmkit.memory.GuestMemory` (so devices reach it), then the next free slot of
the ACPI register block (:mod:`vmmkit.acpi.memory_hotplug`) and the GED's notification. As in
CH (``MemoryManager::hotplug_ram_region``): a DIMM's size is a multiple of 128 MiB (a Linux
memory block on x86-64), and there are at most 8.

Unlike CH (whose ``resize`` ignores a smaller ``desired_ram`` with ACPI), a resize to less RAM
asks the guest to eject the last DIMMs that make up the difference (MRMV, the GED): Linux's
ACPI driver offlines their memory blocks (which succeeds reliably for ``ZONE_MOVABLE`` memory:
``memhp_default_state=online_movable``), removes them and calls the DIMM's ``_EJ0``. Only then,
on that write (or when the VM resets), does the DIMM leave the hypervisor and the guest memory
table; its host memory is given back (``MADV_DONTNEED``) but stays mapped until the VM closes,
so that a device still holding an address in it never touches an unmapped page. A guest may
also eject a DIMM on its own (``echo 1 > /sys/bus/acpi/devices/PNP0C80:00/eject``).

With ``hotplug_method=virtio-mem`` (:class:`VirtioMemHotplug`) the whole area is mapped at boot
(one region, one hypervisor slot, as CH's virtio-mem zone) and handed to a ``virtio-mem``
device (a device type of a plugin: ``vmmkit_devices.virtio.mem``); a resize sets its
``requested_size`` (``desired_ram`` minus the boot RAM, in 2 MiB blocks, also below what is
plugged: the driver unplugs) and the driver plugs or unplugs blocks to reach it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from attrs import frozen

from vmmkit.acpi.memory_hotplug import ENABLED, MemoryHotplugController
from vmmkit.config import ConfigError
from vmmkit.device import DeviceRequest, ManagedDevice
from vmmkit.errors import VmmError
from vmmkit.log import get_logger
from vmmkit.memory import GuestRegion, MemoryRange, close_region, map_region

if TYPE_CHECKING:
    from vmmkit.arch import MemoryLayout
    from vmmkit.config import MemoryConfig, MemoryZoneConfig
    from vmmkit.device_manager import DeviceManager
    from vmmkit.hypervisor import Vm
    from vmmkit.memory import GuestMemory

log = get_logger()

MiB: Final = 1 << 20
#: A DIMM is a whole number of these (Linux's x86-64 memory block; CH checks the same).
DIMM_ALIGN: Final = 128 * MiB
#: The register block's device id.
DEVICE_ID: Final = "_memory_hotplug"


def _check_saved(state: Mapping[str, Any], method: str, boot_size: int) -> str:
    """The snapshot's memory hotplug was ``method`` over ``boot_size`` bytes of boot RAM, as this
    VM's is; the state's name for messages.

    :raises StateError: it was not."""
    from vmmkit.state import StateError, field

    where = "memory_hotplug"
    if field(state, "method", str, where) != method or field(state, "boot_size", int, where) != boot_size:
        raise StateError(f"{where}: saved as {state.get('method')} hotplug over {state.get('boot_size')} bytes "
                         f"of boot RAM, this VM has {method} hotplug over {boot_size}")
    return where


def _human(size: int) -> str:
    return f"{size // MiB} MiB" if size % MiB == 0 else f"{size} bytes"


class MemoryHotplug:
    """The hotplug RAM of one VM: the area it may use, the DIMMs plugged, the registers."""

    def __init__(self, *, area: MemoryRange, boot_size: int, config: MemoryConfig, memory: GuestMemory,
                 vm: Vm, notifiers: Callable[[], Sequence[ManagedDevice]]) -> None:
        self.area = area
        self.boot_size = boot_size
        self._config = config
        self._memory = memory
        self._vm = vm
        #: The register block (placed by :meth:`attach`).
        self.controller = MemoryHotplugController(DEVICE_ID, on_eject=self._ejected, on_reset=self._reset)
        self._notifiers = notifiers
        self._lock = threading.Lock()
        #: The DIMMs plugged, by register slot.
        self.dimms: dict[int, GuestRegion] = {}
        #: DIMMs the guest ejected: still mapped, unmapped by :meth:`close`.
        self._retired: list[GuestRegion] = []
        #: Slots the guest was asked to eject and has not yet.
        self._removing: set[int] = set()

    @classmethod
    def attach(cls, manager: DeviceManager, layout: MemoryLayout, config: MemoryConfig,
               memory: GuestMemory, vm: Vm) -> MemoryHotplug | None:
        """Place the register block and return the VM's hotplug RAM, when the layout has room
        for it (``--memory hotplug_size=``); ``None`` without.

        :raises ConfigError: ``hotplug_size`` is set on an architecture without ACPI memory
            hotplug.
        """
        area, registers = layout.memory_hotplug, layout.memory_hotplug_registers
        if not config.hotplug_size:
            return None
        if area is None or registers is None:
            raise ConfigError("hotplug_size", config.hotplug_size, "no hotplug_size",
                              reason="this architecture has no ACPI memory hotplug")

        def notifiers() -> list[ManagedDevice]:
            return [p.device for p in manager.devices
                    if isinstance(p.device, ManagedDevice) and p.device.handles_memory_hotplug_notification]

        hotplug = cls(area=area, boot_size=config.size, config=config, memory=memory, vm=vm, notifiers=notifiers)
        request = DeviceRequest("memory-hotplug", DEVICE_ID, mmio=(registers.start, registers.size))
        manager.place(hotplug.controller, request)
        return hotplug

    @property
    def plugged(self) -> int:
        """Bytes plugged since boot."""
        return sum(region.size for region in self.dimms.values())

    @property
    def current(self) -> int:
        """The guest's RAM now: boot RAM plus what is plugged."""
        return self.boot_size + self.plugged

    def check(self, desired: int) -> int:
        """The bytes a resize to ``desired`` adds (negative: removes; 0: nothing to do).

        :raises ConfigError: it cannot be done (naming ``desired_ram`` and why).
        """
        current = self.current
        limit = self.boot_size + self.area.size
        if self._removing:
            target = current - sum(self.dimms[slot].size for slot in self._removing)
            if desired != target:
                raise ConfigError("desired_ram", desired, f"{_human(target)} until then",
                                  reason="the guest has not ejected the memory it was asked to remove yet")
            return 0
        if desired > limit:
            raise ConfigError("desired_ram", desired, f"at most {_human(limit)}",
                              reason=f"boot RAM {_human(self.boot_size)} plus hotplug_size "
                                     f"{_human(self.area.size)}")
        if desired < current:
            self._dimms_to_remove(current - desired, desired)
            return desired - current
        added = desired - current
        if added % DIMM_ALIGN:
            raise ConfigError("desired_ram", desired, f"the current {_human(current)} plus a multiple of 128 MiB",
                              reason="hot-plugged memory comes in 128 MiB blocks")
        if added and self.controller.free_slot() is None:
            raise ConfigError("desired_ram", desired, "a free memory hotplug slot",
                              reason=f"all {self.controller.slot_count} slots are plugged")
        return added

    def _dimms_to_remove(self, size: int, desired: int) -> list[int]:
        """The last plugged DIMMs (by address) that hold exactly ``size`` bytes: memory leaves
        in whole DIMMs, the last plugged first."""
        chosen: list[int] = []
        total = 0
        reachable = [self.current]
        for slot, region in sorted(self.dimms.items(), key=lambda item: -item[1].start):
            if total == size:
                break
            chosen.append(slot)
            total += region.size
            reachable.append(self.current - total)
        if total != size:
            sizes = ", ".join(_human(value) for value in reachable[1:]) or "none"
            raise ConfigError("desired_ram", desired, f"one of {sizes}",
                              reason=f"memory is removed in whole hot-plugged DIMMs, never below the boot "
                                     f"RAM {_human(self.boot_size)}")
        return chosen

    def resize(self, desired: int) -> int:
        """Plug memory until the guest has ``desired`` bytes of RAM (one DIMM), or ask the
        guest to eject the last DIMMs down to it, and tell it; the bytes added (negative:
        asked to be removed; 0: nothing to do). Removal is carried out when the guest ejects
        (:meth:`_ejected`); a request repeated meanwhile notifies it again.

        :raises ConfigError: see :meth:`check`; nothing changed.
        :raises VmmError: the host cannot map the memory or the hypervisor refuses the slot;
            nothing changed.
        """
        with self._lock:
            delta = self.check(desired)
            if delta < 0:
                for slot in self._dimms_to_remove(-delta, desired):
                    self._removing.add(slot)
                    self.controller.request_removal(slot)
            elif delta > 0:
                self._plug(delta)
            elif self._removing:  # the same removal asked again: tell the guest again
                for slot in self._removing:
                    self.controller.request_removal(slot)
            else:
                return 0
        for notifier in self._notifiers():
            notifier.notify_memory_devices_changed()
        return delta

    def _plug(self, size: int) -> GuestRegion:
        slot = self.controller.free_slot()
        assert slot is not None
        end = max((region.range.end for region in self.dimms.values()), default=self.area.start)
        rng = MemoryRange(end, size)
        memory_slot = max((r.slot for r in self._memory.regions), default=-1) + 1
        config = self._config
        region = map_region(rng, memory_slot, shared=config.shared, hugepages=config.hugepages,
                            hugepage_size=config.hugepage_size, thp=config.thp, mergeable=config.mergeable,
                            prefault=config.prefault)
        try:
            self._vm.add_memory_region(memory_slot, rng.start, rng.size, region.host_address)
        except BaseException as exc:
            close_region(region)
            if isinstance(exc, Exception) and not isinstance(exc, VmmError):
                raise VmmError(f"the hypervisor refused memory slot {memory_slot} at {rng.start:#x}: {exc}") \
                    from exc
            raise
        self._memory.add_region(region)
        self.dimms[slot] = region
        self.controller.plug(slot, rng.start, rng.size)
        log.info("memory.hotplugged", slot=slot, start=rng.start, size=rng.size, total=self.current)
        return region

    def _reset(self) -> None:
        """The VM resets: a DIMM the guest was asked to eject goes now (as a PCI device does)."""
        with self._lock:
            pending = sorted(self._removing)
        for slot in pending:
            self._ejected(slot)
            self.controller.unplug(slot)

    def _ejected(self, slot: int) -> None:
        """The guest ejected ``slot`` (``_EJ0``, on its vCPU thread): the DIMM leaves the
        hypervisor and the memory table; its host pages are dropped."""
        with self._lock:
            self._removing.discard(slot)
            region = self.dimms.pop(slot, None)
            if region is None:
                return
            self._vm.remove_memory_region(region.slot)
            self._memory.remove_region(region.start)
            region.discard()
            self._retired.append(region)
        log.info("memory.ejected", slot=slot, start=region.start, size=region.size, total=self.current)

    # -- snapshots: the DIMMs are RAM files of the snapshot, the registers a device's state ----

    def save_state(self) -> dict[str, Any]:
        """The boot RAM (the configuration records RAM as resized) and the slots the guest was
        asked to eject and has not yet."""
        with self._lock:
            return {"method": "acpi", "boot_size": self.boot_size, "removing": sorted(self._removing)}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Take back the DIMMs of a restored VM: each enabled slot of the register block (its
        state restored already) must be one RAM region of the snapshot, and every snapshot
        region in the hotplug area one enabled slot.

        :raises StateError: they do not match."""
        from vmmkit.state import StateError, field

        where = _check_saved(state, "acpi", self.boot_size)
        dimms: dict[int, GuestRegion] = {}
        for slot in range(self.controller.slot_count):
            base, length, status = self.controller.slot(slot)
            if not status & ENABLED:
                continue
            region = self._memory.find_region(base)
            if region is None or region.range != MemoryRange(base, length) or not self.area.contains(base, length):
                raise StateError(f"{where}: slot {slot} holds {base:#x}+{length:#x}, which is no RAM file of "
                                 "the snapshot in the hotplug area")
            dimms[slot] = region
        stray = [str(r.range) for r in self._memory.regions
                 if self.area.overlaps(r.range) and r not in dimms.values()]
        if stray:
            raise StateError(f"{where}: RAM {stray} in the hotplug area belongs to no enabled slot")
        removing = field(state, "removing", list, where)
        if not all(isinstance(slot, int) and slot in dimms for slot in removing):
            raise StateError(f"{where}.removing: {removing} are not all plugged slots")
        with self._lock:
            self.dimms, self._removing = dimms, set(removing)

    def close(self) -> None:
        """Unmap the DIMMs the guest ejected (the VM is going away; the others go with its
        :class:`~vmmkit.memory.GuestMemory`)."""
        with self._lock:
            retired, self._retired = self._retired, []
        for region in retired:
            close_region(region)




@frozen
class VirtioMemRegion:
    """What the core hands the ``virtio-mem`` device type (``DeviceRequest.config``): the
    region it manages, mapped already, and what the driver should plug from the start."""

    start: int
    size: int
    requested_size: int = 0


#: The virtio-mem device's id, and its block size (virtio-mem's in ``vmmkit_devices``, CH's
#: ``VIRTIO_MEM_DEFAULT_BLOCK_SIZE``): ``desired_ram`` moves in these steps.
VIRTIO_MEM_ID: Final = "_mem0"
VIRTIO_MEM_BLOCK: Final = 2 * MiB


class VirtioMemHotplug:
    """The hotplug RAM of a VM with ``hotplug_method=virtio-mem``: mapped at boot, plugged by
    the guest's virtio-mem driver up to the ``requested_size`` a resize sets."""

    def __init__(self, *, area: MemoryRange, boot_size: int, requested: int,
                 resize_device: Callable[[int], None]) -> None:
        self.area = area
        self.boot_size = boot_size
        self.requested = requested
        self._resize_device = resize_device
        self._lock = threading.Lock()

    @classmethod
    def attach(cls, manager: DeviceManager, area: MemoryRange, config: MemoryConfig, memory: GuestMemory,
               vm: Vm) -> VirtioMemHotplug:
        """Map the area, give it to the hypervisor and guest memory, and create the device.

        :raises ConfigError: the area is not in whole blocks, or no plugin provides
            ``virtio-mem``.
        """
        return cls._attach(manager, area, memory, vm, device_id=VIRTIO_MEM_ID, boot_size=config.size,
                           requested=config.hotplugged_size or 0, method=config.hotplug_method,
                           option="hotplug_size", shared=config.shared, hugepages=config.hugepages,
                           hugepage_size=config.hugepage_size, thp=config.thp, mergeable=config.mergeable)

    @classmethod
    def attach_zone(cls, manager: DeviceManager, area: MemoryRange, zone: MemoryZoneConfig, memory: GuestMemory,
                    vm: Vm, *, thp: bool) -> VirtioMemHotplug:
        """:meth:`attach` for one memory zone's ``hotplug_size`` (:mod:`vmmkit.memory_zones`):
        device ``_virtio-mem-<zone id>``, host memory with the zone's options."""
        return cls._attach(manager, area, memory, vm, device_id=f"_virtio-mem-{zone.id}", boot_size=zone.size,
                           requested=zone.hotplugged_size or 0, method="VirtioMem",
                           option=f"zone {zone.id}: hotplug_size", shared=zone.shared, hugepages=zone.hugepages,
                           hugepage_size=None, thp=thp, mergeable=zone.mergeable)

    @classmethod
    def _attach(cls, manager: DeviceManager, area: MemoryRange, memory: GuestMemory, vm: Vm, *, device_id: str,
                boot_size: int, requested: int, method: str, option: str, shared: bool, hugepages: bool,
                hugepage_size: int | None, thp: bool, mergeable: bool) -> VirtioMemHotplug:
        if area.size % VIRTIO_MEM_BLOCK:
            raise ConfigError(option, area.size, "a multiple of 2 MiB (virtio-mem's block)")
        if requested % VIRTIO_MEM_BLOCK:
            raise ConfigError(option.replace("hotplug_size", "hotplugged_size"), requested,
                              "a multiple of 2 MiB (virtio-mem's block)")
        restored = memory.find_region(area.start)
        if restored is None:
            memory_slot = max((r.slot for r in memory.regions), default=-1) + 1
            region = map_region(area, memory_slot, shared=shared, hugepages=hugepages, hugepage_size=hugepage_size,
                                thp=thp, mergeable=mergeable, prefault=False)
            try:
                vm.add_memory_region(memory_slot, area.start, area.size, region.host_address)
            except BaseException:
                close_region(region)
                raise
            memory.add_region(region)
        elif restored.range != area:  # a snapshot's RAM file (mapped and given to the VM already)
            raise ConfigError(option, area.size, f"{_human(restored.size)} as in the snapshot")
        request = DeviceRequest("virtio-mem", device_id, VirtioMemRegion(area.start, area.size, requested))
        try:
            manager.create(request)
        except VmmError as exc:
            raise ConfigError("hotplug_method", method, "a method a device plugin provides", reason=str(exc)) from None
        return cls(area=area, boot_size=boot_size, requested=requested,
                   resize_device=lambda size: manager.resize(device_id, size))

    @property
    def current(self) -> int:
        """The RAM the guest is asked to have: boot RAM plus ``requested_size``."""
        return self.boot_size + self.requested

    def check(self, desired: int) -> int:
        """The change of ``requested_size`` a resize to ``desired`` makes.

        :raises ConfigError: it cannot be done (naming ``desired_ram`` and why).
        """
        limit = self.boot_size + self.area.size
        if desired < self.boot_size or desired > limit:
            raise ConfigError("desired_ram", desired, f"{_human(self.boot_size)} to {_human(limit)}",
                              reason="boot RAM, plus at most hotplug_size with virtio-mem")
        if (desired - self.boot_size) % VIRTIO_MEM_BLOCK:
            raise ConfigError("desired_ram", desired, f"the boot RAM {_human(self.boot_size)} plus a multiple of 2 MiB",
                              reason="virtio-mem plugs 2 MiB blocks")
        return desired - self.current

    def resize(self, desired: int) -> int:
        """Set the device's ``requested_size`` for ``desired`` bytes of RAM (the driver follows
        it); the change (0: nothing to do).

        :raises ConfigError: see :meth:`check`; nothing changed.
        """
        with self._lock:
            delta = self.check(desired)
            if delta:
                self._resize_device(desired - self.boot_size)
                self.requested = desired - self.boot_size
        return delta

    def save_state(self) -> dict[str, Any]:
        """The boot RAM and the requested size (the device saves which blocks are plugged)."""
        return {"method": "virtio-mem", "boot_size": self.boot_size, "requested": self.requested}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        from vmmkit.state import int_field

        where = _check_saved(state, "virtio-mem", self.boot_size)
        self.requested = int_field(state, "requested", where, 0, self.area.size)

    def close(self) -> None:
        """The region goes with the VM's guest memory."""


def attach(manager: DeviceManager, layout: MemoryLayout, config: MemoryConfig, memory: GuestMemory,
           vm: Vm) -> MemoryHotplug | VirtioMemHotplug | None:
    """The VM's hotplug RAM for ``--memory hotplug_size=`` by its ``hotplug_method``; ``None``
    without ``hotplug_size``.

    :raises ConfigError: the architecture has no room for it, or the method cannot be had.
    """
    if not config.hotplug_size:
        return None
    if config.hotplug_method == "VirtioMem":
        if layout.memory_hotplug is None:
            raise ConfigError("hotplug_size", config.hotplug_size, "no hotplug_size",
                              reason="this architecture has no room for hotplug memory")
        return VirtioMemHotplug.attach(manager, layout.memory_hotplug, config, memory, vm)
    if config.hotplugged_size:
        raise ConfigError("hotplugged_size", config.hotplugged_size, "no hotplugged_size with hotplug_method=acpi",
                          reason="as in Cloud Hypervisor, only virtio-mem starts with memory plugged")
    return MemoryHotplug.attach(manager, layout, config, memory, vm)
