"""Guest RAM plugged while the guest runs (``--memory hotplug_method=acpi,hotplug_size=``,
``vm.resize desired_ram``), as Cloud Hypervisor's memory manager does it with ACPI.

The layout reserves guest-physical space for it (``MemoryLayout.memory_hotplug``). Each
``resize`` to more RAM maps one new region (a "DIMM") at the end of what is plugged: host
memory (``mmap``, with the options of ``--memory``), a new memory slot of the hypervisor, a
region of :class:`vmmkit.memory.GuestMemory` (so devices reach it), then the next free slot of
the ACPI register block (:mod:`vmmkit.acpi.memory_hotplug`) and the GED's notification. As in
CH (``MemoryManager::hotplug_ram_region``): a DIMM's size is a multiple of 128 MiB (a Linux
memory block on x86-64), there are at most 8, and ``vm.resize`` never shrinks RAM this way.
A guest may still eject a DIMM on its own (Linux's ACPI driver, ``echo 1 > .../eject``): the
DIMM's ``_EJ0`` takes it out of the hypervisor and of the guest memory table, and its host
memory is given back (``MADV_DONTNEED``) but stays mapped until the VM closes, so that a
device still holding an address in it never touches an unmapped page.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from vmmkit.acpi.memory_hotplug import MemoryHotplugController
from vmmkit.config import ConfigError
from vmmkit.device import DeviceRequest, ManagedDevice
from vmmkit.errors import VmmError
from vmmkit.log import get_logger
from vmmkit.memory import GuestRegion, MemoryRange, close_region, map_region

if TYPE_CHECKING:
    from vmmkit.arch import MemoryLayout
    from vmmkit.config import MemoryConfig
    from vmmkit.device_manager import DeviceManager
    from vmmkit.hypervisor import Vm
    from vmmkit.memory import GuestMemory

log = get_logger()

MiB: Final = 1 << 20
#: A DIMM is a whole number of these (Linux's x86-64 memory block; CH checks the same).
DIMM_ALIGN: Final = 128 * MiB
#: The register block's device id.
DEVICE_ID: Final = "_memory_hotplug"


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
        self.controller = MemoryHotplugController(DEVICE_ID, on_eject=self._ejected)
        self._notifiers = notifiers
        self._lock = threading.Lock()
        #: The DIMMs plugged, by register slot.
        self.dimms: dict[int, GuestRegion] = {}
        #: DIMMs the guest ejected: still mapped, unmapped by :meth:`close`.
        self._retired: list[GuestRegion] = []

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
        """The bytes a resize to ``desired`` adds (0: nothing to do).

        :raises ConfigError: it cannot be done (naming ``desired_ram`` and why).
        """
        current = self.current
        limit = self.boot_size + self.area.size
        if desired < current:
            raise ConfigError("desired_ram", desired, f"at least the current {_human(current)}",
                              reason="ACPI memory hotplug cannot take memory away (as Cloud Hypervisor's)")
        if desired > limit:
            raise ConfigError("desired_ram", desired, f"at most {_human(limit)}",
                              reason=f"boot RAM {_human(self.boot_size)} plus hotplug_size "
                                     f"{_human(self.area.size)}")
        added = desired - current
        if added % DIMM_ALIGN:
            raise ConfigError("desired_ram", desired, f"the current {_human(current)} plus a multiple of 128 MiB",
                              reason="hot-plugged memory comes in 128 MiB blocks")
        if added and self.controller.free_slot() is None:
            raise ConfigError("desired_ram", desired, "a free memory hotplug slot",
                              reason=f"all {self.controller.slot_count} slots are plugged")
        return added

    def resize(self, desired: int) -> GuestRegion | None:
        """Plug memory until the guest has ``desired`` bytes of RAM and tell it (one DIMM);
        ``None`` when it has them already.

        :raises ConfigError: see :meth:`check`; nothing changed.
        :raises VmmError: the host cannot map the memory or the hypervisor refuses the slot;
            nothing changed.
        """
        with self._lock:
            added = self.check(desired)
            if not added:
                return None
            slot = self.controller.free_slot()
            assert slot is not None
            end = max((region.range.end for region in self.dimms.values()), default=self.area.start)
            rng = MemoryRange(end, added)
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
        for notifier in self._notifiers():
            notifier.notify_memory_devices_changed()
        log.info("memory.hotplugged", slot=slot, start=rng.start, size=rng.size, total=self.current)
        return region

    def _ejected(self, slot: int) -> None:
        """The guest ejected ``slot`` (``_EJ0``, on its vCPU thread): the DIMM leaves the
        hypervisor and the memory table; its host pages are dropped."""
        with self._lock:
            region = self.dimms.pop(slot, None)
            if region is None:
                return
            self._vm.remove_memory_region(region.slot)
            self._memory.remove_region(region.start)
            region.buffer.madvise(_MADV_DONTNEED)
            self._retired.append(region)
        log.info("memory.ejected", slot=slot, start=region.start, size=region.size, total=self.current)

    def close(self) -> None:
        """Unmap the DIMMs the guest ejected (the VM is going away; the others go with its
        :class:`~vmmkit.memory.GuestMemory`)."""
        with self._lock:
            retired, self._retired = self._retired, []
        for region in retired:
            close_region(region)


_MADV_DONTNEED: Final = 4
