"""The whole VM: :class:`VmConfig` (CH's ``vm.create`` body) and its payload."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Self

import attrs

from vmmkit.config.codec import _Config
from vmmkit.config.consoles import ConsoleConfig, DebugConsoleConfig, SerialConfig
from vmmkit.config.cpus import CpusConfig, MemoryConfig
from vmmkit.config.devices import (
    BalloonConfig,
    DeviceConfig,
    FsConfig,
    PluginDeviceConfig,
    PmemConfig,
    RngConfig,
    VsockConfig,
)
from vmmkit.config.disk_net import DiskConfig, NetConfig, RateLimitGroupConfig
from vmmkit.config.errors import ConfigError, _field_head, _relabel
from vmmkit.config.fields import (
    _EXTENSION,
    _instance,
    _is_bool,
    _is_opt_str,
    _is_opt_text,
    _opt_path,
    _tuple,
    _tuple_of,
    _Validator,
)
from vmmkit.config.generic_vhost_user import GenericVhostUserConfig
from vmmkit.config.landlock import LandlockConfig
from vmmkit.config.memory_zones import MemoryZoneConfig
from vmmkit.config.options import _make
from vmmkit.config.platform import PlatformConfig

# --- the payload ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PayloadConfig(_Config):
    """What to boot: ``--kernel``, ``--cmdline``, ``--initramfs``, ``--firmware`` (all optional)."""

    firmware: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    kernel: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    cmdline: str | None = attrs.field(default=None, validator=_is_opt_text)
    initramfs: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    igvm: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    host_data: str | None = attrs.field(default=None, validator=_is_opt_text)

# --- the VM -----------------------------------------------------------------------------------


def _tuple_of_type(cls: type[Any]) -> _Validator:
    return _tuple_of(lambda v: isinstance(v, cls), f"a {cls.__name__}")


@attrs.frozen(kw_only=True)
class VmConfig(_Config):
    """A whole VM, as CH's ``VmConfig`` (``vm.create`` body) plus vmmkit's ``plugin_devices``.

    Build it with :meth:`from_cli`, :meth:`from_json` or directly. Besides each section's own
    checks: device ids are unique (``__``-prefixed ids are reserved), vhost-user devices and
    virtio-fs need shared memory, ``pci_segment`` values exist on the platform, devices on an
    ``iommu_segments`` segment have ``iommu`` on, VFIO paths are unique, a virtio-mmio device has
    no ``pci_device_id``, and the balloon is smaller than RAM. Whether there is something to boot
    is not checked (see :attr:`bootable`).
    """

    cpus: CpusConfig = attrs.field(factory=CpusConfig, validator=_instance(CpusConfig))
    memory: MemoryConfig = attrs.field(factory=MemoryConfig, validator=_instance(MemoryConfig))
    payload: PayloadConfig = attrs.field(factory=PayloadConfig, validator=_instance(PayloadConfig))
    disks: tuple[DiskConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(DiskConfig)
    )
    net: tuple[NetConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(NetConfig)
    )
    rng: RngConfig = attrs.field(factory=RngConfig, validator=_instance(RngConfig))
    balloon: BalloonConfig | None = attrs.field(
        default=None, validator=_instance(BalloonConfig, optional=True)
    )
    fs: tuple[FsConfig, ...] = attrs.field(default=(), converter=_tuple, validator=_tuple_of_type(FsConfig))
    pmem: tuple[PmemConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(PmemConfig)
    )
    serial: SerialConfig = attrs.field(factory=SerialConfig, validator=_instance(SerialConfig))
    console: ConsoleConfig = attrs.field(factory=ConsoleConfig, validator=_instance(ConsoleConfig))
    debug_console: DebugConsoleConfig = attrs.field(
        factory=DebugConsoleConfig, validator=_instance(DebugConsoleConfig)
    )
    devices: tuple[DeviceConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(DeviceConfig)
    )
    vsock: VsockConfig | None = attrs.field(default=None, validator=_instance(VsockConfig, optional=True))
    generic_vhost_user: tuple[GenericVhostUserConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(GenericVhostUserConfig)
    )
    iommu: bool = attrs.field(default=False, validator=_is_bool)
    watchdog: bool = attrs.field(default=False, validator=_is_bool)
    pvpanic: bool = attrs.field(default=False, validator=_is_bool)
    platform: PlatformConfig | None = attrs.field(
        default=None, validator=_instance(PlatformConfig, optional=True)
    )
    plugin_devices: tuple[PluginDeviceConfig, ...] = attrs.field(
        default=(),
        converter=_tuple,
        validator=_tuple_of_type(PluginDeviceConfig),
        metadata=_EXTENSION,
    )
    #: Landlock after set-up (``--landlock``; :mod:`vmmkit.sandbox.landlock`).
    landlock_enable: bool = attrs.field(default=False, validator=_is_bool)
    landlock_rules: tuple[LandlockConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(LandlockConfig)
    )
    #: Rate limits shared by the disks naming them (``--rate-limit-group``; :mod:`vmmkit.ratelimit`).
    rate_limit_groups: tuple[RateLimitGroupConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(RateLimitGroupConfig)
    )

    def __attrs_post_init__(self) -> None:
        _check_rate_limit_groups(self)
        if self.landlock_rules and not self.landlock_enable:
            raise ConfigError("landlock_rules", [r.path for r in self.landlock_rules], "landlock_enable true",
                              reason="Landlock rules without Landlock (--landlock)")
        ids: dict[str, str] = {}
        for path, device in self._all_devices():
            if device.id is None:
                continue
            if device.id in ids:
                raise ConfigError(
                    f"{path}.id",
                    device.id,
                    "an id no other device uses",
                    reason=f"duplicate id {device.id!r} (also {ids[device.id]})",
                )
            ids[device.id] = path
        shared = self.memory.shared or self.memory.hugepages
        needs_shared = [f"disks[{i}]" for i, d in enumerate(self.disks) if d.vhost_user]
        needs_shared += [f"net[{i}]" for i, n in enumerate(self.net) if n.vhost_user]
        needs_shared += [f"fs[{i}]" for i in range(len(self.fs))]
        needs_shared += [f"generic_vhost_user[{i}]" for i in range(len(self.generic_vhost_user))]
        if needs_shared and not shared:
            raise ConfigError(
                needs_shared[0],
                None,
                "--memory shared=on (or hugepages=on)",
                reason="vhost-user devices (and virtio-fs) need shared guest memory",
            )
        segments = self.platform.num_pci_segments if self.platform else 1
        iommu_segments = self.platform.iommu_segments if self.platform else ()
        for path, device in self._all_devices():
            segment = getattr(device, "pci_segment", None)
            if segment is None:
                continue
            if segment >= segments:
                raise ConfigError(
                    f"{path}.pci_segment", segment, f"a segment below num_pci_segments ({segments})"
                )
            if segment not in iommu_segments or _field_head(path) in ("rng", "console", "balloon"):
                continue  # CH checks only these hot-pluggable devices against IOMMU segments
            if _field_head(path) == "fs":
                raise ConfigError(
                    f"{path}.pci_segment", segment, "a segment not behind the IOMMU (virtio-fs cannot be)"
                )
            if _field_head(path) == "generic_vhost_user":
                raise ConfigError(f"{path}.pci_segment", segment,
                                  "a segment not behind the IOMMU (generic vhost-user has no iommu option)")
            if not device.iommu:
                raise ConfigError(f"{path}.iommu", False, f"iommu on (segment {segment} is behind the IOMMU)")
        explicit = self.platform.virtio_transport if self.platform else None
        for path, device in self._all_devices():
            if path.startswith("devices["):
                continue  # VFIO devices are PCI devices
            transport = getattr(device, "transport", None) or explicit
            if transport == "mmio" and getattr(device, "pci_device_id", None) is not None:
                raise ConfigError(
                    f"{path}.pci_device_id", device.pci_device_id, "a PCI slot only for a device on PCI",
                    reason="pci_device_id (a PCI slot) for a virtio-mmio device",
                )
        paths: set[str] = set()
        for index, vfio in enumerate(self.devices):
            if vfio.path.rstrip("/") in paths:
                raise ConfigError(f"devices[{index}].path", vfio.path, "a device not given twice")
            paths.add(vfio.path.rstrip("/"))
        if self.balloon is not None and self.balloon.size >= self.memory.boot_size:
            raise ConfigError(
                "balloon.size", self.balloon.size, f"less than the memory size ({self.memory.boot_size})"
            )

    # -- queries --

    def _all_devices(self) -> Iterator[tuple[str, Any]]:
        """``(JSON path, config)`` of every device config that has an ``id``."""
        for name in ("disks", "net", "fs", "pmem", "devices", "plugin_devices", "generic_vhost_user"):
            for index, device in enumerate(getattr(self, name)):
                yield f"{name}[{index}]", device
        yield "rng", self.rng
        yield "console", self.console
        for name in ("balloon", "vsock"):
            if getattr(self, name) is not None:
                yield name, getattr(self, name)

    @property
    def bootable(self) -> bool:
        """Whether the payload names a kernel, firmware or IGVM file."""
        p = self.payload
        return bool(p.kernel or p.firmware or p.igvm)

    @property
    def virtio_transport(self) -> str:
        """The VM's default virtio transport (``PlatformConfig.virtio_transport``, else pci)."""
        return (self.platform.virtio_transport if self.platform else None) or "pci"

    def transport_of(self, device: Any) -> str:
        """How a virtio device config attaches: its ``transport``, else the VM default."""
        return getattr(device, "transport", None) or self.virtio_transport

    @property
    def iommu_required(self) -> bool:
        """Whether the VM needs a virtual IOMMU (CH sets ``iommu`` itself in this case)."""
        return (
            self.iommu
            or any(getattr(d, "iommu", False) for _, d in self._all_devices())
            or bool(self.platform and self.platform.iommu_segments)
        )

    # -- changes --

    def with_disk(self, disk: DiskConfig) -> VmConfig:
        """A copy with ``disk`` added (``vm.add-disk``); :meth:`assign_ids` names it."""
        return attrs.evolve(self, disks=(*self.disks, disk))

    def with_net(self, net: NetConfig) -> VmConfig:
        """A copy with ``net`` added (``vm.add-net``)."""
        return attrs.evolve(self, net=(*self.net, net))

    def with_fs(self, fs: FsConfig) -> VmConfig:
        """A copy with ``fs`` added (``vm.add-fs``)."""
        return attrs.evolve(self, fs=(*self.fs, fs))

    def with_generic_vhost_user(self, device: GenericVhostUserConfig) -> VmConfig:
        """A copy with ``device`` added (``vm.add-generic-vhost-user``)."""
        return attrs.evolve(self, generic_vhost_user=(*self.generic_vhost_user, device))

    def with_pmem(self, pmem: PmemConfig) -> VmConfig:
        """A copy with ``pmem`` added (``vm.add-pmem``)."""
        return attrs.evolve(self, pmem=(*self.pmem, pmem))

    def with_device(self, device: DeviceConfig) -> VmConfig:
        """A copy with VFIO ``device`` added (``vm.add-device``)."""
        return attrs.evolve(self, devices=(*self.devices, device))

    def with_vsock(self, vsock: VsockConfig) -> VmConfig:
        """A copy with ``vsock`` set (``vm.add-vsock``); a VM has at most one."""
        if self.vsock is not None:
            raise ConfigError("vsock", vsock, "no vsock device yet", reason="vsock already present")
        return attrs.evolve(self, vsock=vsock)

    def with_plugin_device(self, device: PluginDeviceConfig) -> VmConfig:
        """A copy with plugin ``device`` added."""
        return attrs.evolve(self, plugin_devices=(*self.plugin_devices, device))

    def without_device(self, device_id: str) -> VmConfig:
        """A copy without the disk, net, fs, pmem, VFIO, vsock or plugin device ``device_id``
        (``vm.remove-device``).

        :raises ConfigError: no such removable device.
        """
        for name in ("disks", "net", "fs", "pmem", "devices", "plugin_devices", "generic_vhost_user"):
            items = getattr(self, name)
            kept = tuple(device for device in items if device.id != device_id)
            if len(kept) != len(items):
                changes: dict[str, Any] = {name: kept}
                return attrs.evolve(self, **changes)
        if self.vsock is not None and self.vsock.id == device_id:
            return attrs.evolve(self, vsock=None)
        raise ConfigError(
            "id",
            device_id,
            "the id of a disk, net, fs, pmem, VFIO, vsock or plugin device",
            reason=f"no device with id {device_id!r}",
        )

    def assign_ids(self) -> VmConfig:
        """A copy where every disk, net, fs, pmem, vsock, VFIO and plugin device has an id.

        Missing ids are made as CH does at VM creation: prefix (``_disk``, ``_net``, ``_fs``,
        ``_pmem``, ``_vsock``, ``_vfio``, ``_<type>`` for plugin devices) plus one counter shared
        by all devices, skipping names in use (``_disk0``, ``_net1``...). rng, console and balloon
        keep ``None``: CH names them ``__rng``, ``__console``, ``__balloon`` internally.
        """
        used = {device.id for _, device in self._all_devices() if device.id is not None}
        counter = 0

        def name(prefix: str) -> str:
            nonlocal counter
            while f"{prefix}{counter}" in used:
                counter += 1
            used.add(f"{prefix}{counter}")
            counter += 1
            return f"{prefix}{counter - 1}"

        def fill(items: tuple[Any, ...], prefix: Callable[[Any], str]) -> tuple[Any, ...]:
            return tuple(
                item if item.id is not None else attrs.evolve(item, id=name(prefix(item))) for item in items
            )

        disks = fill(self.disks, lambda _: "_disk")
        net = fill(self.net, lambda _: "_net")
        fs = fill(self.fs, lambda _: "_fs")
        pmem = fill(self.pmem, lambda _: "_pmem")
        vsock = self.vsock
        if vsock is not None and vsock.id is None:
            vsock = attrs.evolve(vsock, id=name("_vsock"))
        devices = fill(self.devices, lambda _: "_vfio")
        plugins = fill(self.plugin_devices, lambda d: f"_{d.type}")
        generic = fill(self.generic_vhost_user, lambda _: "_generic_vhost_user")
        return attrs.evolve(
            self,
            disks=disks,
            net=net,
            fs=fs,
            pmem=pmem,
            vsock=vsock,
            devices=devices,
            plugin_devices=plugins,
            generic_vhost_user=generic,
        )

    # -- construction --

    @classmethod
    def from_json(
        cls, obj: Mapping[str, Any], *, strict: bool = True, ignored: list[str] | None = None, section: str = ""
    ) -> Self:
        """Build from a CH ``VmConfig`` JSON object (already decoded, e.g. by ``json.loads``).

        Types are checked strictly (sizes are integers in bytes, booleans are ``true``/``false``);
        ``null`` means "the default", also for a key vmmkit does not know (older CH versions
        write every unset option). Keys of CH's schema that vmmkit does not support yet
        (``numa``...; :data:`vmmkit.config.support.NOT_SUPPORTED`) raise
        :class:`~vmmkit.config.support.NotSupportedYet` unless their value asks for nothing
        (``false``, ``[]``); any other unknown key raises :class:`ConfigError`. CH ignores unknown
        keys; vmmkit does not, so a misspelt key is never lost. ``strict=False`` reads leniently
        instead (a ``vm.info`` of another CH version): unknown keys are skipped, and their JSON
        paths appended to ``ignored`` if given. Errors name the JSON path (``memory.size``,
        ``disks[1].id``). Whether the VM's device plugins support the result is a separate check
        (:func:`vmmkit.config.check_supported`).
        """
        return super().from_json(obj, strict=strict, ignored=ignored, section=section)

    @classmethod
    def from_cli(
        cls,
        *,
        kernel: str | None = None,
        cmdline: str | None = None,
        initramfs: str | None = None,
        firmware: str | None = None,
        cpus: str | None = None,
        memory: str | None = None,
        memory_zones: Iterable[str] | None = (),
        disks: Iterable[str] | None = (),
        net: Iterable[str] | None = (),
        rng: str | None = None,
        serial: str | None = None,
        console: str | None = None,
        fs: Iterable[str] | None = (),
        pmem: Iterable[str] | None = (),
        vsock: str | None = None,
        devices: Iterable[str] | None = (),
        platform: str | None = None,
        plugin_devices: Iterable[PluginDeviceConfig | tuple[str, str]] | None = (),
        debug_console: str | None = None,
        balloon: str | None = None,
        watchdog: bool = False,
        pvpanic: bool = False,
        landlock_enable: bool = False,
        landlock_rules: Iterable[str] | None = (),
        rate_limit_groups: Iterable[str] | None = (),
        generic_vhost_user: Iterable[str] | None = (),
    ) -> VmConfig:
        """Build from raw command-line option values, CH's syntax (``None``: the default).

        Repeatable options take a list of values (``None`` is an empty list, as argparse's
        ``append`` leaves it); a plugin device is a :class:`PluginDeviceConfig` or a
        ``(type_name, spec)`` pair. Errors name the option (``--cpus``).
        """

        def many(values: Iterable[Any] | None) -> list[Any]:
            return [values] if isinstance(values, str) else list(values or ())

        plugins = [_plugin_device(d) for d in many(plugin_devices)]
        sections = dict(
            cpus=CpusConfig.parse(cpus) if cpus is not None else None,
            memory=_memory_from_cli(memory, tuple(MemoryZoneConfig.parse(spec) for spec in many(memory_zones))),
            disks=tuple(DiskConfig.parse(spec) for spec in many(disks)),
            net=tuple(NetConfig.parse(spec) for spec in many(net)),
            rng=RngConfig.parse(rng) if rng is not None else None,
            balloon=BalloonConfig.parse(balloon) if balloon is not None else None,
            fs=tuple(FsConfig.parse(spec) for spec in many(fs)),
            pmem=tuple(PmemConfig.parse(spec) for spec in many(pmem)),
            serial=SerialConfig.parse(serial) if serial is not None else None,
            console=ConsoleConfig.parse(console) if console is not None else None,
            debug_console=DebugConsoleConfig.parse(debug_console) if debug_console is not None else None,
            devices=tuple(DeviceConfig.parse(spec) for spec in many(devices)),
            vsock=VsockConfig.parse(vsock) if vsock is not None else None,
            platform=PlatformConfig.parse(platform) if platform is not None else None,
            plugin_devices=tuple(plugins),
            landlock_rules=tuple(LandlockConfig.parse(spec) for spec in many(landlock_rules)),
            rate_limit_groups=tuple(RateLimitGroupConfig.parse(spec) for spec in many(rate_limit_groups)),
            generic_vhost_user=tuple(GenericVhostUserConfig.parse(spec) for spec in many(generic_vhost_user)),
        )
        try:
            payload = PayloadConfig(kernel=kernel, cmdline=cmdline, initramfs=initramfs, firmware=firmware)
        except ConfigError as err:
            raise _relabel(err, f"--{err.option}", None) from None
        try:
            return _make(cls, payload=payload, watchdog=watchdog, pvpanic=pvpanic, landlock_enable=landlock_enable,
                         **sections)
        except ConfigError as err:
            raise _vm_error_for_cli(err, plugins) from None


