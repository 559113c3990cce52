"""The request bodies Kata Containers' two Cloud Hypervisor drivers send, built field by field
as their code builds them (kata-containers/kata-containers, ``src/runtime``: Go,
``src/runtime-rs``: Rust), with the test's paths and sizes.

- Go: ``virtcontainers/clh.go`` fills the generated OpenAPI client's models
  (``pkg/cloud-hypervisor/client/model_*.go``); their ``New*`` constructors set the schema's
  defaults, and ``MarshalJSON`` writes every field that is set (required ones always).
- Rust: ``crates/hypervisor/ch-config/src/{lib,convert}.rs``: serde structs written with
  ``serde_json``; ``Option`` fields without ``skip_serializing_if`` are written as ``null``.
"""

from __future__ import annotations

from typing import Any

MiB = 1 << 20

#: Go: getNonUserDefinedKernelParams without debug (clhKernelParams + "quiet"); Rust:
#: get_kernel_params() with enable_debug (its "panic=1" comes from KernelParams::new).
GO_KERNEL_PARAMS = "panic=1 no_timer_check noreplace-smp quiet"
RUST_KERNEL_PARAMS = "panic=1 console=ttyS0,115200n8 no_timer_check noreplace-smp systemd.log_target=console"
#: Go with debug (no "quiet"): clhKernelParams, then clhDebugKernelParams (x86-64) or
#: clhArmDebugKernelParams (arm64), then clhDebugKernelParamsCommon.
GO_X86_64_DEBUG_KERNEL_PARAMS = "panic=1 no_timer_check noreplace-smp console=ttyS0,115200n8 systemd.log_target=console"
GO_ARM64_DEBUG_KERNEL_PARAMS = ("panic=1 no_timer_check noreplace-smp console=ttyAMA0,115200n8 "
                                "systemd.log_target=console")


