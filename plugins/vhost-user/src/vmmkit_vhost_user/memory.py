"""The frontend's guest memory, as a vhost-user backend sees it (``SET_MEM_TABLE``).

Each region arrives as a descriptor (a memfd, or a hugetlbfs or shared file) with its
guest-physical address, size, the frontend's own virtual address of it (``userspace_addr``,
in which SET_VRING_ADDR gives the rings) and an offset into the file. The regions are mapped
shared and become a :class:`vmmkit.memory.GuestMemory`, so the core's bounds-checked guest
access and virtqueue walker serve them unchanged.

The frontend is not trusted either: a region must be page aligned, inside its file (a mapping
past the end of a file would fault with SIGBUS on first touch), and not overlap another.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
from collections.abc import Sequence

from attrs import frozen

from vmmkit.errors import GuestMemoryError
from vmmkit.memory import GuestMemory, GuestRegion, MemoryRange, close_region
from vmmkit.vhost_user.protocol import MemoryRegion, VhostUserProtocolError


@frozen
class UserRange:
    """Where a region lies in the frontend's address space."""

    userspace_addr: int
    size: int
    guest_phys_addr: int


class FrontendMemory:
    """The mapped memory table; :meth:`close` unmaps it."""

    def __init__(self, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> None:
        """Map ``regions`` (one descriptor each, in order); the descriptors stay the caller's.

        :raises VhostUserProtocolError: a region the backend refuses (nothing stays mapped).
        """
        if len(regions) != len(fds):
            raise VhostUserProtocolError(f"memory table of {len(regions)} regions came with {len(fds)} descriptors")
        self.memory = GuestMemory()
        self.ranges: list[UserRange] = []
        try:
            for slot, (region, fd) in enumerate(zip(regions, fds, strict=True)):
                mapped = _map(region, fd, slot)
                try:
                    self.memory.add_region(mapped)
                except BaseException:
                    close_region(mapped)
                    raise
                self.ranges.append(UserRange(region.userspace_addr, region.memory_size, region.guest_phys_addr))
        except GuestMemoryError as exc:
            self.close()
            raise VhostUserProtocolError(f"memory table refused: {exc}") from None
        except BaseException:
            self.close()
            raise

    def user_to_guest(self, address: int, length: int) -> int | None:
        """The guest-physical address of ``[address, address + length)`` of the frontend's
        address space, if it lies inside one region; else ``None``."""
        for item in self.ranges:
            if item.userspace_addr <= address and length <= item.size - (address - item.userspace_addr):
                return item.guest_phys_addr + (address - item.userspace_addr)
        return None

    def close(self) -> None:
        self.memory.close()
        self.ranges = []


def _map(region: MemoryRegion, fd: int, slot: int) -> GuestRegion:
    page = mmap.PAGESIZE
    size, offset = region.memory_size, region.mmap_offset
    if region.guest_phys_addr % page or size % page or offset % page:
        raise GuestMemoryError(f"region {region} is not page aligned")
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
        raise GuestMemoryError(f"region {region} runs past the end of its {st.st_size}-byte file")
    if not stat.S_ISREG(st.st_mode):
        raise GuestMemoryError(f"region {region} is not backed by a file or memfd")
    try:
        buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    except (OSError, OverflowError, ValueError) as exc:
        raise GuestMemoryError(f"cannot map region {region}: {exc}") from None
    pin = (ctypes.c_char * size).from_buffer(buffer)  # an export: the mapping outlives no user
    return GuestRegion(MemoryRange(region.guest_phys_addr, size), buffer, ctypes.addressof(pin), slot=slot,
                       pin=pin)
