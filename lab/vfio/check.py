"""Inside the lab, after ``lab/vfio/bind.sh``: prove that the VFIO groups of the given PCI
functions are usable from userspace, with nothing but the kernel's VFIO container/group API
(``include/uapi/linux/vfio.h``; Linux ``Documentation/driver-api/vfio.rst``), as a VMM's VFIO
device would use it:

    python3 lab/vfio/check.py 0000:00:02.0 [1234:11e8 ...]   # functions, or vendor:device ids

For each function: the container's API version and the Type1 v2 IOMMU, the group viable, the
container set, the device file, its regions and interrupts; BAR 0 mapped (``mmap``). For QEMU's
``edu`` (1234:11e8) also: the identification and liveness registers through the mapping, a DMA
round trip from and to memory mapped for the device with ``VFIO_IOMMU_MAP_DMA`` (so through the
emulated IOMMU's translation), and an MSI delivered to an eventfd (``VFIO_DEVICE_SET_IRQS``).
For an NVMe controller (class 0x010802): its version register. One line per fact,
``VMMKIT-VFIO: ...``; exit status 1 if a check failed. Standard library only (the lab's Python).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import select
import struct
import sys
import time
from pathlib import Path

# include/uapi/linux/vfio.h: _IO(VFIO_TYPE ';', VFIO_BASE 100 + n)
VFIO_GET_API_VERSION = 0x3B64
VFIO_CHECK_EXTENSION = 0x3B65
VFIO_SET_IOMMU = 0x3B66
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_SET_CONTAINER = 0x3B68
VFIO_GROUP_GET_DEVICE_FD = 0x3B6A
VFIO_DEVICE_GET_INFO = 0x3B6B
VFIO_DEVICE_GET_REGION_INFO = 0x3B6C
VFIO_DEVICE_SET_IRQS = 0x3B6E
VFIO_IOMMU_MAP_DMA = 0x3B71
VFIO_IOMMU_UNMAP_DMA = 0x3B72
VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_DEVICE_FLAGS_PCI = 2
VFIO_REGION_INFO_FLAG_MMAP = 4
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_DMA_MAP_FLAG_READ_WRITE = 3

EDU = (0x1234, 0x11E8)
NVME_CLASS = 0x010802
#: Where the edu's DMA goes: an IOVA of our choosing, mapped to our own pages.
IOVA = 0x10_0000


class Check:
    def __init__(self) -> None:
        self.failed = 0

    def ok(self, text: str) -> None:
        print(f"VMMKIT-VFIO: {text}", flush=True)

    def fail(self, text: str) -> None:
        self.failed += 1
        print(f"VMMKIT-VFIO: FAIL {text}", flush=True)


def sysfs(bdf: str, name: str) -> int:
    return int(Path(f"/sys/bus/pci/devices/{bdf}/{name}").read_text(), 16)


def region_info(device: int, index: int) -> tuple[int, int, int]:
    """(flags, size, offset) of a region."""
    buf = bytearray(struct.pack("=IIIIQQ", 32, 0, index, 0, 0, 0))
    fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, buf)
    _, flags, _, _, size, offset = struct.unpack("=IIIIQQ", buf)
    return flags, size, offset


def set_msi(device: int, eventfd: int | None) -> None:
    """One MSI vector to ``eventfd``, or MSI off (``None``)."""
    if eventfd is None:
        buf = struct.pack("=IIIII", 20, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                          VFIO_PCI_MSI_IRQ_INDEX, 0, 0)
    else:
        buf = struct.pack("=IIIIIi", 24, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                          VFIO_PCI_MSI_IRQ_INDEX, 0, 1, eventfd)
    fcntl.ioctl(device, VFIO_DEVICE_SET_IRQS, bytearray(buf))


def register(bar: mmap.mmap, offset: int) -> ctypes.c_uint32:
    """A 32-bit register of a mapped BAR: one 32-bit load or store per access (``struct`` would
    move bytes one at a time, which the edu ignores and QEMU answers with a bus error)."""
    return ctypes.c_uint32.from_buffer(bar, offset)


class Edu:
    """The edu's registers through the mapped BAR 0 (hw/misc/edu.c in QEMU)."""

    def __init__(self, bar: mmap.mmap) -> None:
        self.bar = bar

    def read(self, offset: int) -> int:
        return register(self.bar, offset).value

    def write(self, offset: int, value: int) -> None:
        register(self.bar, offset).value = value & 0xFFFFFFFF

    def wait_clear(self, offset: int, mask: int, seconds: float = 10) -> bool:
        end = time.monotonic() + seconds
        while self.read(offset) & mask:
            if time.monotonic() > end:
                return False
            time.sleep(0.001)
        return True

    def dma(self, src: int, dst: int, count: int, to_ram: bool) -> bool:
        self.write(0x80, src)
        self.write(0x88, dst)
        self.write(0x90, count)
        self.write(0x98, 0x1 | (0x2 if to_ram else 0))
        return self.wait_clear(0x98, 0x1)