def go_vm_config(*, kernel: str, initramfs: str, rootfs: str, cmdline: str, vsock: str, fs_socket: str,
                 boot_vcpus: int, max_vcpus: int, memory: int, hotplug_size: int, debug: bool = False,
                 devices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``clh.CreateVM`` + ``addVSock`` + ``addVolume`` for a production (non-debug) sandbox:
    serial and console ``Off``, virtio-fs, the rootfs image as a read-only disk and
    ``reclaim_guest_freed_memory`` (the balloon). ``debug``: the serial port ``Tty`` (a debug
    sandbox); ``devices``: the VFIO devices ``AddDevice`` cold-plugged (:func:`go_device_config`).

    One departure: Kata boots either an image (a disk) or an initrd; this guest has both, its
    /init in the initramfs and a read-only rootfs disk (as Kata's image, and its initdata disk)."""
    config: dict[str, Any] = {
        "cpus": {
            "boot_vcpus": boot_vcpus, "max_vcpus": max_vcpus,
            "topology": {"threads_per_core": 1, "cores_per_die": max_vcpus, "dies_per_package": 1, "packages": 1},
            "kvm_hyperv": False, "nested": True,
        },
        "memory": {
            "size": memory, "hotplug_size": hotplug_size, "mergeable": False, "hotplug_method": "Acpi",
            "shared": True, "hugepages": False, "prefault": False, "thp": True,
        },
        "payload": {"kernel": kernel, "cmdline": cmdline, "initramfs": initramfs},
        "disks": [{
            "path": rootfs, "readonly": True, "direct": False, "iommu": False, "num_queues": 1, "queue_size": 128,
            "vhost_user": False, "image_type": "Raw", "backing_files": False, "sparse": True,
        }],
        "fs": [{"tag": "kataShared", "socket": fs_socket, "num_queues": 1, "queue_size": 1024, "pci_segment": 1}],
        "rng": {"src": "/dev/urandom", "iommu": False},
        "balloon": {"size": 0, "deflate_on_oom": False, "free_page_reporting": True},
        "serial": {"mode": "Tty" if debug else "Off", "iommu": False},
        "console": {"mode": "Off", "iommu": False},
        "iommu": False,
        "vsock": {"cid": 3, "socket": vsock, "iommu": False},
        "watchdog": False,
        "pvpanic": False,
        "platform": {"num_pci_segments": 2, "tdx": False, "sev_snp": False},
        "landlock_enable": False,
    }
    if devices is not None:  # a nil slice is left out
        config["devices"] = devices
    return config


def go_device_config(path: str, device_id: str | None = None) -> dict[str, Any]:
    """A VFIO device: ``NewDeviceConfig(SysfsDev)`` (``iommu`` false, the default), then
    ``SetIommu(clh.config.IOMMU)``, false unless configured; ``coldPlugVFIODevice`` also sets the
    device's own ``id`` (Kata's ``vfio-<hex>``, kept for ``vm.remove-device``), the hot-plug
    (``hotPlugVFIODevice``, ``vm.add-device``) does not and keeps the answer's id."""
    body: dict[str, Any] = {"path": path, "iommu": False}
    if device_id is not None:
        body["id"] = device_id
    return body


def go_net_config(mac: str) -> dict[str, Any]:
    """``clh.addNet``: ``NewNetConfig()`` with the endpoint's MAC (the taps go as SCM_RIGHTS)."""
    return {
        "ip": "192.168.249.1", "mask": "255.255.255.0", "mac": mac, "iommu": False, "num_queues": 2,
        "queue_size": 256, "vhost_user": False, "vhost_mode": "Client", "offload_tso": True, "offload_ufo": True,
        "offload_csum": True,
    }


def go_hotplug_disk(path: str, *, boot_vcpus: int) -> dict[str, Any]:
    """``clh.hotplugAddBlockDevice`` (``BlockDeviceCacheSet`` false, no rate limiter)."""
    return {
        "path": path, "readonly": False, "direct": False, "iommu": False, "num_queues": boot_vcpus,
        "queue_size": 1024, "vhost_user": False, "image_type": "Raw", "backing_files": False, "sparse": True,
    }


def rust_vm_config(*, kernel: str, initramfs: str | None, rootfs: str, cmdline: str, vsock: str,
                   boot_vcpus: int, max_vcpus: int, memory: int, hotplug_size: int) -> dict[str, Any]:
    """``VmConfig::try_from(NamedHypervisorConfig)`` for a debug sandbox without a shared
    filesystem (a template source may not have one), with ``reclaim_guest_freed_memory``.

    As for Go, the guest has both the initramfs and the read-only rootfs disk."""
    return {
        "cpus": {
            "boot_vcpus": boot_vcpus, "max_vcpus": max_vcpus,
            "topology": {"threads_per_core": 1, "cores_per_die": max_vcpus, "dies_per_package": 1, "packages": 1},
            "kvm_hyperv": False, "max_phys_bits": 46, "features": {"amx": False},
        },
        "memory": {
            "size": memory, "mergeable": False, "hotplug_method": "Acpi", "hotplug_size": hotplug_size,
            "shared": True, "hugepages": False, "prefault": False,
        },
        "payload": {
            "firmware": None, "kernel": kernel, "cmdline": cmdline, "initramfs": initramfs, "mrconfigid": None,
            "host_data": None,
        },
        "disks": [{
            "path": rootfs, "readonly": True, "direct": False, "iommu": False, "num_queues": 1, "queue_size": 128,
            "vhost_user": False, "vhost_socket": None, "rate_limiter_config": None, "id": None,
            "disable_io_uring": False, "pci_segment": 0, "sparse": True, "image_type": "Unknown",
        }],
        "rng": {"src": "/dev/urandom", "iommu": False},
        "balloon": {"size": 0, "deflate_on_oom": False, "free_page_reporting": True},
        "serial": {"file": None, "mode": "Tty", "iommu": False},
        "console": {"file": None, "mode": "Off", "iommu": False},
        "vsock": {"cid": 3, "socket": vsock, "iommu": False, "id": None, "pci_segment": 0},
        "iommu": False,
        "watchdog": False,
    }


def rust_net_config(mac: str) -> dict[str, Any]:
    """``NetConfig`` as runtime-rs's ``inner_device.rs`` fills it for a tap endpoint (fds
    passed with the request, ``fds`` itself skipped)."""
    return {
        "ip": "192.168.249.1", "mask": "255.255.255.0", "mac": mac, "iommu": False, "num_queues": 2,
        "queue_size": 256, "vhost_user": False, "vhost_mode": "Client",
    }


def rust_hotplug_disk(path: str) -> dict[str, Any]:
    """``DiskConfig`` for a hot-plugged block device (``inner_device.rs``)."""
    return {
        "path": path, "readonly": False, "direct": False, "iommu": False, "num_queues": 1, "queue_size": 128,
        "vhost_user": False, "vhost_socket": None, "rate_limiter_config": None, "id": None,
        "disable_io_uring": False, "pci_segment": 0, "sparse": True, "image_type": "Raw",
    }


def template_vm_config_memory(memory: int, memory_path: str) -> dict[str, Any]:
    """The ``memory`` of a template source VM (both runtimes: ``template_memory_config`` /
    ``BootToBeTemplate``): size 0, one shared zone backed by the template's memory file."""
    return {
        "size": 0, "mergeable": False, "hotplug_method": "Acpi", "shared": True, "hugepages": False,
        "prefault": False,
        "zones": [{"id": "mem0", "size": memory, "file": memory_path, "shared": True, "hugepages": False,
                   "hugepage_size": None, "host_numa_node": None, "hotplug_size": None, "hotplugged_size": None,
                   "prefault": False}],
    }