def _check_rate_limit_groups(config: VmConfig) -> None:
    """Group ids are unique, and every disk's ``rate_limit_group`` names one (as CH checks)."""
    groups: set[str] = set()
    for index, group in enumerate(config.rate_limit_groups):
        if group.id in groups:
            raise ConfigError(f"rate_limit_groups[{index}].id", group.id, "an id no other rate limit group uses",
                              reason=f"duplicate rate limit group {group.id!r}")
        groups.add(group.id)
    for index, disk in enumerate(config.disks):
        if disk.rate_limit_group is not None and disk.rate_limit_group not in groups:
            raise ConfigError(f"disks[{index}].rate_limit_group", disk.rate_limit_group,
                              f"the id of a rate limit group ({', '.join(sorted(groups)) or 'none defined'})",
                              reason=f"no rate limit group {disk.rate_limit_group!r}")


def _memory_from_cli(memory: str | None, zones: tuple[MemoryZoneConfig, ...]) -> MemoryConfig | None:
    """``--memory`` with the ``--memory-zone`` values (zones need ``--memory size=0``, as in CH)."""
    if zones and memory is None:
        raise ConfigError("--memory-zone", zones[0].id, "--memory size=0 with it (guest RAM is the zones')")
    return MemoryConfig.parse(memory, zones) if memory is not None else None


