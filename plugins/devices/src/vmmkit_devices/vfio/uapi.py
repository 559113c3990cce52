"""The VFIO user API as Linux defines it (``include/uapi/linux/vfio.h``), packed with ``struct``.

Only what vmmkit uses: the container and group ioctls (``VFIO_GET_API_VERSION`` ...
``VFIO_GROUP_GET_DEVICE_FD``), the device ioctls (``VFIO_DEVICE_GET_INFO``, ``GET_REGION_INFO``
with its capability chain, ``GET_IRQ_INFO``, ``SET_IRQS``, ``RESET``) and the type-1 IOMMU's
``VFIO_IOMMU_MAP_DMA`` / ``UNMAP_DMA``. Every VFIO ioctl is ``_IO(';', 100 + n)``: the argument
sizes live in each structure's ``argsz``, not in the request number (Documentation/driver-api/
vfio.rst). ``tests/unit/vfio/test_uapi_layout.py`` compiles these numbers and sizes against the
host's ``<linux/vfio.h>`` with gcc.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from attrs import frozen

VFIO_TYPE: Final = ord(";")
VFIO_BASE: Final = 100
VFIO_API_VERSION: Final = 0


def _io(nr: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + nr)`` (asm-generic/ioctl.h: type << 8 | number)."""
    return VFIO_TYPE << 8 | (VFIO_BASE + nr)


VFIO_GET_API_VERSION: Final = _io(0)
VFIO_CHECK_EXTENSION: Final = _io(1)
VFIO_SET_IOMMU: Final = _io(2)
VFIO_GROUP_GET_STATUS: Final = _io(3)
VFIO_GROUP_SET_CONTAINER: Final = _io(4)
VFIO_GROUP_UNSET_CONTAINER: Final = _io(5)
VFIO_GROUP_GET_DEVICE_FD: Final = _io(6)
VFIO_DEVICE_GET_INFO: Final = _io(7)
VFIO_DEVICE_GET_REGION_INFO: Final = _io(8)
VFIO_DEVICE_GET_IRQ_INFO: Final = _io(9)
VFIO_DEVICE_SET_IRQS: Final = _io(10)
VFIO_DEVICE_RESET: Final = _io(11)
VFIO_IOMMU_GET_INFO: Final = _io(12)
VFIO_IOMMU_MAP_DMA: Final = _io(13)
VFIO_IOMMU_UNMAP_DMA: Final = _io(14)

#: Every ioctl request the plugin issues (for seccomp argument filters, should vmmkit get them).
REQUESTS: Final = (VFIO_GET_API_VERSION, VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU, VFIO_GROUP_GET_STATUS,
                   VFIO_GROUP_SET_CONTAINER, VFIO_GROUP_UNSET_CONTAINER, VFIO_GROUP_GET_DEVICE_FD,
                   VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_GET_IRQ_INFO,
                   VFIO_DEVICE_SET_IRQS, VFIO_DEVICE_RESET, VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA)

#: IOMMU types (VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU).
VFIO_TYPE1_IOMMU: Final = 1
VFIO_TYPE1v2_IOMMU: Final = 3

#: struct vfio_group_status.flags
VFIO_GROUP_FLAGS_VIABLE: Final = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET: Final = 1 << 1

#: struct vfio_device_info.flags
VFIO_DEVICE_FLAGS_RESET: Final = 1 << 0
VFIO_DEVICE_FLAGS_PCI: Final = 1 << 1

#: struct vfio_region_info.flags
VFIO_REGION_INFO_FLAG_READ: Final = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE: Final = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP: Final = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS: Final = 1 << 3
#: Region capability IDs.
VFIO_REGION_INFO_CAP_SPARSE_MMAP: Final = 1
VFIO_REGION_INFO_CAP_TYPE: Final = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: Final = 3

#: vfio-pci region and IRQ indexes.
VFIO_PCI_BAR0_REGION_INDEX: Final = 0
VFIO_PCI_ROM_REGION_INDEX: Final = 6
VFIO_PCI_CONFIG_REGION_INDEX: Final = 7
VFIO_PCI_INTX_IRQ_INDEX: Final = 0
VFIO_PCI_MSI_IRQ_INDEX: Final = 1
VFIO_PCI_MSIX_IRQ_INDEX: Final = 2

#: struct vfio_irq_info.flags
VFIO_IRQ_INFO_EVENTFD: Final = 1 << 0
VFIO_IRQ_INFO_MASKABLE: Final = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED: Final = 1 << 2
VFIO_IRQ_INFO_NORESIZE: Final = 1 << 3

#: struct vfio_irq_set.flags: one DATA_ and one ACTION_ bit.
VFIO_IRQ_SET_DATA_NONE: Final = 1 << 0
VFIO_IRQ_SET_DATA_BOOL: Final = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD: Final = 1 << 2
VFIO_IRQ_SET_ACTION_MASK: Final = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK: Final = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER: Final = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK: Final = 0x7
VFIO_IRQ_SET_ACTION_TYPE_MASK: Final = 0x38

