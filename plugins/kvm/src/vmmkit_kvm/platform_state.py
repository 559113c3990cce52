"""KVM's irqchip layouts (``struct kvm_ioapic_state``, ``struct kvm_pic_state`` of
<linux/kvm.h>, arch/x86/include/uapi/asm/kvm.h) to and from :mod:`vmmkit.x86_platform`'s
backend-neutral layout."""

from __future__ import annotations

import struct
from typing import Final

from vmmkit.state import StateError
from vmmkit.x86_platform import IOAPIC_PINS, PIC_FIELDS, IoApicState

KVM_IRQCHIP_PIC_MASTER: Final = 0
KVM_IRQCHIP_PIC_SLAVE: Final = 1
KVM_IRQCHIP_IOAPIC: Final = 2

#: struct kvm_ioapic_state: u64 base_address, u32 ioregsel, u32 id, u32 irr, u32 pad,
#: u64 redirtbl[24].
_IOAPIC: Final = struct.Struct(f"<QIIII{IOAPIC_PINS}Q")
#: struct kvm_pic_state: sixteen u8 fields, in PIC_FIELDS order.
_PIC: Final = struct.Struct("<16B")


def ioapic_from_kvm(raw: bytes) -> IoApicState:
    _base, select, apic_id, irr, _pad, *table = _IOAPIC.unpack_from(raw)
    return IoApicState(apic_id, select, irr, tuple(table))


def ioapic_to_kvm(state: IoApicState, current: bytes) -> bytes:
    """``current`` (what KVM has, for the base address) with ``state`` written in."""
    base = _IOAPIC.unpack_from(current)[0]
    out = bytearray(current)
    _IOAPIC.pack_into(out, 0, base, state.select, state.id, state.irr, 0, *state.redirection)
    return bytes(out)


def pic_from_kvm(raw: bytes) -> dict[str, int]:
    return dict(zip(PIC_FIELDS, _PIC.unpack_from(raw), strict=True))


def pic_to_kvm(state: dict[str, int], current: bytes) -> bytes:
    out = bytearray(current)
    try:
        _PIC.pack_into(out, 0, *(state[name] for name in PIC_FIELDS))
    except (KeyError, struct.error) as exc:
        raise StateError(f"vm.pics: {exc}") from None
    return bytes(out)
