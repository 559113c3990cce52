"""vCPUs (``--cpus``) and guest RAM (``--memory``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

import attrs

from vmmkit.config.codec import _Config
from vmmkit.config.errors import ConfigError, _cli_errors
from vmmkit.config.fields import (
    DEFAULT_MAX_PHYS_BITS,
    DEFAULT_MEMORY_SIZE,
    MAX_VCPUS,
    PAGE_SIZE,
    U8,
    U32,
    _choice,
    _instance,
    _int_range,
    _is_bool,
    _is_u32,
    _opt_hotplug_size,
    _opt_hotplugged_size,
    _opt_hugepage_size,
    _size,
    _tuple,
    _tuple_of,
)
from vmmkit.config.memory_zones import ZONE_HOTPLUG_ALIGN, MemoryZoneConfig
from vmmkit.config.options import _INT_RE, OptionParser, ParsedOptions, _make


@attrs.frozen(kw_only=True)
class CpuTopology(_Config):
    """``topology=<threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>``."""

    threads_per_core: int = attrs.field(validator=_int_range(1, MAX_VCPUS))
    cores_per_die: int = attrs.field(validator=_int_range(1, MAX_VCPUS))
    dies_per_package: int = attrs.field(validator=_int_range(1, MAX_VCPUS))
    packages: int = attrs.field(validator=_int_range(1, MAX_VCPUS))

    @property
    def vcpus(self) -> int:
        """The number of vCPUs the topology describes."""
        return self.threads_per_core * self.cores_per_die * self.dies_per_package * self.packages

    def __str__(self) -> str:
        return f"{self.threads_per_core}:{self.cores_per_die}:{self.dies_per_package}:{self.packages}"


@attrs.frozen(kw_only=True)
class CpuAffinity(_Config):
    """The host CPUs one vCPU may run on."""

    vcpu: int = attrs.field(validator=_int_range(0, MAX_VCPUS - 1))
    host_cpus: tuple[int, ...] = attrs.field(
        converter=_tuple, validator=_tuple_of(_is_u32, "a host CPU number")
    )

    def __attrs_post_init__(self) -> None:
        if not self.host_cpus:
            raise ConfigError("host_cpus", self.host_cpus, "at least one host CPU")


@attrs.frozen(kw_only=True)
class CpuFeatures(_Config):
    """Optional CPU features (``features=amx``)."""

    amx: bool = attrs.field(default=False, validator=_is_bool)


_CORE_SCHEDULING: Final = {"vm": "Vm", "vcpu": "Vcpu", "off": "Off"}


@attrs.frozen(kw_only=True)
class CpusConfig(_Config):
    """vCPUs: ``--cpus boot=2,max=4,topology=1:2:1:2,kvm_hyperv=on,max_phys_bits=46,
    affinity=[0@[0-1]],features=amx,nested=on,core_scheduling=vm``.

    ``max_vcpus`` defaults to ``boot_vcpus``; ``1 <= boot_vcpus <= max_vcpus <= 254``
    (:data:`MAX_VCPUS`). A topology's product must equal ``max_vcpus``.
    """

    boot_vcpus: int = attrs.field(default=1, validator=_int_range(1, MAX_VCPUS))
    max_vcpus: int = attrs.field(validator=_int_range(1, MAX_VCPUS))
    topology: CpuTopology | None = attrs.field(default=None, validator=_instance(CpuTopology, optional=True))
    kvm_hyperv: bool = attrs.field(default=False, validator=_is_bool)
    max_phys_bits: int = attrs.field(default=DEFAULT_MAX_PHYS_BITS, validator=_int_range(1, 64))
    affinity: tuple[CpuAffinity, ...] = attrs.field(
        default=(),
        converter=_tuple,
        validator=_tuple_of(lambda v: isinstance(v, CpuAffinity), "a CpuAffinity"),
    )
    features: CpuFeatures = attrs.field(factory=CpuFeatures, validator=_instance(CpuFeatures))
    nested: bool = attrs.field(default=True, validator=_is_bool)
    core_scheduling: str = attrs.field(default="Vm", validator=_choice("Vm", "Vcpu", "Off"))

    _CLI_KEYS: ClassVar[Mapping[str, str]] = {"boot_vcpus": "boot", "max_vcpus": "max"}

    @max_vcpus.default
    def _max_vcpus_default(self) -> int:
        return self.boot_vcpus

    def __attrs_post_init__(self) -> None:
        if self.max_vcpus < self.boot_vcpus:
            raise ConfigError("max_vcpus", self.max_vcpus, f"at least boot_vcpus ({self.boot_vcpus})")
        if self.topology is not None and self.topology.vcpus != self.max_vcpus:
            raise ConfigError(
                "topology",
                str(self.topology),
                f"a topology whose product equals max_vcpus ({self.max_vcpus})",
            )
        seen: set[int] = set()
        for index, affinity in enumerate(self.affinity):
            if affinity.vcpu >= self.max_vcpus or affinity.vcpu in seen:
                raise ConfigError(
                    f"affinity[{index}].vcpu",
                    affinity.vcpu,
                    f"a distinct vCPU index below max_vcpus ({self.max_vcpus})",
                )
            seen.add(affinity.vcpu)

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--cpus",
        (
            "boot",
            "max",
            "topology",
            "kvm_hyperv",
            "max_phys_bits",
            "affinity",
            "features",
            "nested",
            "core_scheduling",
        ),
    )

    @classmethod
    def parse(cls, spec: str) -> CpusConfig:
        """Parse a ``--cpus`` value (``""`` gives the defaults)."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option, cls._CLI_KEYS):
            return _make(
                cls,
                boot_vcpus=o.integer("boot", hi=U32),
                max_vcpus=o.integer("max", hi=U32),
                topology=_parse_topology(o),
                kvm_hyperv=o.toggle("kvm_hyperv"),
                max_phys_bits=o.integer("max_phys_bits", hi=U8),
                affinity=_parse_affinity(o),
                features=_parse_features(o),
                nested=o.toggle("nested"),
                core_scheduling=o.choice("core_scheduling", _CORE_SCHEDULING),
            )


