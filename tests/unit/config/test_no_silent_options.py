"""Nothing accepted in silence (issue #12): every Cloud Hypervisor ``VmConfig`` key (walked from
CH's OpenAPI document, every property of every sub-schema), every vmmkit extension and every
command-line option and sub-option either works or is refused by name.

"Works" is checked, not just declared: each implemented path is listed in :data:`IMPLEMENTED`
and a sample sets it (the value lands in the parsed ``VmConfig`` and survives JSON). A refused one
is covered by :data:`vmmkit.config.NOT_SUPPORTED` and really raises, naming it: through
:func:`check_supported`, through the real ``vmmkit`` entry point (exit 2) and through the real API
server (400). A new schema key, CLI option or sub-option left unclassified fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Container, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import yaml

from vmmkit.api.client import ApiClient
from vmmkit.api.server import ApiServer, bind_unix_socket
from vmmkit.cli import _UNMODELLED_OPTIONS, _VM_OPTIONS, build_parser
from vmmkit.config import (
    NOT_SUPPORTED,
    ConfigError,
    NotSupportedYet,
    PlatformConfig,
    VmConfig,
    check_supported,
    refusals,
)
from vmmkit.config.support import DEVICE_SECTIONS, table_path
from vmmkit.config.vm import _CLI_OPTIONS
from vmmkit.device import DeviceType, claimed_sections
from vmmkit.vmm import Vmm

SPEC = Path(__file__).parents[3].parent / "shared" / "specs" / "cloud-hypervisor.yaml"

#: What works: JSON paths (no indices) of leaves (or leaf objects) vmmkit implements. A path below
#: one listed here counts as listed.
IMPLEMENTED = frozenset({
    "payload.kernel", "payload.cmdline", "payload.initramfs",
    "cpus.boot_vcpus", "cpus.max_vcpus", "cpus.topology", "cpus.max_phys_bits", "cpus.nested",
    "cpus.features.amx",
    "memory.size", "memory.mergeable", "memory.shared", "memory.hugepages", "memory.prefault",
    "memory.thp", "memory.hotplug_size",
    "memory.zones.id", "memory.zones.size", "memory.zones.file", "memory.zones.mergeable", "memory.zones.shared",
    "memory.zones.hugepages", "memory.zones.hotplug_size", "memory.zones.hotplugged_size", "memory.zones.prefault",
    "disks.path", "disks.readonly", "disks.direct", "disks.num_queues", "disks.queue_size", "disks.id",
    "disks.serial", "disks.sparse", "disks.image_type", "disks.lock_granularity", "disks.pci_device_id",
    "disks.transport", "disks.backing_files",
    # offload_*: the device offers no offloads, which is what "off" asks for; "on" (CH's default)
    # cannot be told apart from "not given" and is a performance hint, see vmmkit_devices.virtio.net
    "net.tap", "net.ip", "net.mask", "net.mac", "net.host_mac", "net.mtu", "net.num_queues",
    "net.queue_size", "net.id", "net.fds", "net.pci_device_id", "net.transport",
    "net.offload_tso", "net.offload_ufo", "net.offload_csum",
    "rng.src", "rng.id", "rng.pci_device_id", "rng.transport",
    "balloon.size", "balloon.deflate_on_oom", "balloon.free_page_reporting", "balloon.id",
    "balloon.pci_device_id", "balloon.transport",
    "serial.file", "serial.socket", "serial.mode",
    "console.file", "console.socket", "console.mode", "console.id", "console.pci_device_id",
    "console.transport",
    "vsock.cid", "vsock.socket", "vsock.id", "vsock.pci_device_id", "vsock.transport",
    "pmem.file", "pmem.size", "pmem.discard_writes", "pmem.id", "pmem.pci_device_id", "pmem.transport",
    "pmem.pci_segment",
    "debug_console.file", "debug_console.mode", "debug_console.iobase",
    "pvpanic",
    "platform.virtio_transport", "platform.num_pci_segments",
    "disks.pci_segment", "net.pci_segment", "rng.pci_segment", "balloon.pci_segment", "console.pci_segment",
    "vsock.pci_segment",
    "plugin_devices",
    "landlock_enable", "landlock_rules.path", "landlock_rules.access",
    "rate_limit_groups.id", "rate_limit_groups.rate_limiter_config",
})

#: One sample per CLI option and sub-option: (option, key or None) -> (value of that option,
#: other ``VmConfig.from_cli`` arguments it needs, the JSON path it sets (``""``: the value is the
#: default), the text a refusal names if not the key).
Sample = tuple[str, Mapping[str, Any], str, str | None]
SHARED = {"memory": "shared=on"}
#: Memory zones need --memory size=0; the defaults compare against zone z0 of 1 GiB.
ZONES = {"memory": "size=0", "memory_zones": ["id=z0,size=1G"]}
ZONES_VIRTIO_MEM = {"memory": "size=0,hotplug_method=virtio-mem", "memory_zones": ["id=z0,size=1G"]}
SEG2 = {"platform": "num_pci_segments=2"}
GROUP = {"rate_limit_groups": ["id=g,ops_size=5,ops_refill_time=5"]}
CLI_SAMPLES: Mapping[tuple[str, str | None], Sample] = {
    ("--kernel", None): ("/k", {}, "payload.kernel", None),
    ("--cmdline", None): ("console=ttyS0", {}, "payload.cmdline", None),
    ("--initramfs", None): ("/i", {}, "payload.initramfs", None),
    ("--firmware", None): ("/fw", {}, "payload.firmware", None),
    ("--cpus", "boot"): ("boot=2", {}, "cpus.boot_vcpus", None),
    ("--cpus", "max"): ("max=4", {}, "cpus.max_vcpus", None),
    ("--cpus", "topology"): ("boot=4,topology=1:2:1:2", {}, "cpus.topology", None),
    ("--cpus", "kvm_hyperv"): ("kvm_hyperv=on", {}, "cpus.kvm_hyperv", None),
    ("--cpus", "max_phys_bits"): ("max_phys_bits=40", {}, "cpus.max_phys_bits", None),
    ("--cpus", "affinity"): ("affinity=[0@[0]]", {}, "cpus.affinity", None),
    ("--cpus", "features"): ("features=amx", {}, "cpus.features.amx", None),
    ("--cpus", "nested"): ("nested=off", {}, "cpus.nested", None),
    ("--cpus", "core_scheduling"): ("core_scheduling=vcpu", {}, "cpus.core_scheduling", None),
    ("--memory", "size"): ("size=1G", {}, "memory.size", None),
    ("--memory", "mergeable"): ("mergeable=on", {}, "memory.mergeable", None),
    ("--memory", "shared"): ("shared=on", {}, "memory.shared", None),
    ("--memory", "hugepages"): ("hugepages=on", {}, "memory.hugepages", None),
    ("--memory", "hugepage_size"): ("hugepages=on,hugepage_size=2M", {}, "memory.hugepage_size", None),
    ("--memory", "hotplug_method"): ("hotplug_method=virtio-mem", {}, "memory.hotplug_method", None),
    ("--memory", "hotplug_size"): ("hotplug_size=1G", {}, "memory.hotplug_size", None),
    ("--memory", "hotplugged_size"): ("hotplug_size=1G,hotplugged_size=512M", {}, "memory.hotplugged_size",
                                      None),
    ("--memory", "prefault"): ("prefault=on", {}, "memory.prefault", None),
    ("--memory", "thp"): ("thp=off", {}, "memory.thp", None),
    ("--memory-zone", None): ("id=z0,size=1G", ZONES, "", None),
    ("--memory-zone", "id"): ("id=z1,size=1G", ZONES, "memory.zones.id", None),
    ("--memory-zone", "size"): ("id=z0,size=2G", ZONES, "memory.zones.size", None),
    ("--memory-zone", "file"): ("id=z0,size=1G,file=/dev/shm/z0", ZONES, "memory.zones.file", None),
    ("--memory-zone", "mergeable"): ("id=z0,size=1G,mergeable=on", ZONES, "memory.zones.mergeable", None),
    ("--memory-zone", "shared"): ("id=z0,size=1G,shared=on", ZONES, "memory.zones.shared", None),
    ("--memory-zone", "hugepages"): ("id=z0,size=1G,hugepages=on", ZONES, "memory.zones.hugepages", None),
    ("--memory-zone", "hugepage_size"): ("id=z0,size=1G,hugepages=on,hugepage_size=2M", ZONES,
                                         "memory.zones.hugepage_size", None),
    ("--memory-zone", "host_numa_node"): ("id=z0,size=1G,host_numa_node=0", ZONES, "memory.zones.host_numa_node",
                                          None),
    ("--memory-zone", "hotplug_size"): ("id=z0,size=1G,hotplug_size=1G", ZONES_VIRTIO_MEM,
                                        "memory.zones.hotplug_size", None),
    ("--memory-zone", "hotplugged_size"): ("id=z0,size=1G,hotplug_size=1G,hotplugged_size=512M",
                                           ZONES_VIRTIO_MEM, "memory.zones.hotplugged_size", None),
    ("--memory-zone", "prefault"): ("id=z0,size=1G,prefault=on", ZONES, "memory.zones.prefault", None),
    ("--disk", "path"): ("path=a.img", {}, "disks.path", None),
    ("--disk", "readonly"): ("path=a.img,readonly=on", {}, "disks.readonly", None),
    ("--disk", "direct"): ("path=a.img,direct=on", {}, "disks.direct", None),
    ("--disk", "num_queues"): ("path=a.img,num_queues=2", {}, "disks.num_queues", None),
    ("--disk", "queue_size"): ("path=a.img,queue_size=256", {}, "disks.queue_size", None),
    ("--disk", "vhost_user"): ("vhost_user=on,socket=/s", SHARED, "disks.vhost_user", None),
    ("--disk", "socket"): ("vhost_user=on,socket=/s", SHARED, "disks.vhost_socket", "socket"),
    **{("--disk", key): (f"path=a.img,{key}=9,{key[:key.index('_')]}_size=5,{key[:key.index('_')]}_refill_time=5",
                         {}, "disks.rate_limiter_config", "bw_*/ops_*")
       for key in ("bw_size", "bw_one_time_burst", "bw_refill_time", "ops_size", "ops_one_time_burst",
                   "ops_refill_time")},
    ("--disk", "serial"): ("path=a.img,serial=abc", {}, "disks.serial", None),
    ("--disk", "rate_limit_group"): ("path=a.img,rate_limit_group=g", GROUP, "disks.rate_limit_group", None),
    ("--disk", "queue_affinity"): ("path=a.img,queue_affinity=[0@[0]]", {}, "disks.queue_affinity", None),
    ("--disk", "backing_files"): ("path=a.img,backing_files=on", {}, "disks.backing_files", None),
    ("--disk", "sparse"): ("path=a.img,sparse=off", {}, "disks.sparse", None),
    ("--disk", "image_type"): ("path=a.img,image_type=raw", {}, "disks.image_type", None),
    ("--disk", "lock_granularity"): ("path=a.img,lock_granularity=full", {}, "disks.lock_granularity", None),
    ("--disk", "id"): ("path=a.img,id=d0", {}, "disks.id", None),
    ("--disk", "iommu"): ("path=a.img,iommu=on", {}, "disks.iommu", None),
    ("--disk", "pci_segment"): ("path=a.img,pci_segment=1", SEG2, "disks.pci_segment", None),
    ("--disk", "pci_device_id"): ("path=a.img,pci_device_id=7", {}, "disks.pci_device_id", None),
    ("--disk", "transport"): ("path=a.img,transport=mmio", {}, "disks.transport", None),
    ("--net", "tap"): ("tap=tap0", {}, "net.tap", None),
    ("--net", "ip"): ("ip=10.0.0.1", {}, "net.ip", None),
    ("--net", "mask"): ("mask=255.255.0.0", {}, "net.mask", None),
    ("--net", "mac"): ("mac=12:34:56:78:9a:bc", {}, "net.mac", None),
    ("--net", "host_mac"): ("host_mac=12:34:56:78:9a:bd", {}, "net.host_mac", None),
    ("--net", "mtu"): ("mtu=1400", {}, "net.mtu", None),
    ("--net", "num_queues"): ("num_queues=4", {}, "net.num_queues", None),
    ("--net", "queue_size"): ("queue_size=512", {}, "net.queue_size", None),
    ("--net", "vhost_user"): ("vhost_user=on,socket=/s", SHARED, "net.vhost_user", None),
    ("--net", "socket"): ("vhost_user=on,socket=/s", SHARED, "net.vhost_socket", "socket"),
    ("--net", "vhost_mode"): ("vhost_user=on,socket=/s,vhost_mode=server", SHARED, "net.vhost_mode", None),
    ("--net", "fd"): ("fd=[3]", {}, "net.fds", None),
    **{("--net", key): (f"{key}=9,{key[:key.index('_')]}_size=5,{key[:key.index('_')]}_refill_time=5",
                        {}, "net.rate_limiter_config", "bw_*/ops_*")
       for key in ("bw_size", "bw_one_time_burst", "bw_refill_time", "ops_size", "ops_one_time_burst",
                   "ops_refill_time")},
    ("--net", "offload_tso"): ("offload_tso=off", {}, "net.offload_tso", None),
    ("--net", "offload_ufo"): ("offload_ufo=off", {}, "net.offload_ufo", None),
    ("--net", "offload_csum"): ("offload_tso=off,offload_ufo=off,offload_csum=off", {}, "net.offload_csum", None),
    ("--net", "id"): ("id=n0", {}, "net.id", None),
    ("--net", "iommu"): ("iommu=on", {}, "net.iommu", None),
    ("--net", "pci_segment"): ("pci_segment=1", SEG2, "net.pci_segment", None),
    ("--net", "pci_device_id"): ("pci_device_id=7", {}, "net.pci_device_id", None),
    ("--net", "transport"): ("transport=mmio", {}, "net.transport", None),
    ("--rng", "src"): ("src=/dev/random", {}, "rng.src", None),
    ("--rng", "id"): ("id=r0", {}, "rng.id", None),
    ("--rng", "iommu"): ("iommu=on", {}, "rng.iommu", None),
    ("--rng", "pci_segment"): ("pci_segment=1", SEG2, "rng.pci_segment", None),
    ("--rng", "pci_device_id"): ("pci_device_id=7", {}, "rng.pci_device_id", None),
    ("--rng", "transport"): ("transport=mmio", {}, "rng.transport", None),
    ("--balloon", None): ("size=1M", {}, "balloon.size", None),
    ("--balloon", "size"): ("size=1M", {}, "balloon.size", None),
    ("--balloon", "deflate_on_oom"): ("deflate_on_oom=on", {}, "balloon.deflate_on_oom", None),
    ("--balloon", "free_page_reporting"): ("free_page_reporting=on", {}, "balloon.free_page_reporting", None),
    ("--balloon", "transport"): ("transport=mmio", {}, "balloon.transport", None),
    ("--balloon", "id"): ("id=b0", {}, "balloon.id", None),
    ("--balloon", "iommu"): ("iommu=on", {}, "balloon.iommu", None),
    ("--balloon", "pci_segment"): ("pci_segment=1", SEG2, "balloon.pci_segment", None),
    ("--balloon", "pci_device_id"): ("pci_device_id=7", {}, "balloon.pci_device_id", None),
    **{("--fs", key): ("tag=t,socket=/s" + extra, SHARED, "fs", None)
       for key, extra in (("tag", ""), ("socket", ""), ("num_queues", ",num_queues=2"),
                          ("queue_size", ",queue_size=512"), ("id", ",id=f"), ("pci_segment", ""),
                          ("pci_device_id", ",pci_device_id=7"), ("transport", ",transport=mmio"))},
    **{("--generic-vhost-user", key): ("socket=/s,virtio_id=2,queue_sizes=[128]" + extra, SHARED,
                                       "generic_vhost_user", None)
       for key, extra in (("socket", ""), ("virtio_id", ""), ("queue_sizes", ",queue_sizes=[128,64]"),
                          ("id", ",id=g"), ("pci_segment", ""), ("pci_device_id", ",pci_device_id=7"),
                          ("transport", ",transport=mmio"))},
    ("--generic-vhost-user", "device_type"): ("socket=/s,device_type=26,queue_sizes=[128]", SHARED,
                                              "generic_vhost_user", None),
    ("--pmem", "file"): ("file=/p.img", {}, "pmem.file", None),
    ("--pmem", "size"): ("file=/p.img,size=2M", {}, "pmem.size", None),
    ("--pmem", "discard_writes"): ("file=/p.img,discard_writes=on", {}, "pmem.discard_writes", None),
    ("--pmem", "id"): ("file=/p.img,id=p", {}, "pmem.id", None),
    ("--pmem", "iommu"): ("file=/p.img,iommu=on", {}, "pmem.iommu", None),
    ("--pmem", "pci_segment"): ("file=/p.img,pci_segment=1", SEG2, "pmem.pci_segment", None),
    ("--pmem", "pci_device_id"): ("file=/p.img,pci_device_id=7", {}, "pmem.pci_device_id", None),
    ("--pmem", "transport"): ("file=/p.img,transport=mmio", {}, "pmem.transport", None),
    ("--serial", "off"): ("off", {}, "serial.mode", None),
    ("--serial", "pty"): ("pty", {}, "serial.mode", None),
    ("--serial", "tty"): ("tty", {}, "", None),  # "": the default, nothing to change
    ("--serial", "null"): ("null", {}, "serial.mode", None),
    ("--serial", "file"): ("file=/tmp/s.log", {}, "serial.file", None),
    ("--serial", "socket"): ("socket=/tmp/s.sock", {}, "serial.socket", None),
    ("--console", "off"): ("off", {}, "", None),
    ("--console", "pty"): ("pty", {}, "console.mode", None),
    ("--console", "tty"): ("tty", {}, "console.mode", None),
    ("--console", "null"): ("null", {}, "console.mode", None),
    ("--console", "file"): ("file=/tmp/c.log", {}, "console.file", None),
    ("--console", "socket"): ("socket=/tmp/c.sock", {}, "console.socket", None),
    ("--console", "id"): ("tty,id=c0", {}, "console.id", None),
    ("--console", "iommu"): ("tty,iommu=on", {}, "console.iommu", None),
    ("--console", "pci_segment"): ("tty,pci_segment=1", SEG2, "console.pci_segment", None),
    ("--console", "pci_device_id"): ("tty,pci_device_id=7", {}, "console.pci_device_id", None),
    ("--console", "transport"): ("tty,transport=mmio", {}, "console.transport", None),
    ("--debug-console", "off"): ("off", {}, "", None),
    ("--debug-console", "pty"): ("pty", {}, "debug_console.mode", None),
    ("--debug-console", "tty"): ("tty", {}, "debug_console.mode", None),
    ("--debug-console", "null"): ("null", {}, "debug_console.mode", None),
    ("--debug-console", "file"): ("file=/tmp/d.log", {}, "debug_console.file", None),
    ("--debug-console", "iobase"): ("tty,iobase=0x402", {}, "debug_console.iobase", None),
    **{("--device", key): ("path=/sys/bus/pci/devices/0000:01:00.0" + extra, {}, "devices", None)
       for key, extra in (("path", ""), ("id", ",id=v"), ("pci_segment", ""),
                          ("pci_device_id", ",pci_device_id=7"))},
    # the vfio-pci device type claims "devices" but for these (vmmkit.config.support)
    ("--device", "iommu"): ("path=/sys/bus/pci/devices/0000:01:00.0,iommu=on", {}, "devices.iommu", None),
    ("--device", "x_nv_gpudirect_clique"): ("path=/sys/bus/pci/devices/0000:01:00.0,x_nv_gpudirect_clique=1", {},
                                            "devices.x_nv_gpudirect_clique", None),
    ("--vsock", "cid"): ("cid=3,socket=/v", {}, "vsock.cid", None),
    ("--vsock", "socket"): ("cid=3,socket=/v", {}, "vsock.socket", None),
    ("--vsock", "id"): ("cid=3,socket=/v,id=v", {}, "vsock.id", None),
    ("--vsock", "iommu"): ("cid=3,socket=/v,iommu=on", {}, "vsock.iommu", None),
    ("--vsock", "pci_segment"): ("cid=3,socket=/v,pci_segment=1", SEG2, "vsock.pci_segment", None),
    ("--vsock", "pci_device_id"): ("cid=3,socket=/v,pci_device_id=7", {}, "vsock.pci_device_id", None),
    ("--vsock", "transport"): ("cid=3,socket=/v,transport=mmio", {}, "vsock.transport", None),
    ("--platform", "num_pci_segments"): ("num_pci_segments=2", {}, "platform.num_pci_segments", None),
    ("--platform", "iommu_segments"): ("num_pci_segments=2,iommu_segments=[1]", {}, "platform.iommu_segments",
                                       None),
    ("--platform", "iommu_address_width"): ("iommu_address_width=48", {}, "platform.iommu_address_width_bits",
                                            None),
    ("--platform", "serial_number"): ("serial_number=s1", {}, "platform.system_serial_number", "serial_number"),
    ("--platform", "uuid"): ("uuid=u1", {}, "platform.system_uuid", "uuid"),
    ("--platform", "oem_strings"): ("oem_strings=[a,b]", {}, "platform.oem_strings", None),
    ("--platform", "iommufd"): ("iommufd=on", {}, "platform.iommufd", None),
    ("--platform", "vfio_p2p_dma"): ("vfio_p2p_dma=off", {}, "platform.vfio_p2p_dma", None),
    **{("--platform", key): (f"{key}=x", {}, f"platform.{key}", None)
       for key in PlatformConfig._DMI_KEYS},
    ("--platform", "tdx"): ("tdx=on", {}, "platform.tdx", None),
    ("--platform", "sev_snp"): ("sev_snp=on", {}, "platform.sev_snp", None),
    ("--platform", "virtio_transport"): ("virtio_transport=mmio", {}, "platform.virtio_transport", None),
    ("--pvpanic", None): ("", {}, "pvpanic", None),
    ("--watchdog", None): ("", {}, "watchdog", None),
    ("--landlock", None): ("", {}, "landlock_enable", None),
    ("--landlock-rules", "path"): ("path=/tmp,access=r", {"landlock_enable": True}, "landlock_rules.path", None),
    ("--landlock-rules", "access"): ("path=/tmp,access=rw", {"landlock_enable": True}, "landlock_rules.access",
                                     None),
    ("--rate-limit-group", "id"): ("id=g,bw_size=5,bw_refill_time=5", {}, "rate_limit_groups.id", None),
    **{("--rate-limit-group", key): (f"id=g,{key}=9,{key[:key.index('_')]}_size=5,"
                                     f"{key[:key.index('_')]}_refill_time=5", {},
                                     "rate_limit_groups.rate_limiter_config", None)
       for key in ("bw_size", "bw_one_time_burst", "bw_refill_time", "ops_size", "ops_one_time_burst",
                   "ops_refill_time")},
}
_FLAGS = {"--pvpanic", "--watchdog", "--landlock"}
_FROM_CLI_NAME = {"--memory-zone": "memory_zones", "--disk": "disks", "--device": "devices",
                  "--debug-console": "debug_console", "--landlock": "landlock_enable",
                  "--landlock-rules": "landlock_rules", "--rate-limit-group": "rate_limit_groups",
                  "--generic-vhost-user": "generic_vhost_user"}


def _keyword(option: str) -> str:
    return _FROM_CLI_NAME.get(option, option.removeprefix("--"))


def sample_config(option: str, value: str, extra: Mapping[str, Any]) -> VmConfig:
    """``VmConfig.from_cli`` with ``option`` set to ``value`` (and ``extra``)."""
    kwargs: dict[str, Any] = dict(extra)
    keyword = _keyword(option)
    if option in _FLAGS:
        kwargs[keyword] = True
    elif keyword in ("disks", "net", "fs", "pmem", "devices", "memory_zones", "rate_limit_groups",
                     "generic_vhost_user"):
        kwargs[keyword] = [value]
    else:
        kwargs[keyword] = value
    return VmConfig.from_cli(**kwargs)


def value_at(config: Any, path: str) -> list[Any]:
    """Every value at ``path`` (lists walked), leaving out absent (``None``) parents."""
    values = [config]
    for name in path.split("."):
        nxt: list[Any] = []
        for value in values:
            if value is None:
                continue
            item = getattr(value, name)
            nxt.extend(item if isinstance(item, tuple) and name != path.split(".")[-1] else [item])
        values = nxt
    return values


def covered(path: str, table: Container[str]) -> bool:
    """Whether ``path`` or one of its ancestors is in ``table``."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in table for i in range(1, len(parts) + 1))