def check_edu(check: Check, container: int, device: int, bar: mmap.mmap, config: int) -> None:
    edu = Edu(bar)
    ident = edu.read(0)
    if ident & 0xFFFF != 0xED:
        check.fail(f"edu identification 0x{ident:08x}")
        return
    check.ok(f"edu identification 0x{ident:08x} (version {ident >> 24}.{(ident >> 16) & 0xff}) "
             "through the mapped BAR 0")
    edu.write(0x04, 0x12345678)
    live = edu.read(0x04)
    (check.ok if live == 0xEDCBA987 else check.fail)(f"edu liveness: wrote 0x12345678, read 0x{live:08x}")

    # Bus mastering on, through the config region (vfio-pci leaves it to the user).
    command = struct.unpack("<H", os.pread(device, 2, config + 4))[0]
    os.pwrite(device, struct.pack("<H", command | 0x6), config + 4)
    memory = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    vaddr = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    dma_map = struct.pack("=IIQQQ", 32, VFIO_DMA_MAP_FLAG_READ_WRITE, vaddr, IOVA, len(memory))
    try:
        fcntl.ioctl(container, VFIO_IOMMU_MAP_DMA, bytearray(dma_map))
    except OSError as exc:
        check.fail(f"VFIO_IOMMU_MAP_DMA of 2 pages at IOVA 0x{IOVA:x}: {exc}")
        return
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(256))
    memory[:256] = pattern
    page = mmap.PAGESIZE
    done = edu.dma(IOVA, 0x40000, 256, to_ram=False) and edu.dma(0x40000, IOVA + page, 256, to_ram=True)
    back = bytes(memory[page:page + 256])
    if done and back == pattern:
        check.ok(f"edu dma: 256 bytes from IOVA 0x{IOVA:x} to the device and back to IOVA 0x{IOVA + page:x} "
                 "(VFIO_IOMMU_MAP_DMA, through the IOMMU)")
    else:
        differ = sum(a != b for a, b in zip(back, pattern, strict=True))
        check.fail(f"edu dma: {'done' if done else 'not done'}, {differ} bytes differ")

    eventfd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        set_msi(device, eventfd)
        edu.write(0x60, 0x4000)
        ready, _, _ = select.select([eventfd], [], [], 10)
        count = os.eventfd_read(eventfd) if ready else 0
        status = edu.read(0x24)
        edu.write(0x64, 0x4000)
        after = edu.read(0x24)
        if count >= 1 and status == 0x4000 and after == 0:
            check.ok("edu msi: raised 0x4000, the eventfd counted it (VFIO_DEVICE_SET_IRQS), acknowledged")
        else:
            check.fail(f"edu msi: eventfd count {count}, status 0x{status:x}, after acknowledging 0x{after:x}")
        set_msi(device, None)
    except OSError as exc:
        check.fail(f"edu msi: {exc}")
    finally:
        os.close(eventfd)
    os.pwrite(device, struct.pack("<H", command), config + 4)
    fcntl.ioctl(container, VFIO_IOMMU_UNMAP_DMA, bytearray(struct.pack("=IIQQ", 24, 0, IOVA, len(memory))))