#: struct vfio_iommu_type1_dma_map.flags
VFIO_DMA_MAP_FLAG_READ: Final = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE: Final = 1 << 1

# Layouts (all native-endian, naturally aligned; x86-64 and arm64 agree).
GROUP_STATUS: Final = struct.Struct("=II")  # argsz, flags
DEVICE_INFO: Final = struct.Struct("=IIIIII")  # argsz, flags, num_regions, num_irqs, cap_offset, pad (6.2+)
REGION_INFO: Final = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
INFO_CAP_HEADER: Final = struct.Struct("=HHI")  # id, version, next
SPARSE_MMAP_HEADER: Final = struct.Struct("=II")  # nr_areas, reserved (after the cap header)
SPARSE_MMAP_AREA: Final = struct.Struct("=QQ")  # offset, size
IRQ_INFO: Final = struct.Struct("=IIII")  # argsz, flags, index, count
IRQ_SET: Final = struct.Struct("=IIIII")  # argsz, flags, index, start, count; data[] follows
DMA_MAP: Final = struct.Struct("=IIQQQ")  # argsz, flags, vaddr, iova, size
DMA_UNMAP: Final = struct.Struct("=IIQQ")  # argsz, flags, iova, size

#: Capability chains are walked at most this far (a kernel bug must not loop us forever).
_MAX_CAPS: Final = 64


@frozen
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int

    @property
    def resettable(self) -> bool:
        return bool(self.flags & VFIO_DEVICE_FLAGS_RESET)

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & VFIO_DEVICE_FLAGS_PCI)


@frozen
class RegionInfo:
    """One region of the device fd: ``size`` bytes at file ``offset``; ``sparse`` lists the
    ``(offset, size)`` areas that may be mmapped when the region has a sparse-mmap capability
    (``None``: the whole region, if ``FLAG_MMAP``)."""

    index: int
    flags: int
    size: int
    offset: int
    sparse: tuple[tuple[int, int], ...] | None = None
    msix_mappable: bool = False

    @property
    def readable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_WRITE)

    def mmap_areas(self) -> tuple[tuple[int, int], ...]:
        """The ``(offset, size)`` areas the kernel lets userspace mmap (none without FLAG_MMAP)."""
        if not self.flags & VFIO_REGION_INFO_FLAG_MMAP or self.size == 0:
            return ()
        if self.sparse is None:
            return ((0, self.size),)
        return tuple((off, size) for off, size in self.sparse if size > 0 and off + size <= self.size)


@frozen
class IrqInfo:
    index: int
    flags: int
    count: int

    @property
    def eventfd(self) -> bool:
        return bool(self.flags & VFIO_IRQ_INFO_EVENTFD)


def parse_region_info(buffer: bytes) -> RegionInfo:
    """A ``struct vfio_region_info`` and, with ``FLAG_CAPS``, its capability chain (offsets
    from the start of the buffer; ``next`` 0 ends it). Unknown capabilities are skipped; a
    chain that points outside the buffer or loops is cut there."""
    _argsz, flags, index, cap_offset, size, offset = REGION_INFO.unpack_from(buffer)
    sparse: list[tuple[int, int]] | None = None
    msix_mappable = False
    if flags & VFIO_REGION_INFO_FLAG_CAPS:
        for cap_id, at in _caps(buffer, cap_offset):
            if cap_id == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                body = at + INFO_CAP_HEADER.size
                if body + SPARSE_MMAP_HEADER.size > len(buffer):
                    continue
                count, _ = SPARSE_MMAP_HEADER.unpack_from(buffer, body)
                first = body + SPARSE_MMAP_HEADER.size
                count = min(count, (len(buffer) - first) // SPARSE_MMAP_AREA.size)
                sparse = [SPARSE_MMAP_AREA.unpack_from(buffer, first + i * SPARSE_MMAP_AREA.size)
                          for i in range(count)]
            elif cap_id == VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                msix_mappable = True
    return RegionInfo(index, flags, size, offset, tuple(sparse) if sparse is not None else None, msix_mappable)


def _caps(buffer: bytes, offset: int) -> Iterator[tuple[int, int]]:
    seen: set[int] = set()
    while offset and offset not in seen and len(seen) < _MAX_CAPS:
        if offset < REGION_INFO.size or offset + INFO_CAP_HEADER.size > len(buffer):
            return
        seen.add(offset)
        cap_id, _version, nxt = INFO_CAP_HEADER.unpack_from(buffer, offset)
        yield cap_id, offset
        offset = nxt


def irq_set(index: int, flags: int, start: int, count: int, data: bytes = b"") -> bytearray:
    """A ``struct vfio_irq_set`` with its ``data[]`` (eventfds as s32, or bools as u8)."""
    buffer = bytearray(IRQ_SET.pack(IRQ_SET.size + len(data), flags, index, start, count))
    buffer += data
    return buffer


def eventfd_data(fds: list[int]) -> bytes:
    """``data[]`` for ``DATA_EVENTFD``: one s32 per vector, -1 to de-assign."""
    return struct.pack(f"={len(fds)}i", *fds)
