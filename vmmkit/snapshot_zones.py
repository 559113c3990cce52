"""Snapshots, restores and migrations of guest RAM made of memory zones (``--memory-zone``), as
Cloud Hypervisor's memory manager does them (``vmm/src/memory_manager.rs``).

Each piece of a zone (:func:`vmmkit.memory_zones.zone_pieces`; a zone straddling the 32-bit
hole is two) and each zone's virtio-mem area is one RAM range of the snapshot, tagged with its
zone (``state.memory[].zone``). What is saved follows CH's ``snapshot`` (its
``memory_range_table(MemoryRangePolicy::SkipPersisted)``): the RAM of a zone mapped
``MAP_SHARED`` from a file that is still linked on the host (``file=<path>,shared=on``;
``is_hardlink``: ``st_nlink > 0``) is **not** copied: the file holds it already (it is synced
first). Its range is recorded with ``"file": null``, ``zone_offset`` (where it starts in the
zone's file) and ``zone_file`` (the path, for messages). Every other piece is a
``memory-<slot>.bin`` as without zones: anonymous and memfd zones, a private file zone
(``shared=off``: its RAM is the guest's own copy), an unnamed file (``file=<directory>``), and
the virtio-mem areas (sparse: unplugged blocks are holes; the device saves which are plugged,
:class:`vmmkit.memory_zones.ZoneHotplug` the requested sizes).

A restore maps each zone with the options of the (possibly edited) ``config.json``, as CH's
``MemoryManager::new_from_snapshot`` builds the zones from the configuration and fills in the
saved ranges: a range left in its file is that file mapped again (``shared=off``, what Kata
Containers writes into a VM template's ``config.json``: copy-on-write, the file is only read;
``shared=on``: the restored guest writes the file), which must exist and be long enough, else
the restore is refused before anything is built; a saved range of a private zone maps its
``memory-<slot>.bin`` copy-on-write; a shared or huge-page zone gets its memory (its file, for
``file=``) and the saved bytes copied in. As in CH, a zone's file must not change between the
snapshot and a restore from it.

A live migration sends every zone's RAM (CH: ``MemoryRangePolicy::Full``) and the destination
maps each zone as its configuration says; with ``local=true`` a shared zone's file descriptor
(memfd or file, at its offset) is handed over instead. A shared file zone whose file is the very
file the source runs on (one host, the same inode) is refused unless ``local=true``: receiving
the pre-copy into it would write stale bytes under the running source.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import frozen

from vmmkit.memory import GuestMemory, GuestRegion, MemoryAllocationError, MemoryRange, close_region, map_region
from vmmkit.memory_zones import hotplug_areas, map_file_region, zone_pieces
from vmmkit.state import SnapshotError, StateError, field, int_field

if TYPE_CHECKING:
    from vmmkit.arch import MemoryLayout
    from vmmkit.config import MemoryConfig, MemoryZoneConfig, VmConfig
    from vmmkit.machine import Machine
    from vmmkit.snapshot import SnapshotImage


@frozen
class ZonePiece:
    """One RAM range of a zone: boot RAM at ``offset`` in the zone (its file), or the zone's
    virtio-mem area (``hotplug``)."""

    zone: MemoryZoneConfig
    range: MemoryRange
    offset: int
    hotplug: bool


@frozen
class PersistedRange:
    """A range the snapshot left in its zone's file (``state.memory[]`` with ``"file": null``)."""

    slot: int
    range: MemoryRange
    zone: str
    offset: int


def pieces(memory: MemoryConfig, layout: MemoryLayout) -> dict[int, ZonePiece]:
    """Every RAM range the zones of ``memory`` make in ``layout``, by guest address."""
    out = {rng.start: ZonePiece(zone, rng, offset, False)
           for zone, rng, offset in zone_pieces(layout.ram, memory.zones)}
    if layout.memory_hotplug is not None and any(zone.hotplug_size for zone in memory.zones):
        by_id = {zone.id: zone for zone in memory.zones}
        for zone_id, area in hotplug_areas(layout.memory_hotplug, memory.zones).items():
            out[area.start] = ZonePiece(by_id[zone_id], area, 0, True)
    return out


def check_ranges(where: str, ranges: Sequence[MemoryRange], config: VmConfig, layout: MemoryLayout) -> None:
    """Saved or migrated RAM ranges against the zones' layout: each zone piece of boot RAM
    exactly once, and zone virtio-mem areas only whole.

    :raises SnapshotError: they differ."""
    expected = pieces(config.memory, layout)
    boot = sorted(start for start, piece in expected.items() if not piece.hotplug)
    seen = [rng.start for rng in ranges]
    wrong = [str(rng) for rng in ranges if rng.start not in expected or expected[rng.start].range != rng]
    if wrong or len(set(seen)) != len(seen) or not set(boot) <= set(seen):
        layout_text = [f"{piece.zone.id}{' (virtio-mem)' if piece.hotplug else ''} {piece.range}"
                       for piece in sorted(expected.values(), key=lambda p: p.range.start)]
        raise SnapshotError(f"{where}: the saved RAM ranges {[str(r) for r in ranges]} are not the memory "
                            f"zones this vmmkit lays out for the configuration {layout_text}")