def _plugin_device(value: Any) -> PluginDeviceConfig:
    if isinstance(value, PluginDeviceConfig):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(part, str) for part in value):
        return PluginDeviceConfig.parse(*value)
    raise ConfigError("plugin_devices", value, "a PluginDeviceConfig or a (type_name, spec) pair of strings")


_CLI_OPTIONS: Final[Mapping[str, tuple[str, type[Any] | None]]] = {
    "cpus": ("--cpus", CpusConfig),
    "memory": ("--memory", MemoryConfig),
    "memory_zones": ("--memory-zone", MemoryZoneConfig),  # memory.zones (see cli_location)
    "disks": ("--disk", DiskConfig),
    "net": ("--net", NetConfig),
    "rng": ("--rng", RngConfig),
    "balloon": ("--balloon", BalloonConfig),
    "fs": ("--fs", FsConfig),
    "pmem": ("--pmem", PmemConfig),
    "serial": ("--serial", SerialConfig),
    "console": ("--console", ConsoleConfig),
    "debug_console": ("--debug-console", DebugConsoleConfig),
    "devices": ("--device", DeviceConfig),
    "vsock": ("--vsock", VsockConfig),
    "platform": ("--platform", PlatformConfig),
    "watchdog": ("--watchdog", None),
    "pvpanic": ("--pvpanic", None),
    "landlock_enable": ("--landlock", None),
    "landlock_rules": ("--landlock-rules", LandlockConfig),
    "rate_limit_groups": ("--rate-limit-group", RateLimitGroupConfig),
    "generic_vhost_user": ("--generic-vhost-user", GenericVhostUserConfig),
}


