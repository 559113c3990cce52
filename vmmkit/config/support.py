"""What vmmkit does not support yet, in one table, and the check that refuses it by name.

Every Cloud Hypervisor option, sub-option and ``VmConfig`` key is either implemented or listed in
:data:`NOT_SUPPORTED` (its JSON path without list indices, ``"disks.vhost_user"``, mapped to a short
reason). Nothing is accepted and then ignored: a configuration that uses a listed key (a value other
than its default) is refused with a :class:`NotSupportedYet` error that names it, as the user wrote
it: ``--pmem: not supported yet (virtio-pmem devices)`` on the command line,
``disks[0].vhost_user: not supported yet (vhost-user block devices)`` from JSON. The CLI exits 2,
the API answers 400. Implementing a feature removes its entry.

Devices come from plugins, so a device section is not the core's to refuse for good: a device type
names the ``VmConfig`` sections it consumes in :attr:`vmmkit.device.DeviceType.sections`
(``("pmem",)``, or a finer path such as ``("disks.vhost_user",)``), and an entry a registered type
claims is no longer refused. A device section in use that no registered type claims is refused
too (:data:`DEVICE_SECTIONS`), so disabling a device plugin never leaves its options silently
ignored.

Keys of Cloud Hypervisor's schema that vmmkit's classes do not model at all (``numa``...) are
refused while decoding JSON (see :mod:`vmmkit.config.codec`); any other unknown key is refused
there as unknown. Cloud Hypervisor itself ignores unknown keys (its ``VmConfig`` has no
``#[serde(deny_unknown_fields)]``, ``vmm/src/vm_config.rs``); vmmkit refuses them, so a misspelt key is never lost.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

import attrs

from vmmkit.config.errors import ConfigError

_VFIO: Final = "VFIO device passthrough"
_IOMMU: Final = "a virtual IOMMU"
_SMBIOS: Final = "SMBIOS tables"
_VIRTIO_MEM: Final = "virtio-mem memory hotplug: no installed device type provides virtio-mem"

#: The one table of what vmmkit does not support yet: JSON path (no list indices) -> reason.
NOT_SUPPORTED: Final[Mapping[str, str]] = {
    # payload
    "payload.firmware": "booting a firmware image; boot a kernel with --kernel",
    "payload.igvm": "IGVM payloads",
    "payload.host_data": "confidential-guest host data",
    # vCPUs
    "cpus.kvm_hyperv": "Hyper-V enlightenments",
    "cpus.affinity": "pinning vCPUs to host CPUs",
    "cpus.core_scheduling": "core scheduling",
    # memory
    "memory.hugepage_size": "choosing the huge page size (hugepages=on uses the host's default)",
    # claimed by the virtio-mem device type (vmmkit-devices); the default method, Acpi, is the core's
    "memory.hotplug_method": _VIRTIO_MEM,
    "memory.hotplugged_size": _VIRTIO_MEM,  # virtio-mem only, as in Cloud Hypervisor
    "memory.reserve": "reserving swap space for guest RAM (it is mapped MAP_NORESERVE)",
    "memory.zones.host_numa_node": "placing a memory zone on a host NUMA node",
    "memory.zones.hugepage_size": "choosing the huge page size (hugepages=on uses the host's default)",
    "memory.zones.reserve": "reserving swap space for guest RAM (it is mapped MAP_NORESERVE)",
    # disks
    "disks.vhost_user": "vhost-user block devices",
    "disks.vhost_socket": "vhost-user block devices",
    # claimed by the virtio-blk device type (vmmkit-devices)
    "disks.rate_limiter_config": "disk rate limits",
    "disks.rate_limit_group": "rate limit groups",
    "disks.queue_affinity": "queue affinity",
    "disks.iommu": _IOMMU,
    # Cloud Hypervisor's testing switch, sent (false) by Kata's runtime-rs with every disk
    "disks.disable_io_uring": "choosing the disk I/O engine",
    "disks.disable_aio": "choosing the disk I/O engine",
    # nets
    "net.vhost_user": "vhost-user network devices",
    "net.vhost_socket": "vhost-user network devices",
    "net.vhost_mode": "vhost-user network devices",
    # claimed by the virtio-net device type (vmmkit-devices)
    "net.rate_limiter_config": "network rate limits",
    "net.iommu": _IOMMU,
    # other built-in devices
    "rng.iommu": _IOMMU,
    "console.iommu": _IOMMU,
    # CH's serial is a ConsoleConfig: Kata's Go client sends {"mode": ..., "iommu": false}
    "serial.iommu": _IOMMU,
    "balloon.iommu": _IOMMU,
    "vsock.iommu": _IOMMU,
    "pmem.iommu": _IOMMU,
    # device sections no in-tree device type implements yet
    "fs": "virtio-fs devices",
    "pmem": "virtio-pmem devices",
    "devices": _VFIO,
    # claimed by the vfio-pci device type (vmmkit-devices) but for these keys
    "devices.iommu": _IOMMU,
    "devices.pci_segment": "VFIO devices on PCI segments other than 0",
    "devices.x_nv_gpudirect_clique": "NVIDIA GPUDirect peer-to-peer cliques",
    "user_devices": "vfio-user devices",
    "vdpa": "vDPA devices",
    "generic_vhost_user": "generic vhost-user devices",
    "watchdog": "a watchdog device (no registered device type claims it)",
    "tpm": "TPM devices",
    "rtc": "configuring the RTC device",
    # the VM
    "iommu": _IOMMU,
    "numa": "guest NUMA nodes",
    "pci_segments": "PCI segment apertures",
    # platform
    "platform.iommu_segments": _IOMMU,
    "platform.iommu_address_width_bits": _IOMMU,
    "platform.system_serial_number": _SMBIOS,
    "platform.system_uuid": _SMBIOS,
    "platform.oem_strings": _SMBIOS,
    "platform.system_manufacturer": _SMBIOS,
    "platform.system_product_name": _SMBIOS,
    "platform.system_version": _SMBIOS,
    "platform.system_family": _SMBIOS,
    "platform.system_sku_number": _SMBIOS,
    "platform.chassis_asset_tag": _SMBIOS,
    "platform.tdx": "Intel TDX guests",
    "platform.sev_snp": "AMD SEV-SNP guests",
    "platform.iommufd": _VFIO,
    "platform.vfio_p2p_dma": _VFIO,
}

#: The ``VmConfig`` sections that device types consume: one in use must be claimed by a registered
#: type (:attr:`vmmkit.device.DeviceType.sections`), or it is refused.
DEVICE_SECTIONS: Final = (
    "disks",
    "net",
    "rng",
    "balloon",
    "fs",
    "generic_vhost_user",
    "pmem",
    "serial",
    "console",
    "debug_console",
    "devices",
    "vsock",
    "watchdog",
    "pvpanic",
)

_INDEX: Final = re.compile(r"\[\d+\]")


class NotSupportedYet(ConfigError):
    """A configuration asks for something vmmkit does not support yet (an entry of
    :data:`NOT_SUPPORTED`, or a device section no registered device type consumes).

    ``str()``: ``--disk: vhost_user is not supported yet (vhost-user block devices)`` or
    ``numa: not supported yet (guest NUMA nodes)``; ``also`` lists further uses, appended
    after ``; also``. A :class:`ConfigError`: CLI exit 2, API 400.
    """

    def __init__(
        self, option: str, value: object, reason: str, *, key: str | None = None, also: tuple[str, ...] = ()
    ) -> None:
        super().__init__(option, value, "", key=key, reason=reason)
        self.also = also

    def __str__(self) -> str:
        what = f"{self.key} is not supported yet" if self.key else "not supported yet"
        return "; also ".join((f"{self.option}: {what} ({self.reason})", *self.also))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.option, self.value, self.reason, self.key, self.also))


def _rebuild(option: str, value: object, reason: str, key: str | None, also: tuple[str, ...]) -> NotSupportedYet:
    return NotSupportedYet(option, value, reason, key=key, also=also)


@attrs.frozen
class Refusal:
    """One use of something not supported: ``path`` where it is (``"disks[0].vhost_user"``),
    ``entry`` the table key (``"disks.vhost_user"``), ``value`` and ``reason``."""

    path: str
    entry: str
    value: Any
    reason: str


def table_path(path: str) -> str:
    """A JSON path without its list indices: ``disks[1].vhost_user`` -> ``disks.vhost_user``."""
    return _INDEX.sub("", path)


def unmodelled_refusal(path: str, value: Any) -> NotSupportedYet | None:
    """The error for a JSON key the configuration classes do not model, ``None`` when it is not in
    the table or its value asks for nothing (``false``, ``[]``, ``{}``; ``null`` never gets here)."""
    reason = NOT_SUPPORTED.get(table_path(path))
    if reason is None or value is False or value == [] or value == {}:
        return None
    return NotSupportedYet(path, value, reason)


def refusals(config: Any, claimed_sections: Iterable[str] = ()) -> list[Refusal]:
    """Every place ``config`` (a :class:`~vmmkit.config.VmConfig`) uses something not supported:
    a :data:`NOT_SUPPORTED` entry set to a value other than its default and not claimed by a
    device type, or a :data:`DEVICE_SECTIONS` section in use that no device type claims.

    :param claimed_sections: the sections (or finer paths) the registered device types consume,
        see :func:`vmmkit.device.claimed_sections`.
    """
    claimed = frozenset(claimed_sections)
    out: list[Refusal] = []
    for entry, reason in NOT_SUPPORTED.items():
        if entry not in claimed:
            out.extend(Refusal(path, entry, value, reason) for path, value in _uses(config, entry.split("."), ""))
    refused = {refusal.entry for refusal in out}
    for section in DEVICE_SECTIONS:
        if section in claimed or section in refused:
            continue
        for path, value in _uses(config, [section], ""):
            out.append(Refusal(path, section, value, "no installed device type consumes it"))
    return out


def check_supported(config: Any, claimed_sections: Iterable[str] = (), *, cli: bool = False) -> None:
    """Refuse ``config`` if it uses anything :func:`refusals` finds.

    :param cli: name the command-line option (``--disk: vhost_user``) instead of the JSON path
        (``disks[0].vhost_user``).
    :raises NotSupportedYet: naming the first use, and listing the others on the same line.
    """
    found = refusals(config, claimed_sections)
    if not found:
        return
    first, *others = [_error(refusal, config, cli) for refusal in found]
    if others:
        first.also = tuple(str(err) for err in others)
    raise first


def _error(refusal: Refusal, config: Any, cli: bool) -> NotSupportedYet:
    if not cli:
        return NotSupportedYet(refusal.path, refusal.value, refusal.reason)
    from vmmkit.config.vm import cli_location  # vm -> codec -> this module: import on use

    option, key = cli_location(refusal.path, config.plugin_devices)
    return NotSupportedYet(option, refusal.value, refusal.reason, key=key)


def _uses(obj: Any, parts: list[str], path: str) -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of each place field path ``parts`` holds a value other than its default."""
    name, rest = parts[0], parts[1:]
    field = attrs.fields_dict(type(obj)).get(name) if attrs.has(type(obj)) else None
    if field is None:
        return  # a key the classes do not model: refused while decoding JSON
    value = getattr(obj, name)
    here = f"{path}.{name}" if path else name
    if not rest:
        if value != _default(field, obj):
            yield here, value
        return
    items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
    for index, item in items:
        if item is not None:
            yield from _uses(item, rest, here if index is None else f"{here}[{index}]")


def _default(field: attrs.Attribute[Any], obj: Any) -> Any:
    default: Any = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]  # attrs types Factory as a function
        return default.factory(obj) if default.takes_self else default.factory()
    return default
