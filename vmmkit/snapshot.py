"""Snapshot and restore, as Cloud Hypervisor does them (``docs/snapshot_restore.md``).

``vm.snapshot destination_url=file:///dir`` on a paused VM writes into ``dir``:

``config.json``
    the VM's configuration (``VmConfig.to_json()``), which the restore builds the VM from.
``state.json``
    ``{"arch", "hypervisor", "vm", "vcpus", "devices", "memory"}``: the backend VM's state
    (``{"version", "state"}``: the in-kernel interrupt controllers and clock, in
    :mod:`vmmkit.x86_platform`'s layout on x86), each vCPU's (``{"version", "state"}``, from
    the architecture: :mod:`vmmkit_x86_64.snapshot`), each placed device's (``{"id", "kind",
    "version", "placement", "state"}``, from :class:`vmmkit.state.Snapshottable`), the
    guest RAM ranges (``{"slot", "start", "size", "file"}``; with memory zones also ``"zone"``,
    and ``"file": null`` for a range left in its zone's file: :mod:`vmmkit.snapshot_zones`),
    and ``"snapshot"``: its own manifest (``{"format", "version", "vmmkit", "sha256"}``, the
    checksum of the rest), which a restore from a directory without ``snapshot.json`` checks.
``memory-<slot>.bin``
    each RAM range's bytes, as the guest sees them (sparse: pages of zeros are holes).
``snapshot.json``
    the manifest, written last: ``{"format": "vmmkit-snapshot", "version":`` :data:`FORMAT_VERSION`
    ``, "vmmkit", "files": {name: {"size", "sha256"}}}`` (memory files: size only, so a restore
    never reads untouched RAM; ``config.json``: ``{"editable": true}``, it may be edited before a
    restore, as Kata Containers does with a VM template's).

A restore (``vmmkit --restore source_url=file:///dir[,prefault=on]``, ``vm.restore``) checks
everything before it builds anything: the manifest's format and version, the sizes of all
files and the checksums of the configuration and the state; then the state's structure as the
pieces parse it. A mismatch is refused with what is wrong. The VM is built from the saved
configuration (devices placed where they were: the placement is compared), RAM is mapped from
the memory files ``MAP_PRIVATE`` (copy-on-write: the restore reads only what the guest touches;
``prefault=on`` populates it at once; a VM with shared or huge-page memory gets a copy), and the
states are put back. The VM comes back paused; ``vm.resume`` continues it. As in Cloud
Hypervisor, the memory files must not change while a VM restored from them runs.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlparse

import attrs
from attrs import frozen

from vmmkit import __version__, snapshot_zones
from vmmkit.log import get_logger
from vmmkit.memory import PAGE_SIZE, GuestMemory, GuestRegion, MemoryRange, map_region
from vmmkit.snapshot_zones import PersistedRange
from vmmkit.state import (
    NotSnapshottable,
    SnapshotError,
    StateError,
    check_version,
    field,
    int_field,
    is_snapshottable,
)

if TYPE_CHECKING:
    from vmmkit.arch import MemoryLayout
    from vmmkit.config import VmConfig
    from vmmkit.machine import Machine

log = get_logger()

FORMAT: Final = "vmmkit-snapshot"
FORMAT_VERSION: Final = 1
MANIFEST: Final = "snapshot.json"
CONFIG: Final = "config.json"
STATE: Final = "state.json"
#: The key of ``state.json``'s own manifest (:func:`_seal`).
SEAL: Final = "snapshot"
_CHUNK: Final = 1 << 20
_ZEROS: Final = bytes(_CHUNK)
#: JSON files larger than this are refused before they are read (a hostile directory).
_MAX_JSON: Final = 64 << 20


def directory_of(url: str, what: str) -> Path:
    """The directory of a ``file:///dir`` URL (the only scheme, as in Cloud Hypervisor)."""
    if not isinstance(url, str) or not url:
        raise SnapshotError(f"{what}: a file:///<directory> URL is required")
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path:
        raise SnapshotError(f"{what}: {url!r} is not a file:///<directory> URL (the only kind supported)")
    return Path(unquote(parsed.path))