@pytest.fixture
def claimed(vmmkit_registries: Any) -> frozenset[str]:
    return claimed_sections(vmmkit_registries.devices)


def refused(path: str, claimed: frozenset[str]) -> bool:
    parts = path.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(prefix in NOT_SUPPORTED and prefix not in claimed for prefix in prefixes) or (
        parts[0] in DEVICE_SECTIONS and parts[0] not in claimed
    )


def works(path: str, claimed: frozenset[str]) -> bool:
    """Listed in :data:`IMPLEMENTED`, or below a ``NOT_SUPPORTED`` entry a device type has claimed
    (its keys are that type's then). Claiming ``disks`` does not make every disk key work."""
    return covered(path, IMPLEMENTED) or covered(path, claimed & set(NOT_SUPPORTED))


# --- the schema ------------------------------------------------------------------------------


def _schema() -> dict[str, Any]:
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is absent: Cloud Hypervisor's API document lives in the team's ../shared")
    return dict(yaml.safe_load(SPEC.read_text()))


def schema_leaves(schemas: Mapping[str, Any], name: str = "VmConfig", prefix: str = "") -> Iterator[str]:
    """Every property path below schema ``name``, recursively, leaves only (no sub-object)."""
    for key, prop in schemas[name].get("properties", {}).items():
        ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
        target = ref.rsplit("/", 1)[-1] if ref else None
        path = f"{prefix}{key}"
        if target and "properties" in schemas[target]:
            yield from schema_leaves(schemas, target, path + ".")
        else:
            yield path