def _parse_topology(o: ParsedOptions) -> CpuTopology | None:
    raw = o.get("topology")
    if raw is None:
        return None
    parts = raw.split(":")
    if len(parts) != 4 or not all(_INT_RE.fullmatch(p) for p in parts):
        raise o.error("topology", raw, "<threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>")
    threads, cores, dies, packages = (int(p) for p in parts)
    try:
        return CpuTopology(
            threads_per_core=threads, cores_per_die=cores, dies_per_package=dies, packages=packages
        )
    except ConfigError as err:
        raise o.error("topology", raw, f"each part from 1 to {MAX_VCPUS}") from err


def _parse_affinity(o: ParsedOptions) -> tuple[CpuAffinity, ...] | None:
    pairs = o.pairs("affinity", hi=MAX_VCPUS - 1)
    if pairs is None:
        return None
    return tuple(CpuAffinity(vcpu=vcpu, host_cpus=cpus) for vcpu, cpus in pairs)


def _parse_features(o: ParsedOptions) -> CpuFeatures | None:
    names = o.string_list("features")
    if names is None:
        return None
    for name in names:
        if name != "amx":
            raise o.error("features", name, "a list of: amx")
    return CpuFeatures(amx=True)


# --- memory -----------------------------------------------------------------------------------


_HOTPLUG_METHODS: Final = {"acpi": "Acpi", "virtio-mem": "VirtioMem"}


