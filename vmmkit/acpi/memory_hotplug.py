"""ACPI memory hotplug as Cloud Hypervisor does it: the memory manager's register block, which
the guest's AML reads, and the DSDT around it (``vmm/src/memory_manager.rs``: ``impl BusDevice
for MemoryManager``, ``impl Aml for MemoryManager``, ``MemoryMethods``, ``MemorySlot``).

The register block, :data:`MEMORY_HOTPLUG_SIZE` (CH's ``MEMORY_MANAGER_ACPI_SIZE``) bytes of
MMIO, about the *selected* slot (one of :data:`HOTPLUG_SLOTS`, each a "DIMM")::

    +0x00  read: base, low dword      write: select the slot (MSEL)
    +0x04  read: base, high dword     +0x08 / +0x0c  read: length, low / high dword
    +0x10  MHPX: the proximity domain (0: vmmkit has one NUMA node)
    +0x14  status byte. read: bit 0 MEN_ (enabled: the slot holds memory), bit 1 MINS
           (inserting), bit 2 MRMV (removing). write: bit 1 / bit 2 acknowledge the insertion /
           removal, bit 3 MEJ0 (the guest ejected the slot's memory)

Base and length reads take 4 bytes, the status byte 1 (the AML's DWord / Byte fields); any
other access is counted in ``bad_accesses`` and answers zeros.

The DSDT (:meth:`MemoryHotplugController.describe_acpi`): ``\\_SB_.MHPC`` (``PNP0A06``) with
the region ``MHPR`` and its fields, the mutex ``MLCK``, and the methods ``MTFY(slot, value)``
(notifies ``Mnnn``), ``MSCN`` (for every slot: MINS set -> device check and acknowledge; MRMV
set -> eject request and acknowledge), ``MSTA(slot)`` (0xF when MEN_, else 0) and
``MCRS(slot)`` (a QWordMemory of the slot's base and length); one ``Device (Mnnn)``
(``PNP0C80``, a memory device) per slot with ``_STA``, ``_CRS`` and ``_EJ0`` (writes MEJ0).
The GED's ``ESCN`` calls ``\\_SB_.MHPC.MSCN`` when its memory bit (0x02) is set.

Linux's ``acpi_memhotplug`` driver handles the notification: it reads ``_CRS`` and adds the
range (``add_memory``); onlining the new blocks is up to the guest (``memhp_default_state=``,
or ``/sys/devices/system/memory/memoryN/online``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

from vmmkit.acpi import aml
from vmmkit.device import Device, PlacedDevice
from vmmkit.log import get_logger

if TYPE_CHECKING:
    from vmmkit.firmware import AcpiScope

log = get_logger()

#: Bytes of MMIO the register block takes (CH's ``MEMORY_MANAGER_ACPI_SIZE``).
MEMORY_HOTPLUG_SIZE: Final = 0x18
#: How many slots ("DIMMs") a VM may plug (CH's ``HOTPLUG_COUNT``).
HOTPLUG_SLOTS: Final = 8

SELECTION: Final = 0x00
BASE_LOW: Final = 0x00
BASE_HIGH: Final = 0x04
LENGTH_LOW: Final = 0x08
LENGTH_HIGH: Final = 0x0C
PROXIMITY: Final = 0x10
STATUS: Final = 0x14
#: Written by nothing vmmkit's AML does (CH's MOEV and MOSC fields): accepted and ignored.
EVENT: Final = 0x04
OSC: Final = 0x08

ENABLED: Final = 1 << 0
INSERTING: Final = 1 << 1
REMOVING: Final = 1 << 2
EJECT: Final = 1 << 3

#: ACPI notify values (ACPI 6.5, 5.6.6): device check, eject request.
NOTIFY_DEVICE_CHECK: Final = 1
NOTIFY_EJECT_REQUEST: Final = 3

EjectHandler = Callable[[int], None]


class MemorySlot:
    """What the guest reads about one slot."""

    __slots__ = ("base", "length", "active", "inserting", "removing")

    def __init__(self) -> None:
        self.base = 0
        self.length = 0
        self.active = False
        self.inserting = False
        self.removing = False

    @property
    def status(self) -> int:
        return (ENABLED if self.active else 0) | (INSERTING if self.inserting else 0) | \
            (REMOVING if self.removing else 0)


class MemoryHotplugController(Device):
    """The MHPC registers of :data:`HOTPLUG_SLOTS` slots. ``on_eject(slot)`` is called, on the
    vCPU thread, when the guest ejects an enabled slot (its memory is off-line and removed)."""

    kind: ClassVar[str] = "memory-hotplug"

    def __init__(self, device_id: str, *, slots: int = HOTPLUG_SLOTS,
                 on_eject: EjectHandler | None = None, on_reset: Callable[[], None] | None = None) -> None:
        super().__init__(device_id)
        if not 0 < slots <= 256:
            raise ValueError(f"1 to 256 memory hotplug slots, not {slots}")
        self._slots = [MemorySlot() for _ in range(slots)]
        self._on_eject = on_eject
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self.selected = 0
        self.insertions = 0
        self.ejects = 0
        self.bad_accesses = 0

    # -- the host's side ---------------------------------------------------------------------

    @property
    def slot_count(self) -> int:
        return len(self._slots)

    def plug(self, slot: int, base: int, length: int) -> None:
        """Memory ``[base, base + length)`` is mapped for ``slot``: the guest's next ``MSCN``
        sends it a device check."""
        with self._lock:
            state = self._slots[slot]
            if state.active:
                raise ValueError(f"memory slot {slot} is in use")
            state.base, state.length = base, length
            state.active = state.inserting = True
            state.removing = False

    def request_removal(self, slot: int) -> None:
        """Ask the guest to eject ``slot``: its next ``MSCN`` sends an eject request."""
        with self._lock:
            state = self._slots[slot]
            if not state.active:
                raise ValueError(f"memory slot {slot} holds no memory")
            state.removing = True

    def unplug(self, slot: int) -> None:
        """Empty ``slot`` at once (the VM resets: no guest to ask)."""
        with self._lock:
            state = self._slots[slot]
            state.active = state.inserting = state.removing = False
            state.base = state.length = 0

    def slot(self, slot: int) -> tuple[int, int, int]:
        """``(base, length, status)`` of ``slot`` as the guest would read them now."""
        with self._lock:
            state = self._slots[slot]
            return state.base, state.length, state.status

    def free_slot(self) -> int | None:
        """The lowest slot holding no memory, ``None`` when all do."""
        with self._lock:
            return next((i for i, s in enumerate(self._slots) if not s.active), None)

    # -- the guest's side --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            state = self._slots[self.selected] if self.selected < len(self._slots) else None
            if state is None:
                value, ok = 0, False
            elif offset == STATUS and size == 1:
                value, ok = state.status, True
            elif offset in (BASE_LOW, BASE_HIGH, LENGTH_LOW, LENGTH_HIGH, PROXIMITY) and size == 4:
                whole = state.base if offset in (BASE_LOW, BASE_HIGH) else state.length
                value = 0 if offset == PROXIMITY else whole >> (32 if offset in (BASE_HIGH, LENGTH_HIGH) else 0)
                ok = True
            else:
                value, ok = 0, False
        if not ok:
            self.bad_accesses += 1
            return b"\x00" * max(size, 0)
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if offset == SELECTION and len(data) == 4:
            if value >= len(self._slots):
                log.warning("memory_hotplug.bad_slot", slot=value)
                self.bad_accesses += 1
            with self._lock:
                self.selected = value  # an out-of-range selection reads zeros, as CH's
            return
        if offset in (EVENT, OSC) and len(data) == 4:
            return
        if offset != STATUS or len(data) != 1:
            self.bad_accesses += 1
            return
        ejected = None
        with self._lock:
            if self.selected >= len(self._slots):
                self.bad_accesses += 1
                return
            state = self._slots[self.selected]
            if value & INSERTING and state.inserting:
                state.inserting = False
                self.insertions += 1
            if value & REMOVING and state.removing:
                state.removing = False
            if value & EJECT and state.active:
                ejected = self.selected
                state.active = state.inserting = state.removing = False
                state.base = state.length = 0
                self.ejects += 1
        if ejected is not None:
            log.debug("memory_hotplug.eject", slot=ejected)
            if self._on_eject is not None:
                try:
                    self._on_eject(ejected)
                except Exception:
                    log.exception("memory_hotplug.eject_failed", slot=ejected)

    def reset(self) -> None:
        """A rebooted guest finds the plugged memory by evaluating ``_STA`` at boot: nothing is
        pending any more, and what is plugged stays (as DIMMs stay in a rebooted machine), except
        what the guest was asked to eject: ``on_reset`` removes it first."""
        if self._on_reset is not None:
            self._on_reset()
        with self._lock:
            for state in self._slots:
                state.inserting = state.removing = False
            self.selected = 0

    # -- snapshots (vmmkit.state.Snapshottable) ------------------------------------------------

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """MSEL, the counters and each slot's base, length and enabled / inserting / removing bits."""
        with self._lock:
            return {"selected": self.selected, "insertions": self.insertions, "ejects": self.ejects,
                    "slots": [[slot.base, slot.length, slot.active, slot.inserting, slot.removing]
                              for slot in self._slots]}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        from vmmkit.state import StateError, field, int_field

        selected = int_field(state, "selected", self.id, 0, 0xFFFF_FFFF)
        insertions, ejects = (int_field(state, key, self.id) for key in ("insertions", "ejects"))
        slots = field(state, "slots", list, self.id)
        if len(slots) != len(self._slots) or not all(
                isinstance(slot, list) and len(slot) == 5
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in slot[:2])
                and all(isinstance(bit, bool) for bit in slot[2:]) for slot in slots):
            raise StateError(f"{self.id}.slots: {len(self._slots)} [base, length, enabled, inserting, removing] "
                             "entries expected")
        with self._lock:
            self.selected, self.insertions, self.ejects = selected, insertions, ejects
            for slot, (base, length, active, inserting, removing) in zip(self._slots, slots, strict=True):
                slot.base, slot.length = base, length
                slot.active, slot.inserting, slot.removing = active, inserting, removing

    def counters(self) -> Mapping[str, int]:
        return {"insertions": self.insertions, "ejects": self.ejects, "bad_accesses": self.bad_accesses}

    # -- the guest's firmware ----------------------------------------------------------------

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """``\\_SB_.MHPC`` as CH's ``impl Aml for MemoryManager`` writes it."""
        if placed.mmio is None:
            return
        base, size = placed.mmio
        scope.add(aml.Device("MHPC", [
            aml.Name("_HID", aml.EisaId("PNP0A06")),
            aml.Name("_UID", "Memory Hotplug Controller"),
            aml.Mutex("MLCK", 0),
            aml.Name("_CRS", aml.ResourceTemplate([aml.dword_memory(base, base + size - 1)])),
            aml.OpRegion("MHPR", aml.SYSTEM_MEMORY, base, size),
            aml.Field("MHPR", [("MHBL", 32), ("MHBH", 32), ("MHLL", 32), ("MHLH", 32)], flags=aml.DWORD_ACC),
            aml.Field("MHPR", [("", 128), ("MHPX", 32)], flags=aml.DWORD_ACC),
            aml.Field("MHPR", [("", 160), ("MEN_", 1), ("MINS", 1), ("MRMV", 1), ("MEJ0", 1)],
                      flags=aml.BYTE_ACC | aml.WRITE_AS_ZEROS),
            aml.Field("MHPR", [("MSEL", 32), ("MOEV", 32), ("MOSC", 32)], flags=aml.DWORD_ACC),
            *_methods(len(self._slots)),
            *(_slot_device(slot) for slot in range(len(self._slots))),
        ]))


