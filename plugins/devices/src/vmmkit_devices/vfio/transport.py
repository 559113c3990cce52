"""The ``vfio-pci`` transport: places passed-through functions, and owns a VM's VFIO state.

A transport is instantiated once per VM (:mod:`vmmkit.transport`), which makes it the owner of
what a VM's VFIO devices share (Cloud Hypervisor's ``DeviceManager`` keeps the same in its
``vfio_container`` and memory-slot allocator): one container, the IOMMU groups by number
(reference-counted: two functions of one group share it), the DMA map of guest RAM, and the
memory slot numbers of BAR mappings.

The device type builds a :class:`VfioRequest` (nothing opened yet); :meth:`VfioPciTransport.place`
opens the group and the device, builds the :class:`~vmmkit_devices.vfio.device.VfioPciFunction`,
gives it the VM's resources and plugs it into a PCI slot like any PCI function. Removal unplugs
it; closing it gives the group back, and the last group's release closes the container (the
kernel unmaps the DMA then).

Guest RAM is mapped for DMA when the container gets its IOMMU model: every
:class:`vmmkit.memory.GuestRegion` at its guest-physical address (``VFIO_IOMMU_MAP_DMA``, the
kernel pins it), and kept in step with the region table after that (a listener of
:class:`vmmkit.memory.GuestMemory`): a DIMM plugged by ``vm.resize`` is mapped, an ejected one
unmapped (before its pages are given back), as Cloud Hypervisor's ``DeviceManager`` does for
hot-plugged RAM with its VFIO container.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from vmmkit.device import ManagedDevice, PlacedDevice
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.transport import Transport

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vmmkit.device import DeviceRequest
    from vmmkit.memory import GuestMemory, GuestRegion
    from vmmkit.transport import DeviceHost
    from vmmkit_devices.vfio.container import VfioContainer, VfioGroup
    from vmmkit_devices.vfio.kernel import VfioKernel

log = get_logger()

#: BAR mappings take memory slots from here up (RAM and hotplugged DIMMs count up from 0).
FIRST_BAR_SLOT = 0x4000
LAST_BAR_SLOT = 0x7000


@attrs.define(eq=False)
class VfioRequest(ManagedDevice):
    """A VFIO device to open at placement: its sysfs path, which BARs never to mmap, and the
    kernel interface (the host's, or a simulator's in contract tests)."""

    transport_family: ClassVar[str] = "vfio"

    path: str
    exclude_mmap: frozenset[int] = frozenset()
    kernel: VfioKernel | None = None
    dev_dir: str = "/dev/vfio"


class SlotAllocator:
    def __init__(self, first: int = FIRST_BAR_SLOT, last: int = LAST_BAR_SLOT) -> None:
        self._free = list(range(last - 1, first - 1, -1))
        self._lock = threading.Lock()

    def allocate(self) -> int:
        with self._lock:
            if not self._free:
                raise DeviceError("no memory slot left for a BAR mapping")
            return self._free.pop()

    def free(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)
            self._free.sort(reverse=True)


class VfioVmState:
    """One VM's container, groups and BAR memory slots."""

    def __init__(self) -> None:
        self.container: VfioContainer | None = None
        self.groups: dict[str, tuple[VfioGroup, int]] = {}
        self.slots = SlotAllocator()
        self._lock = threading.Lock()
        #: The guest memory whose region table the DMA map follows, once mapped.
        self._memory: GuestMemory | None = None

    def container_for(self, kernel: VfioKernel, dev_dir: str) -> VfioContainer:
        from vmmkit_devices.vfio.container import VfioContainer

        if self.container is None:
            self.container = VfioContainer(kernel, dev_dir)
        return self.container

    def map_guest_ram(self, host: DeviceHost) -> None:
        """Every RAM region at its guest-physical address, once the container has an IOMMU; from
        then on the map follows the region table (memory hotplug)."""
        container = self.container
        if container is None or not container.iommu_set:
            return
        self._sync_dma(host.memory.regions)
        if self._memory is None:
            self._memory = host.memory
            host.memory.add_listener(self._memory_changed)

    def _sync_dma(self, regions: Iterable[GuestRegion]) -> None:
        """Map the regions not mapped yet, unmap what is no longer RAM."""
        container = self.container
        assert container is not None
        current = {region.start: region for region in regions}
        for iova in [iova for iova in container.dma if iova not in current]:
            container.unmap_dma(iova)
            log.info("vfio.dma_unmapped", iova=hex(iova))
        for start, region in current.items():
            if start not in container.dma:
                container.map_dma(start, region.size, region.host_address)

    def _memory_changed(self) -> None:
        """The guest's RAM changed (a listener: it must not raise)."""
        from vmmkit_devices.vfio.container import VfioError

        with self._lock:
            if self.container is None or not self.container.iommu_set or self._memory is None:
                return
            try:
                self._sync_dma(self._memory.regions)
            except VfioError as exc:  # the device cannot reach that RAM; the guest goes on
                log.error("vfio.dma_sync_failed", error=str(exc))

    def close_unused_container(self) -> None:
        if not self.groups and self.container is not None:
            if self._memory is not None:
                self._memory.remove_listener(self._memory_changed)
                self._memory = None
            mapped = len(self.container.dma)
            self.container.unmap_all()
            self.container.close()
            self.container = None
            log.info("vfio.container_closed", unmapped=mapped)

    def release_group(self, number: str) -> None:
        with self._lock:
            entry = self.groups.get(number)
            if entry is None:
                return
            group, uses = entry
            if uses > 1:
                self.groups[number] = (group, uses - 1)
                return
            del self.groups[number]
            mapped = 0
            if not self.groups and self.container is not None:
                mapped = len(self.container.dma)
                self.container.unmap_all()  # while the group still holds the IOMMU context
            group.close()
            log.info("vfio.group_released", group=number, unmapped=mapped)
            self.close_unused_container()