def model_leaves(cls: type[Any] = VmConfig, prefix: str = "") -> Iterator[str]:
    """Every field path of vmmkit's configuration classes (extensions included), leaves only."""
    attrs.resolve_types(cls)
    for field in attrs.fields(cls):
        path = f"{prefix}{field.name}"
        inner = [arg for arg in getattr(field.type, "__args__", (field.type,)) if arg is not type(None)]
        nested = [arg for arg in inner if isinstance(arg, type) and attrs.has(arg)]
        if nested and not covered(path, IMPLEMENTED):
            yield from model_leaves(nested[0], path + ".")
        else:
            yield path


def _unalias(path: str) -> str:
    head, _, key = path.rpartition(".")
    return f"{head}.{PlatformConfig._JSON_ALIASES[key]}" if head == "platform" and key in PlatformConfig._JSON_ALIASES \
        else path


def test_every_schema_key_and_extension_is_implemented_or_refused(claimed: frozenset[str]) -> None:
    schemas = _schema()["components"]["schemas"]
    leaves = {_unalias(path) for path in schema_leaves(schemas)} | set(model_leaves())
    assert "numa.distances.distance" in leaves and "disks.rate_limiter_config.ops.size" in leaves
    unclassified = sorted(p for p in leaves if not works(p, claimed) and not refused(p, claimed))
    assert not unclassified, f"neither implemented (IMPLEMENTED) nor refused (NOT_SUPPORTED): {unclassified}"
    both = sorted(p for p in leaves if covered(p, IMPLEMENTED) and refused(p, claimed))
    assert not both, f"listed as implemented and refused: {both}"