# -- taking a snapshot ---------------------------------------------------------------------------


def persisted_entry(region: GuestRegion, piece: ZonePiece | None) -> dict[str, Any] | None:
    """The ``state.memory`` entry of a region whose RAM stays in its zone's file (synced now),
    or ``None`` when its bytes must be written into the snapshot (see the module's docstring)."""
    if piece is None or piece.hotplug or piece.zone.file is None or not piece.zone.shared or region.fd is None:
        return None
    try:
        if os.fstat(region.fd).st_nlink == 0:  # an unnamed file (file=<directory>): nobody else can reach it
            return None
        os.fsync(region.fd)
    except OSError as exc:
        raise SnapshotError(f"memory zone {piece.zone.id!r}: cannot sync its file {piece.zone.file}: "
                            f"{exc.strerror or exc}") from None
    return {"slot": region.slot, "start": region.start, "size": region.size, "file": None,
            "zone": piece.zone.id, "zone_offset": piece.offset, "zone_file": piece.zone.file}


def zone_of(pieces_by_start: Mapping[int, ZonePiece], region: GuestRegion) -> dict[str, Any]:
    """What a saved region's entry says of its zone (nothing without zones)."""
    piece = pieces_by_start.get(region.start)
    return {} if piece is None else {"zone": piece.zone.id}


def save_hotplug(machine: Machine) -> dict[str, Any] | None:
    """The zones' virtio-mem bookkeeping (``state.zone_hotplug``), ``None`` without."""
    return None if machine.zone_hotplug is None else machine.zone_hotplug.save_state()


# -- reading one back ----------------------------------------------------------------------------


def parse_persisted(entry: Mapping[str, Any]) -> PersistedRange:
    """A ``state.memory`` entry with ``"file": null``. :raises StateError: malformed."""
    where = "state.memory"
    return PersistedRange(int_field(entry, "slot", where, 0, 1 << 16),
                          MemoryRange(int_field(entry, "start", where), int_field(entry, "size", where)),
                          field(entry, "zone", str, where), int_field(entry, "zone_offset", where))


def check_persisted(directory: Path, config: VmConfig, persisted: Iterable[PersistedRange]) -> None:
    """Each range left in a zone's file still has it: the configuration gives that zone a
    file, which is a regular file long enough.

    :raises SnapshotError: naming the zone and what is wrong."""
    zones = {zone.id: zone for zone in config.memory.zones}
    for kept in persisted:
        zone = zones.get(kept.zone)
        what = f"{directory}: memory zone {kept.zone!r}"
        if zone is None or zone.file is None:
            raise SnapshotError(f"{what}: its RAM ({kept.range}) was left in the zone's file, but config.json "
                                + ("has no such zone" if zone is None else "gives the zone no file="))
        if kept.offset < 0 or kept.offset + kept.range.size > zone.size:
            raise SnapshotError(f"{what}: the saved range {kept.range} at {kept.offset:#x} is not in the "
                                f"{zone.size}-byte zone")
        try:
            facts = os.stat(zone.file)
        except OSError as exc:
            raise SnapshotError(f"{what}: its RAM lives in {zone.file}, which cannot be read: "
                                f"{exc.strerror or exc}") from None
        need = kept.offset + kept.range.size
        if not os.path.isfile(zone.file):
            raise SnapshotError(f"{what}: its RAM lives in {zone.file}, which is not a regular file")
        if facts.st_size < need:
            raise SnapshotError(f"{what}: its RAM lives in {zone.file}, which holds {facts.st_size} bytes; "
                                f"the snapshot needs {need} (truncated or replaced since the snapshot)")


def restore_hotplug(machine: Machine, saved: Any) -> None:
    """Put back the zones' virtio-mem bookkeeping. :raises StateError: it does not match."""
    if (saved is None) != (machine.zone_hotplug is None):
        raise StateError("memory zones: " + ("the snapshot has no zone hotplug memory, this VM has" if saved is None
                                             else "saved with zone hotplug memory, this VM has none"))
    if machine.zone_hotplug is not None:
        if not isinstance(saved, dict):
            raise StateError("zone_hotplug: expected an object")
        machine.zone_hotplug.restore_state(saved)


# -- building the memory of a restored or received VM --------------------------------------------


