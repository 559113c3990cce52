"""MSI-X: the capability, the vector table and the pending-bit array (PBA) in a BAR.

Each table entry is 16 bytes: message address low/high, message data, vector control (bit 0
masks the vector). The capability's Message Control has the table size (N-1, read-only), the
function mask (bit 14) and MSI-X enable (bit 15). A vector is *effectively masked* when its
own mask bit or the function mask is set, or MSI-X is disabled; a message raised while masked
sets the vector's pending bit and is delivered when the vector is unmasked (PCI Local Bus
spec 3.0, section 6.8.2; Cloud Hypervisor's ``pci/src/msix.rs``).

Delivery is :class:`vmmkit.irq.MsiVector`'s: with an irqfd-capable backend that offers MSI
routes, each vector owns a GSI whose route follows the table entry (``vm.set_msi_route``) and
an eventfd registered as its irqfd while unmasked, so a trigger is one eventfd write; other
backends get ``vm.signal_msi(address, data)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vmmkit.hypervisor import Vm
from vmmkit.irq import MsiVector
from vmmkit.log import get_logger
from vmmkit.pci.config import CAP_ID_MSIX, PciConfigSpace, overlaps

log = get_logger()

MAX_VECTORS = 2048
ENTRY_SIZE = 16
#: Message Control bits.
CONTROL_TABLE_SIZE = 0x07FF
CONTROL_FUNCTION_MASK = 0x4000
CONTROL_ENABLE = 0x8000
#: Vector Control bit.
VECTOR_MASKED = 0x1

#: Byte masks of what the guest may write in one entry: the message address is dword
#: aligned (bits 1:0 read as zero), vector control keeps only the mask bit.
_ENTRY_WMASK = bytes([0xFC, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0, 0, 0])


def table_bytes(vectors: int) -> int:
    return vectors * ENTRY_SIZE


def pba_bytes(vectors: int) -> int:
    """The PBA is an array of qwords, one bit per vector."""
    return (vectors + 63) // 64 * 8


def backend_routes_msi(vm: Vm) -> bool:
    """Whether ``vm`` can raise an MSI from an irqfd (irqfds plus MSI routes)."""
    return bool(vm.supports_irqfd) and type(vm).set_msi_route is not Vm.set_msi_route


class MsixTable:
    """The MSI-X state of one function.

    ``allocate_gsi`` hands out a GSI for a vector's MSI route (``machine.allocate_msi_gsi``);
    it is only called when the backend routes MSIs through irqfds, and may return ``None``
    (out of GSIs), in which case that vector uses ``vm.signal_msi``.
    """

    def __init__(self, vm: Vm, vectors: int, allocate_gsi: Callable[[], int | None] | None = None,
                 release_gsi: Callable[[int], None] | None = None) -> None:
        self._release_gsi = release_gsi
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X needs 1 to {MAX_VECTORS} vectors, not {vectors}")
        self.num_vectors = vectors
        self._table = bytearray(table_bytes(vectors))
        self._lock = threading.Lock()
        self.enabled = False
        self.function_masked = False
        self._cap_offset: int | None = None
        use_gsi = allocate_gsi is not None and backend_routes_msi(vm)
        self.vectors = [MsiVector(vm, allocate_gsi() if use_gsi and allocate_gsi else None)
                        for _ in range(vectors)]
        self._init_table()

    def _init_table(self) -> None:
        self._table[:] = bytes(len(self._table))
        for index in range(self.num_vectors):
            self._table[index * ENTRY_SIZE + 12] = VECTOR_MASKED

    # -- the capability --------------------------------------------------------------------

    def add_capability(self, config: PciConfigSpace, *, table_bar: int, table_offset: int,
                       pba_bar: int, pba_offset: int) -> int:
        """Add the MSI-X capability to ``config``; only enable and function mask are writable."""
        if table_offset & 7 or pba_offset & 7:
            raise ValueError("the MSI-X table and PBA offsets must be qword aligned")
        control = (self.num_vectors - 1) & CONTROL_TABLE_SIZE
        body = (control.to_bytes(2, "little") + (table_offset | table_bar).to_bytes(4, "little")
                + (pba_offset | pba_bar).to_bytes(4, "little"))
        writable = bytes([0x00, 0xC0]) + bytes(8)
        self._cap_offset = config.add_capability(CAP_ID_MSIX, body, writable)
        return self._cap_offset

    def config_written(self, config: PciConfigSpace, offset: int, size: int) -> None:
        """Call after every guest config write: picks up enable / function-mask changes."""
        if self._cap_offset is None or not overlaps(offset, size, self._cap_offset + 2, 2):
            return
        control = config.get(self._cap_offset + 2, 2)
        self.set_control(bool(control & CONTROL_ENABLE), bool(control & CONTROL_FUNCTION_MASK))

    def set_control(self, enabled: bool, function_masked: bool) -> None:
        with self._lock:
            if (enabled, function_masked) == (self.enabled, self.function_masked):
                return
            self.enabled, self.function_masked = enabled, function_masked
            log.debug("msix.control", enabled=enabled, function_masked=function_masked)
            for index in range(self.num_vectors):
                self._sync(index)

    # -- table and PBA, as the guest sees them in the BAR ----------------------------------

    def read_table(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if offset < 0 or offset + size > len(self._table):
            return bytes(size)
        with self._lock:
            return bytes(self._table[offset : offset + size])

    def write_table(self, offset: int, data: bytes) -> None:
        """Dword or qword writes, naturally aligned (the spec's only legal accesses)."""
        size = len(data)
        if size not in (4, 8) or offset % size or offset < 0 or offset + size > len(self._table):
            return
        with self._lock:
            for i, byte in enumerate(data):
                pos = offset + i
                mask = _ENTRY_WMASK[pos % ENTRY_SIZE]
                self._table[pos] = (self._table[pos] & ~mask) | (byte & mask)
            for index in {offset // ENTRY_SIZE, (offset + size - 1) // ENTRY_SIZE}:
                self._sync(index)

    def read_pba(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if offset < 0 or offset + size > pba_bytes(self.num_vectors):
            return bytes(size)
        bits = 0
        for index, vector in enumerate(self.vectors):
            if vector.pending:
                bits |= 1 << index
        image = bits.to_bytes(pba_bytes(self.num_vectors), "little")
        return image[offset : offset + size]

    def write_pba(self, offset: int, data: bytes) -> None:
        """The PBA is read-only; writes are ignored."""

    # -- the device side -------------------------------------------------------------------

    def set_requester_id(self, devid: int | None) -> None:
        """The function's PCI requester ID, sent with every message as its device ID (the root
        sets it when the function is plugged; a route already programmed is rewritten)."""
        with self._lock:
            for index, vector in enumerate(self.vectors):
                if vector.devid != devid:
                    vector.devid = devid
                    if not vector.masked:
                        vector.address = vector.data = -1  # force the route to be rewritten
                        self._sync(index)

    def entry(self, index: int) -> tuple[int, int, bool]:
        """``(address, data, vector_masked)`` of table entry ``index``."""
        base = index * ENTRY_SIZE
        raw = self._table[base : base + ENTRY_SIZE]
        address = int.from_bytes(raw[0:8], "little")
        data = int.from_bytes(raw[8:12], "little")
        return address, data, bool(raw[12] & VECTOR_MASKED)

    def masked(self, index: int) -> bool:
        """Whether vector ``index`` is effectively masked (entry, function mask or disabled)."""
        return self.vectors[index].masked

    def pending(self, index: int) -> bool:
        return self.vectors[index].pending

    def trigger(self, index: int) -> None:
        """Send vector ``index``'s message, or set its pending bit while it is masked."""
        if 0 <= index < self.num_vectors:
            self.vectors[index].trigger()

    def _sync(self, index: int) -> None:
        address, data, masked = self.entry(index)
        masked = masked or self.function_masked or not self.enabled
        try:
            self.vectors[index].update(address, data, masked)
        except Exception as exc:  # a backend refusing a route must not kill the vCPU thread
            log.warning("msix.update_failed", vector=index, error=str(exc))

    def reset(self) -> None:
        """Power-on state: MSI-X disabled, every vector masked, no message pending."""
        with self._lock:
            self.enabled = self.function_masked = False
            self._init_table()
            for index, vector in enumerate(self.vectors):
                vector.pending = False
                self._sync(index)

    def close(self) -> None:
        for vector in self.vectors:
            try:
                vector.close()
            except Exception as exc:
                log.warning("msix.close_failed", error=str(exc))
            if vector.gsi is not None and self._release_gsi is not None:
                self._release_gsi(vector.gsi)
                vector.gsi = None