#: Keys of Cloud Hypervisor's serde structs (vmm/src/vm_config.rs: ``serial`` is a
#: ``ConsoleConfig``; ``DiskConfig``'s testing switches) that its OpenAPI document omits, but its
#: ``vm.info`` writes and Kata Containers sends (issue #21).
SERDE_ONLY_KEYS = {"serial.iommu", "disks.disable_io_uring", "disks.disable_aio"}


def test_the_tables_name_only_real_keys() -> None:
    schemas = _schema()["components"]["schemas"]
    leaves = {_unalias(path) for path in schema_leaves(schemas)} | set(model_leaves()) | SERDE_ONLY_KEYS
    known = leaves | {".".join(p.split(".")[:i]) for p in leaves for i in range(1, p.count(".") + 1)}
    assert not sorted(set(NOT_SUPPORTED) - known), "NOT_SUPPORTED names keys that exist nowhere"
    assert not sorted(IMPLEMENTED - known), "IMPLEMENTED names keys that exist nowhere"


def test_every_implemented_key_is_set_by_a_sample() -> None:
    """An implemented key nothing exercises would be a declaration, not a check."""
    sampled = {path for _value, _extra, path, _named in CLI_SAMPLES.values()}
    sampled.add("plugin_devices")  # test_plugin_devices_are_not_refused_here
    missing = sorted(p for p in IMPLEMENTED if p not in sampled and not covered(p, sampled))
    assert not missing, f"implemented but set by no sample: {missing}"


