"""ACPI vCPU hotplug as Cloud Hypervisor does it: the CPU manager's register block and the
DSDT's processor devices around it (``vmm/src/cpu.rs``: ``impl BusDevice for CpuManager``,
``impl Aml for CpuManager``, ``Cpu``, ``CpuMethods``; ``docs/hotplug.md``).

The register block, 12 bytes of MMIO::

    +0  CSEL  dword  the selected vCPU (read/write)
    +4  byte         the selected vCPU's status; read: bit 0 CPEN (present), bit 1 CINS
                     (being inserted), bit 2 CRMV (being removed); write: 1 in CINS or CRMV
                     acknowledges that event, 1 in bit 3 (CEJ0) ejects the vCPU
    +5  CCMD  byte   (read 0, writes ignored)
    +8  CDAT  dword  (read 0, writes ignored)

The DSDT (:meth:`CpuHotplugController.describe_acpi`):

- ``\\_SB_.PRES`` (``PNP0A06``): the region ``PRST`` with those fields and the mutex ``CPLK``;
- ``\\_SB_.CPUS`` (``ACPI0010``): ``CSTA(n)`` (``_STA`` of vCPU n: 0x0F if present, else 0),
  ``CTFY(n, value)`` (``Notify`` vCPU n's device), ``CEJ0(n)`` (eject vCPU n) and ``CSCN`` (for
  every vCPU: CINS set -> device check, CRMV set -> eject request, each acknowledged), and one
  ``Device (Cnnn)`` (hexadecimal) per possible vCPU: ``ACPI0007``, ``_UID`` n (its MADT
  processor UID), ``_STA``, ``_PXM`` 0, ``_MAT`` (its MADT entry, enabled: Linux maps a
  hot-added processor by it) and ``_EJ0``;
- the GED's ``ESCN`` calls ``\\_SB_.CPUS.CSCN`` when its CPU bit (0x01) is set.

The host side (the machine): :meth:`CpuHotplugController.insert` marks a new vCPU present and
being inserted, :meth:`CpuHotplugController.request_removal` marks one for removal; then the
GED's interrupt. Linux's ACPI processor driver handles the notifications: it adds the
processor (user space onlines it), or offlines it, calls ``_EJ0`` and checks ``_STA``; the
CEJ0 write calls ``on_eject(n)`` and the vCPU reads absent from then on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

from vmmkit.acpi import aml
from vmmkit.device import Device, PlacedDevice
from vmmkit.log import get_logger

if TYPE_CHECKING:
    from vmmkit.firmware import AcpiScope

log = get_logger()

#: Bytes of MMIO the register block takes (CH's ``CPU_MANAGER_ACPI_SIZE``).
CPU_HOTPLUG_SIZE: Final = 0xC
CSEL: Final = 0
STATUS: Final = 4
CCMD: Final = 5
CDAT: Final = 8
CPEN: Final = 1 << 0
CINS: Final = 1 << 1
CRMV: Final = 1 << 2
CEJ0: Final = 1 << 3
#: ACPI notify values (ACPI 6.5, 5.6.6): device check, eject request.
NOTIFY_DEVICE_CHECK: Final = 1
NOTIFY_EJECT_REQUEST: Final = 3
#: ``_STA`` of a present processor: present, enabled, shown, functioning.
STA_PRESENT: Final = 0x0F

EjectHandler = Callable[[int], bool]


class _VcpuSlot:
    __slots__ = ("present", "inserting", "removing")

    def __init__(self, present: bool) -> None:
        self.present = present
        self.inserting = False
        self.removing = False


class CpuHotplugController(Device):
    """The CSEL/status registers of ``max_vcpus`` possible vCPUs, the first ``present``
    present. ``processor_entries[n]`` is vCPU n's ``_MAT``; ``on_eject(n)`` is called, on
    the vCPU thread that wrote CEJ0, when the guest ejects present vCPU n, and answers
    whether it was carried out (the machine refuses to eject its last vCPU)."""

    kind: ClassVar[str] = "cpu-hotplug"

    def __init__(self, device_id: str, *, present: int, processor_entries: Sequence[bytes],
                 on_eject: EjectHandler) -> None:
        super().__init__(device_id)
        if not 1 <= present <= len(processor_entries):
            raise ValueError(f"{present} present vCPUs of {len(processor_entries)} possible")
        self.processor_entries = tuple(processor_entries)
        self._on_eject = on_eject
        self._lock = threading.Lock()
        self._slots = [_VcpuSlot(index < present) for index in range(len(processor_entries))]
        self.selected = 0
        self.ejects = 0
        self.bad_accesses = 0

    @property
    def max_vcpus(self) -> int:
        return len(self._slots)

    # -- the host's side ---------------------------------------------------------------------

    def insert(self, index: int) -> None:
        """vCPU ``index`` exists now: present, and the guest's next ``CSCN`` sends it a device
        check."""
        with self._lock:
            slot = self._slots[index]
            slot.present, slot.inserting, slot.removing = True, True, False

    def request_removal(self, index: int) -> None:
        """Ask the guest to eject vCPU ``index``: its next ``CSCN`` sends an eject request."""
        with self._lock:
            self._slots[index].removing = True

    def status(self, index: int) -> int:
        """vCPU ``index``'s status bits as the guest would read them now."""
        with self._lock:
            return self._status(index)

    def _status(self, index: int) -> int:
        slot = self._slots[index]
        return (CPEN if slot.present else 0) | (CINS if slot.inserting else 0) | (CRMV if slot.removing else 0)

    # -- the guest's side --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset == CSEL and size == 4:
                value = self.selected
            elif offset == STATUS and size == 1:
                value = self._status(self.selected) if self.selected < len(self._slots) else 0
            elif (offset, size) in ((CCMD, 1), (CDAT, 4)):
                value = 0
            else:
                self.bad_accesses += 1
                value = 0
        return value.to_bytes(max(size, 0), "little")

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if offset == CSEL and len(data) == 4:
            with self._lock:
                self.selected = value
            return
        if (offset, len(data)) in ((CCMD, 1), (CDAT, 4)):
            return
        if offset != STATUS or len(data) != 1:
            self.bad_accesses += 1
            return
        with self._lock:
            index = self.selected
            if index >= len(self._slots):
                log.warning("cpu_hotplug.bad_selection", vcpu=index)
                self.bad_accesses += 1
                return
            slot = self._slots[index]
            if value & CINS:
                slot.inserting = False
            if value & CRMV:
                slot.removing = False
            eject = bool(value & CEJ0) and slot.present
        if eject:
            self._eject(index)

    def _eject(self, index: int) -> None:
        log.debug("cpu_hotplug.eject", vcpu=index)
        try:
            done = self._on_eject(index)
        except Exception:
            log.exception("cpu_hotplug.eject_failed", vcpu=index)
            done = False
        if done:
            with self._lock:
                slot = self._slots[index]
                slot.present = slot.removing = slot.inserting = False
                self.ejects += 1

    def reset(self) -> None:
        """A rebooted guest finds its processors in the MADT: no event is pending any more."""
        with self._lock:
            for slot in self._slots:
                slot.inserting = slot.removing = False
            self.selected = 0

    def set_present(self, count: int) -> None:
        """Exactly the first ``count`` vCPUs are present (the machine, at a reset)."""
        with self._lock:
            for index, slot in enumerate(self._slots):
                slot.present = index < count

    # -- snapshots (vmmkit.state.Snapshottable) ------------------------------------------------

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """CSEL and each possible vCPU's present / inserting / removing bits."""
        with self._lock:
            return {"selected": self.selected,
                    "slots": [[slot.present, slot.inserting, slot.removing] for slot in self._slots]}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        from vmmkit.state import StateError, field, int_field

        selected = int_field(state, "selected", self.id, 0, 0xFFFF_FFFF)
        slots = field(state, "slots", list, self.id)
        if len(slots) != len(self._slots) or not all(
                isinstance(slot, list) and len(slot) == 3 and all(isinstance(bit, bool) for bit in slot)
                for slot in slots):
            raise StateError(f"{self.id}.slots: {len(self._slots)} [present, inserting, removing] entries expected")
        with self._lock:
            self.selected = selected
            for slot, (present, inserting, removing) in zip(self._slots, slots, strict=True):
                slot.present, slot.inserting, slot.removing = present, inserting, removing

    def counters(self) -> Mapping[str, int]:
        return {"ejects": self.ejects, "bad_accesses": self.bad_accesses}

    # -- the guest's firmware ----------------------------------------------------------------

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """``\\_SB_.PRES`` and ``\\_SB_.CPUS`` as CH's ``impl Aml for CpuManager`` writes them."""
        if placed.mmio is None:
            return
        base, size = placed.mmio
        scope.add(aml.Device("PRES", [
            aml.Name("_HID", aml.EisaId("PNP0A06")),
            aml.Name("_UID", "CPU Hotplug Controller"),
            aml.Mutex("CPLK", 0),
            aml.Name("_CRS", aml.ResourceTemplate([aml.dword_memory(base, base + size - 1)])),
            aml.OpRegion("PRST", aml.SYSTEM_MEMORY, base, size),
            aml.Field("PRST", [("", 32), ("CPEN", 1), ("CINS", 1), ("CRMV", 1), ("CEJ0", 1), ("", 4),
                               ("CCMD", 8)], flags=aml.BYTE_ACC | aml.WRITE_AS_ZEROS),
            aml.Field("PRST", [("CSEL", 32), ("", 32), ("CDAT", 32)], flags=aml.DWORD_ACC),
        ]))
        scope.add(aml.Device("CPUS", [
            aml.Name("_HID", "ACPI0010"),
            aml.Name("_CID", aml.EisaId("PNP0A05")),
            *_methods(self.max_vcpus),
            *(_processor(index, entry) for index, entry in enumerate(self.processor_entries)),
        ]))