def _slot_name(slot: int) -> str:
    return f"M{slot:03d}"


def _methods(slots: int) -> list[aml.Term]:
    """CH's ``MemoryMethods``: MTFY, MSCN, MSTA, MCRS."""
    notifies = [aml.If(aml.LEqual(aml.Arg(0), slot), [aml.Notify(aml.Path(_slot_name(slot)), aml.Arg(1))])
                for slot in range(slots)]
    scan = [
        aml.Acquire("MLCK", 0xFFFF),
        aml.Store(0, aml.Local(0)),
        aml.While(aml.LLess(aml.Local(0), slots), [
            aml.Store(aml.Local(0), aml.Path("\\_SB_.MHPC.MSEL")),
            aml.If(aml.LEqual(aml.Path("\\_SB_.MHPC.MINS"), 1), [
                aml.Call("MTFY", [aml.Local(0), NOTIFY_DEVICE_CHECK]),
                aml.Store(1, aml.Path("\\_SB_.MHPC.MINS")),
            ]),
            aml.If(aml.LEqual(aml.Path("\\_SB_.MHPC.MRMV"), 1), [
                aml.Call("MTFY", [aml.Local(0), NOTIFY_EJECT_REQUEST]),
                aml.Store(1, aml.Path("\\_SB_.MHPC.MRMV")),
            ]),
            aml.Add(aml.Local(0), 1, aml.Local(0)),
        ]),
        aml.Release("MLCK"),
    ]
    status = [
        aml.Acquire("MLCK", 0xFFFF),
        aml.Store(aml.Arg(0), aml.Path("\\_SB_.MHPC.MSEL")),
        aml.Store(0, aml.Local(0)),
        aml.If(aml.LEqual(aml.Path("\\_SB_.MHPC.MEN_"), 1), [aml.Store(aml.STA_PRESENT, aml.Local(0))]),
        aml.Release("MLCK"),
        aml.Return(aml.Local(0)),
    ]
    # The QWordMemory descriptor's minimum, maximum and length are at bytes 14, 22 and 38.
    resources = [
        aml.Acquire("MLCK", 0xFFFF),
        aml.Store(aml.Arg(0), aml.Path("\\_SB_.MHPC.MSEL")),
        aml.Name("MR64", aml.ResourceTemplate([aml.qword_memory(0, 0xFFFF_FFFF_FFFF_FFFE, cacheable=True)])),
        aml.CreateQWordField(aml.Path("MR64"), 14, "MINQ"),
        aml.CreateQWordField(aml.Path("MR64"), 22, "MAXQ"),
        aml.CreateQWordField(aml.Path("MR64"), 38, "LENQ"),
        aml.ShiftLeft(aml.Path("\\_SB_.MHPC.MHBH"), 32, aml.Local(0)),
        aml.Or(aml.Local(0), aml.Path("\\_SB_.MHPC.MHBL"), aml.Path("MINQ")),
        aml.ShiftLeft(aml.Path("\\_SB_.MHPC.MHLH"), 32, aml.Local(1)),
        aml.Or(aml.Local(1), aml.Path("\\_SB_.MHPC.MHLL"), aml.Path("LENQ")),
        aml.Add(aml.Path("MINQ"), aml.Path("LENQ"), aml.Local(2)),
        aml.Subtract(aml.Local(2), 1, aml.Path("MAXQ")),
        aml.Release("MLCK"),
        aml.Return(aml.Path("MR64")),
    ]
    return [
        aml.Method("MTFY", 2, notifies, serialized=True),
        aml.Method("MSCN", 0, scan, serialized=True),
        aml.Method("MSTA", 1, status, serialized=True),
        aml.Method("MCRS", 1, resources, serialized=True),
    ]


def _slot_device(slot: int) -> aml.Device:
    """CH's ``MemorySlot``, with ``_EJ0`` (Linux removes the memory, then ejects it)."""
    return aml.Device(_slot_name(slot), [
        aml.Name("_HID", aml.EisaId("PNP0C80")),
        aml.Name("_UID", slot),
        aml.Method("_STA", 0, [aml.Return(aml.Call("MSTA", [slot]))]),
        aml.Method("_CRS", 0, [aml.Return(aml.Call("MCRS", [slot]))]),
        aml.Method("_EJ0", 1, [
            aml.Acquire("MLCK", 0xFFFF),
            aml.Store(slot, aml.Path("MSEL")),
            aml.Store(1, aml.Path("MEJ0")),
            aml.Release("MLCK"),
        ], serialized=True),
    ])