# --- the command line --------------------------------------------------------------------------


def cli_table(registries: Any, pm: Any) -> set[tuple[str, str | None]]:
    """Every VM option the ``vmmkit`` parser offers, and every sub-option of each."""
    parser = build_parser(pm, registries)
    offered = {flag for action in parser._actions for flag in action.option_strings}
    table: set[tuple[str, str | None]] = set()
    for flag, _dest, _repeatable, _help in _VM_OPTIONS:
        assert flag in offered
        table.add((flag, None))
    table |= {("--pvpanic", None), ("--watchdog", None), ("--landlock", None)}
    for flag, config_class in _CLI_OPTIONS.values():
        assert flag in offered, f"{flag} is in VmConfig.from_cli but not on the command line"
        if config_class is not None:
            table |= {(flag, key) for key in (*config_class._PARSER.keys, *config_class._PARSER.flags)}
    return table


def test_every_cli_option_and_sub_option_has_a_sample(vmmkit_registries: Any, vmmkit_pm: Any) -> None:
    table = cli_table(vmmkit_registries, vmmkit_pm)
    options_alone = {(flag, None) for flag, _d, _r, _h in _VM_OPTIONS if (flag, None) not in CLI_SAMPLES}
    missing = sorted(table - set(CLI_SAMPLES) - options_alone, key=str)
    assert not missing, f"CLI options without a sample (classify them): {missing}"
    assert not sorted(set(CLI_SAMPLES) - table, key=str), "samples for options that do not exist"


