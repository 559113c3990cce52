"""Checked bindings of the VFIO container/group API (Documentation/driver-api/vfio.rst,
"VFIO Usage Example"): every call's failure becomes a :class:`VfioError` that says what to do.

The order is the kernel's: open ``/dev/vfio/vfio`` (the container), check
``VFIO_GET_API_VERSION`` and the type-1 v2 IOMMU extension; open ``/dev/vfio/<group>`` (the
group named by the device's ``iommu_group`` link in sysfs), check that it is viable (every
device of the group bound to vfio-pci or to no driver), add it to the container, set the IOMMU
model once the first group is in, map guest RAM for DMA (``VFIO_IOMMU_MAP_DMA``), and only then
ask the group for a device fd (``VFIO_GROUP_GET_DEVICE_FD``). Cloud Hypervisor's
``vfio-ioctls`` crate (``VfioContainer``, ``VfioGroup``, ``VfioDevice``) has the same shape.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit_devices.vfio import uapi
from vmmkit_devices.vfio.kernel import VfioKernel

log = get_logger()

DEV_VFIO = "/dev/vfio"


class VfioError(DeviceError):
    """VFIO refused or lacks something; the message names the file or call and what to do."""


def iommu_group_of(sysfs_device: str) -> str:
    """The IOMMU group number of a device in sysfs (``/sys/bus/pci/devices/0000:01:00.0``):
    the last component of its ``iommu_group`` symlink."""
    path = sysfs_device.rstrip("/")
    if not os.path.isdir(path):
        raise VfioError(f"{path}: no such device in sysfs")
    try:
        target = os.readlink(os.path.join(path, "iommu_group"))
    except FileNotFoundError:
        raise VfioError(f"{path} has no IOMMU group ({path}/iommu_group is missing): the host has no "
                        "IOMMU enabled for it (intel_iommu=on, an SMMU), so VFIO cannot pass it through") from None
    except OSError as exc:
        raise VfioError(f"{path}/iommu_group: {exc.strerror}") from None
    group = os.path.basename(target)
    if not group.isdigit():
        raise VfioError(f"{path}/iommu_group points to {target!r}, not an IOMMU group number")
    return group


def _ioctl(kernel: VfioKernel, fd: int, request: int, arg: int | bytearray, what: str) -> int:
    try:
        return kernel.ioctl(fd, request, arg)
    except OSError as exc:
        raise VfioError(f"{what}: {os.strerror(exc.errno or 0)}") from exc


class VfioContainer:
    """``/dev/vfio/vfio``: an IOMMU context its groups share, and the DMA map of guest RAM."""

    def __init__(self, kernel: VfioKernel, dev_dir: str = DEV_VFIO) -> None:
        self.kernel = kernel
        self.dev_dir = dev_dir
        path = os.path.join(dev_dir, "vfio")
        if not os.path.isdir(dev_dir) and dev_dir == DEV_VFIO:
            raise VfioError(f"{dev_dir} is missing: this host has no VFIO (load the vfio-pci module and bind "
                            "the device to vfio-pci)")
        try:
            self.fd = kernel.open(path)
        except FileNotFoundError:
            raise VfioError(f"{path} is missing: this host has no VFIO (load the vfio-pci module)") from None
        except OSError as exc:
            raise VfioError(f"{path}: {os.strerror(exc.errno or 0)}") from None
        try:
            version = _ioctl(kernel, self.fd, uapi.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
            if version != uapi.VFIO_API_VERSION:
                raise VfioError(f"{path}: VFIO API version {version}, vmmkit speaks {uapi.VFIO_API_VERSION}")
            if _ioctl(kernel, self.fd, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU,
                      "VFIO_CHECK_EXTENSION") <= 0:
                raise VfioError(f"{path}: the kernel offers no type-1 v2 IOMMU (VFIO_TYPE1v2_IOMMU)")
        except BaseException:
            kernel.close(self.fd)
            raise
        self.iommu_set = False
        #: iova -> size of what is mapped for DMA.
        self.dma: dict[int, int] = {}

    def set_iommu(self) -> None:
        """``VFIO_SET_IOMMU`` type-1 v2: once, after the first group joined."""
        if not self.iommu_set:
            _ioctl(self.kernel, self.fd, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU, "VFIO_SET_IOMMU")
            self.iommu_set = True

    def map_dma(self, iova: int, size: int, vaddr: int) -> None:
        """Let devices of the container read and write ``size`` bytes at ``iova`` (a guest
        physical address), backed by this process's memory at ``vaddr`` (pinned by the kernel)."""
        flags = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE
        arg = bytearray(uapi.DMA_MAP.pack(uapi.DMA_MAP.size, flags, vaddr, iova, size))
        _ioctl(self.kernel, self.fd, uapi.VFIO_IOMMU_MAP_DMA, arg, f"VFIO_IOMMU_MAP_DMA {iova:#x}+{size:#x}")
        self.dma[iova] = size

    def unmap_dma(self, iova: int) -> None:
        size = self.dma.pop(iova)
        arg = bytearray(uapi.DMA_UNMAP.pack(uapi.DMA_UNMAP.size, 0, iova, size))
        _ioctl(self.kernel, self.fd, uapi.VFIO_IOMMU_UNMAP_DMA, arg, f"VFIO_IOMMU_UNMAP_DMA {iova:#x}+{size:#x}")

    def unmap_all(self) -> None:
        """Unmap every DMA mapping (before the last group leaves: the IOMMU context goes with it)."""
        for iova in list(self.dma):
            try:
                self.unmap_dma(iova)
            except VfioError as exc:
                log.warning("vfio.unmap_failed", iova=hex(iova), error=str(exc))

    def close(self) -> None:
        self.dma.clear()
        self.kernel.close(self.fd)


