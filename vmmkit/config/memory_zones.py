"""Memory zones (``--memory-zone``), as Cloud Hypervisor's ``MemoryZoneConfig``
(``vmm/src/vm_config.rs``, ``docs/memory.md``): with ``--memory size=0``, guest RAM is the zones
in the order given, each zone backed by host memory with its own options and, with
``--memory hotplug_method=virtio-mem``, a virtio-mem device of its own (``hotplug_size``), resized
by ``vm.resize-zone``.
"""

from __future__ import annotations

from typing import ClassVar, Final

import attrs

from vmmkit.config.codec import _Config
from vmmkit.config.errors import ConfigError, _cli_errors
from vmmkit.config.fields import (
    PAGE_SIZE,
    _is_bool,
    _is_id,
    _is_opt_str,
    _opt_hotplug_size,
    _opt_hotplugged_size,
    _opt_hugepage_size,
    _opt_path,
    _size,
)
from vmmkit.config.options import OptionParser, _make

#: Each zone's virtio-mem area starts on a Linux memory block (CH's ``VIRTIO_MEM_ALIGN_SIZE``).
ZONE_HOTPLUG_ALIGN: Final = 128 << 20


def _is_zone_id(inst: object, attr: attrs.Attribute[str], value: object) -> None:
    if value is None:
        raise ConfigError(attr.name, value, "an id naming the zone")
    _is_id(inst, attr, value)


def _opt_int(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise ConfigError("host_numa_node", value, "an integer")
    return value


@attrs.frozen(kw_only=True)
class MemoryZoneConfig(_Config):
    """One zone: ``--memory-zone id=mem0,size=1G,shared=on,file=/dev/shm/z0,hotplug_size=2G``.

    ``size`` and the hotplug sizes are multiples of 4 KiB (``size`` may be 0 for a zone that
    only has hotplug memory); ``hotplugged_size`` needs ``hotplug_size`` and fits in it.
    ``host_numa_node``, ``hugepage_size`` and ``reserve`` are refused by name
    (:data:`vmmkit.config.support.NOT_SUPPORTED`).
    """

    id: str = attrs.field(validator=_is_zone_id)
    size: int = attrs.field(converter=_size)
    file: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    mergeable: bool = attrs.field(default=False, validator=_is_bool)
    shared: bool = attrs.field(default=False, validator=_is_bool)
    hugepages: bool = attrs.field(default=False, validator=_is_bool)
    hugepage_size: int | None = attrs.field(default=None, converter=_opt_hugepage_size)
    host_numa_node: int | None = attrs.field(default=None, converter=_opt_int)
    hotplug_size: int | None = attrs.field(default=None, converter=_opt_hotplug_size)
    hotplugged_size: int | None = attrs.field(default=None, converter=_opt_hotplugged_size)
    prefault: bool = attrs.field(default=False, validator=_is_bool)
    reserve: bool = attrs.field(default=False, validator=_is_bool)

    def __attrs_post_init__(self) -> None:
        if self.size < 0 or self.size % PAGE_SIZE:
            raise ConfigError("size", self.size, f"a multiple of {PAGE_SIZE} bytes (4K), such as 512M")
        for name in ("hotplug_size", "hotplugged_size"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % PAGE_SIZE):
                raise ConfigError(name, value, f"a positive multiple of {PAGE_SIZE} bytes (4K)")
        if self.hotplugged_size is not None and (
            self.hotplug_size is None or self.hotplugged_size > self.hotplug_size
        ):
            raise ConfigError("hotplugged_size", self.hotplugged_size, "at most hotplug_size (which must be set)")
        if self.size == 0 and not self.hotplug_size:
            raise ConfigError("size", self.size, "a positive size (or a hotplug_size)")
        if self.hugepages and self.file is not None:
            raise ConfigError("file", self.file, "no file with hugepages=on",
                              reason="huge pages come from the host's hugetlbfs pool, not a file")

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--memory-zone",
        ("id", "size", "file", "mergeable", "shared", "hugepages", "hugepage_size", "host_numa_node",
         "hotplug_size", "hotplugged_size", "prefault"),
    )

    @classmethod
    def parse(cls, spec: str) -> MemoryZoneConfig:
        """Parse one ``--memory-zone`` value (``id`` and ``size`` are required, as in CH)."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option):
            if o.get("id") is None:
                raise o.error("id", None, "an id naming the zone (id=mem0)")
            size = o.size("size")
            if size is None:
                raise o.error("size", None, "the zone's size (size=512M)")
            return _make(
                cls,
                id=o.get("id"),
                size=size,
                file=o.get("file"),
                mergeable=o.toggle("mergeable"),
                shared=o.toggle("shared"),
                hugepages=o.toggle("hugepages"),
                hugepage_size=o.size("hugepage_size"),
                host_numa_node=o.integer("host_numa_node", 0, (1 << 31) - 1),
                hotplug_size=o.size("hotplug_size"),
                hotplugged_size=o.size("hotplugged_size"),
                prefault=o.toggle("prefault"),
            )

