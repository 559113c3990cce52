"""Guest RAM made of memory zones (``--memory size=0 --memory-zone id=,size=,...``), as Cloud
Hypervisor's ``MemoryManager::create_memory_regions_content`` lays them out: the zones fill the
layout's RAM ranges in the order given (a zone may straddle the 32-bit hole: it is then two
regions), each region mapped with its zone's options (``shared``, ``hugepages``, ``mergeable``,
``prefault``, ``file``).

A zone with ``file=`` maps that file (created if absent and grown to the zone's size, never
shrunk; a directory gets an unnamed file in it, ``O_TMPFILE``, as CH does): ``shared=on`` makes
the guest's writes reach the file (``MAP_SHARED``), ``shared=off`` keeps them private. A
shared zone's region keeps its file's descriptor (``GuestRegion.fd``, at ``fd_offset``), as a
memfd region does: a vhost-user backend maps it, a local migration hands it over, released
pages are punched out of the file, and a snapshot leaves its RAM in the file
(:mod:`vmmkit.snapshot_zones`).

With ``--memory hotplug_method=virtio-mem`` a zone's ``hotplug_size`` is an area of its own in
the layout's hotplug space (zones in order, each on a 128 MiB boundary, CH's
``VIRTIO_MEM_ALIGN_SIZE``) with a virtio-mem device of its own (``_virtio-mem-<zone>``);
``vm.resize-zone`` sets that device's ``requested_size`` (:class:`ZoneHotplug`).
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vmmkit.config import ConfigError
from vmmkit.config.memory_zones import ZONE_HOTPLUG_ALIGN
from vmmkit.memory import (
    _MAP_NORESERVE,
    GuestMemory,
    GuestRegion,
    MemoryAllocationError,
    MemoryRange,
    _ffi,
    map_region,
)

if TYPE_CHECKING:
    from vmmkit.config import MemoryConfig, MemoryZoneConfig
    from vmmkit.device_manager import DeviceManager
    from vmmkit.hypervisor import Vm
    from vmmkit.memory_hotplug import VirtioMemHotplug



def zone_pieces(ram: Sequence[MemoryRange], zones: Iterable[MemoryZoneConfig]) -> Iterator[
        tuple[MemoryZoneConfig, MemoryRange, int]]:
    """``(zone, guest range, offset in the zone)`` for each piece of guest RAM, zones in order
    filling ``ram`` in order.

    :raises ConfigError: the zones do not add up to the RAM ranges (a bug of the layout).
    """
    ranges = list(ram)
    index, used = 0, 0  # the RAM range being filled and how much of it is
    for zone in zones:
        offset = 0
        while offset < zone.size:
            if index >= len(ranges):
                raise ConfigError("memory.zones", zone.id, "zones that fit the guest's RAM ranges")
            rng = ranges[index]
            take = min(zone.size - offset, rng.size - used)
            yield zone, MemoryRange(rng.start + used, take), offset
            offset += take
            used += take
            if used == rng.size:
                index, used = index + 1, 0


def allocate(ram: Sequence[MemoryRange], config: MemoryConfig) -> GuestMemory:
    """Guest RAM for ``config.zones``: one region (and hypervisor slot) per piece.

    :raises MemoryAllocationError: the host cannot provide it (a file that cannot be opened).
    """
    memory = GuestMemory()
    try:
        for slot, (zone, rng, offset) in enumerate(zone_pieces(ram, config.zones)):
            if zone.file is not None:
                region = map_file_region(rng, slot, zone, offset)
            else:
                region = map_region(rng, slot, shared=zone.shared, hugepages=zone.hugepages, hugepage_size=None,
                                    thp=config.thp, mergeable=zone.mergeable, prefault=zone.prefault)
            memory.add_region(region)
    except BaseException:
        memory.close()
        raise
    return memory


def map_file_region(rng: MemoryRange, slot: int, zone: MemoryZoneConfig, offset: int, *,
                    existing: bool = False, prefault: bool | None = None) -> GuestRegion:
    """Map ``zone.file`` at ``offset`` for ``rng`` (see the module's docstring). ``existing``:
    the file holds the guest's RAM already (a snapshot left it there): it must exist and be
    long enough, and is never created or grown. ``prefault``: default the zone's.

    :raises MemoryAllocationError: the file cannot be opened, grown or mapped, or (``existing``)
        is missing or too short.
    """
    assert zone.file is not None
    where = f"memory zone {zone.id!r}: file {zone.file}"
    try:
        fd = _open_existing(zone.file, zone.shared) if existing else _open_backing(zone.file)
    except OSError as exc:
        raise MemoryAllocationError(f"{where}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MemoryAllocationError(f"{where}: not a regular file" + ("" if existing else " or a directory"))
        size = os.fstat(fd).st_size
        if existing and size < offset + rng.size:
            raise MemoryAllocationError(f"{where}: {size} bytes, the zone's RAM needs {offset + rng.size} "
                                        "(truncated or replaced since the snapshot?)")
        if not existing and size < zone.size:
            os.ftruncate(fd, zone.size)
        flags = (mmap.MAP_SHARED if zone.shared else mmap.MAP_PRIVATE) | _MAP_NORESERVE
        if zone.prefault if prefault is None else prefault:
            flags |= mmap.MAP_POPULATE
        buffer = mmap.mmap(fd, rng.size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise MemoryAllocationError(f"{where}: {exc.strerror or exc}") from None
        raise
    named = zone.shared and os.fstat(fd).st_nlink > 0  # not an unnamed file in a directory
    if not zone.shared:
        os.close(fd)  # the private mapping keeps the file; nothing else needs it
    if zone.mergeable:
        buffer.madvise(mmap.MADV_MERGEABLE)
    pin = _ffi().from_buffer(buffer)
    return GuestRegion(rng, buffer, int(_ffi().cast("uintptr_t", pin)), fd=fd if zone.shared else None,
                       slot=slot, fd_offset=offset if zone.shared else 0,
                       backing_file=zone.file if named else None, pin=pin)


def _open_backing(path: str) -> int:
    if os.path.isdir(path):
        return os.open(path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _open_existing(path: str, shared: bool) -> int:
    """A zone's file that must be there (a private mapping only reads it)."""
    return os.open(path, (os.O_RDWR if shared else os.O_RDONLY) | os.O_CLOEXEC)


def hotplug_areas(area: MemoryRange, zones: Iterable[MemoryZoneConfig]) -> dict[str, MemoryRange]:
    """Each zone's virtio-mem area (zones with a ``hotplug_size``) inside the layout's ``area``.

    :raises ConfigError: they do not fit (the layout reserved too little).
    """
    out: dict[str, MemoryRange] = {}
    start = area.start
    for zone in zones:
        if not zone.hotplug_size:
            continue
        start = -(-start // ZONE_HOTPLUG_ALIGN) * ZONE_HOTPLUG_ALIGN
        out[zone.id] = MemoryRange(start, zone.hotplug_size)
        start += zone.hotplug_size
    if start > area.end:
        raise ConfigError("memory.zones", [zone.id for zone in zones], "hotplug areas that fit the layout")
    return out


class ZoneHotplug:
    """The virtio-mem devices of a VM's zones, by zone id (``vm.resize-zone``)."""

    def __init__(self, zones: dict[str, VirtioMemHotplug]) -> None:
        self.zones = zones

    @classmethod
    def attach(cls, manager: DeviceManager, area: MemoryRange, config: MemoryConfig, memory: GuestMemory,
               vm: Vm) -> ZoneHotplug:
        from vmmkit.memory_hotplug import VirtioMemHotplug

        devices: dict[str, VirtioMemHotplug] = {}
        by_id = {zone.id: zone for zone in config.zones}
        for zone_id, zone_area in hotplug_areas(area, config.zones).items():
            devices[zone_id] = VirtioMemHotplug.attach_zone(manager, zone_area, by_id[zone_id], memory, vm,
                                                            thp=config.thp)
        return cls(devices)

    def device(self, zone_id: str) -> VirtioMemHotplug:
        """Zone ``zone_id``'s virtio-mem device.

        :raises ConfigError: no such zone, or one without ``hotplug_size``."""
        device = self.zones.get(zone_id)
        if device is None:
            raise ConfigError("id", zone_id, f"a zone with a hotplug_size ({', '.join(self.zones) or 'none here'})",
                              reason="no such zone, or one without hotplug_size")
        return device

    def resize(self, zone_id: str, desired: int) -> int:
        """Set zone ``zone_id``'s RAM to ``desired`` bytes (its ``size`` plus what its virtio-mem
        device plugs); the change of ``requested_size`` (0: nothing to do).

        :raises ConfigError: no such zone, a zone without ``hotplug_size``, or ``desired`` out
            of its range or not in 2 MiB blocks.
        """
        return self.device(zone_id).resize(desired)

    def save_state(self) -> dict[str, Any]:
        """Each zone's requested size (its device saves which blocks are plugged; the area's
        bytes are a RAM file of the snapshot)."""
        return {zone_id: device.save_state() for zone_id, device in self.zones.items()}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """:raises StateError: the zones with hotplug memory differ, or a zone's state is bad."""
        from vmmkit.state import StateError, field

        if set(state) != set(self.zones):
            raise StateError(f"zone_hotplug: saved for zones {sorted(state)}, this VM's are {sorted(self.zones)}")
        for zone_id, device in self.zones.items():
            device.restore_state(field(state, zone_id, dict, "zone_hotplug"))

    def close(self) -> None:
        for device in self.zones.values():
            device.close()
