"""ACPI PCI hotplug as Cloud Hypervisor does it: a register block the guest's AML reads, and
the DSDT methods around it.

The register block (CH's ``DeviceManager`` as a ``BusDevice``, ``vmm/src/device_manager.rs``),
16 bytes of MMIO, four little-endian dwords, only 4-byte accesses:

    +0  PCIU  slots of the selected segment with a device added   (read: the bitmap, cleared)
    +4  PCID  slots whose device the host wants removed           (read: the bitmap, cleared)
    +8  B0EJ  write a bitmap: the guest ejected those slots        (read: 0)
    +12 PSEG  the selected segment                                 (read/write)

The DSDT (:meth:`PciHotplugController.describe_acpi` and :func:`slot_terms`):

- ``\\_SB_.PHPR`` (``PNP0A06``, ``_STA`` 0x0B): the region ``PCST`` with fields PCIU, PCID,
  B0EJ, PSEG, the mutex ``BLCK``, ``PCEJ(slot, segment)`` (select the segment, write
  ``1 << slot`` to B0EJ) and ``PSCN`` (calls each hotplug segment's ``PCNT``);
- under ``\\_SB_.PCI0``, one ``Device (Snnn)`` per slot 1-31 with ``_SUN``, ``_ADR`` and
  ``_EJ0`` (calls ``PCEJ(_SUN, _SEG)``), ``DVNT(bitmap, value)`` (notifies each slot whose bit
  is set) and ``PCNT`` (``DVNT(PCIU, 1)``: device check; ``DVNT(PCID, 3)``: eject request);
- the GED's ``ESCN`` calls ``\\_SB_.PHPR.PSCN`` when its PCI bit (0x04) is set.

The host side: the device manager sets a slot's PCIU bit after placing a device there
(:meth:`PciHotplugController.device_added`) or its PCID bit to ask for its removal
(:meth:`PciHotplugController.removal_requested`), then raises the GED's interrupt. Linux's
``acpiphp`` handles the notifications: it scans the slot, or unbinds the device and calls
``_EJ0``, whose B0EJ write calls ``on_eject(segment, slot)``: only then does the manager take the
function off the bus (CH's ``eject_device``). Slot 0 (the host bridge) is never hotplugged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

from vmmkit.acpi import aml
from vmmkit.device import Device, PlacedDevice
from vmmkit.log import get_logger
from vmmkit.pci.host import segment_name

if TYPE_CHECKING:
    from vmmkit.firmware import AcpiScope

log = get_logger()

#: Bytes of MMIO the register block takes (CH's ``DEVICE_MANAGER_ACPI_SIZE``).
PCI_HOTPLUG_SIZE: Final = 0x10
PCIU: Final = 0
PCID: Final = 4
B0EJ: Final = 8
PSEG: Final = 12
#: ACPI notify values (ACPI 6.5, 5.6.6): device check, eject request.
NOTIFY_DEVICE_CHECK: Final = 1
NOTIFY_EJECT_REQUEST: Final = 3
#: The slots a guest may see come and go (slot 0 is the host bridge).
HOTPLUG_SLOTS: Final = range(1, 32)

EjectHandler = Callable[[int, int], None]


class _Segment:
    __slots__ = ("up", "down")

    def __init__(self) -> None:
        self.up = 0
        self.down = 0


class PciHotplugController(Device):
    """The PCIU/PCID/B0EJ/PSEG registers. ``segments`` says which PCI segments take hotplug
    (read when the DSDT is written); ``on_eject(segment, slot)`` is called, on the vCPU
    thread, for every slot the guest ejects."""

    kind: ClassVar[str] = "pci-hotplug"

    def __init__(self, device_id: str, *, segments: Callable[[], Iterable[int]],
                 on_eject: EjectHandler) -> None:
        super().__init__(device_id)
        self._segments_of = segments
        self._on_eject = on_eject
        self._lock = threading.Lock()
        self._state: dict[int, _Segment] = {}
        self.selected = 0
        self.ejects = 0
        self.bad_accesses = 0

    # -- the host's side ---------------------------------------------------------------------

    def device_added(self, segment: int, slot: int) -> None:
        """A device was placed in ``slot``: the guest's next ``PCNT`` sends it a device check."""
        with self._lock:
            self._segment(segment).up |= 1 << slot

    def removal_requested(self, segment: int, slot: int) -> None:
        """Ask the guest to eject ``slot``: its next ``PCNT`` sends an eject request."""
        with self._lock:
            self._segment(segment).down |= 1 << slot

    def pending(self, segment: int = 0) -> tuple[int, int]:
        """``(PCIU, PCID)`` of ``segment`` as the guest would read them now (not cleared)."""
        with self._lock:
            state = self._segment(segment)
            return state.up, state.down

    def _segment(self, segment: int) -> _Segment:
        state = self._state.get(segment)
        if state is None:
            state = self._state[segment] = _Segment()
        return state

    # -- the guest's side --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if size != 4 or offset not in (PCIU, PCID, B0EJ, PSEG):
            self.bad_accesses += 1
            return b"\x00" * max(size, 0)
        with self._lock:
            state = self._segment(self.selected)
            if offset == PCIU:
                value, state.up = state.up, 0
            elif offset == PCID:
                value, state.down = state.down, 0
            elif offset == PSEG:
                value = self.selected
            else:
                value = 0  # B0EJ: ejects are carried out on the write
        return value.to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 4 or offset not in (B0EJ, PSEG):
            self.bad_accesses += 1
            return
        value = int.from_bytes(data, "little")
        if offset == PSEG:
            if value not in set(self._segments_of()):
                log.warning("pci_hotplug.bad_segment", segment=value)
                self.bad_accesses += 1
                return
            self.selected = value
            return
        segment = self.selected
        for slot in HOTPLUG_SLOTS:
            if value & (1 << slot):
                self.ejects += 1
                log.debug("pci_hotplug.eject", segment=segment, slot=slot)
                try:
                    self._on_eject(segment, slot)
                except Exception:
                    log.exception("pci_hotplug.eject_failed", segment=segment, slot=slot)

    def reset(self) -> None:
        """A rebooted guest finds the devices by scanning: nothing is pending any more."""
        with self._lock:
            self._state.clear()
            self.selected = 0

    # -- snapshots (vmmkit.state.Snapshottable) ------------------------------------------------

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """PCIU/PCID per segment (what the guest has not been told yet) and PSEG."""
        with self._lock:
            return {"selected": self.selected,
                    "segments": {str(index): [state.up, state.down] for index, state in self._state.items()}}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        from vmmkit.state import StateError, field, int_field

        selected = int_field(state, "selected", self.id, 0, 0xFFFF_FFFF)
        segments = field(state, "segments", dict, self.id)
        parsed = {}
        for key, value in segments.items():
            if (not key.isdigit() or not isinstance(value, list) or len(value) != 2
                    or not all(isinstance(v, int) and 0 <= v < 1 << 32 for v in value)):
                raise StateError(f"{self.id}.segments: bad entry {key!r}")
            parsed[int(key)] = value
        with self._lock:
            self.selected = selected
            self._state = {}
            for index, (up, down) in parsed.items():
                self._segment(index).up, self._segment(index).down = up, down

    def counters(self) -> Mapping[str, int]:
        return {"ejects": self.ejects, "bad_accesses": self.bad_accesses}

    # -- the guest's firmware ----------------------------------------------------------------

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """``\\_SB_.PHPR`` as CH's ``impl Aml for DeviceManager`` writes it."""
        if placed.mmio is None:
            return
        base, size = placed.mmio
        scans = [aml.Call(f"\\_SB_.{segment_name(segment)}.PCNT") for segment in sorted(self._segments_of())]
        scope.add(aml.Device("PHPR", [
            aml.Name("_HID", aml.EisaId("PNP0A06")),
            aml.Name("_STA", 0x0B),
            aml.Name("_UID", "PCI Hotplug Controller"),
            aml.Mutex("BLCK", 0),
            aml.Name("_CRS", aml.ResourceTemplate([aml.dword_memory(base, base + size - 1)])),
            aml.OpRegion("PCST", aml.SYSTEM_MEMORY, base, size),
            aml.Field("PCST", [("PCIU", 32), ("PCID", 32), ("B0EJ", 32), ("PSEG", 32)],
                      flags=aml.DWORD_ACC | aml.WRITE_AS_ZEROS),
            aml.Method("PCEJ", 2, [
                aml.Acquire("BLCK", 0xFFFF),
                aml.Store(aml.Arg(1), aml.Path("PSEG")),
                aml.ShiftLeft(1, aml.Arg(0), aml.Path("B0EJ")),
                aml.Release("BLCK"),
                aml.Return(0),
            ], serialized=True),
            aml.Method("PSCN", 0, scans, serialized=True),
        ]))