class VfioGroup:
    """``/dev/vfio/<n>``: opened, checked viable, and added to ``container``."""

    def __init__(self, container: VfioContainer, number: str) -> None:
        self.kernel = container.kernel
        self.number = number
        self.path = os.path.join(container.dev_dir, number)
        try:
            self.fd = self.kernel.open(self.path)
        except FileNotFoundError:
            raise VfioError(f"{self.path} is missing: no device of IOMMU group {number} is bound to vfio-pci "
                            "(echo vfio-pci > .../driver_override, then bind it)") from None
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise VfioError(f"{self.path}: IOMMU group {number} is already in use (by another VMM or "
                                "process)") from None
            raise VfioError(f"{self.path}: {os.strerror(exc.errno or 0)}") from None
        try:
            status = bytearray(uapi.GROUP_STATUS.pack(uapi.GROUP_STATUS.size, 0))
            _ioctl(self.kernel, self.fd, uapi.VFIO_GROUP_GET_STATUS, status, f"{self.path}: VFIO_GROUP_GET_STATUS")
            _argsz, flags = uapi.GROUP_STATUS.unpack(status)
            if not flags & uapi.VFIO_GROUP_FLAGS_VIABLE:
                raise VfioError(f"IOMMU group {number} is not viable: every device in it must be bound to vfio-pci "
                                f"or to no driver (see /sys/kernel/iommu_groups/{number}/devices)")
            fd_arg = bytearray(container.fd.to_bytes(4, "little", signed=True))
            _ioctl(self.kernel, self.fd, uapi.VFIO_GROUP_SET_CONTAINER, fd_arg,
                   f"{self.path}: VFIO_GROUP_SET_CONTAINER")
            self.in_container = True
            container.set_iommu()
        except BaseException:
            self.kernel.close(self.fd)
            raise

    def open_device(self, name: str) -> int:
        """``VFIO_GROUP_GET_DEVICE_FD`` for the device named ``name`` (``0000:01:00.0``)."""
        arg = bytearray(name.encode() + b"\0")
        try:
            return self.kernel.ioctl(self.fd, uapi.VFIO_GROUP_GET_DEVICE_FD, arg)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise VfioError(f"device {name} is already in use (another VMM holds it open)") from None
            raise VfioError(f"{self.path}: VFIO_GROUP_GET_DEVICE_FD {name}: {os.strerror(exc.errno or 0)}") from None

    def close(self) -> None:
        if self.in_container:
            try:
                self.kernel.ioctl(self.fd, uapi.VFIO_GROUP_UNSET_CONTAINER, 0)
            except OSError as exc:
                log.warning("vfio.unset_container_failed", group=self.number, error=os.strerror(exc.errno or 0))
            self.in_container = False
        self.kernel.close(self.fd)


