"""The VM configuration: frozen attrs classes mirroring Cloud Hypervisor's ``VmConfig``.

Field names are the JSON property names of CH's OpenAPI schema (``vm.create`` bodies) and
defaults are CH's, so a CH JSON body round-trips. A configuration comes from:

- the command line: each class has ``parse(spec)`` for its option's ``k=v,...`` value, with CH's
  syntax (``--disk path=a.img,readonly=on``), and :meth:`VmConfig.from_cli` builds the whole VM;
- JSON: :meth:`VmConfig.from_json` / :meth:`VmConfig.to_json` (sizes are integers in bytes);
- Python: ``VmConfig(memory=MemoryConfig(size="1G"), disks=[DiskConfig(path="a.img")])``;
  change one with ``attrs.evolve`` or the ``with_*`` / ``without_device`` helpers.

Every rejected value raises :class:`ConfigError` (a ``ValueError`` and a
:class:`vmmkit.errors.VmmError`), whichever way it came in.

Differences from Cloud Hypervisor, on purpose:

- The default serial port is ``tty`` and the default virtio console ``off`` (CH: serial ``null``,
  console ``tty``): a vmmkit guest talks on its serial port, like most kernels expect.
- ``NetConfig.mac`` defaults to ``None`` (a MAC is generated when the VM is created) where CH picks
  a random one while parsing, so parsing is deterministic.
- ``max_vcpus`` is at most 254 (:data:`MAX_VCPUS`: 8-bit xAPIC ids, 255 being the broadcast
  id); recent CH versions allow more.
- ``iommu`` is kept as given; CH turns it on when any device asks for an IOMMU, which
  :attr:`VmConfig.iommu_required` reports instead.
- Unknown JSON keys are refused (CH ignores them: its ``VmConfig`` has no
  ``deny_unknown_fields``) and missing ones take vmmkit's defaults, see :meth:`VmConfig.from_json`.
- What vmmkit does not support yet is refused by name, never accepted and ignored
  (:mod:`~vmmkit.config.support`, :func:`check_supported`): CLI exit 2, API 400.
- Validation happens on construction, not at VM creation; ``attrs.evolve`` re-validates.

vmmkit extensions (optional, left out of ``to_json()`` while unset, so CH JSON round-trips):
``transport`` (``"pci"`` | ``"mmio"`` | ``None`` for the VM default) on every virtio device
config, ``PlatformConfig.virtio_transport`` (the VM default, ``"pci"``) and
``VmConfig.plugin_devices`` (:class:`PluginDeviceConfig`, devices from third-party plugins).

The package, by concern: :mod:`~vmmkit.config.errors` (:class:`ConfigError`),
:mod:`~vmmkit.config.options` (CH's ``k=v,...`` option syntax), :mod:`~vmmkit.config.codec`
(JSON), :mod:`~vmmkit.config.fields` (limits, validators), the sections
(:mod:`~vmmkit.config.cpus`, :mod:`~vmmkit.config.disk_net`, :mod:`~vmmkit.config.devices`,
:mod:`~vmmkit.config.consoles`, :mod:`~vmmkit.config.platform`) and :mod:`~vmmkit.config.vm`
(:class:`VmConfig`), and :mod:`~vmmkit.config.support` (what is not supported yet).
Import every public name from ``vmmkit.config`` itself.
"""

from __future__ import annotations

from vmmkit.config.consoles import ConsoleConfig, DebugConsoleConfig, SerialConfig
from vmmkit.config.cpus import CpuAffinity, CpuFeatures, CpusConfig, CpuTopology, MemoryConfig
from vmmkit.config.devices import (
    BalloonConfig,
    DeviceConfig,
    FsConfig,
    PluginDeviceConfig,
    PmemConfig,
    RngConfig,
    VsockConfig,
)
from vmmkit.config.disk_net import (
    DiskConfig,
    NetConfig,
    RateLimiterConfig,
    RateLimitGroupConfig,
    TokenBucket,
    VirtQueueAffinity,
)
from vmmkit.config.errors import ConfigError
from vmmkit.config.fields import MAX_VCPUS, TRANSPORTS
from vmmkit.config.generic_vhost_user import GenericVhostUserConfig
from vmmkit.config.landlock import LandlockConfig
from vmmkit.config.memory_zones import MemoryZoneConfig
from vmmkit.config.options import OptionParser, ParsedOptions, split_commas
from vmmkit.config.platform import PlatformConfig
from vmmkit.config.support import NOT_SUPPORTED, NotSupportedYet, Refusal, check_supported, refusals
from vmmkit.config.vm import PayloadConfig, VmConfig

__all__ = [
    "ConfigError",
    "LandlockConfig",
    "OptionParser",
    "ParsedOptions",
    "split_commas",
    "PayloadConfig",
    "CpuTopology",
    "CpuAffinity",
    "CpuFeatures",
    "CpusConfig",
    "MemoryConfig",
    "MemoryZoneConfig",
    "TokenBucket",
    "RateLimiterConfig",
    "RateLimitGroupConfig",
    "VirtQueueAffinity",
    "DiskConfig",
    "NetConfig",
    "RngConfig",
    "BalloonConfig",
    "FsConfig",
    "GenericVhostUserConfig",
    "PmemConfig",
    "SerialConfig",
    "ConsoleConfig",
    "DebugConsoleConfig",
    "DeviceConfig",
    "VsockConfig",
    "PlatformConfig",
    "PluginDeviceConfig",
    "VmConfig",
    "MAX_VCPUS",
    "TRANSPORTS",
    "NOT_SUPPORTED",
    "NotSupportedYet",
    "Refusal",
    "check_supported",
    "refusals",
]