class VfioPciTransport(Transport):
    """A VFIO-assigned function on PCI bus 0 of a segment, as any PCI function."""

    name: ClassVar[str] = "vfio-pci"
    family: ClassVar[str] = "vfio"
    description: ClassVar[str] = "a host PCI function passed through with VFIO"
    hotpluggable: ClassVar[bool] = True

    def __init__(self) -> None:
        self.state = VfioVmState()

    @classmethod
    def preload(cls) -> None:
        import vmmkit_devices.vfio.device  # noqa: F401

    def place(self, host: DeviceHost, device: Any, request: DeviceRequest) -> PlacedDevice:
        from vmmkit.pci.host import place_function
        from vmmkit_devices.vfio.container import iommu_group_of, open_device
        from vmmkit_devices.vfio.device import VfioPciFunction
        from vmmkit_devices.vfio.kernel import HostKernel

        if not isinstance(device, VfioRequest):
            raise DeviceError(f"device {request.id}: the vfio-pci transport places VFIO devices, not "
                              f"{type(device).__name__}")
        kernel = device.kernel if device.kernel is not None else HostKernel()
        state = self.state
        with state._lock:
            container = state.container_for(kernel, device.dev_dir)  # first: a host without /dev/vfio says so
            try:
                number = iommu_group_of(device.path)
                group, handle = open_device(container, state.groups, device.path, lambda: state.map_guest_ram(host))
            except BaseException:
                state.close_unused_container()
                raise
        try:
            function = VfioPciFunction(request.id, handle, exclude_mmap=device.exclude_mmap,
                                       on_close=lambda: state.release_group(number))
        except BaseException:
            handle.close()
            state.release_group(number)
            raise
        try:
            function.attach(_Link(host), state.slots)
            placed = place_function(host, function, request, transport=self.name)
        except BaseException:
            function.close()
            raise
        log.info("vfio.device_placed", id=request.id, host_device=handle.name, group=group.number,
                 bdf=placed.properties.get("bdf"))
        return placed

    def remove(self, host: DeviceHost, placed: PlacedDevice) -> None:
        from vmmkit.pci.host import remove_function

        remove_function(host, placed)


class _Link:
    """The parts of the device manager a placed function keeps using."""

    def __init__(self, host: DeviceHost) -> None:
        self._host = host

    @property
    def vm(self) -> Any:
        return self._host.vm

    @property
    def event_loop(self) -> Any:
        return self._host.event_loop

    def allocate_msi_gsi(self) -> int | None:
        return self._host.allocate_msi_gsi()

    def release_msi_gsi(self, gsi: int) -> None:
        self._host.release_msi_gsi(gsi)
