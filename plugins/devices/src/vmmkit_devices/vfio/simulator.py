"""A simulated ``/dev/vfio`` for contract tests: the :class:`~vmmkit_devices.vfio.kernel.VfioKernel`
calls answered with the kernel's semantics, from the same ``struct vfio_*`` bytes.

This is **not** VFIO: nothing here touches a device or an IOMMU. It exists so the plugin's
logic (config-space filtering, BAR mapping and trapping, MSI/MSI-X/INTx wiring, DMA mapping,
error paths) can be tested on a host without ``/dev/vfio``; what passes here is a *contract
test*. The semantics follow drivers/vfio/vfio_main.c, container.c, vfio_iommu_type1.c and
pci/vfio_pci_core.c (Linux 6.1): the device fd is refused until the group's container has an
IOMMU model (EINVAL), a second open of a device or group is EBUSY, a non-viable group cannot
join a container, MSI cannot be enabled while INTx is (EINVAL), DMA maps must be page aligned
and must not overlap (EEXIST), region info with capabilities asks for a larger ``argsz``.
Interrupts are raised by writing the eventfds the plugin handed over (:meth:`SimDevice.fire`).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Callable

import attrs

from vmmkit_devices.vfio import uapi

_PAGE = 4096
_REGION_SHIFT = 40
_FIRST_FD = 1 << 24  # far above real descriptors


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@attrs.define
class SimBar:
    size: int
    io: bool = False
    mem64: bool = False
    prefetch: bool = False
    mmap: bool = True
    sparse: tuple[tuple[int, int], ...] | None = None


@attrs.define(eq=False)
class SimDevice:
    """A PCI function behind vfio-pci: a 256-byte config space, BARs backed by shared memory
    (what pwrite and an mmap both see), interrupt counts per index, what SET_IRQS armed."""

    name: str
    group: str
    config: bytearray
    bars: dict[int, SimBar]
    irq_counts: dict[int, int]
    resettable: bool = True
    in_use_elsewhere: bool = False
    opened: bool = False
    resets: int = 0
    memory: dict[int, mmap.mmap] = attrs.Factory(dict)
    #: index -> {vector: eventfd} armed for ACTION_TRIGGER; INTx's unmask eventfd.
    triggers: dict[int, dict[int, int]] = attrs.Factory(dict)
    intx_unmask_fd: int | None = None
    intx_unmasks: int = 0
    config_writes: list[tuple[int, bytes]] = attrs.Factory(list)
    bar_writes: list[tuple[int, int, bytes]] = attrs.Factory(list)

    def fire(self, index: int, vector: int = 0) -> bool:
        """The device raises ``vector`` of ``index``: its trigger eventfd is written (False:
        nothing is armed for it, so the interrupt is lost, as on hardware with it disabled)."""
        fd = self.triggers.get(index, {}).get(vector)
        if fd is None:
            return False
        os.eventfd_write(fd, 1)
        return True

    def enabled_index(self) -> int | None:
        for index, vectors in self.triggers.items():
            if vectors:
                return index
        return None


def pci_config(*, vendor: int, device: int, class_code: int = 0x00FF00, header_type: int = 0,
               caps: list[tuple[int, bytes]] | None = None, bars: dict[int, SimBar] | None = None,
               interrupt_pin: int = 1) -> bytearray:
    """A config space with ``caps`` (id, body after the 2-byte header) chained from 0x40."""
    space = bytearray(256)
    struct.pack_into("<HH", space, 0, vendor, device)
    struct.pack_into("<I", space, 8, class_code << 8 | 1)
    space[0x0E] = header_type
    space[0x3D] = interrupt_pin
    for index, bar in (bars or {}).items():
        low = 1 if bar.io else (0x4 if bar.mem64 else 0) | (0x8 if bar.prefetch else 0)
        struct.pack_into("<I", space, 0x10 + 4 * index, low)
    offset, link = 0x40, 0x34
    for cap_id, body in caps or []:
        space[link] = offset
        space[offset] = cap_id
        space[offset + 2: offset + 2 + len(body)] = body
        link = offset + 1
        offset = (offset + 2 + len(body) + 3) & ~3
    if caps:
        space[0x06] |= 0x10
    return space


class SimulatedVfio:
    """``/dev/vfio`` at ``dev_dir`` (a path name only; nothing is created there)."""

    def __init__(self, dev_dir: str = "/sim/dev/vfio") -> None:
        self.dev_dir = dev_dir
        self.devices: dict[str, SimDevice] = {}
        self.viable: dict[str, bool] = {}
        self.present = True
        self._next_fd = _FIRST_FD
        self._fds: dict[int, tuple[str, object]] = {}
        self.calls: list[tuple[str, int]] = []  # (kind of fd, request) of every ioctl
        # container state
        self.iommu: int | None = None
        self.containers: set[int] = set()
        self.dma: dict[int, tuple[int, int]] = {}  # iova -> (size, vaddr)
        self.group_container: dict[str, int | None] = {}
        self.open_groups: set[str] = set()
        self._handlers: dict[tuple[str, int], Callable[[int, object, int | bytearray], int]] = {
            ("container", uapi.VFIO_GET_API_VERSION): self._api_version,
            ("container", uapi.VFIO_CHECK_EXTENSION): self._check_extension,
            ("container", uapi.VFIO_SET_IOMMU): self._set_iommu,
            ("container", uapi.VFIO_IOMMU_MAP_DMA): self._map_dma,
            ("container", uapi.VFIO_IOMMU_UNMAP_DMA): self._unmap_dma,
            ("group", uapi.VFIO_GROUP_GET_STATUS): self._group_status,
            ("group", uapi.VFIO_GROUP_SET_CONTAINER): self._set_container,
            ("group", uapi.VFIO_GROUP_UNSET_CONTAINER): self._unset_container,
            ("group", uapi.VFIO_GROUP_GET_DEVICE_FD): self._get_device_fd,
            ("device", uapi.VFIO_DEVICE_GET_INFO): self._device_info,
            ("device", uapi.VFIO_DEVICE_GET_REGION_INFO): self._region_info,
            ("device", uapi.VFIO_DEVICE_GET_IRQ_INFO): self._irq_info,
            ("device", uapi.VFIO_DEVICE_SET_IRQS): self._set_irqs,
            ("device", uapi.VFIO_DEVICE_RESET): self._reset,
        }

    # -- set-up ----------------------------------------------------------------------------------

    def add_device(self, device: SimDevice, *, viable: bool = True) -> SimDevice:
        self.devices[device.name] = device
        self.viable.setdefault(device.group, viable)
        self.group_container.setdefault(device.group, None)
        for index, bar in device.bars.items():
            device.memory[index] = mmap.mmap(-1, max(bar.size, _PAGE))
        return device

    # -- VfioKernel ------------------------------------------------------------------------------

    def _new_fd(self, kind: str, obj: object) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = (kind, obj)
        return fd

    def open(self, path: str) -> int:
        if not self.present or os.path.dirname(path) != self.dev_dir:
            raise _err(errno.ENOENT)
        name = os.path.basename(path)
        if name == "vfio":
            fd = self._new_fd("container", None)
            self.containers.add(fd)
            return fd
        if name not in self.viable:
            raise _err(errno.ENOENT)
        if name in self.open_groups:
            raise _err(errno.EBUSY)
        self.open_groups.add(name)
        return self._new_fd("group", name)

    def close(self, fd: int) -> None:
        kind, obj = self._fds.pop(fd)
        if kind == "group":
            assert isinstance(obj, str)
            self.open_groups.discard(obj)
            self._leave_container(obj)
        elif kind == "device":
            assert isinstance(obj, SimDevice)
            obj.opened = False
            obj.triggers.clear()
            obj.intx_unmask_fd = None
        elif kind == "container":
            self.containers.discard(fd)
            for group, container in self.group_container.items():
                if container == fd:
                    self.group_container[group] = None
            self.iommu = None
            self.dma.clear()

    def _leave_container(self, group: str) -> None:
        if self.group_container.get(group) is not None:
            self.group_container[group] = None
            if not any(c is not None for c in self.group_container.values()):
                self.iommu = None  # the last group leaving tears the IOMMU context down
                self.dma.clear()

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        if fd not in self._fds:
            raise _err(errno.EBADF)
        kind, obj = self._fds[fd]
        self.calls.append((kind, request))
        handler = self._handlers.get((kind, request))
        if handler is None:
            raise _err(errno.ENOTTY)
        return handler(fd, obj, arg)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        device, index, at = self._region_access(fd, size, offset)
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            return bytes(device.config[at: at + size])
        return bytes(device.memory[index][at: at + size])

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        device, index, at = self._region_access(fd, len(data), offset)
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            device.config_writes.append((at, bytes(data)))
            if at >= 0x40 or at == 0x04:  # the command register and beyond the header take writes
                device.config[at: at + len(data)] = data
            return len(data)
        device.bar_writes.append((index, at, bytes(data)))
        device.memory[index][at: at + len(data)] = data
        return len(data)

    def mmap(self, fd: int, size: int, offset: int) -> _SimMapping:
        device, index, at = self._region_access(fd, size, offset)
        bar = device.bars.get(index)
        if bar is None or not bar.mmap or at % _PAGE or size % _PAGE:
            raise _err(errno.EINVAL)
        areas = bar.sparse if bar.sparse is not None else ((0, bar.size),)
        if not any(start <= at and at + size <= start + length for start, length in areas):
            raise _err(errno.EINVAL)
        return _SimMapping(device.memory[index], at, size)

    def _region_access(self, fd: int, size: int, offset: int) -> tuple[SimDevice, int, int]:
        kind, obj = self._fds.get(fd, ("", None))
        if kind != "device" or not isinstance(obj, SimDevice):
            raise _err(errno.EBADF)
        index, at = offset >> _REGION_SHIFT, offset & ((1 << _REGION_SHIFT) - 1)
        limit = 256 if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX else (
            obj.bars[index].size if index in obj.bars else 0)
        if at + size > limit or size <= 0:
            raise _err(errno.EINVAL)
        return obj, index, at

    # -- the container (drivers/vfio/container.c, vfio_iommu_type1.c) ------------------------------

    def _api_version(self, fd: int, obj: object, arg: int | bytearray) -> int:  # GET_API_VERSION
        return uapi.VFIO_API_VERSION

    def _check_extension(self, fd: int, obj: object, arg: int | bytearray) -> int:  # CHECK_EXTENSION
        return 1 if arg in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU) else 0

    def _set_iommu(self, fd: int, obj: object, arg: int | bytearray) -> int:  # SET_IOMMU
        if fd not in self.group_container.values() or self.iommu is not None:
            raise _err(errno.EINVAL)  # no group yet, or a model already set
        if arg not in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU):
            raise _err(errno.EINVAL)
        self.iommu = int(arg)
        return 0

    def _map_dma(self, fd: int, obj: object, arg: int | bytearray) -> int:  # IOMMU_MAP_DMA
        assert isinstance(arg, bytearray)
        argsz, flags, vaddr, iova, size = uapi.DMA_MAP.unpack_from(arg)
        if self.iommu is None or argsz < uapi.DMA_MAP.size or not size or (vaddr | iova | size) % _PAGE:
            raise _err(errno.EINVAL)
        if not flags & (uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE):
            raise _err(errno.EINVAL)
        for start, (length, _) in self.dma.items():
            if start < iova + size and iova < start + length:
                raise _err(errno.EEXIST)
        self.dma[iova] = (size, vaddr)
        return 0

    def _unmap_dma(self, fd: int, obj: object, arg: int | bytearray) -> int:  # IOMMU_UNMAP_DMA
        assert isinstance(arg, bytearray)
        argsz, _flags, iova, size = uapi.DMA_UNMAP.unpack_from(arg)
        if self.iommu is None or argsz < uapi.DMA_UNMAP.size:
            raise _err(errno.EINVAL)
        unmapped = 0
        for start in [s for s, (length, _) in self.dma.items() if iova <= s and s + length <= iova + size]:
            unmapped += self.dma.pop(start)[0]
        struct.pack_into("=Q", arg, 16, unmapped)
        return 0

    # -- groups (drivers/vfio/group.c) -----------------------------------------------------------

    def _group_status(self, fd: int, group: object, arg: int | bytearray) -> int:  # GROUP_GET_STATUS
        assert isinstance(arg, bytearray) and isinstance(group, str)
        argsz, _ = uapi.GROUP_STATUS.unpack_from(arg)
        if argsz < uapi.GROUP_STATUS.size:
            raise _err(errno.EINVAL)
        flags = (uapi.VFIO_GROUP_FLAGS_VIABLE if self.viable[group] else 0) | (
            uapi.VFIO_GROUP_FLAGS_CONTAINER_SET if self.group_container[group] is not None else 0)
        uapi.GROUP_STATUS.pack_into(arg, 0, argsz, flags)
        return 0

    def _set_container(self, fd: int, group: object, arg: int | bytearray) -> int:  # GROUP_SET_CONTAINER
        assert isinstance(arg, bytearray) and isinstance(group, str)
        (container,) = struct.unpack_from("=i", arg)
        if self.group_container[group] is not None:
            raise _err(errno.EINVAL)
        if not self.viable[group]:
            raise _err(errno.EPERM)
        if container not in self.containers:
            raise _err(errno.EBADF)
        self.group_container[group] = container
        return 0

    def _unset_container(self, fd: int, group: object, arg: int | bytearray) -> int:  # GROUP_UNSET_CONTAINER
        assert isinstance(group, str)
        if self.group_container[group] is None:
            raise _err(errno.EINVAL)
        if any(d.opened for d in self.devices.values() if d.group == group):
            raise _err(errno.EBUSY)
        self._leave_container(group)
        return 0

    def _get_device_fd(self, fd: int, group: object, arg: int | bytearray) -> int:  # GROUP_GET_DEVICE_FD
        assert isinstance(arg, bytearray) and isinstance(group, str)
        name = bytes(arg).split(b"\0", 1)[0].decode()
        if self.group_container[group] is None or self.iommu is None:
            raise _err(errno.EINVAL)
        device = self.devices.get(name)
        if device is None or device.group != group:
            raise _err(errno.ENODEV)
        if device.opened or device.in_use_elsewhere:
            raise _err(errno.EBUSY)
        device.opened = True
        return self._new_fd("device", device)

    # -- devices (drivers/vfio/pci/vfio_pci_core.c) ----------------------------------------------

    def _device_info(self, fd: int, device: object, arg: int | bytearray) -> int:  # DEVICE_GET_INFO
        assert isinstance(arg, bytearray) and isinstance(device, SimDevice)
        argsz = struct.unpack_from("=I", arg)[0]
        if argsz < 16:
            raise _err(errno.EINVAL)
        flags = uapi.VFIO_DEVICE_FLAGS_PCI | (uapi.VFIO_DEVICE_FLAGS_RESET if device.resettable else 0)
        struct.pack_into("=IIII", arg, 0, argsz, flags, 9, 5)
        return 0

    def _region_info(self, fd: int, device: object, arg: int | bytearray) -> int:  # GET_REGION_INFO
        assert isinstance(arg, bytearray) and isinstance(device, SimDevice)
        argsz, _flags, index, _cap, _size, _offset = uapi.REGION_INFO.unpack_from(arg)
        if argsz < uapi.REGION_INFO.size or index >= 9:
            raise _err(errno.EINVAL)
        offset = index << _REGION_SHIFT
        caps = b""
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            flags, size = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE, 256
        elif index in device.bars:
            bar = device.bars[index]
            flags = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
            size = bar.size
            if bar.mmap and not bar.io:
                flags |= uapi.VFIO_REGION_INFO_FLAG_MMAP
                if bar.sparse is not None:
                    areas = b"".join(uapi.SPARSE_MMAP_AREA.pack(o, s) for o, s in bar.sparse)
                    caps = (uapi.INFO_CAP_HEADER.pack(uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 0)
                            + uapi.SPARSE_MMAP_HEADER.pack(len(bar.sparse), 0) + areas)
        else:
            flags, size = 0, 0
        cap_offset = 0
        if caps:
            flags |= uapi.VFIO_REGION_INFO_FLAG_CAPS
            needed = uapi.REGION_INFO.size + len(caps)
            if argsz < needed:
                argsz = needed  # "call again with this argsz"; cap_offset stays 0
            else:
                cap_offset = uapi.REGION_INFO.size
                arg[cap_offset: cap_offset + len(caps)] = caps
        uapi.REGION_INFO.pack_into(arg, 0, argsz, flags, index, cap_offset, size, offset)
        return 0

    def _irq_info(self, fd: int, device: object, arg: int | bytearray) -> int:  # GET_IRQ_INFO
        assert isinstance(arg, bytearray) and isinstance(device, SimDevice)
        argsz, _flags, index, _count = uapi.IRQ_INFO.unpack_from(arg)
        if argsz < uapi.IRQ_INFO.size or index >= 5:
            raise _err(errno.EINVAL)
        count = device.irq_counts.get(index, 0)
        flags = uapi.VFIO_IRQ_INFO_EVENTFD if count else 0
        if index == uapi.VFIO_PCI_INTX_IRQ_INDEX and count:
            flags |= uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED
        elif count:
            flags |= uapi.VFIO_IRQ_INFO_NORESIZE
        uapi.IRQ_INFO.pack_into(arg, 0, argsz, flags, index, count)
        return 0

    def _set_irqs(self, fd: int, device: object, arg: int | bytearray) -> int:  # SET_IRQS
        assert isinstance(arg, bytearray) and isinstance(device, SimDevice)
        argsz, flags, index, start, count = uapi.IRQ_SET.unpack_from(arg)
        data_type, action = flags & uapi.VFIO_IRQ_SET_DATA_TYPE_MASK, flags & uapi.VFIO_IRQ_SET_ACTION_TYPE_MASK
        if bin(data_type).count("1") != 1 or bin(action).count("1") != 1 or flags & ~0x3F:
            raise _err(errno.EINVAL)
        available = device.irq_counts.get(index, 0)
        if start + count > available or (count == 0 and data_type != uapi.VFIO_IRQ_SET_DATA_NONE):
            raise _err(errno.EINVAL)
        width = {uapi.VFIO_IRQ_SET_DATA_NONE: 0, uapi.VFIO_IRQ_SET_DATA_BOOL: 1,
                 uapi.VFIO_IRQ_SET_DATA_EVENTFD: 4}[data_type]
        if argsz < uapi.IRQ_SET.size + width * count or len(arg) < argsz:
            raise _err(errno.EINVAL)
        if action == uapi.VFIO_IRQ_SET_ACTION_TRIGGER:
            enabled = device.enabled_index()
            if count == 0:
                if enabled == index:
                    device.triggers[index] = {}
                    if index == uapi.VFIO_PCI_INTX_IRQ_INDEX:
                        device.intx_unmask_fd = None  # vfio_intx_disable drops the unmask eventfd too
                return 0
            if enabled is not None and enabled != index:
                raise _err(errno.EINVAL)  # one interrupt type at a time
            if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
                fds = struct.unpack_from(f"={count}i", arg, uapi.IRQ_SET.size)
                armed = device.triggers.setdefault(index, {})
                for i, efd in enumerate(fds):
                    if efd < 0:
                        armed.pop(start + i, None)
                    else:
                        os.fstat(efd)  # EBADF for a descriptor that is not open
                        armed[start + i] = efd
            return 0
        if index != uapi.VFIO_PCI_INTX_IRQ_INDEX or not device.triggers.get(index) or start != 0 or count != 1:
            raise _err(errno.EINVAL)  # masking is INTx's only, while INTx is enabled (vfio_pci_set_intx_unmask)
        if action == uapi.VFIO_IRQ_SET_ACTION_UNMASK:
            if data_type == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
                (efd,) = struct.unpack_from("=i", arg, uapi.IRQ_SET.size)
                device.intx_unmask_fd = efd if efd >= 0 else None
            else:
                device.intx_unmasks += 1
        return 0

    def _reset(self, fd: int, device: object, arg: int | bytearray) -> int:  # DEVICE_RESET
        assert isinstance(device, SimDevice)
        if not device.resettable:
            raise _err(errno.EINVAL)
        device.resets += 1
        return 0


class _SimMapping:
    def __init__(self, memory: mmap.mmap, offset: int, size: int) -> None:
        import cffi

        ffi = cffi.FFI()
        self._pin = ffi.from_buffer(memory)
        self.address = int(ffi.cast("uintptr_t", self._pin)) + offset
        self.size = size
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self._pin = None


def sysfs_device(root: str, name: str, group: str | None) -> str:
    """A device directory under ``root`` laid out as sysfs has it (``iommu_group`` a symlink to
    ``../../../kernel/iommu_groups/<n>``; none when ``group`` is ``None``). Real files."""
    path = os.path.join(root, "bus", "pci", "devices", name)
    os.makedirs(path, exist_ok=True)
    if group is not None:
        target = os.path.join(root, "kernel", "iommu_groups", group)
        os.makedirs(target, exist_ok=True)
        link = os.path.join(path, "iommu_group")
        if not os.path.islink(link):
            os.symlink(os.path.relpath(target, path), link)
    return path
