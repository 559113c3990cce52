"""What Kata Containers' runtimes accept in vmmkit's answers: the Go runtime's generated
OpenAPI models (decoded with ``encoding/json``) and the Rust runtime's serde structs, as
checkers that raise :class:`Rejected` where the runtime's decoder or code would fail.

- :data:`GO_MODELS` is the field table of ``src/runtime/virtcontainers/pkg/cloud-hypervisor/
  client/model_*.go`` (kata-containers/kata-containers, client last changed in 77e558de): JSON
  name -> (Go type, required). ``encoding/json`` ignores unknown keys and leaves missing ones
  at their zero value, and fails on a value of another JSON type (a string for an ``int32``,
  a fraction, a number out of range).
- :data:`RUST_VM_INFO` is ``VmInfo`` of ``src/runtime-rs/crates/hypervisor/ch-config/src/
  lib.rs``: serde fails on a missing field that is neither ``Option`` nor ``#[serde(default)]``,
  on ``null`` for a non-``Option`` field, on an unknown enum variant, on a negative or
  out-of-range integer; unknown keys are ignored (no ``deny_unknown_fields``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Final


class Rejected(AssertionError):
    """The runtime would fail on this answer."""


# -- Go: encoding/json into the generated models ------------------------------------------------

#: model -> JSON name -> (Go type, required by the schema). Extracted from the model files.
GO_MODELS: Final[Mapping[str, Mapping[str, tuple[str, bool]]]] = {
    'BalloonConfig': {
        'size': ('int64', True),
        'deflate_on_oom': ('*bool', False),
        'free_page_reporting': ('*bool', False),
    },
    'ConsoleConfig': {
        'file': ('*string', False),
        'socket': ('*string', False),
        'mode': ('string', True),
        'iommu': ('*bool', False),
    },
    'CpuAffinity': {
        'vcpu': ('int32', True),
        'host_cpus': ('[]int32', True),
    },
    'CpuFeatures': {
        'amx': ('*bool', False),
    },
    'CpuTopology': {
        'threads_per_core': ('*int32', False),
        'cores_per_die': ('*int32', False),
        'dies_per_package': ('*int32', False),
        'packages': ('*int32', False),
    },
    'CpusConfig': {
        'boot_vcpus': ('int32', True),
        'max_vcpus': ('int32', True),
        'topology': ('*CpuTopology', False),
        'kvm_hyperv': ('*bool', False),
        'max_phys_bits': ('*int32', False),
        'nested': ('*bool', False),
        'affinity': ('*[]CpuAffinity', False),
        'features': ('*CpuFeatures', False),
    },
    'DebugConsoleConfig': {
        'file': ('*string', False),
        'mode': ('string', True),
        'iobase': ('*int32', False),
    },
    'DeviceConfig': {
        'path': ('string', True),
        'iommu': ('*bool', False),
        'pci_segment': ('*int32', False),
        'id': ('*string', False),
        'x_nv_gpudirect_clique': ('*int32', False),
    },
    'DeviceNode': {
        'id': ('*string', False),
        'resources': ('*[]map[string]interface{}', False),
        'children': ('*[]string', False),
        'pci_bdf': ('*string', False),
    },
    'DiskConfig': {
        'path': ('*string', False),
        'readonly': ('*bool', False),
        'direct': ('*bool', False),
        'iommu': ('*bool', False),
        'num_queues': ('*int32', False),
        'queue_size': ('*int32', False),
        'vhost_user': ('*bool', False),
        'vhost_socket': ('*string', False),
        'rate_limiter_config': ('*RateLimiterConfig', False),
        'pci_segment': ('*int32', False),
        'id': ('*string', False),
        'serial': ('*string', False),
        'rate_limit_group': ('*string', False),
        'queue_affinity': ('*[]VirtQueueAffinity', False),
        'backing_files': ('*bool', False),
        'sparse': ('*bool', False),
        'image_type': ('*string', False),
    },
    'FsConfig': {
        'tag': ('string', True),
        'socket': ('string', True),
        'num_queues': ('int32', True),
        'queue_size': ('int32', True),
        'pci_segment': ('*int32', False),
        'id': ('*string', False),
    },
    'LandlockConfig': {
        'path': ('string', True),
        'access': ('string', True),
    },
    'MemoryConfig': {
        'size': ('int64', True),
        'hotplug_size': ('*int64', False),
        'hotplugged_size': ('*int64', False),
        'mergeable': ('*bool', False),
        'hotplug_method': ('*string', False),
        'shared': ('*bool', False),
        'hugepages': ('*bool', False),
        'hugepage_size': ('*int64', False),
        'prefault': ('*bool', False),
        'thp': ('*bool', False),
        'zones': ('*[]MemoryZoneConfig', False),
    },
    'MemoryZoneConfig': {
        'id': ('string', True),
        'size': ('int64', True),
        'file': ('*string', False),
        'mergeable': ('*bool', False),
        'shared': ('*bool', False),
        'hugepages': ('*bool', False),
        'hugepage_size': ('*int64', False),
        'host_numa_node': ('*int32', False),
        'hotplug_size': ('*int64', False),
        'hotplugged_size': ('*int64', False),
        'prefault': ('*bool', False),
    },
    'NetConfig': {
        'tap': ('*string', False),
        'ip': ('*string', False),
        'mask': ('*string', False),
        'mac': ('*string', False),
        'host_mac': ('*string', False),
        'mtu': ('*int32', False),
        'iommu': ('*bool', False),
        'num_queues': ('*int32', False),
        'queue_size': ('*int32', False),
        'vhost_user': ('*bool', False),
        'vhost_socket': ('*string', False),
        'vhost_mode': ('*string', False),
        'id': ('*string', False),
        'pci_segment': ('*int32', False),
        'rate_limiter_config': ('*RateLimiterConfig', False),
        'offload_tso': ('*bool', False),
        'offload_ufo': ('*bool', False),
        'offload_csum': ('*bool', False),
    },
    'NumaConfig': {
        'guest_numa_id': ('int32', True),
        'cpus': ('*[]int32', False),
        'distances': ('*[]NumaDistance', False),
        'memory_zones': ('*[]string', False),
        'pci_segments': ('*[]int32', False),
        'device_id': ('*string', False),
    },
    'NumaDistance': {
        'destination': ('int32', True),
        'distance': ('int32', True),
    },
    'PayloadConfig': {
        'firmware': ('*string', False),
        'kernel': ('*string', False),
        'cmdline': ('*string', False),
        'initramfs': ('*string', False),
        'igvm': ('*string', False),
        'host_data': ('*string', False),
    },
    'PciDeviceInfo': {
        'id': ('string', True),
        'bdf': ('string', True),
    },
    'PciSegmentConfig': {
        'pci_segment': ('int32', True),
        'mmio32_aperture_weight': ('*int32', False),
        'mmio64_aperture_weight': ('*int32', False),
    },
    'PlatformConfig': {
        'num_pci_segments': ('*int32', False),
        'iommu_segments': ('*[]int32', False),
        'iommu_address_width': ('*int32', False),
        'serial_number': ('*string', False),
        'uuid': ('*string', False),
        'oem_strings': ('*[]string', False),
        'tdx': ('*bool', False),
        'sev_snp': ('*bool', False),
    },
    'PmemConfig': {
        'file': ('string', True),
        'size': ('*int64', False),
        'iommu': ('*bool', False),
        'discard_writes': ('*bool', False),
        'pci_segment': ('*int32', False),
        'id': ('*string', False),
    },
    'RateLimitGroupConfig': {
        'id': ('string', True),
        'rate_limiter_config': ('RateLimiterConfig', True),
    },
    'RateLimiterConfig': {
        'bandwidth': ('*TokenBucket', False),
        'ops': ('*TokenBucket', False),
    },
    'RngConfig': {
        'src': ('string', True),
        'iommu': ('*bool', False),
    },
    'TokenBucket': {
        'size': ('int64', True),
        'one_time_burst': ('*int64', False),
        'refill_time': ('int64', True),
    },
    'TpmConfig': {
        'socket': ('string', True),
    },
    'VdpaConfig': {
        'path': ('string', True),
        'num_queues': ('int32', True),
        'iommu': ('*bool', False),
        'pci_segment': ('*int32', False),
        'id': ('*string', False),
    },
    'VirtQueueAffinity': {
        'queue_index': ('int32', True),
        'host_cpus': ('[]int32', True),
    },
    'VmConfig': {
        'cpus': ('*CpusConfig', False),
        'memory': ('*MemoryConfig', False),
        'payload': ('PayloadConfig', True),
        'rate_limit_groups': ('*[]RateLimitGroupConfig', False),
        'disks': ('*[]DiskConfig', False),
        'net': ('*[]NetConfig', False),
        'rng': ('*RngConfig', False),
        'balloon': ('*BalloonConfig', False),
        'fs': ('*[]FsConfig', False),
        'pmem': ('*[]PmemConfig', False),
        'serial': ('*ConsoleConfig', False),
        'console': ('*ConsoleConfig', False),
        'debug_console': ('*DebugConsoleConfig', False),
        'devices': ('*[]DeviceConfig', False),
        'vdpa': ('*[]VdpaConfig', False),
        'vsock': ('*VsockConfig', False),
        'numa': ('*[]NumaConfig', False),
        'iommu': ('*bool', False),
        'watchdog': ('*bool', False),
        'pvpanic': ('*bool', False),
        'pci_segments': ('*[]PciSegmentConfig', False),
        'platform': ('*PlatformConfig', False),
        'tpm': ('*TpmConfig', False),
        'landlock_enable': ('*bool', False),
        'landlock_rules': ('*[]LandlockConfig', False),
    },
    'VmInfo': {
        'config': ('VmConfig', True),
        'state': ('string', True),
        'memory_actual_size': ('*int64', False),
        'device_tree': ('*map[string]DeviceNode', False),
    },
    'VmmPingResponse': {
        'build_version': ('*string', False),
        'version': ('string', True),
        'pid': ('*int64', False),
        'features': ('*[]string', False),
    },
    'VsockConfig': {
        'cid': ('int64', True),
        'socket': ('string', True),
        'iommu': ('*bool', False),
        'pci_segment': ('*int32', False),
        'id': ('*string', False),
    },
}

_GO_INTS: Final = {"int32": 31, "int64": 63, "int": 63, "int16": 15, "int8": 7}


def go_decode(go_type: str, value: Any, path: str = "$") -> None:
    """Raise :class:`Rejected` where ``json.Unmarshal`` into ``go_type`` fails."""
    if value is None:
        return  # null leaves the zero value (or a nil pointer)
    if go_type.startswith("*"):
        go_decode(go_type[1:], value, path)
    elif go_type.startswith("[]"):
        if not isinstance(value, list):
            raise Rejected(f"{path}: Go cannot unmarshal {type(value).__name__} into {go_type}")
        for index, item in enumerate(value):
            go_decode(go_type[2:], item, f"{path}[{index}]")
    elif go_type.startswith("map[string]"):
        if not isinstance(value, dict):
            raise Rejected(f"{path}: Go cannot unmarshal {type(value).__name__} into {go_type}")
        for key, item in value.items():
            go_decode(go_type[len("map[string]"):], item, f"{path}.{key}")
    elif go_type == "interface{}":
        return
    elif go_type == "string":
        if not isinstance(value, str):
            raise Rejected(f"{path}: Go cannot unmarshal {value!r} into a string")
    elif go_type == "bool":
        if not isinstance(value, bool):
            raise Rejected(f"{path}: Go cannot unmarshal {value!r} into a bool")
    elif go_type in _GO_INTS:
        bits = _GO_INTS[go_type]
        if type(value) is not int or not -(1 << bits) <= value < (1 << bits):
            raise Rejected(f"{path}: Go cannot unmarshal {value!r} into an {go_type}")
    elif go_type in ("float32", "float64"):
        if type(value) not in (int, float):
            raise Rejected(f"{path}: Go cannot unmarshal {value!r} into a {go_type}")
    elif go_type in GO_MODELS:
        if not isinstance(value, dict):
            raise Rejected(f"{path}: Go cannot unmarshal {type(value).__name__} into {go_type}")
        fields = GO_MODELS[go_type]
        for key, item in value.items():
            if key in fields:
                go_decode(fields[key][0], item, f"{path}.{key}")
    else:  # pragma: no cover - a type the table does not describe
        raise AssertionError(f"no Go type {go_type!r} in the table")


def go_required(model: str, value: Mapping[str, Any], path: str = "$") -> None:
    """The schema's required fields of ``model`` are present (the Go runtime reads them as
    plain values: a missing one reads as 0 or "")."""
    for key, (_type, required) in GO_MODELS[model].items():
        if required and key not in value:
            raise Rejected(f"{path}: {model} needs {key!r}")


def go_pci_path(bdf: str) -> str:
    """``clhPciInfoToPath`` (clh.go): the slot of a ``0000:00:XX.0`` BDF, or :class:`Rejected`."""
    tokens = bdf.split(":")
    if len(tokens) != 3 or tokens[0] != "0000" or tokens[1] != "00":
        raise Rejected(f"Unexpected PCI address {bdf!r} from clh hotplug")
    slot = tokens[2].split(".")
    if len(slot) != 2 or slot[1] != "0" or len(slot[0]) != 2:
        raise Rejected(f"Unexpected PCI address {bdf!r} from clh hotplug")
    if not re.fullmatch(r"[0-9a-fA-F]{2}", slot[0]) or int(slot[0], 16) > 0x1F:
        raise Rejected(f"PciPathFromString: bad slot {slot[0]!r}")  # types.PciSlotFromString
    return slot[0]


# -- Rust: serde into ch-config's structs -------------------------------------------------------

#: A serde field: (type, has #[serde(default)]). Types: "u8" "u16" "u32" "u64" "usize" "bool"
#: "String" "PathBuf" "Ipv4Addr" "MacAddr" "any", ("opt", T), ("vec", T), ("enum", variants),
#: or the name of a struct of :data:`RUST_STRUCTS`.
RustType = Any

_CONSOLE_MODES: Final = ("enum", ("Off", "Pty", "Tty", "File", "Null"))
RUST_STRUCTS: Final[Mapping[str, Mapping[str, tuple[RustType, bool]]]] = {
    "VmInfo": {
        "config": ("VmConfig", False),
        "state": (("enum", ("Created", "Running", "Shutdown", "Paused")), False),
        "memory_actual_size": (("opt", "u64"), True),
    },
    "VmConfig": {
        "cpus": ("CpusConfig", True), "memory": ("MemoryConfig", True), "kernel": (("opt", "KernelConfig"), False),
        "initramfs": (("opt", "InitramfsConfig"), True), "cmdline": ("CmdlineConfig", True),
        "payload": (("opt", "PayloadConfig"), True), "disks": (("opt", ("vec", "DiskConfig")), False),
        "net": (("opt", ("vec", "NetConfig")), False), "rng": ("RngConfig", True),
        "balloon": (("opt", "BalloonConfig"), False), "fs": (("opt", ("vec", "FsConfig")), False),
        "pmem": (("opt", ("vec", "PmemConfig")), False), "serial": ("ConsoleConfig", False),
        "console": ("ConsoleConfig", False), "devices": (("opt", ("vec", "DeviceConfig")), False),
        "user_devices": (("opt", ("vec", "any")), False), "vdpa": (("opt", ("vec", "any")), False),
        "vsock": (("opt", "VsockConfig"), False), "iommu": ("bool", True),
        "sgx_epc": (("opt", ("vec", "any")), False), "numa": (("opt", ("vec", "any")), False),
        "watchdog": ("bool", True), "platform": (("opt", "PlatformConfig"), False),
    },
    "CpusConfig": {
        "boot_vcpus": ("u32", False), "max_vcpus": ("u32", False), "topology": (("opt", "CpuTopology"), True),
        "kvm_hyperv": ("bool", True), "nested": (("opt", "bool"), True), "max_phys_bits": ("u8", False),
        "affinity": (("opt", ("vec", "any")), True), "features": ("CpuFeatures", True),
    },
    "CpuFeatures": {"amx": ("bool", True)},
    "CpuTopology": {
        "threads_per_core": ("u16", False), "cores_per_die": ("u16", False), "dies_per_package": ("u16", False),
        "packages": ("u16", False),
    },
    "MemoryConfig": {
        "size": ("u64", False), "mergeable": ("bool", True),
        "hotplug_method": (("enum", ("Acpi", "VirtioMem")), True), "hotplug_size": (("opt", "u64"), True),
        "hotplugged_size": (("opt", "u64"), True), "shared": ("bool", True), "hugepages": ("bool", True),
        "hugepage_size": (("opt", "u64"), True), "prefault": ("bool", True),
        "zones": (("opt", ("vec", "any")), True),
    },
    "KernelConfig": {"path": ("PathBuf", False)},
    "InitramfsConfig": {"path": ("PathBuf", False)},
    "CmdlineConfig": {"args": ("String", False)},
    "PayloadConfig": {
        "firmware": (("opt", "PathBuf"), True), "kernel": (("opt", "PathBuf"), True),
        "cmdline": (("opt", "String"), True), "initramfs": (("opt", "PathBuf"), True),
        "mrconfigid": (("opt", "String"), True), "host_data": (("opt", "String"), True),
    },
    "DiskConfig": {
        "path": (("opt", "PathBuf"), False), "readonly": ("bool", True), "direct": ("bool", True),
        "iommu": ("bool", True), "num_queues": ("usize", False), "queue_size": ("u16", False),
        "vhost_user": ("bool", True), "vhost_socket": (("opt", "String"), False),
        "rate_limiter_config": (("opt", "any"), True), "id": (("opt", "String"), True),
        "disable_io_uring": ("bool", True), "pci_segment": ("u16", True), "sparse": ("bool", True),
        "image_type": (("enum", ("FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown")), True),
    },
    "NetConfig": {
        "tap": (("opt", "String"), False), "ip": ("Ipv4Addr", False), "mask": ("Ipv4Addr", False),
        "mac": ("MacAddr", False), "host_mac": (("opt", "MacAddr"), True), "mtu": (("opt", "u16"), True),
        "iommu": ("bool", True), "num_queues": ("usize", False), "queue_size": ("u16", False),
        "vhost_user": ("bool", True), "vhost_socket": (("opt", "String"), False),
        "vhost_mode": (("enum", ("Client", "Server")), True), "id": (("opt", "String"), True),
        "fds": (("opt", ("vec", "any")), True), "rate_limiter_config": (("opt", "any"), True),
        "pci_segment": ("u16", True),
    },
    "RngConfig": {"src": ("PathBuf", False), "iommu": ("bool", True)},
    "BalloonConfig": {"size": ("u64", False), "deflate_on_oom": ("bool", True), "free_page_reporting": ("bool", True)},
    "FsConfig": {
        "tag": ("String", False), "socket": ("PathBuf", False), "num_queues": ("usize", False),
        "queue_size": ("u16", False), "id": (("opt", "String"), True), "pci_segment": ("u16", True),
    },
    "PmemConfig": {
        "file": ("PathBuf", False), "size": (("opt", "u64"), True), "iommu": ("bool", True),
        "discard_writes": ("bool", True), "id": (("opt", "String"), True), "pci_segment": ("u16", True),
    },
    "ConsoleConfig": {"file": (("opt", "PathBuf"), False), "mode": (_CONSOLE_MODES, False), "iommu": ("bool", True)},
    "DeviceConfig": {
        "path": ("PathBuf", False), "iommu": ("bool", True), "id": (("opt", "String"), True),
        "pci_segment": ("u16", True),
    },
    "VsockConfig": {
        "cid": ("u32", False), "socket": ("PathBuf", False), "iommu": ("bool", True), "id": (("opt", "String"), True),
        "pci_segment": ("u16", True),
    },
    "PlatformConfig": {
        "num_pci_segments": ("u16", False), "iommu_segments": (("opt", ("vec", "u16")), True),
        "serial_number": (("opt", "String"), True), "uuid": (("opt", "String"), True),
        "oem_strings": (("opt", ("vec", "String")), True), "tdx": ("bool", True),
    },
    # ch_api.rs
    "PciDeviceInfo": {"id": ("String", False), "bdf": ("String", False)},
}

_RUST_UINTS: Final = {"u8": 8, "u16": 16, "u32": 32, "u64": 64, "usize": 64}


def rust_decode(rust_type: RustType, value: Any, path: str = "$") -> None:
    """Raise :class:`Rejected` where ``serde_json::from_str`` into ``rust_type`` fails."""
    if isinstance(rust_type, tuple):
        kind, inner = rust_type
        if kind == "opt":
            if value is not None:
                rust_decode(inner, value, path)
        elif kind == "vec":
            if not isinstance(value, list):
                raise Rejected(f"{path}: serde expected a sequence, got {value!r}")
            for index, item in enumerate(value):
                rust_decode(inner, item, f"{path}[{index}]")
        elif kind == "enum":
            if value not in inner:
                raise Rejected(f"{path}: serde: unknown variant {value!r}, expected one of {inner}")
        return
    if value is None and rust_type != "any":
        raise Rejected(f"{path}: serde: invalid type: null, expected {rust_type}")
    if rust_type == "any":
        return
    if rust_type == "bool":
        if not isinstance(value, bool):
            raise Rejected(f"{path}: serde expected a boolean, got {value!r}")
    elif rust_type in _RUST_UINTS:
        if type(value) is not int or not 0 <= value < (1 << _RUST_UINTS[rust_type]):
            raise Rejected(f"{path}: serde expected {rust_type}, got {value!r}")
    elif rust_type in ("String", "PathBuf"):
        if not isinstance(value, str):
            raise Rejected(f"{path}: serde expected a string, got {value!r}")
    elif rust_type == "Ipv4Addr":
        try:
            ipaddress.IPv4Address(value)
        except (ValueError, TypeError):
            raise Rejected(f"{path}: serde expected an IPv4 address, got {value!r}") from None
    elif rust_type == "MacAddr":
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}", value):
            raise Rejected(f"{path}: MacAddr::parse_str fails on {value!r}")
    else:
        fields = RUST_STRUCTS[rust_type]
        if not isinstance(value, dict):
            raise Rejected(f"{path}: serde expected struct {rust_type}, got {value!r}")
        for name, (field_type, has_default) in fields.items():
            optional = isinstance(field_type, tuple) and field_type[0] == "opt"
            if name not in value:
                if not (has_default or optional):
                    raise Rejected(f"{path}: serde: missing field `{name}` of {rust_type}")
                continue
            rust_decode(field_type, value[name], f"{path}.{name}")


def rust_pci_path(bdf: str) -> str:
    """``clh_pci_info_to_path`` (inner_device.rs): same rule as Go's."""
    return go_pci_path(bdf)
