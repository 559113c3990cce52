"""virtio-balloon (virtio 1.2, section 5.5, "traditional memory balloon device"): device type
``virtio-balloon``, from ``VmConfig.balloon`` (``--balloon size=,deflate_on_oom=,
free_page_reporting=``), as Cloud Hypervisor's ``virtio-devices/src/balloon.rs``.

The host sets a target (``num_pages``, 4 KiB pages, in the configuration space: ``size=`` at
boot, ``vm.resize desired_balloon=`` later, with a configuration-change interrupt); the driver
inflates towards it by handing pages over on the inflate queue (arrays of le32 page frame
numbers, ``VIRTIO_BALLOON_PFN_SHIFT`` 12), deflates on the deflate queue, and writes the number of
pages it holds in ``actual``. Inflated pages are given back to the host (:func:`release_range`,
the core's ``GuestRegion.discard``: a punched hole for memfd-backed RAM, else ``MADV_DONTNEED``); a deflated
page needs nothing: the next guest access faults in a zero page.

Features: ``VIRTIO_BALLOON_F_DEFLATE_ON_OOM`` with ``deflate_on_oom=on`` (the driver then gives
pages back under memory pressure on its own); ``VIRTIO_BALLOON_F_REPORTING`` with
``free_page_reporting=on``: a third queue (the driver numbers present queues consecutively, so
it is queue 2 without a statistics queue) where the driver reports free page ranges as
device-writable buffers (Linux's ``virtballoon_free_page_report`` uses ``virtqueue_add_inbuf``),
each released like an inflated page and returned with used length 0. No statistics queue, no
free page hinting, no page poisoning (none of them offered).

Every page frame number is hostile: a chain with a device-writable buffer on the inflate or
deflate queue, an array whose length is not a multiple of 4 or longer than
:data:`MAX_PFN_BYTES`, or a page not wholly inside guest RAM (or in read-only memory) fails the
device (``DEVICE_NEEDS_RESET``), and nothing of that chain is released. The VMM never raises.
With ``hugepages=on`` guest RAM cannot be released 4 KiB at a time (``MADV_DONTNEED`` needs
huge-page alignment there, and a hole punched in part of a huge page frees nothing): the balloon
then works for the guest, releases nothing, and counts the bytes in ``unreleased_bytes``.

Counters: ``target_pages`` / ``actual_pages`` (the configuration space), ``inflated_pages``,
``deflated_pages``, ``reported_bytes`` (free page reporting), ``released_bytes`` (given back to
the host), ``unreleased_bytes``.
"""

from __future__ import annotations

import mmap
import struct
import sys
from array import array
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.virtio.device import ActivationContext, VirtioInterruptType
from vmmkit.virtio.queue import Virtqueue
from vmmkit_devices.device_types import VirtioBalloonType as VirtioBalloonType  # declared there, re-exported
from vmmkit_devices.virtio.common import QueueDevice

if TYPE_CHECKING:
    from vmmkit.config import BalloonConfig
    from vmmkit.memory import GuestMemory, GuestRegion

log = get_logger()

VIRTIO_ID_BALLOON: Final = 5
VIRTIO_BALLOON_F_DEFLATE_ON_OOM: Final = 1 << 2
VIRTIO_BALLOON_F_REPORTING: Final = 1 << 5
#: The balloon's page unit, whatever the guest's page size (virtio 1.2, 5.5.6).
PFN_SHIFT: Final = 12
BALLOON_PAGE: Final = 1 << PFN_SHIFT
QUEUE_SIZE: Final = 128
#: Linux refuses a reporting queue smaller than PAGE_REPORTING_CAPACITY (32).
REPORTING_QUEUE_SIZE: Final = 32
#: The longest page frame array one chain may carry (Linux sends at most 256 PFNs, 1 KiB); a
#: longer one fails the device before anything is read, so a chain cannot make the VMM copy
#: gigabytes.
MAX_PFN_BYTES: Final = 1 << 20
INFLATE_QUEUE: Final = 0
DEFLATE_QUEUE: Final = 1
REPORTING_QUEUE: Final = 2
#: ``num_pages``, ``actual``, ``free_page_hint_cmd_id``, ``poison_val`` (all le32).
_CONFIG: Final = struct.Struct("<IIII")
_ACTUAL: Final = slice(4, 8)


class BadPages(Exception):
    """The guest named memory that is not its RAM."""