def check_function(check: Check, bdf: str) -> None:
    vendor, device_id, klass = sysfs(bdf, "vendor"), sysfs(bdf, "device"), sysfs(bdf, "class")
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
    container = os.open("/dev/vfio/vfio", os.O_RDWR)
    group_fd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    try:
        version = fcntl.ioctl(container, VFIO_GET_API_VERSION)
        type1v2 = fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU)
        if version != VFIO_API_VERSION or not type1v2:
            check.fail(f"container: API version {version}, Type1 v2 IOMMU {'yes' if type1v2 else 'no'}")
            return
        status = bytearray(struct.pack("=II", 8, 0))
        fcntl.ioctl(group_fd, VFIO_GROUP_GET_STATUS, status)
        flags = struct.unpack("=II", status)[1]
        if not flags & VFIO_GROUP_FLAGS_VIABLE:
            check.fail(f"{bdf}: group {group} is not viable (flags 0x{flags:x}): a device of the group "
                       "is bound to another driver")
            return
        fcntl.ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)))
        fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        device = fcntl.ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\0"))
        info = bytearray(struct.pack("=IIII", 16, 0, 0, 0))
        fcntl.ioctl(device, VFIO_DEVICE_GET_INFO, info)
        _, dflags, regions, irqs = struct.unpack("=IIII", info)
        check.ok(f"{bdf} {vendor:04x}:{device_id:04x} class {klass:06x}: group {group} viable, Type1 v2 "
                 f"container, device fd: {'pci' if dflags & VFIO_DEVICE_FLAGS_PCI else 'not pci'}, "
                 f"{regions} regions, {irqs} irq indexes")
        bar_flags, bar_size, bar_offset = region_info(device, 0)
        _, _, config = region_info(device, VFIO_PCI_CONFIG_REGION_INDEX)
        if not bar_flags & VFIO_REGION_INFO_FLAG_MMAP or bar_size == 0:
            check.fail(f"{bdf}: BAR 0 ({bar_size} bytes, flags 0x{bar_flags:x}) cannot be mapped")
            return
        bar = mmap.mmap(device, bar_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=bar_offset)
        check.ok(f"{bdf}: BAR 0 mapped ({bar_size >> 10} KiB)")
        if (vendor, device_id) == EDU:
            check_edu(check, container, device, bar, config)
        elif klass == NVME_CLASS:
            vs = register(bar, 0x08).value
            (check.ok if vs >> 16 >= 1 else check.fail)(
                f"{bdf}: NVMe version register 0x{vs:08x} ({vs >> 16}.{(vs >> 8) & 0xff}) through the mapped BAR 0")
        bar.close()
        os.close(device)
    except OSError as exc:
        check.fail(f"{bdf}: {exc}")
    finally:
        os.close(group_fd)
        os.close(container)


def functions(spec: str) -> list[str]:
    """A function's address as it is, or every function with a ``vendor:device`` id (hex)."""
    if spec.count(":") == 2:
        return [spec]
    vendor, device = (int(part, 16) for part in spec.split(":"))
    return sorted(path.name for path in Path("/sys/bus/pci/devices").iterdir()
                  if (sysfs(path.name, "vendor"), sysfs(path.name, "device")) == (vendor, device))


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: check.py BDF|VENDOR:DEVICE...", file=sys.stderr)
        return 2
    check = Check()
    checked = 0
    for spec in argv:
        found = functions(spec)
        if not found:
            check.fail(f"no PCI function {spec}")
        for bdf in found:
            check_function(check, bdf)
            checked += 1
    check.ok(f"{checked} function(s) checked, {check.failed} failure(s)")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