@attrs.frozen(kw_only=True)
class MemoryConfig(_Config):
    """Guest RAM: ``--memory size=512M,shared=on,hugepages=on,hotplug_size=1G,hotplug_method=acpi``.

    Sizes accept ``"512M"``-style strings and are stored in bytes. ``size`` (default 512 MiB) and
    the hotplug sizes are multiples of 4 KiB; ``hugepage_size`` is a power of two and needs
    ``hugepages``; ``hotplugged_size`` needs ``hotplug_size`` and fits in it.
    """

    size: int = attrs.field(default=DEFAULT_MEMORY_SIZE, converter=_size)
    mergeable: bool = attrs.field(default=False, validator=_is_bool)
    shared: bool = attrs.field(default=False, validator=_is_bool)
    hugepages: bool = attrs.field(default=False, validator=_is_bool)
    hugepage_size: int | None = attrs.field(default=None, converter=_opt_hugepage_size)
    hotplug_method: str = attrs.field(default="Acpi", validator=_choice("Acpi", "VirtioMem"))
    hotplug_size: int | None = attrs.field(default=None, converter=_opt_hotplug_size)
    hotplugged_size: int | None = attrs.field(default=None, converter=_opt_hotplugged_size)
    prefault: bool = attrs.field(default=False, validator=_is_bool)
    reserve: bool = attrs.field(default=False, validator=_is_bool)
    thp: bool = attrs.field(default=True, validator=_is_bool)
    #: ``--memory-zone``: with ``size=0``, guest RAM is these zones (:mod:`vmmkit.config.memory_zones`).
    zones: tuple[MemoryZoneConfig, ...] = attrs.field(
        default=(), converter=_tuple,
        validator=_tuple_of(lambda z: isinstance(z, MemoryZoneConfig), "a MemoryZoneConfig"),
    )

    def __attrs_post_init__(self) -> None:
        page = f"a positive multiple of {PAGE_SIZE} bytes (4K), such as 512M"
        if self.zones:
            self._check_zones()
        elif self.size <= 0 or self.size % PAGE_SIZE:
            raise ConfigError("size", self.size, page)
        for name in ("hotplug_size", "hotplugged_size"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % PAGE_SIZE):
                raise ConfigError(name, value, page)
        if self.hotplugged_size is not None and (
            self.hotplug_size is None or self.hotplugged_size > self.hotplug_size
        ):
            raise ConfigError(
                "hotplugged_size", self.hotplugged_size, "at most hotplug_size (which must be set)"
            )
        if self.hugepage_size is not None:
            if not self.hugepages:
                raise ConfigError("hugepage_size", self.hugepage_size, "hugepage_size only with hugepages=on")
            if self.hugepage_size <= 0 or self.hugepage_size & (self.hugepage_size - 1):
                raise ConfigError("hugepage_size", self.hugepage_size, "a power of two, such as 2M")

    def _check_zones(self) -> None:
        """As Cloud Hypervisor's ``MemoryManager::new``: RAM is the zones' (``size=0``), hotplug
        memory is each zone's own and only virtio-mem plugs it; ids are unique."""
        if self.size != 0:
            raise ConfigError("size", self.size, "size=0 with memory zones (guest RAM is the zones')")
        for name in ("hotplug_size", "hotplugged_size"):
            if getattr(self, name) is not None:
                raise ConfigError(name, getattr(self, name), f"no {name} with memory zones (each zone has its own)")
        ids = [zone.id for zone in self.zones]
        for index, zone in enumerate(self.zones):
            if zone.id in ids[:index]:
                raise ConfigError(f"zones[{index}].id", zone.id, "an id no other zone has")
            if zone.hotplug_size and self.hotplug_method != "VirtioMem":
                raise ConfigError(f"zones[{index}].hotplug_size", zone.hotplug_size,
                                  "a zone's hotplug_size with hotplug_method=virtio-mem",
                                  reason="as in Cloud Hypervisor, zones plug memory through virtio-mem only")
        if not self.boot_size:
            raise ConfigError("zones", [zone.id for zone in self.zones], "zones with some boot RAM (a size above 0)")

    @property
    def boot_size(self) -> int:
        """Guest RAM at boot: ``size``, or the zones' sizes added up."""
        return self.size + sum(zone.size for zone in self.zones)

    @property
    def hotplug_area_size(self) -> int:
        """Guest-physical space for hotplug RAM: ``hotplug_size``, or the zones' one after the
        other, each starting on :data:`~vmmkit.config.memory_zones.ZONE_HOTPLUG_ALIGN`."""
        size = self.hotplug_size or 0
        for zone in self.zones:
            if zone.hotplug_size:
                size = -(-size // ZONE_HOTPLUG_ALIGN) * ZONE_HOTPLUG_ALIGN + zone.hotplug_size
        return size

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--memory",
        (
            "size",
            "mergeable",
            "shared",
            "hugepages",
            "hugepage_size",
            "hotplug_method",
            "hotplug_size",
            "hotplugged_size",
            "prefault",
            "thp",
        ),
    )

    @classmethod
    def parse(cls, spec: str, zones: tuple[MemoryZoneConfig, ...] = ()) -> MemoryConfig:
        """Parse a ``--memory`` value (``""`` gives the defaults), with the ``--memory-zone``
        values already parsed."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option):
            return _make(
                cls,
                zones=zones or None,
                size=o.size("size"),
                mergeable=o.toggle("mergeable"),
                shared=o.toggle("shared"),
                hugepages=o.toggle("hugepages"),
                hugepage_size=o.size("hugepage_size"),
                hotplug_method=o.choice("hotplug_method", _HOTPLUG_METHODS),
                hotplug_size=o.size("hotplug_size"),
                hotplugged_size=o.size("hotplugged_size"),
                prefault=o.toggle("prefault"),
                thp=o.toggle("thp"),
            )