def page_ranges(memory: GuestMemory, pfns: array[int] | list[int]) -> list[tuple[GuestRegion, int, int]]:
    """The pages ``pfns`` as ``(region, offset, length)`` runs (adjacent pages of one region
    merged), every page checked to lie wholly in writable guest RAM first.

    :raises BadPages: naming the first page that does not.
    """
    runs: list[tuple[GuestRegion, int, int]] = []
    region: GuestRegion | None = None
    for pfn in pfns:
        gpa = pfn << PFN_SHIFT
        if region is None or not region.start <= gpa <= region.start + region.size - BALLOON_PAGE:
            region = memory.find_region(gpa)
            if region is None or gpa + BALLOON_PAGE > region.start + region.size:
                raise BadPages(f"page frame {pfn:#x} (address {gpa:#x}) is not in guest RAM")
            if region.readonly:
                raise BadPages(f"page frame {pfn:#x} (address {gpa:#x}) is in read-only memory")
        offset = gpa - region.start
        if runs and runs[-1][0] is region and runs[-1][1] + runs[-1][2] == offset:
            last = runs[-1]
            runs[-1] = (region, last[1], last[2] + BALLOON_PAGE)
        else:
            runs.append((region, offset, BALLOON_PAGE))
    return runs


def segment_ranges(memory: GuestMemory, gpa: int, length: int) -> Iterator[tuple[GuestRegion, int, int]]:
    """A reported free range as ``(region, offset, length)`` pieces, whole 4 KiB pages only
    (a partial page at either end is left alone).

    :raises BadPages: part of it is not writable guest RAM.
    """
    start = (gpa + BALLOON_PAGE - 1) & ~(BALLOON_PAGE - 1)
    end = (gpa + length) & ~(BALLOON_PAGE - 1)
    while start < end:
        region = memory.find_region(start)
        if region is None or region.readonly:
            raise BadPages(f"reported range {gpa:#x}+{length:#x} is not guest RAM")
        piece = min(end, region.start + region.size) - start
        yield region, start - region.start, piece
        start += piece


def release_range(region: GuestRegion, offset: int, length: int) -> None:
    """Give ``length`` bytes at ``offset`` of ``region`` back to the host (the core's
    :meth:`GuestRegion.discard`: a memfd's hole is punched, not only unmapped); the guest reads
    zeros there next (Cloud Hypervisor's ``release_memory_range``).

    :raises OSError: the host refused.
    """
    region.discard(offset, length)