def cli_location(path: str, plugins: Sequence[PluginDeviceConfig] = ()) -> tuple[str, str | None]:
    """The CLI option and key behind a VmConfig JSON path: ``disks[1].id`` -> ``("--disk", "id")``,
    ``payload.firmware`` -> ``("--firmware", None)``, ``plugin_devices[0]`` -> ``("--<type>", None)``."""
    head, _, rest = path.partition(".")
    section = _field_head(head)
    if section == "payload":
        return f"--{_field_head(rest)}", None
    if section == "memory" and _field_head(rest) == "zones":
        return "--memory-zone", _field_head(rest.partition(".")[2]) or None
    if section == "plugin_devices":
        match = re.fullmatch(r"plugin_devices\[(\d+)\]", head)
        index = int(match.group(1)) if match else len(plugins)
        option = f"--{plugins[index].type}" if index < len(plugins) else "--plugin"
        return option, _field_head(rest) or None
    option, config_class = _CLI_OPTIONS.get(section, (section, None))
    cli_keys: Mapping[str, str] = getattr(config_class, "_CLI_KEYS", {})
    key = _field_head(rest) if rest else None
    return option, cli_keys.get(key, key) if key else None


def _vm_error_for_cli(err: ConfigError, plugins: Sequence[PluginDeviceConfig]) -> ConfigError:
    """Name the CLI option behind a VmConfig-level error (``disks[1].id`` -> ``--disk``, id)."""
    if err.option.startswith("-"):
        return err
    option, key = cli_location(err.option, plugins)
    return _relabel(err, option, key)
