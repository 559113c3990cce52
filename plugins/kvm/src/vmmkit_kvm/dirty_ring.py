"""KVM's dirty ring: guest writes logged per vCPU, for live migration's pre-copy.

Documentation/virt/kvm/api.rst (``KVM_CAP_DIRTY_LOG_RING``, ``KVM_RESET_DIRTY_RINGS``,
``KVM_EXIT_DIRTY_RING_FULL``): the ring is enabled on the VM with ``KVM_ENABLE_CAP`` before its
first vCPU (its size in bytes, a power of two no larger than what the capability reports); each
vCPU's ring is an array of ``struct kvm_dirty_gfn`` mapped at ``KVM_DIRTY_LOG_PAGE_OFFSET`` pages
of the vCPU fd. For every write to a slot with ``KVM_MEM_LOG_DIRTY_PAGES`` KVM appends ``(slot,
page offset)`` flagged DIRTY; userspace reads the entries in order, flags them RESET and calls
``KVM_RESET_DIRTY_RINGS``, which re-protects those pages and frees the entries. A vCPU whose ring
reaches its soft limit exits with ``KVM_EXIT_DIRTY_RING_FULL`` (and exits again on each entry
until the ring is reset). ``KVM_GET_DIRTY_LOG`` is refused on such a VM, so
:meth:`DirtyRings.take` gives the harvest in the bitmap's shape
(:meth:`vmmkit.hypervisor.Vm.get_dirty_log`).

Entries are read by ``vmk_dirty_ring_harvest()`` (``runloop.c``) with acquire loads and release
stores, as ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` requires (and plain ``KVM_CAP_DIRTY_LOG_RING``
allows). QEMU does the same in ``kvm_dirty_ring_reap`` (accel/kvm/kvm-all.c).

The choice (``VMMKIT_KVM_DIRTY_LOG``): ``auto`` (default) takes the ring where KVM offers it,
``bitmap`` forces ``KVM_GET_DIRTY_LOG``, ``ring`` refuses to create a VM without the ring.
``VMMKIT_KVM_DIRTY_RING_ENTRIES`` sets the ring's entries per vCPU (default
:data:`DEFAULT_ENTRIES`, lowered to what KVM allows).

Overflow: KVM only asks the vCPU to exit at the soft limit (the ring's size less 64 reserved
entries); a vCPU that dirties more than that before it exits fills the ring, and KVM then
overwrites its oldest entries (``kvm_dirty_ring_push`` warns, and writes). The nested ``kvm_pvm``
host does this with a guest writing page after page (measured: 512 entries read from a
512-entry ring). The entries overwritten are lost, and KVM's reset index then points at entries it
already reset, so nothing could ever be reset again and the vCPU would exit with
``KVM_EXIT_DIRTY_RING_FULL`` forever. A harvest that reads a whole ring therefore counts an
overflow, makes every slot report all of its pages once (the log over-reports, never
under-reports); and a harvest that finds nothing at the next entry resynchronises the ring
(``vmk_dirty_ring_resync()``: on a consistent ring it finds nothing to do).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Iterable

from vmmkit.errors import CapabilityError, HypervisorError
from vmmkit.log import get_logger
from vmmkit_kvm import bindings
from vmmkit_kvm._native import ffi, lib

log = get_logger()

MODE_ENV = "VMMKIT_KVM_DIRTY_LOG"
ENTRIES_ENV = "VMMKIT_KVM_DIRTY_RING_ENTRIES"
MODES = ("auto", "ring", "bitmap")
#: ``sizeof(struct kvm_dirty_gfn)``: u32 flags, u32 slot, u64 offset.
ENTRY_BYTES = 16
#: 4096 entries (64 KiB) per vCPU, QEMU's usual ``dirty-ring-size``.
DEFAULT_ENTRIES = 4096


def _mode() -> str:
    mode = os.environ.get(MODE_ENV, "auto") or "auto"
    if mode not in MODES:
        raise CapabilityError("KVM_ENABLE_CAP", None, f"{MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _offered(check: Callable[[int], int]) -> tuple[int, int]:
    """The ring capability to enable (ACQ_REL where offered) and its largest size in bytes (0: none)."""
    acq_rel = check(bindings.Cap.DIRTY_LOG_RING_ACQ_REL)
    if acq_rel > 0:
        return int(bindings.Cap.DIRTY_LOG_RING_ACQ_REL), acq_rel
    return int(bindings.Cap.DIRTY_LOG_RING), max(check(bindings.Cap.DIRTY_LOG_RING), 0)


def describe(check: Callable[[int], int]) -> str:
    """What new VMs will log dirty pages with, for ``vmmkit plugins`` (``check``: KVM_CHECK_EXTENSION)."""
    try:
        mode = _mode()
    except CapabilityError:
        return f"dirty log: {MODE_ENV}={os.environ.get(MODE_ENV)!r} is refused (expected {', '.join(MODES)})"
    cap, max_bytes = _offered(check)
    if mode == "bitmap":
        return f"dirty log: bitmap ({MODE_ENV}=bitmap)"
    if max_bytes <= 0:
        return "dirty log: bitmap (no KVM_CAP_DIRTY_LOG_RING)" if mode == "auto" else \
            f"dirty log: none ({MODE_ENV}=ring, no KVM_CAP_DIRTY_LOG_RING)"
    acq_rel = ", acq_rel" if cap == bindings.Cap.DIRTY_LOG_RING_ACQ_REL else ""
    return f"dirty log: ring (up to {max_bytes // ENTRY_BYTES} entries{acq_rel})"


def choose(vm_fd: bindings.KvmVmFd) -> tuple[int, int] | None:
    """``(capability, entries)`` of the ring to enable on a new VM, or ``None`` for the bitmap;
    refuses a mode or size it cannot honour by name."""
    if _mode() == "bitmap":
        return None
    cap, max_bytes = _offered(vm_fd.check_extension)
    if max_bytes <= 0:
        if _mode() == "ring":
            raise CapabilityError("KVM_ENABLE_CAP", None, f"{MODE_ENV}=ring: KVM_CAP_DIRTY_LOG_RING is missing")
        return None
    text = os.environ.get(ENTRIES_ENV)
    if text:
        try:
            entries = int(text, 0)
        except ValueError:
            raise CapabilityError("KVM_ENABLE_CAP", None, f"{ENTRIES_ENV}={text!r}: not an integer") from None
        if entries <= 0 or entries & (entries - 1) or entries * ENTRY_BYTES > max_bytes:
            raise CapabilityError("KVM_ENABLE_CAP", None, f"{ENTRIES_ENV}={entries}: needs a power of two "
                                  f"of at most {max_bytes // ENTRY_BYTES} entries")
    else:
        entries = DEFAULT_ENTRIES
        while entries * ENTRY_BYTES > max_bytes:
            entries //= 2
    return cap, entries


def create(vm_fd: bindings.KvmVmFd, slots: Callable[[], Iterable[int]]) -> DirtyRings | None:
    """The rings of a new VM (no vCPU yet) as :func:`choose` says, or ``None`` for the bitmap. A
    ring KVM refuses falls back to the bitmap only where nothing asked for it."""
    choice = choose(vm_fd)
    if choice is None:
        return None
    try:
        return DirtyRings(vm_fd, *choice, slots=slots)
    except HypervisorError as exc:
        if _mode() == "ring" or os.environ.get(ENTRIES_ENV):
            raise
        log.warning("kvm.dirty_ring.refused", error=str(exc), fallback="bitmap")
        return None


class _Ring:
    """One vCPU's ring: its mapping, the address C reads it at, the next entry to read."""

    def __init__(self, vcpu_fd: int, entries: int) -> None:
        self.mapping = mmap.mmap(vcpu_fd, entries * ENTRY_BYTES, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE,
                                 offset=lib.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        self.address = ffi.from_buffer(self.mapping)
        self.fetch = ffi.new("uint32_t *", 0)

    def close(self) -> None:
        ffi.release(self.address)
        self.mapping.close()


class DirtyRings:
    """The rings of one VM's vCPUs and what they harvested, per slot, not yet taken.
    ``slots`` lists the VM's memory slots (all of them report every page after an overflow)."""

    def __init__(self, vm_fd: bindings.KvmVmFd, cap: int, entries: int, *,
                 slots: Callable[[], Iterable[int]] = tuple) -> None:
        vm_fd.enable_cap(cap, entries * ENTRY_BYTES)  # before any vCPU: KVM refuses it after
        self._vm_fd = vm_fd
        self._all_slots = slots
        self._lost: set[int] = set()  # slots that report all their pages at their next take
        self.entries = entries
        self.acq_rel = cap == bindings.Cap.DIRTY_LOG_RING_ACQ_REL
        self._lock = threading.Lock()
        self._rings: dict[int, _Ring] = {}  # by vCPU fd
        self._slots = ffi.new("uint32_t[]", entries)
        self._offsets = ffi.new("uint64_t[]", entries)
        self._pending: dict[int, set[int]] = {}
        #: Harvests made, entries read, and ``KVM_EXIT_DIRTY_RING_FULL`` exits served.
        self.harvests = 0
        self.entries_read = 0
        self.full_exits = 0
        self.overflows = 0
        self.resyncs = 0

    @property
    def name(self) -> str:
        return f"ring ({self.entries} entries{', acq_rel' if self.acq_rel else ''})"

    def attach(self, vcpu_fd: int) -> None:
        """Map a new vCPU's ring."""
        ring = _Ring(vcpu_fd, self.entries)
        with self._lock:
            self._rings[vcpu_fd] = ring

    def detach(self, vcpu_fd: int) -> None:
        """Harvest and unmap a vCPU's ring (before its fd closes)."""
        self.harvest()
        with self._lock:
            entry = self._rings.pop(vcpu_fd, None)
        if entry is not None:
            entry.close()

    def harvest(self, *, full_exit: bool = False) -> int:
        """Read every ring's dirty entries into the pending sets, then reset the rings; the
        number of entries read. The vCPU that exited with ``KVM_EXIT_DIRTY_RING_FULL`` calls it
        (``full_exit``) as the collector does."""
        with self._lock:
            read = 0
            for ring in self._rings.values():
                n = self._read(ring)
                # Nothing more at the next entry: if KVM writes further on (it overflowed before),
                # step over the entries it already reset so that it can reset again.
                while skipped := int(lib.vmk_dirty_ring_resync(ring.address, self.entries, ring.fetch)):
                    self.resyncs += 1
                    read += skipped  # marked RESET: KVM_RESET_DIRTY_RINGS must see them
                    n += self._read(ring)
                read += n
                if n >= self.entries:  # a whole ring: KVM may have overwritten entries
                    self.overflows += 1
                    self._lost.update(self._all_slots())
                    log.warning("kvm.dirty_ring.overflow", entries=self.entries)
            if read:
                self._vm_fd.reset_dirty_rings()
            self.harvests += 1
            self.entries_read += read
            if full_exit:
                self.full_exits += 1
            return read

    def _read(self, ring: _Ring) -> int:
        n = int(lib.vmk_dirty_ring_harvest(ring.address, self.entries, ring.fetch, self._slots,
                                           self._offsets, self.entries))
        for i in range(n):
            slot = self._slots[i]
            if slot >> 16 == 0:  # address space 0 (1 is x86 SMM, which vmmkit does not use)
                self._pending.setdefault(slot, set()).add(self._offsets[i])
        return n

    def take(self, slot: int, size: int) -> bytes:
        """The pages of ``slot`` (``size`` bytes) written since the last take, one bit per page
        in ``KVM_GET_DIRTY_LOG``'s layout (64-bit words), and forget them."""
        self.harvest()
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        bitmap = bytearray((pages + 63) // 64 * 8)
        with self._lock:
            offsets = self._pending.pop(slot, set())
            if slot in self._lost:
                self._lost.discard(slot)
                offsets = set(range(pages))
        for offset in offsets:
            if offset < pages:  # KVM gives offsets within the slot; a stale slot number is dropped
                bitmap[offset >> 3] |= 1 << (offset & 7)
        return bytes(bitmap)

    def discard(self) -> None:
        """Harvest and drop everything (logging starts or stops)."""
        self.harvest()
        with self._lock:
            self._pending.clear()
            self._lost.clear()

    def counters(self) -> dict[str, int]:
        return {"dirty-ring-harvests": self.harvests, "dirty-ring-entries": self.entries_read,
                "dirty-ring-full": self.full_exits, "dirty-ring-overflows": self.overflows,
                "dirty-ring-resyncs": self.resyncs}

    def close(self) -> None:
        with self._lock:
            rings = list(self._rings.values())
            self._rings.clear()
        for ring in rings:
            ring.close()