# -- taking a snapshot ---------------------------------------------------------------------------


def collect_state(machine: Machine) -> dict[str, Any]:
    """Every piece's state, or :class:`NotSnapshottable` naming the first that has none."""
    assert machine.vm is not None and machine.arch is not None and machine.hypervisor is not None
    vm = machine.vm
    if not is_snapshottable(vm):
        raise NotSnapshottable(f"backend {machine.hypervisor.name} cannot save its VM state "
                               f"({type(vm).__name__} does not implement vmmkit.state.Snapshottable)")
    vm_state = {"version": vm.state_version, "state": vm.save_state()}  # type: ignore[attr-defined]
    vcpus = [{"version": machine.arch.vcpu_state_version, "state": machine.arch.save_vcpu(vcpu, machine.hypervisor)}
             for vcpu in machine.vcpus]
    devices = []
    for placed in machine.devices:
        device = placed.device
        if not is_snapshottable(device):
            raise NotSnapshottable(f"device {placed.id} ({placed.kind}, {type(device).__name__}) does not "
                                   "implement the snapshot contract (vmmkit.state.Snapshottable)")
        devices.append({"id": placed.id, "kind": placed.kind, "version": device.state_version,
                        "placement": placement_of(placed), "state": device.save_state()})
    state = {"arch": machine.arch_name, "hypervisor": machine.hypervisor.name, "vm": vm_state,
             "vcpus": vcpus, "devices": devices}
    if machine.memory_hotplug is not None:  # its DIMMs are RAM files; the registers a device's state
        state["memory_hotplug"] = machine.memory_hotplug.save_state()
    zone_hotplug = snapshot_zones.save_hotplug(machine)
    if zone_hotplug is not None:
        state["zone_hotplug"] = zone_hotplug
    return state


def placement_of(placed: Any) -> dict[str, Any]:
    return {"transport": placed.transport, "pio": list(placed.pio) if placed.pio else None,
            "mmio": list(placed.mmio) if placed.mmio else None, "irq": placed.irq,
            "bdf": placed.properties.get("bdf")}


