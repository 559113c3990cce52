"""The x86 PC platform's interrupt controllers and clock in a snapshot, backend-neutral.

A backend's :class:`vmmkit.hypervisor.Vm` that holds these pieces itself (KVM's in-kernel
irqchip, emu's I/O APIC model) saves them in this layout (version :data:`STATE_VERSION`), so a
snapshot of one backend restores on another::

    ioapic    {"id", "select", "irr", "redirection": [24 x u64]} (82093AA registers) or null
    pics      [master, slave]: the 8259A state, {"irr", "imr", "isr", "priority_add",
              "irq_base", "read_reg_select", "poll", "special_mask", "init_state", "auto_eoi",
              "rotate_on_auto_eoi", "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
              "last_irr"} (the fields of Linux's ``struct kvm_pic_state``), or []
    kvm_pit2  KVM's in-kernel PIT (``struct kvm_pit_state2``, base64) or null: only a backend
              with KVM's in-kernel PIT takes it
    clock_ns  the paravirtual clock (kvmclock) in ns, or null

A PIC the guest initialised (``irq_base``, its ICW2 vector base, is not 0) and did not mask
entirely (``imr`` is not 0xff) is in use; a backend without a PIC refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from attrs import frozen

from vmmkit.state import StateError, field, int_field, pack_bytes, unpack_bytes

STATE_VERSION: Final = 1
IOAPIC_PINS: Final = 24
PIC_FIELDS: Final = ("last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
                     "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
                     "special_fully_nested_mode", "init4", "elcr", "elcr_mask")


@frozen
class IoApicState:
    id: int
    select: int
    irr: int
    redirection: tuple[int, ...]


@frozen
class PlatformState:
    ioapic: IoApicState | None
    pics: tuple[dict[str, int], ...]
    kvm_pit2: bytes | None
    clock_ns: int | None

    def pics_in_use(self) -> bool:
        return any(pic.get("irq_base", 0) != 0 and pic.get("imr", 0xFF) != 0xFF for pic in self.pics)


def platform_state(*, ioapic: IoApicState | None = None, pics: list[dict[str, int]] | None = None,
                   kvm_pit2: bytes | None = None, clock_ns: int | None = None) -> dict[str, Any]:
    return {
        "ioapic": None if ioapic is None else {"id": ioapic.id, "select": ioapic.select, "irr": ioapic.irr,
                                                "redirection": list(ioapic.redirection)},
        "pics": list(pics or []),
        "kvm_pit2": None if kvm_pit2 is None else pack_bytes(kvm_pit2),
        "clock_ns": clock_ns,
    }


def parse_platform_state(state: Mapping[str, Any]) -> PlatformState:
    """:raises StateError: malformed."""
    what = "vm"
    ioapic = None
    raw = state.get("ioapic") if isinstance(state, Mapping) else None
    if raw is not None:
        if not isinstance(raw, Mapping):
            raise StateError("vm.ioapic: expected an object")
        table = field(raw, "redirection", list, "vm.ioapic")
        if len(table) != IOAPIC_PINS or not all(isinstance(v, int) and not isinstance(v, bool)
                                                and 0 <= v < 1 << 64 for v in table):
            raise StateError(f"vm.ioapic.redirection: expected {IOAPIC_PINS} 64-bit entries")
        ioapic = IoApicState(int_field(raw, "id", "vm.ioapic", 0, 0xFF), int_field(raw, "select", "vm.ioapic", 0, 0xFF),
                             int_field(raw, "irr", "vm.ioapic", 0, 0xFFFF_FFFF), tuple(table))
    pics = []
    for index, pic in enumerate(field(state, "pics", list, what)):
        if not isinstance(pic, Mapping):
            raise StateError(f"vm.pics[{index}]: expected an object")
        pics.append({name: int_field(pic, name, f"vm.pics[{index}]", 0, 0xFF) for name in PIC_FIELDS})
    if len(pics) > 2:
        raise StateError("vm.pics: at most two 8259As")
    pit = state.get("kvm_pit2")
    clock = state.get("clock_ns")
    if clock is not None and (not isinstance(clock, int) or isinstance(clock, bool) or not 0 <= clock < 1 << 64):
        raise StateError("vm.clock_ns: expected a 64-bit count of ns or null")
    return PlatformState(ioapic, tuple(pics), None if pit is None else unpack_bytes(pit, "vm.kvm_pit2"), clock)