@pytest.mark.parametrize("option_key", sorted(CLI_SAMPLES, key=str), ids=lambda k: f"{k[0]}:{k[1] or ''}")
def test_each_cli_option_works_or_is_refused_by_name(
    option_key: tuple[str, str | None], claimed: frozenset[str]
) -> None:
    option, key = option_key
    value, extra, path, named = CLI_SAMPLES[option_key]
    config = sample_config(option, value, extra)
    default = VmConfig.from_cli(**extra)
    if not path:  # the default spelled out: accepted, and it is what an unset option gives
        assert config == default and refusals(config, claimed) == []
        return
    assert value_at(config, path) != value_at(default, path), f"{option} {value} did not reach {path}"
    assert VmConfig.from_json(json.loads(json.dumps(config.to_json()))) == config  # and survives JSON
    if refused(table_path(path), claimed):
        with pytest.raises(NotSupportedYet) as info:
            check_supported(config, claimed, cli=True)
        message = str(info.value)
        assert message.startswith(f"{option}:") or f"; also {option}:" in message, message
        assert "not supported yet" in message
        if key is not None and not (path.count(".") == 0 or table_path(path) in DEVICE_SECTIONS):
            assert (named or key) in message, message
        with pytest.raises(NotSupportedYet) as info:  # the same from JSON names the JSON path
            check_supported(VmConfig.from_json(config.to_json()), claimed)
        assert path in table_path(str(info.value)), str(info.value)
    else:
        assert works(table_path(path), claimed), f"{path} ({option} {key}) is neither implemented nor refused"
        assert refusals(config, claimed) == []
        check_supported(config, claimed, cli=True)