def _processor(index: int, entry: bytes) -> aml.Device:
    """CH's ``impl Aml for Cpu`` (dynamic): ``Cnnn`` with ``_HID``, ``_UID``, ``_STA``,
    ``_PXM``, ``_MAT`` and ``_EJ0``."""
    return aml.Device(f"C{index:03X}", [
        aml.Name("_HID", "ACPI0007"),
        aml.Name("_UID", index),
        aml.Method("_STA", 0, [aml.Return(aml.Call("CSTA", [index]))]),
        aml.Method("_PXM", 0, [aml.Return(0)]),
        aml.Name("_MAT", entry),
        aml.Method("_EJ0", 1, [aml.Call("CEJ0", [index])]),
    ])


def _methods(max_vcpus: int) -> list[aml.Term]:
    """CH's ``CpuMethods`` (dynamic): CSTA, CTFY, CEJ0 and CSCN."""
    lock, select = "\\_SB_.PRES.CPLK", "\\_SB_.PRES.CSEL"
    notifies = [aml.If(aml.LEqual(aml.Arg(0), index), [aml.Notify(aml.Path(f"C{index:03X}"), aml.Arg(1))])
                for index in range(max_vcpus)]
    return [
        aml.Method("CSTA", 1, [
            aml.Acquire(lock, 0xFFFF),
            aml.Store(aml.Arg(0), aml.Path(select)),
            aml.Store(0, aml.Local(0)),
            aml.If(aml.LEqual(aml.Path("\\_SB_.PRES.CPEN"), 1), [aml.Store(STA_PRESENT, aml.Local(0))]),
            aml.Release(lock),
            aml.Return(aml.Local(0)),
        ], serialized=True),
        aml.Method("CTFY", 2, notifies, serialized=True),
        aml.Method("CEJ0", 1, [
            aml.Acquire(lock, 0xFFFF),
            aml.Store(aml.Arg(0), aml.Path(select)),
            aml.Store(1, aml.Path("\\_SB_.PRES.CEJ0")),
            aml.Release(lock),
        ], serialized=True),
        aml.Method("CSCN", 0, [
            aml.Acquire(lock, 0xFFFF),
            aml.Store(0, aml.Local(0)),
            aml.While(aml.LLess(aml.Local(0), max_vcpus), [
                aml.Store(aml.Local(0), aml.Path(select)),
                aml.If(aml.LEqual(aml.Path("\\_SB_.PRES.CINS"), 1), [
                    aml.Call("CTFY", [aml.Local(0), NOTIFY_DEVICE_CHECK]),
                    aml.Store(1, aml.Path("\\_SB_.PRES.CINS")),
                ]),
                aml.If(aml.LEqual(aml.Path("\\_SB_.PRES.CRMV"), 1), [
                    aml.Call("CTFY", [aml.Local(0), NOTIFY_EJECT_REQUEST]),
                    aml.Store(1, aml.Path("\\_SB_.PRES.CRMV")),
                ]),
                aml.Add(aml.Local(0), 1, aml.Local(0)),
            ]),
            aml.Release(lock),
        ], serialized=True),
    ]