class VfioDeviceFd:
    """A device fd: its info, regions, interrupts and reset."""

    def __init__(self, kernel: VfioKernel, fd: int, name: str) -> None:
        self.kernel = kernel
        self.fd = fd
        self.name = name
        try:
            buf = bytearray(uapi.DEVICE_INFO.pack(uapi.DEVICE_INFO.size, 0, 0, 0, 0, 0))
            _ioctl(kernel, fd, uapi.VFIO_DEVICE_GET_INFO, buf, f"{name}: VFIO_DEVICE_GET_INFO")
            _argsz, flags, regions, irqs, _cap, _pad = uapi.DEVICE_INFO.unpack(buf)
            self.info = uapi.DeviceInfo(flags, regions, irqs)
            if not self.info.is_pci:
                raise VfioError(f"{name} is not a PCI device (VFIO_DEVICE_FLAGS_PCI is clear)")
            if regions <= uapi.VFIO_PCI_CONFIG_REGION_INDEX:
                raise VfioError(f"{name}: only {regions} regions, no PCI configuration space region")
        except BaseException:
            kernel.close(fd)
            raise

    def region_info(self, index: int) -> uapi.RegionInfo:
        """``VFIO_DEVICE_GET_REGION_INFO``, asked again with the ``argsz`` the kernel wants when
        the region has capabilities (sparse mmap areas, MSI-X mappable)."""
        size = uapi.REGION_INFO.size
        for _ in range(2):
            buf = bytearray(uapi.REGION_INFO.pack(size, 0, index, 0, 0, 0)) + bytes(size - uapi.REGION_INFO.size)
            _ioctl(self.kernel, self.fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf,
                   f"{self.name}: VFIO_DEVICE_GET_REGION_INFO {index}")
            wanted = uapi.REGION_INFO.unpack_from(buf)[0]
            if wanted <= size or wanted > 1 << 16:
                return uapi.parse_region_info(bytes(buf))
            size = wanted
        return uapi.parse_region_info(bytes(buf))

    def irq_info(self, index: int) -> uapi.IrqInfo:
        buf = bytearray(uapi.IRQ_INFO.pack(uapi.IRQ_INFO.size, 0, index, 0))
        _ioctl(self.kernel, self.fd, uapi.VFIO_DEVICE_GET_IRQ_INFO, buf,
               f"{self.name}: VFIO_DEVICE_GET_IRQ_INFO {index}")
        _argsz, flags, got_index, count = uapi.IRQ_INFO.unpack(buf)
        return uapi.IrqInfo(got_index, flags, count)

    def set_irqs(self, index: int, flags: int, start: int, count: int, data: bytes = b"") -> None:
        _ioctl(self.kernel, self.fd, uapi.VFIO_DEVICE_SET_IRQS, uapi.irq_set(index, flags, start, count, data),
               f"{self.name}: VFIO_DEVICE_SET_IRQS index {index}")

    def set_eventfds(self, index: int, fds: list[int]) -> None:
        """Trigger eventfds for vectors 0..len-1 of ``index`` (none: disable the interrupt)."""
        if fds:
            self.set_irqs(index, uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER, 0, len(fds),
                          uapi.eventfd_data(fds))
        else:
            self.set_irqs(index, uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)

    def reset(self) -> bool:
        """``VFIO_DEVICE_RESET`` when the device offers it; whether it was reset."""
        if not self.info.resettable:
            return False
        _ioctl(self.kernel, self.fd, uapi.VFIO_DEVICE_RESET, 0, f"{self.name}: VFIO_DEVICE_RESET")
        return True

    def read(self, region: uapi.RegionInfo, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` in ``region``; all ones where the kernel refuses."""
        try:
            data = self.kernel.pread(self.fd, size, region.offset + offset)
        except OSError:
            return b"\xff" * size
        return data if len(data) == size else (data + b"\xff" * size)[:size]

    def write(self, region: uapi.RegionInfo, offset: int, data: bytes) -> None:
        try:
            self.kernel.pwrite(self.fd, data, region.offset + offset)
        except OSError as exc:
            log.debug("vfio.write_refused", device=self.name, region=region.index, offset=offset,
                      error=os.strerror(exc.errno or 0))

    def close(self) -> None:
        self.kernel.close(self.fd)


def open_device(container: VfioContainer, groups: dict[str, tuple[VfioGroup, int]], sysfs_device: str,
                group_ready: Callable[[], None]) -> tuple[VfioGroup, VfioDeviceFd]:
    """The group (shared, reference-counted in ``groups``) and the device fd for
    ``sysfs_device``; ``group_ready`` runs once the group is in the container with its IOMMU
    model and before the device fd is asked for (DMA mapping, as vfio.rst's example orders it)."""
    number = iommu_group_of(sysfs_device)
    name = os.path.basename(sysfs_device.rstrip("/"))
    entry = groups.get(number)
    if entry is None:
        group = VfioGroup(container, number)
        uses = 0
    else:
        group, uses = entry
    try:
        group_ready()
        fd = group.open_device(name)
        device = VfioDeviceFd(group.kernel, fd, name)
    except BaseException:
        if uses == 0:
            group.close()
        raise
    groups[number] = (group, uses + 1)
    return group, device