class BalloonDevice(QueueDevice):
    """A virtio memory balloon.

    :param device_id: the device's id (``__balloon`` by default).
    :param size: the initial target in bytes (rounded down to 4 KiB pages).
    :param deflate_on_oom: offer ``VIRTIO_BALLOON_F_DEFLATE_ON_OOM``.
    :param free_page_reporting: offer ``VIRTIO_BALLOON_F_REPORTING`` (and its queue).
    :param release: give pages back to the host (``False``: guest RAM is on huge pages).
    """

    device_type = VIRTIO_ID_BALLOON
    name = "virtio-balloon"

    def __init__(self, device_id: str, size: int = 0, *, deflate_on_oom: bool = False,
                 free_page_reporting: bool = False, release: bool = True) -> None:
        if mmap.PAGESIZE != BALLOON_PAGE:
            raise DeviceError(f"{device_id}: virtio-balloon needs 4 KiB host pages (this host has "
                              f"{mmap.PAGESIZE})")
        sizes = [QUEUE_SIZE, QUEUE_SIZE] + ([REPORTING_QUEUE_SIZE] if free_page_reporting else [])
        features = ((VIRTIO_BALLOON_F_DEFLATE_ON_OOM if deflate_on_oom else 0)
                    | (VIRTIO_BALLOON_F_REPORTING if free_page_reporting else 0))
        super().__init__(device_id, sizes, features)
        self.deflate_on_oom = deflate_on_oom
        self.free_page_reporting = free_page_reporting
        self.release_pages = release
        self.num_pages = self._pages_of(size)
        self.actual = 0
        self._tell_driver = False  # a target the driver has not been told of (set while paused)
        for name in ("inflated_pages", "deflated_pages", "released_bytes"):
            self.count(name, 0)

    @classmethod
    def from_config(cls, device_id: str, config: BalloonConfig, *, hugepages: bool = False) -> BalloonDevice:
        return cls(device_id, config.size, deflate_on_oom=config.deflate_on_oom,
                   free_page_reporting=config.free_page_reporting, release=not hugepages)

    def _pages_of(self, size: int) -> int:
        if not 0 <= size < (1 << 32) * BALLOON_PAGE:
            raise DeviceError(f"{self.id}: balloon size {size} out of range")
        return size >> PFN_SHIFT

    # -- configuration space and target ------------------------------------------------------

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.num_pages, self.actual, 0, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes ``actual`` (the only field it owns without the hinting and
        poisoning features, which are not offered); other writes are ignored."""
        if offset < _ACTUAL.start or offset + len(data) > _ACTUAL.stop:
            log.debug("virtio_balloon.config_write_ignored", device=self.id, offset=offset, size=len(data))
            return
        current = bytearray(self.config_space()[_ACTUAL])
        current[offset - _ACTUAL.start : offset - _ACTUAL.start + len(data)] = data
        self.actual = int.from_bytes(current, "little")

    def resize(self, size: int) -> None:
        """``vm.resize desired_balloon``: the new target in bytes (Cloud Hypervisor's
        ``Balloon::resize``); an active driver gets a configuration-change interrupt."""
        self.num_pages = self._pages_of(size)
        self._tell_driver = True
        self._notify_target()
        log.info("virtio_balloon.target", device=self.id, pages=self.num_pages)

    def _notify_target(self) -> None:
        """The configuration interrupt for a new target; on a paused device, at resume."""
        ctx = self.context
        if self._tell_driver and ctx is not None and self.running():
            self._tell_driver = False
            ctx.interrupt.trigger(VirtioInterruptType.CONFIG)

    def resumed(self) -> None:
        self._notify_target()

    def activated(self, ctx: ActivationContext) -> None:
        self._tell_driver = False  # a new driver reads num_pages when it probes

    def counters(self) -> Mapping[str, int]:
        return {**super().counters(), "target_pages": self.num_pages, "actual_pages": self.actual}

    def describe(self) -> Mapping[str, Any]:
        return {"size": self.num_pages << PFN_SHIFT, "deflate_on_oom": self.deflate_on_oom,
                "free_page_reporting": self.free_page_reporting}

    def reset(self) -> None:
        super().reset()
        self.actual = 0  # a new driver starts with an empty balloon (the guest was reset)

    # -- queues ------------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        served = 0
        while self.running():
            chain = queue.pop()
            if chain is None:
                break
            try:
                if index == REPORTING_QUEUE:
                    self._report(chain.writable, chain.readable_count, queue)
                elif chain.readable_bytes > MAX_PFN_BYTES:
                    raise BadPages(f"a page frame array of {chain.readable_bytes} bytes (at most {MAX_PFN_BYTES})")
                else:
                    self._pages(index, chain.read(), chain.writable_bytes)
            except BadPages as exc:
                self.fail(queue, f"queue {index}: {exc}")
                return
            queue.add_used(chain.head, 0)
            served += 1
        if served:
            self.signal(queue)

    def _pages(self, index: int, data: bytes, writable: int) -> None:
        if writable:
            raise BadPages("a page frame array must be device-readable only")
        if len(data) % 4:
            raise BadPages(f"a page frame array of {len(data)} bytes is not a multiple of 4")
        pfns = array("I")
        pfns.frombytes(data)
        if sys.byteorder != "little":
            pfns.byteswap()
        runs = page_ranges(self.context.memory if self.context else _no_memory(), pfns)
        if index == DEFLATE_QUEUE:
            self.count("deflated_pages", len(pfns))  # pages fault back in on the guest's next access
            return
        self.count("inflated_pages", len(pfns))
        self._release(runs)

    def _report(self, segments: tuple[Any, ...], readable: int, queue: Virtqueue) -> None:
        if readable or not segments:
            raise BadPages("a free page report must be device-writable buffers only")
        memory = self.context.memory if self.context else _no_memory()
        runs = [run for segment in segments for run in segment_ranges(memory, segment.gpa, segment.length)]
        self.count("reported_bytes", sum(segment.length for segment in segments))
        self._release(runs)

    def _release(self, runs: list[tuple[GuestRegion, int, int]]) -> None:
        total = sum(length for _, _, length in runs)
        if not self.release_pages:
            self.count("unreleased_bytes", total)
            return
        for region, offset, length in runs:
            try:
                release_range(region, offset, length)
            except (OSError, ValueError) as exc:  # the host refused: the guest still gave them up
                self.count("unreleased_bytes", length)
                log.warning("virtio_balloon.release_failed", device=self.id, offset=offset, length=length,
                            error=str(exc))
                continue
            self.count("released_bytes", length)


def _no_memory() -> GuestMemory:
    raise BadPages("the device is not active")


def create(ctx: DeviceContext, request: DeviceRequest) -> BalloonDevice:
    """``VirtioBalloonType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    config = request.config
    if config is None or not hasattr(config, "deflate_on_oom"):
        raise DeviceError(f"{request.id}: virtio-balloon needs a BalloonConfig")
    hugepages = ctx.config.memory.hugepages
    if hugepages:
        log.warning("virtio_balloon.no_release", device=request.id,
                    reason="guest RAM is on huge pages: inflated pages cannot be given back 4 KiB at a time")
    return BalloonDevice.from_config(request.id, config, hugepages=hugepages)