@pytest.mark.parametrize(("flag", "path", "takes_value"), _UNMODELLED_OPTIONS, ids=lambda v: str(v))
def test_cli_options_vmmkit_does_not_model_are_refused_by_name(flag: str, path: str, takes_value: bool) -> None:
    assert path in NOT_SUPPORTED
    args = ["--kernel", "/nonexistent/vmlinux", flag, *(["x=1"] if takes_value else [])]
    result = subprocess.run([sys.executable, "-m", "vmmkit", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"vmmkit: error: {flag}: not supported yet ({NOT_SUPPORTED[path]})"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pmem", "file=x,size=2M,iommu=on"], "--pmem: iommu is not supported yet (a virtual IOMMU)"),
        (["--memory", "hugepages=on,hugepage_size=2M"], "--memory: hugepage_size is not supported yet"),
        (["--firmware", "/fw"], "--firmware: not supported yet"),
        (["--cpus", "kvm_hyperv=on"], "--cpus: kvm_hyperv is not supported yet"),
    ],
)
def test_the_vmmkit_command_exits_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    """Through the real entry point, before any VM is built (the kernel need not exist)."""
    result = subprocess.run([sys.executable, "-m", "vmmkit", "--kernel", "/nonexistent/vmlinux", *args],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"vmmkit: error: {result.stderr.split('error: ', 1)[1].strip()}"]
    assert message in result.stderr


# --- JSON and the API ---------------------------------------------------------------------------


def _schema_value(prop: Mapping[str, Any]) -> Any:
    """A value that asks for something, of the property's JSON type."""
    kind = str(prop.get("type", ""))
    return {"boolean": True, "integer": 1, "string": "x", "array": [{}]}.get(kind, {"x": 1})


def unmodelled_schema_keys() -> list[tuple[str, Any]]:
    """CH ``VmConfig`` keys (top level and in ``memory``) that vmmkit's classes do not model."""
    schemas = _schema()["components"]["schemas"]
    out = []
    for schema, cls, prefix in (("VmConfig", VmConfig, ""), ("MemoryConfig", VmConfig, "memory.")):
        fields = attrs.fields_dict(type(VmConfig().memory) if prefix else cls)
        for key, prop in schemas[schema]["properties"].items():
            if key not in fields:
                out.append((prefix + key, _schema_value(prop)))
    return out


def test_json_keys_vmmkit_does_not_model_are_refused_by_name() -> None:
    keys = unmodelled_schema_keys()
    assert {"numa", "tpm", "vdpa", "user_devices"} <= {
        path for path, _ in keys}
    for path, value in keys:
        head, _, key = path.rpartition(".")
        body: dict[str, Any] = {"payload": {"kernel": "/k"}}
        (body.setdefault(head, {}) if head else body)[key] = value
        with pytest.raises(NotSupportedYet) as info:
            VmConfig.from_json(body)
        assert info.value.option == path and "not supported yet" in str(info.value)


def test_an_unknown_json_key_is_refused_as_unknown() -> None:
    with pytest.raises(ConfigError) as info:
        VmConfig.from_json({"payload": {"kernel": "/k"}, "disks": [{"path": "a", "readonly_": True}]})
    assert info.value.option == "disks[0].readonly_" and "unknown key" in str(info.value)
    assert not isinstance(info.value, NotSupportedYet)


