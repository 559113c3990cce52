"""The local APIC state of MSHV_GET/SET_VP_STATE(MSHV_VP_STATE_LAPIC), a
``struct hv_local_interrupt_controller_state`` (rust-vmm/mshv hv-headers/hvhdk.h), translated
to and from the xAPIC register page vmmkit's neutral interface uses (``X86Vcpu.get_lapic``:
1 KiB, each register at its MMIO offset, as KVM_GET_LAPIC returns it; Intel SDM vol. 3
table 11-1). The APIC ID is kept as the register holds it (ID in bits 31:24)."""

from __future__ import annotations

import struct

#: hv_local_interrupt_controller_state: 44 little-endian u32.
STATE_FORMAT = "<5I8I8I8I3I7I5I"
STATE_SIZE = struct.calcsize(STATE_FORMAT)
PAGE_SIZE = 0x400

#: (state field index, page offset) of the scalar registers.
_SCALARS = (
    (0, 0x20),  # apic_id
    (1, 0x30),  # apic_version
    (2, 0xD0),  # apic_ldr
    (3, 0xE0),  # apic_dfr
    (4, 0xF0),  # apic_spurious
    (29, 0x280),  # apic_esr
    (30, 0x310),  # apic_icr_high
    (31, 0x300),  # apic_icr_low
    (32, 0x320),  # apic_lvt_timer
    (33, 0x330),  # apic_lvt_thermal
    (34, 0x340),  # apic_lvt_perfmon
    (35, 0x350),  # apic_lvt_lint0
    (36, 0x360),  # apic_lvt_lint1
    (37, 0x370),  # apic_lvt_error
    (38, 0x2F0),  # apic_lvt_cmci
    (40, 0x380),  # apic_initial_count
    (41, 0x390),  # apic_counter_value
    (42, 0x3E0),  # apic_divide_configuration
    (43, 0xC0),  # apic_remote_read
)
#: (first state field index, page offset) of the 8-word bitmaps: ISR, TMR, IRR.
_BITMAPS = ((5, 0x100), (13, 0x180), (21, 0x200))


def lapic_page_from_state(state: bytes) -> bytes:
    fields = struct.unpack_from(STATE_FORMAT, state)
    page = bytearray(PAGE_SIZE)
    for index, offset in _SCALARS:
        struct.pack_into("<I", page, offset, fields[index])
    for first, offset in _BITMAPS:
        for word in range(8):
            struct.pack_into("<I", page, offset + 0x10 * word, fields[first + word])
    return bytes(page)


def lapic_state_from_page(page: bytes, current: bytes) -> bytes:
    """The state for ``page``; fields the page has no place for (the error status) keep their
    ``current`` values. The result is ``current``'s length (the kernel wants whole pages)."""
    if len(page) < PAGE_SIZE:
        raise ValueError(f"a local APIC page is {PAGE_SIZE} bytes, not {len(page)}")
    fields = list(struct.unpack_from(STATE_FORMAT, current))
    for index, offset in _SCALARS:
        fields[index] = struct.unpack_from("<I", page, offset)[0]
    for first, offset in _BITMAPS:
        for word in range(8):
            fields[first + word] = struct.unpack_from("<I", page, offset + 0x10 * word)[0]
    out = bytearray(current)
    struct.pack_into(STATE_FORMAT, out, 0, *fields)
    return bytes(out)