def map_snapshot(image: SnapshotImage, config: VmConfig, layout: MemoryLayout, *, prefault: bool) -> GuestMemory:
    """Guest RAM of a zoned VM from its snapshot (see the module's docstring).

    :raises SnapshotError: the ranges or the zones' files do not match."""
    from vmmkit.snapshot import copy_file, map_file

    saved: dict[int, tuple[int, MemoryRange, Path | None]] = {
        rng.start: (slot, rng, path) for slot, rng, path in image.memory}
    for kept in image.persisted:
        saved[kept.range.start] = (kept.slot, kept.range, None)
    check_ranges(str(image.directory), [rng for _slot, rng, _path in saved.values()], config, layout)
    check_persisted(image.directory, config, image.persisted)
    by_start = pieces(config.memory, layout)
    for kept in image.persisted:
        piece = by_start[kept.range.start]
        if (piece.zone.id, piece.offset) != (kept.zone, kept.offset):
            raise SnapshotError(f"{image.directory}: {kept.range} was saved as zone {kept.zone!r} at {kept.offset:#x} "
                                f"in its file; config.json makes it zone {piece.zone.id!r} at {piece.offset:#x}")
    thp = config.memory.thp
    memory = GuestMemory()
    try:
        for start in sorted(saved):
            slot, rng, path = saved[start]
            piece = by_start[start]
            zone = piece.zone
            early = prefault or zone.prefault
            if path is None:
                memory.add_region(_map_zone(piece, slot, existing=True, prefault=early))
            elif zone.shared or zone.hugepages:
                region = _map_zone(piece, slot, existing=False, prefault=early, thp=thp)
                memory.add_region(region)
                copy_file(path, region)
            else:
                memory.add_region(map_file(path, rng, slot, prefault=early, thp=thp, mergeable=zone.mergeable))
    except MemoryAllocationError as exc:
        memory.close()
        raise SnapshotError(f"{image.directory}: {exc}") from None
    except BaseException:
        memory.close()
        raise
    return memory


def allocate_received(config: VmConfig, layout: MemoryLayout, ranges: Mapping[int, MemoryRange],
                      source_files: Mapping[int, tuple[int, int]]) -> GuestMemory:
    """Guest RAM of a zoned VM arriving by a (copying) migration: each announced range mapped
    as its zone says, empty (the bytes follow). ``source_files``: slot -> ``(st_dev, st_ino)``
    of the file the source maps there.

    :raises SnapshotError: a shared zone file is the source's own (see the module's docstring).
    """
    by_start = pieces(config.memory, layout)
    memory = GuestMemory()
    try:
        for slot, rng in sorted(ranges.items()):
            piece = by_start[rng.start]
            zone = piece.zone
            if zone.file is not None and zone.shared and slot in source_files and _same_file(zone.file,
                                                                                          source_files[slot]):
                raise SnapshotError(f"memory zone {zone.id!r}: {zone.file} is the file the source VM runs on "
                                    "(this host): migrate with local=true, which hands it over, instead of "
                                    "copying the guest's RAM into it under the running source")
            memory.add_region(_map_zone(piece, slot, existing=False, prefault=False, thp=config.memory.thp))
    except MemoryAllocationError as exc:
        memory.close()
        raise SnapshotError(str(exc)) from None
    except BaseException:
        memory.close()
        raise
    return memory


def _same_file(path: str, identity: Sequence[int]) -> bool:
    try:
        facts = os.stat(path)
    except OSError:
        return False  # created by the mapping: a new file
    return [facts.st_dev, facts.st_ino] == list(identity)


def source_file_ids(regions: Iterable[GuestRegion]) -> dict[int, tuple[int, int]]:
    """``slot -> (st_dev, st_ino)`` of the files behind a source's shared regions."""
    out = {}
    for region in regions:
        if region.fd is not None:
            facts = os.fstat(region.fd)
            out[region.slot] = (facts.st_dev, facts.st_ino)
    return out


def _map_zone(piece: ZonePiece, slot: int, *, existing: bool, prefault: bool, thp: bool = True) -> GuestRegion:
    """A zone piece's memory: its file's bytes (``existing``), else zeros the saved or sent
    bytes are written over (a shared zone's file is emptied first: its old bytes are not the
    guest's; a private file zone's RAM comes whole from the snapshot or the source, so it
    needs no file)."""
    zone = piece.zone
    if zone.file is not None and not piece.hotplug and (existing or zone.shared):
        region = map_file_region(piece.range, slot, zone, piece.offset, existing=existing, prefault=prefault)
        if not existing:
            try:
                region.discard()  # a hole punched in the file: reads as zeros
            except OSError as exc:
                close_region(region)
                raise MemoryAllocationError(f"memory zone {zone.id!r}: cannot clear {zone.file}: "
                                            f"{exc.strerror or exc}") from None
        return region
    return map_region(piece.range, slot, shared=zone.shared, hugepages=zone.hugepages, hugepage_size=None, thp=thp,
                      mergeable=zone.mergeable, prefault=prefault)