def slot_terms() -> list[aml.Term]:
    """What a hotplug segment's root bridge holds (CH's ``PciDevSlot`` and
    ``PciDevSlotMethods``): the slot devices ``S001``-``S031``, ``DVNT`` and ``PCNT``."""
    terms: list[aml.Term] = []
    for slot in HOTPLUG_SLOTS:
        terms.append(aml.Device(f"S{slot:03d}", [
            aml.Name("_SUN", slot),
            aml.Name("_ADR", slot << 16),
            aml.Method("_EJ0", 1, [aml.Call("\\_SB_.PHPR.PCEJ", [aml.Path("_SUN"), aml.Path("_SEG")])],
                       serialized=True),
        ]))
    notifies: list[aml.Term] = []
    for slot in HOTPLUG_SLOTS:
        mask = 1 << slot
        notifies += [
            aml.And(aml.Arg(0), mask, aml.Local(0)),
            aml.If(aml.LEqual(aml.Local(0), mask), [aml.Notify(aml.Path(f"S{slot:03d}"), aml.Arg(1))]),
        ]
    terms.append(aml.Method("DVNT", 2, notifies, serialized=True))
    terms.append(aml.Method("PCNT", 0, [
        aml.Acquire("\\_SB_.PHPR.BLCK", 0xFFFF),
        aml.Store(aml.Path("_SEG"), aml.Path("\\_SB_.PHPR.PSEG")),
        aml.Call("DVNT", [aml.Path("\\_SB_.PHPR.PCIU"), NOTIFY_DEVICE_CHECK]),
        aml.Call("DVNT", [aml.Path("\\_SB_.PHPR.PCID"), NOTIFY_EJECT_REQUEST]),
        aml.Release("\\_SB_.PHPR.BLCK"),
    ], serialized=True))
    return terms