def write_snapshot(machine: Machine, url: str, *, config: VmConfig | None = None) -> Path:
    """Write a paused machine's snapshot into the directory ``url`` names (created if needed;
    it must not hold a snapshot already); ``config``: the configuration to record (default:
    the machine's)."""
    directory = directory_of(url, "destination_url")
    assert machine.memory is not None
    state = collect_state(machine)  # refuses before any file is written
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SnapshotError(f"cannot create {directory}: {exc.strerror or exc}") from None
    if (directory / MANIFEST).exists():
        raise SnapshotError(f"{directory} already holds a snapshot (choose an empty directory)")
    files: dict[str, dict[str, Any]] = {}
    memory = []
    zones = (snapshot_zones.pieces(machine.config.memory, machine.layout)
             if machine.config.memory.zones and machine.layout is not None else {})
    for region in machine.memory.regions:
        kept = snapshot_zones.persisted_entry(region, zones.get(region.start))
        if kept is not None:  # its RAM stays in its zone's file, as Cloud Hypervisor leaves it
            memory.append(kept)
            continue
        name = f"memory-{region.slot}.bin"
        _write_region(region, directory / name)
        files[name] = {"size": region.size}
        memory.append({"slot": region.slot, "start": region.start, "size": region.size, "file": name,
                       **snapshot_zones.zone_of(zones, region)})
    state["memory"] = memory
    state[SEAL] = _seal(state)
    for name, document in ((CONFIG, (config or machine.config).to_json()), (STATE, state)):
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        _write_file(directory / name, data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    files[CONFIG] = {"editable": True}  # see open_snapshot: checked by parsing, not by checksum
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "vmmkit": __version__, "files": files}
    _write_file(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    log.info("vm.snapshot", directory=str(directory), ram=sum(r.size for r in machine.memory.regions))
    return directory


def _seal(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state.json``'s own manifest: the format, and the checksum of the rest of it. A restore
    from a directory without ``snapshot.json`` relies on it (Kata Containers copies only
    ``config.json`` and ``state.json`` of a VM template into a sandbox's directory)."""
    body = json.dumps({k: v for k, v in state.items() if k != SEAL}, indent=1, sort_keys=True).encode()
    return {"format": FORMAT, "version": FORMAT_VERSION, "vmmkit": __version__,
            "sha256": hashlib.sha256(body).hexdigest()}


def _write_file(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise SnapshotError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_nonzero_pages(fd: int, chunk: bytes, offset: int) -> None:
    """``chunk`` at ``offset``, each run of non-zero pages in one write (zero pages stay holes)."""
    zero_page = _ZEROS[:PAGE_SIZE]
    run_start = None
    for page in range(0, len(chunk) + PAGE_SIZE, PAGE_SIZE):
        nonzero = page < len(chunk) and chunk[page : page + PAGE_SIZE] != zero_page[: len(chunk) - page]
        if nonzero and run_start is None:
            run_start = page
        elif not nonzero and run_start is not None:
            os.pwrite(fd, chunk[run_start:page], offset + run_start)
            run_start = None


def _write_region(region: GuestRegion, path: Path) -> None:
    """The region's bytes, pages of zeros left as holes (a fresh guest's RAM is mostly zeros)."""
    buffer = region.buffer
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            for offset in range(0, region.size, _CHUNK):
                chunk = buffer[offset : offset + _CHUNK]  # bytes: compared with memcmp (a memoryview is 30x slower)
                if chunk != _ZEROS[: len(chunk)]:
                    _write_nonzero_pages(fd, chunk, offset)
            os.ftruncate(fd, region.size)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SnapshotError(f"cannot write {path}: {exc.strerror or exc}") from None


# -- reading one back ----------------------------------------------------------------------------


@frozen
class SnapshotImage:
    """A snapshot directory, checked: the configuration, the state and the memory files."""

    directory: Path
    config: VmConfig
    state: Mapping[str, Any]
    memory: tuple[tuple[int, MemoryRange, Path], ...]  #: (slot, range, file)
    #: Ranges left in their memory zone's file (:mod:`vmmkit.snapshot_zones`).
    persisted: tuple[PersistedRange, ...] = ()


def open_snapshot(url: str) -> SnapshotImage:
    """Read and check the snapshot at ``url``: by its manifest, or (a directory without
    ``snapshot.json``: a VM template's ``config.json`` and ``state.json`` copied, as Kata
    Containers does) by ``state.json``'s own (:func:`_seal`) and the memory files it names.

    :raises SnapshotError: what is missing, damaged or of another version."""
    from vmmkit.config import ConfigError, VmConfig

    directory = directory_of(url, "source_url")
    if not directory.is_dir():
        raise SnapshotError(f"{directory}: no such snapshot directory")
    if (directory / MANIFEST).exists() or not (directory / STATE).exists():
        files = _manifest_files(directory)
        state = _read_json(directory / STATE, files[STATE].get("sha256"))
    else:
        state = _read_sealed_state(directory)
        files = {CONFIG: {"editable": True}, STATE: {}}
        entries = state.get("memory")
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                files[entry["file"]] = {"size": entry.get("size")}
        _check_sizes(directory, files, "state.json says")
    if not isinstance(state, dict):
        raise SnapshotError(f"{directory / STATE}: not a JSON object")
    # config.json may be edited between snapshot and restore, as Cloud Hypervisor allows: Kata
    # Containers rewrites the vsock socket and memory.shared of a VM template's config.json
    # (clh.go: SaveVM, updateVsockSocketPath). It is checked as any configuration is, and the
    # restore compares each device's placement with the saved state.
    config_json = _read_json(directory / CONFIG, None)
    try:
        config = VmConfig.from_json(config_json)
    except ConfigError as exc:
        raise SnapshotError(f"{directory / CONFIG}: {exc}") from None
    memory = []
    persisted = []
    try:
        for entry in field(state, "memory", list, "state"):
            if isinstance(entry, dict) and entry.get("file") is None and "zone" in entry:
                persisted.append(snapshot_zones.parse_persisted(entry))
                continue
            name = field(entry, "file", str, "state.memory")
            if name not in files:
                raise SnapshotError(f"{directory / STATE}: memory file {name!r} is not in the manifest")
            rng = MemoryRange(int_field(entry, "start", "state.memory"), int_field(entry, "size", "state.memory"))
            if files[name].get("size") != rng.size or rng.size % PAGE_SIZE or rng.start % PAGE_SIZE:
                raise SnapshotError(f"{directory / name}: does not match the range {rng}")
            memory.append((int_field(entry, "slot", "state.memory", 0, 1 << 16), rng, directory / name))
        for key in ("vcpus", "devices"):
            field(state, key, list, "state")
        field(state, "vm", dict, "state")
    except StateError as exc:
        raise SnapshotError(f"{directory / STATE}: {exc}") from None
    snapshot_zones.check_persisted(directory, config, persisted)
    return SnapshotImage(directory, config, state, tuple(memory), tuple(persisted))


def _manifest_files(directory: Path) -> dict[str, Any]:
    """The manifest's file list, each file's size checked."""
    manifest = _read_json(directory / MANIFEST, None)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{directory / MANIFEST}: not a vmmkit snapshot manifest")
    _check_version(directory, manifest.get("version"))
    files = manifest.get("files")
    if not isinstance(files, dict) or CONFIG not in files or STATE not in files:
        raise SnapshotError(f"{directory / MANIFEST}: the file list is missing or incomplete")
    _check_sizes(directory, files, "the manifest says")
    return files


def _check_version(directory: Path, version: Any) -> None:
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{directory}: snapshot format version {version!r}; this vmmkit "
                            f"{__version__} restores version {FORMAT_VERSION}")


def _check_sizes(directory: Path, files: Mapping[str, Any], source: str) -> None:
    for name, facts in files.items():
        if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(facts, dict):
            raise SnapshotError(f"{directory / MANIFEST}: bad file entry {name!r}")
        size = facts.get("size")
        path = directory / name
        try:
            actual = path.stat().st_size
        except OSError:
            raise SnapshotError(f"{path}: missing (the snapshot is incomplete)") from None
        if name == CONFIG or (name == STATE and size is None):  # editable; sealed on its own
            continue
        if actual != size:
            raise SnapshotError(f"{path}: {actual} bytes, {source} {size} (truncated or damaged)")


def _read_sealed_state(directory: Path) -> dict[str, Any]:
    """``state.json`` checked by its own manifest (:func:`_seal`)."""
    path = directory / STATE
    state = _read_json(path, None)
    seal = state.get(SEAL) if isinstance(state, dict) else None
    if not isinstance(seal, dict) or seal.get("format") != FORMAT:
        raise SnapshotError(f"{directory}: no {MANIFEST}, and {STATE} carries no manifest of its own "
                            "(not a vmmkit snapshot, or one from an older vmmkit: copy its snapshot.json too)")
    _check_version(directory, seal.get("version"))
    assert isinstance(state, dict)
    if _seal(state)["sha256"] != seal.get("sha256"):
        raise SnapshotError(f"{path}: checksum mismatch (the file was changed or damaged after the snapshot)")
    return state


def _read_json(path: Path, sha256: Any) -> Any:
    try:
        size = path.stat().st_size
        if size > _MAX_JSON:
            raise SnapshotError(f"{path}: {size} bytes is too large for a snapshot file")
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{path}: {exc.strerror or exc} (the snapshot is incomplete)") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise SnapshotError(f"{path}: checksum mismatch (the file was changed or damaged after the snapshot)")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise SnapshotError(f"{path}: not valid JSON: {str(exc)[:200]}") from None


# -- restoring -----------------------------------------------------------------------------------


def boot_config(image: SnapshotImage, config: VmConfig) -> VmConfig:
    """The configuration a restored machine is built with: ``config`` (the snapshot's) with the
    boot RAM it had, where ``vm.resize`` recorded RAM as resized (ACPI hotplug: ``memory.size``
    grows; the plugged DIMMs come back from the RAM files, not as boot RAM).

    :raises SnapshotError: the saved boot size is not a number."""
    hotplug = image.state.get("memory_hotplug")
    if hotplug is None:
        return config
    try:
        boot_size = int_field(hotplug, "boot_size", "state.memory_hotplug", PAGE_SIZE)
    except StateError as exc:
        raise SnapshotError(f"{image.directory / STATE}: {exc}") from None
    return attrs.evolve(config, memory=attrs.evolve(config.memory, size=boot_size))


def map_memory(image: SnapshotImage, config: VmConfig, layout: MemoryLayout, *, prefault: bool) -> GuestMemory:
    """Guest RAM from the memory files: private copy-on-write mappings, or (shared or
    huge-page memory, which must not be file-private) allocated memory the files are copied into.
    Files in the hotplug area are the plugged DIMMs or virtio-mem's region (checked by the
    memory hotplug's ``restore_state``).

    :raises SnapshotError: the saved ranges are not the layout this configuration gets."""
    if config.memory.zones:
        return snapshot_zones.map_snapshot(image, config, layout, prefault=prefault)
    saved = sorted(image.memory, key=lambda item: item[1].start)
    check_ranges(str(image.directory), [rng for _slot, rng, _path in saved], config, layout)
    mem = config.memory
    memory = GuestMemory()
    try:
        for slot, rng, path in saved:
            if mem.shared or mem.hugepages:  # must stay shareable: allocate, then copy the file in
                region = map_region(rng, slot, shared=mem.shared, hugepages=mem.hugepages,
                                    hugepage_size=mem.hugepage_size, thp=mem.thp, mergeable=mem.mergeable,
                                    prefault=prefault)
                memory.add_region(region)
                copy_file(path, region)
            else:
                memory.add_region(map_file(path, rng, slot, prefault=prefault, thp=mem.thp,
                                            mergeable=mem.mergeable))
    except BaseException:
        memory.close()
        raise
    return memory


def check_ranges(where: str, ranges: list[MemoryRange], config: VmConfig, layout: MemoryLayout) -> None:
    """Saved (or migrated) RAM ranges, sorted by address, against the layout this vmmkit
    builds for ``config``: the boot RAM exactly, the rest inside the hotplug area.

    :raises SnapshotError: they differ."""
    if config.memory.zones:
        return snapshot_zones.check_ranges(where, ranges, config, layout)
    area = layout.memory_hotplug if config.memory.hotplug_size else None
    boot = tuple(rng for rng in ranges if area is None or not area.overlaps(rng))
    hot = [rng for rng in ranges if area is not None and area.overlaps(rng)]
    if boot != tuple(layout.ram) or any(area is None or not area.contains(r.start, r.size) for r in hot):
        raise SnapshotError(f"{where}: the saved RAM ranges {[str(r) for r in ranges]} are not "
                            f"the layout this vmmkit builds for the configuration {[str(r) for r in layout.ram]}"
                            + (f" and hotplug area {area}" if area is not None else ""))


def copy_file(path: Path, region: GuestRegion) -> None:
    """A RAM file into ``region``, a chunk at a time, its holes (zero pages) skipped."""
    view = memoryview(region.buffer)
    try:
        with open(path, "rb", buffering=0) as source:
            for offset in range(0, region.size, _CHUNK):
                chunk = source.read(min(_CHUNK, region.size - offset))
                if chunk != _ZEROS[: len(chunk)]:
                    view[offset : offset + len(chunk)] = chunk
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        view.release()


def map_file(path: Path, rng: MemoryRange, slot: int, *, prefault: bool, thp: bool, mergeable: bool) -> GuestRegion:
    from vmmkit.memory import _ffi

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot open {path}: {exc.strerror}") from None
    try:
        if os.fstat(fd).st_size != rng.size:
            raise SnapshotError(f"{path}: changed size since it was checked")
        flags = mmap.MAP_PRIVATE | (mmap.MAP_POPULATE if prefault else 0)
        buffer = mmap.mmap(fd, rng.size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot map {path}: {exc}") from None
    finally:
        os.close(fd)  # the mapping keeps the file
    if mergeable:
        buffer.madvise(mmap.MADV_MERGEABLE)
    pin = _ffi().from_buffer(buffer)
    return GuestRegion(rng, buffer, int(_ffi().cast("uintptr_t", pin)), slot=slot, pin=pin)


def restore_state(machine: Machine, image: SnapshotImage) -> None:
    """Put the saved states into a machine built from ``image`` (devices placed, vCPUs created,
    nothing running). Compares what was saved with what was built first.

    :raises SnapshotError: a mismatch or a piece that cannot take its state."""
    assert machine.vm is not None and machine.arch is not None and machine.hypervisor is not None
    state = image.state
    where = image.directory / STATE
    try:
        if state.get("arch") != machine.arch_name:
            raise StateError(f"the snapshot is of an {state.get('arch')!r} guest, this VM is {machine.arch_name}")
        vcpus = state["vcpus"]
        if len(vcpus) != len(machine.vcpus):
            raise StateError(f"{len(vcpus)} vCPUs in the snapshot, the configuration makes {len(machine.vcpus)}")
        saved_devices: dict[str, Any] = {str(entry.get("id")): entry for entry in state["devices"]
                                         if isinstance(entry, dict)}
        built = {placed.id: placed for placed in machine.devices}
        if set(saved_devices) != set(built):
            missing = sorted(set(built) - set(saved_devices))
            extra = sorted(set(saved_devices) - set(built))
            raise StateError(f"the devices differ: not in the snapshot {missing}, only in the snapshot {extra}")
        for device_id, entry in saved_devices.items():
            placed = built[device_id]
            if entry.get("placement") != placement_of(placed):
                raise StateError(f"device {device_id} was placed at {entry.get('placement')}, "
                                 f"this VM places it at {placement_of(placed)}")
            if not is_snapshottable(placed.device):
                raise StateError(f"device {device_id} ({placed.kind}) cannot restore state")
            check_version(f"device {device_id} ({placed.kind})", entry.get("version"), placed.device.state_version)
        vm = machine.vm
        if not is_snapshottable(vm):
            raise StateError(f"backend {machine.hypervisor.name} cannot restore a VM state")
        vm_entry = state["vm"]
        check_version(f"backend VM state ({state.get('hypervisor')} -> {machine.hypervisor.name})",
                      vm_entry.get("version"), vm.state_version)  # type: ignore[attr-defined]
        for index, entry in enumerate(vcpus):
            if not isinstance(entry, dict):
                raise StateError(f"vcpus[{index}]: expected an object")
            check_version(f"vcpu{index}", entry.get("version"), machine.arch.vcpu_state_version)
        # All checked: now the pieces take their states (each still validates its own).
        vm.restore_state(field(vm_entry, "state", dict, "vm"))  # type: ignore[attr-defined]
        for index, (vcpu, entry) in enumerate(zip(machine.vcpus, vcpus, strict=True)):
            machine.arch.restore_vcpu(vcpu, index, machine.hypervisor, machine.config,
                                      field(entry, "state", dict, f"vcpus[{index}]"))
        for device_id, entry in saved_devices.items():
            built[device_id].device.restore_state(field(entry, "state", dict, f"device {device_id}"))
        hotplug = state.get("memory_hotplug")
        if (hotplug is None) != (machine.memory_hotplug is None):
            raise StateError("memory hotplug: " + ("the snapshot has none, this VM has hotplug_size" if hotplug is None
                                                   else "saved with hotplug memory, this VM has no hotplug_size"))
        if machine.memory_hotplug is not None:  # after the devices: the register block's state is back
            machine.memory_hotplug.restore_state(field(state, "memory_hotplug", dict, "state"))
        snapshot_zones.restore_hotplug(machine, state.get("zone_hotplug"))
    except StateError as exc:
        raise SnapshotError(f"{where}: cannot restore: {exc}") from None
    log.info("vm.restored", directory=str(image.directory), hypervisor=machine.hypervisor.name,
             saved_on=state.get("hypervisor"))
