"""The ``vfio-pci`` device type (claims the ``devices`` section: ``--device``, ``vm.add-device``),
the seccomp needs of VFIO, and whether this host can do VFIO (``vmmkit plugins``).

Light on purpose: registration imports this module at every start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

from vmmkit.device import DeviceContext, DeviceRequest, DeviceType, section_id
from vmmkit.hypervisor import Availability
from vmmkit.sandbox import API, VCPU, VMM

if TYPE_CHECKING:
    from vmmkit.config import VmConfig

VFIO_CONTAINER: Final = "/dev/vfio/vfio"

#: What VFIO's code calls beyond the runtime's lists, by the threads that run it: opening
#: ``/dev/vfio`` nodes and the ioctls (vmmkit's filters allow ``ioctl`` whatever its request
#: number; :data:`vmmkit_devices.vfio.uapi.REQUESTS` lists VFIO's), ``mmap`` of BARs and eventfds
#: where a VM is built or hot-plugged (API, VMM), ``pread64``/``pwrite64`` of trapped BAR and
#: config accesses on vCPU threads. All are in vmmkit's lists already; declaring them keeps
#: VFIO working if those lists narrow.
SECCOMP_SYSCALLS: Final[Mapping[str, Sequence[str]]] = {
    VCPU: ["ioctl", "pread64", "pwrite64", "eventfd2"],
    API: ["openat", "ioctl", "mmap", "munmap", "eventfd2", "readlinkat", "pread64", "pwrite64"],
    VMM: ["openat", "ioctl", "mmap", "munmap", "eventfd2", "readlinkat", "pread64", "pwrite64"],
}


class VfioPciType(DeviceType):
    """``vfio-pci``: one passed-through host PCI function per ``--device`` entry."""

    name: ClassVar[str] = "vfio-pci"
    description: ClassVar[str] = ("host PCI function passed through with VFIO "
                                  "(--device path=/sys/bus/pci/devices/...)")
    sections: ClassVar[tuple[str, ...]] = ("devices",)

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        return [DeviceRequest(cls.name, section_id(device), device, transport="vfio-pci",
                              pci_segment=device.pci_segment, pci_slot=device.pci_device_id)
                for device in config.devices]

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> Any:
        from vmmkit_devices.vfio.transport import VfioRequest

        config = request.config
        return VfioRequest(config.path, exclude_mmap=frozenset(config.x_exclude_mmap_bars))

    @classmethod
    def preload(cls) -> Any:
        import vmmkit_devices.vfio.transport

        return vmmkit_devices.vfio.transport

    @classmethod
    def host_support(cls) -> Availability:
        return vfio_availability()


def vfio_availability(path: str = VFIO_CONTAINER) -> Availability:
    """Whether ``/dev/vfio/vfio`` opens and offers the type-1 v2 IOMMU (no side effects)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return Availability(False, f"{path} not found (no VFIO on this host)")
    except OSError as exc:
        return Availability(False, f"{path}: {os.strerror(exc.errno or 0)}")
    try:
        import fcntl

        from vmmkit_devices.vfio import uapi

        if fcntl.ioctl(fd, uapi.VFIO_GET_API_VERSION, 0) != uapi.VFIO_API_VERSION:
            return Availability(False, f"{path}: unknown VFIO API version")
        if fcntl.ioctl(fd, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU) <= 0:
            return Availability(False, f"{path}: no type-1 v2 IOMMU")
    except OSError as exc:
        return Availability(False, f"{path}: {os.strerror(exc.errno or 0)}")
    finally:
        os.close(fd)
    return Availability(True, f"{path}, type-1 v2 IOMMU")