@pytest.fixture
def client(vmmkit_registries: Any, vmmkit_pm: Any) -> Iterator[ApiClient]:
    """The real API server (an in-process Vmm) on a Unix socket."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="vk-cfg-", dir="/tmp"))
    vmm = Vmm(registries=vmmkit_registries, plugin_manager=vmmkit_pm)
    path = str(directory / "api.sock")
    server = ApiServer(vmm, bind_unix_socket(path), path=path, idle_timeout=5.0)
    server.start()
    yield ApiClient(path, timeout=10.0)
    server.close()
    vmm.close()
    directory.rmdir()


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"pmem": [{"file": "/p.img", "iommu": True}]}, "pmem[0].iommu: not supported yet"),
        ({"memory": {"size": 1 << 30, "reserve": True}}, "memory.reserve: not supported yet"),
        ({"disks": [{"path": "/a", "rate_limiter_config": {"ops": {"size": 0, "refill_time": 1}}}]},
         "disks[0].rate_limiter_config.ops.size: invalid value 0"),
        ({"numa": [{"guest_numa_id": 0}]}, "numa: not supported yet"),
        ({"balloon": {"size": 1 << 20, "iommu": True}}, "balloon.iommu: not supported yet"),
        ({"landlock_rules": [{"path": "/x", "access": "rw"}]}, "landlock_rules: Landlock rules without Landlock"),
        ({"tpm": {"socket": "/t"}}, "tpm: not supported yet"),
        ({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": True}}, "cpus.kvm_hyperv: not supported yet"),
        ({"payload": {"kernel": "/k\u0000x"}}, "payload.kernel: a NUL byte"),
        ({"serial": {"mode": "File", "file": "/s\u0000"}}, "serial.file: a NUL byte"),
        ({"no_such_key": 1}, "no_such_key: unknown key"),
    ],
)
def test_vm_create_answers_400_naming_the_key(client: ApiClient, body: dict[str, Any], named: str) -> None:
    response = client.request("PUT", "vm.create", {"payload": {"kernel": "/k"}, **body}, check=False)
    assert response.status == 400, response.body
    assert named in response.json()[0]
    assert client.request("GET", "vm.info", check=False).status == 404  # nothing was created


def test_vm_add_answers_400_naming_the_key(client: ApiClient) -> None:
    assert client.request("PUT", "vm.create", {"payload": {"kernel": "/k"}}, check=False).status == 204
    for endpoint, body, named in [
        ("vm.add-disk", {"path": "/a", "rate_limit_group": "g"}, "disks[0].rate_limit_group: no rate limit group 'g'"),
        ("vm.add-disk", {"path": "/a\u0000"}, "path: a NUL byte"),
        ("vm.add-disk", {"path": "/a", "no_such_key": 1}, "no_such_key: unknown key"),
        ("vm.add-net", {"iommu": True}, "net[0].iommu: not supported yet"),
        ("vm.add-device", {"path": "/sys/bus/pci/devices/0000:01:00.0", "iommu": True},
         "devices[0].iommu: not supported yet"),  # vfio-pci claims devices, but not behind a vIOMMU
    ]:
        response = client.request("PUT", endpoint, body, check=False)
        assert response.status == 400, (endpoint, response.body)
        assert named in response.json()[0]
    config = client.request("GET", "vm.info").json()["config"]
    assert "disks" not in config and "net" not in config and "devices" not in config


# --- device types lift refusals -----------------------------------------------------------------


class PmemType(DeviceType):
    name: ClassVar[str] = "test-pmem"
    sections: ClassVar[tuple[str, ...]] = ("pmem",)


class VhostUserBlockType(DeviceType):
    name: ClassVar[str] = "test-vhost-user-blk"
    sections: ClassVar[tuple[str, ...]] = ("disks.vhost_user", "disks.vhost_socket")


def test_plugin_devices_are_not_refused_here(claimed: frozenset[str]) -> None:
    """A plugin device's own options are its type's to check; a type no plugin registered is an
    error at placement (the device manager's), not a silent skip."""
    config = VmConfig.from_cli(plugin_devices=[("led", "port=0x3f0,id=led0")])
    assert refusals(config, claimed) == [] and VmConfig.from_json(config.to_json()) == config
    assert config.plugin_devices[0].get("port") == "0x3f0"


def test_a_device_type_that_claims_a_section_makes_it_acceptable(claimed: frozenset[str]) -> None:
    pmem = VmConfig.from_cli(pmem=["file=p.img"])
    without = claimed - {"pmem"}  # as if the devices plugin (virtio-pmem) were not installed
    with pytest.raises(NotSupportedYet):
        check_supported(pmem, without)
    check_supported(pmem, without | claimed_sections([PmemType]))
    vhost = VmConfig.from_cli(disks=["vhost_user=on,socket=/s"], memory="shared=on")
    unclaimed = claimed - {"disks.vhost_user", "disks.vhost_socket"}  # as without vmmkit-devices' vhost-user-blk
    assert {r.entry for r in refusals(vhost, unclaimed)} == {"disks.vhost_user", "disks.vhost_socket"}
    check_supported(vhost, unclaimed | claimed_sections([VhostUserBlockType]))
    check_supported(vhost, claimed)  # the installed vhost-user-blk type claims them


def test_a_device_section_no_type_claims_is_refused(claimed: frozenset[str]) -> None:
    """With the devices plugin disabled, --disk is refused by name, not ignored."""
    assert {"disks", "net", "rng", "console", "serial", "debug_console", "pvpanic"} <= claimed
    config = VmConfig.from_cli(disks=["path=a.img"], rng="src=/dev/random")
    with pytest.raises(NotSupportedYet) as info:
        check_supported(config, claimed - {"disks", "rng"}, cli=True)
    assert str(info.value).startswith("--disk: not supported yet (no installed device type consumes it)")
    assert "--rng: not supported yet" in str(info.value)
    check_supported(VmConfig(), frozenset())  # defaults ask for nothing


def test_not_supported_yet_pickles() -> None:
    import pickle

    err = NotSupportedYet("--cpus", True, "Hyper-V enlightenments", key="kvm_hyperv")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, NotSupportedYet) and str(again) == str(err)
    assert str(err) == "--cpus: kvm_hyperv is not supported yet (Hyper-V enlightenments)"
