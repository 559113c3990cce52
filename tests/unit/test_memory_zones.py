"""Memory zones (``--memory-zone``, :mod:`vmmkit.config.memory_zones` and
:mod:`vmmkit.memory_zones`): the options and their checks, the zones laid over the x86-64 RAM
ranges (across the 32-bit hole), real host mappings with each zone's options (a file-backed
zone's writes reach its file only with ``shared=on``), and the per-zone virtio-mem areas. A guest
booting with zones is tests/integration/kvm/test_kvm_memory_zones.py; ``vm.resize-zone`` over
the API is tests/integration/api/test_api_memory_zones.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from vmmkit_x86_64.layout import layout_for

from vmmkit.config import ConfigError, MemoryConfig, MemoryZoneConfig, VmConfig
from vmmkit.memory import MemoryRange
from vmmkit.memory_zones import allocate, hotplug_areas, zone_pieces

MiB = 1 << 20
GiB = 1 << 30


def zones_config(*specs: str, memory: str = "size=0") -> VmConfig:
    return VmConfig.from_cli(kernel="/k", memory=memory, memory_zones=list(specs))


# -- options -----------------------------------------------------------------------------------


def test_zones_parse_and_survive_json() -> None:
    config = zones_config("id=a,size=64M,mergeable=on,prefault=on", "id=b,size=0,hotplug_size=256M,hotplugged_size=64M",
                          "id=c,size=32M,file=/dev/shm/c,shared=on", memory="size=0,hotplug_method=virtio-mem")
    a, b, c = config.memory.zones
    assert (a.id, a.size, a.mergeable, a.prefault) == ("a", 64 * MiB, True, True)
    assert (b.size, b.hotplug_size, b.hotplugged_size) == (0, 256 * MiB, 64 * MiB)
    assert (c.file, c.shared) == ("/dev/shm/c", True)
    assert config.memory.boot_size == 96 * MiB
    assert config.memory.hotplug_area_size == 256 * MiB
    assert VmConfig.from_json(config.to_json()) == config
    assert config.to_json()["memory"]["zones"][1] == {
        "id": "b", "size": 0, "hotplug_size": 256 * MiB, "hotplugged_size": 64 * MiB, "mergeable": False,
        "shared": False, "hugepages": False, "prefault": False, "reserve": False}


@pytest.mark.parametrize(("memory", "zones", "message"), [
    ("size=128M", ["id=a,size=64M"], "size=0 with memory zones"),
    (None, ["id=a,size=64M"], "--memory size=0 with it"),
    ("size=0,hotplug_size=1G", ["id=a,size=64M"], "no hotplug_size with memory zones"),
    ("size=0", ["id=a,size=64M", "id=a,size=64M"], "an id no other zone has"),
    ("size=0", ["id=a,size=64M,hotplug_size=128M"], "with hotplug_method=virtio-mem"),
    ("size=0", ["size=64M"], "id"),
    ("size=0", ["id=a"], "the zone's size"),
    ("size=0", ["id=a,size=0"], "a positive size (or a hotplug_size)"),
    ("size=0", ["id=a,size=1000"], "multiple of 4096"),
    ("size=0", ["id=a,size=64M,hotplugged_size=2M"], "at most hotplug_size"),
    ("size=0", ["id=a,size=64M,hugepages=on,file=/f"], "no file with hugepages=on"),
    ("size=0", ["id=__a,size=64M"], "reserved"),
    ("size=0", ["id=a,size=64M,colour=blue"], "unknown key"),
])
def test_bad_zones_are_refused_naming_what(memory: str | None, zones: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        VmConfig.from_cli(kernel="/k", memory=memory, memory_zones=zones)
    assert message in str(info.value), str(info.value)


def test_a_zone_needs_an_id_and_a_size_from_json_too() -> None:
    with pytest.raises(ConfigError, match="size"):
        VmConfig.from_json({"memory": {"size": 0, "zones": [{"id": "a"}]}})
    with pytest.raises(ConfigError, match="id"):
        MemoryZoneConfig(id=None, size=MiB)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="memory.zones.0..file: a NUL byte"):
        VmConfig.from_json({"memory": {"size": 0, "zones": [{"id": "a", "size": MiB, "file": "a\0b"}]}})


# -- the layout and the mappings ---------------------------------------------------------------


def test_zones_fill_the_ram_ranges_in_order_across_the_32_bit_hole() -> None:
    config = zones_config("id=a,size=2G", "id=b,size=2G", "id=c,size=1G")
    layout = layout_for(config)
    assert layout.ram == (MemoryRange(0, 3 * GiB), MemoryRange(4 * GiB, 2 * GiB))
    pieces = [(zone.id, rng, offset) for zone, rng, offset in zone_pieces(layout.ram, config.memory.zones)]
    assert pieces == [
        ("a", MemoryRange(0, 2 * GiB), 0),
        ("b", MemoryRange(2 * GiB, GiB), 0),
        ("b", MemoryRange(4 * GiB, GiB), GiB),
        ("c", MemoryRange(5 * GiB, GiB), 0),
    ]


def test_each_zone_gets_a_virtio_mem_area_on_a_128_mib_boundary() -> None:
    config = zones_config("id=a,size=64M,hotplug_size=66M", "id=b,size=64M", "id=c,size=64M,hotplug_size=64M",
                          memory="size=0,hotplug_method=virtio-mem")
    layout = layout_for(config)
    assert layout.memory_hotplug == MemoryRange(4 * GiB, 256 * MiB - 64 * MiB)  # 66M, pad to 128M, 64M
    areas = hotplug_areas(layout.memory_hotplug, config.memory.zones)
    assert areas == {"a": MemoryRange(4 * GiB, 66 * MiB), "c": MemoryRange(4 * GiB + 128 * MiB, 64 * MiB)}
    with pytest.raises(ConfigError, match="fit"):
        hotplug_areas(MemoryRange(4 * GiB, 128 * MiB), config.memory.zones)


def test_each_zone_is_mapped_with_its_own_options(tmp_path: Path) -> None:
    shared_file, private_file = tmp_path / "shared.ram", tmp_path / "private.ram"
    private_file.write_bytes(b"\xaa" * 4096)  # shorter than the zone: grown, its contents kept
    config = zones_config("id=anon,size=4M", "id=memfd,size=4M,shared=on",
                          f"id=file,size=4M,file={shared_file},shared=on", f"id=cow,size=4M,file={private_file}",
                          f"id=tmp,size=4M,file={tmp_path},shared=on")
    layout = layout_for(config)
    memory = allocate(layout.ram, config.memory)
    try:
        regions = memory.regions
        assert [r.range for r in regions] == [MemoryRange(i * 4 * MiB, 4 * MiB) for i in range(5)]
        assert [r.slot for r in regions] == [0, 1, 2, 3, 4]
        assert regions[0].fd is None and regions[1].fd is not None  # shared=on: a memfd (vhost-user can map it)
        assert regions[2].fd is not None and os.fstat(regions[2].fd).st_ino == shared_file.stat().st_ino  # its file
        assert regions[3].fd is None  # a private file mapping: nothing to hand over
        for index, region in enumerate(regions):
            memory.write(region.start + 8192, f"zone {index}".encode())
        # the shared file zone's writes are in its file, grown to the zone's size
        assert shared_file.stat().st_size == 4 * MiB
        with open(shared_file, "rb") as f:
            f.seek(8192)
            assert f.read(6) == b"zone 2"
        # the private one reads the file but keeps its writes to itself
        assert memory.read(3 * 4 * MiB, 2) == b"\xaa\xaa"
        assert private_file.stat().st_size == 4 * MiB
        with open(private_file, "rb") as f:
            f.seek(8192)
            assert f.read(6) == b"\0" * 6
        assert set(os.listdir(tmp_path)) == {"shared.ram", "private.ram"}  # the directory's file is unnamed
        assert memory.read(4 * 4 * MiB + 8192, 6) == b"zone 4"
    finally:
        memory.close()


def test_a_zone_file_that_cannot_be_mapped_is_a_clear_error(tmp_path: Path) -> None:
    from vmmkit.memory import MemoryAllocationError

    config = zones_config(f"id=z,size=4M,file={tmp_path / 'missing' / 'dir' / 'f'}")
    with pytest.raises(MemoryAllocationError, match="memory zone 'z': file .*No such file"):
        allocate(layout_for(config).ram, config.memory)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    config = zones_config(f"id=z,size=4M,file={fifo}")
    with pytest.raises(MemoryAllocationError, match="not a regular file"):
        allocate(layout_for(config).ram, config.memory)


def test_memory_config_without_zones_is_unchanged() -> None:
    memory = MemoryConfig(size="512M", hotplug_size="1G")
    assert memory.boot_size == 512 * MiB and memory.hotplug_area_size == GiB and memory.zones == ()
