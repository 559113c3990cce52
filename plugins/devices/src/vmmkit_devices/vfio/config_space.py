"""The guest's view of a passed-through function's configuration space: shadowed and filtered.

What the guest reads and writes goes to one of three places, byte by byte (QEMU's
``hw/vfio/pci.c`` ``emulated_config_bits`` and Cloud Hypervisor's ``pci/src/vfio.rs``
``VfioPciConfig`` split it the same way):

- **shadow** (:class:`vmmkit.pci.config.PciConfigSpace` with write masks): the whole type-0
  header (IDs from the device, BARs emulated with the device's sizes so sizing and relocation
  are the guest's business, no expansion ROM, the interrupt line and pin), the header of every
  capability kept (its next pointer re-linked past the hidden ones), and the MSI and MSI-X
  capabilities entirely (virtualized: the guest's vectors are routed by vmmkit);
- **device**: the bodies of the other capabilities kept (power management, PCI Express,
  vendor-specific) and the bytes outside any capability, read and written through the
  device's configuration region (the host's vfio-pci filters them again);
- **zero**: capabilities vmmkit hides (a guest must not drive them: MSI-X is virtual, others
  such as SR-IOV or AER need host co-operation), and everything past 256 bytes (no extended
  capabilities are exposed).

The physical capability list is walked with the guards of Linux's ``pci_find_next_cap_ttl``:
at most 48 entries, dword aligned, inside the first 256 bytes, no loops.
"""

from __future__ import annotations

import enum
from typing import Final

from attrs import frozen

from vmmkit.pci import config as c

#: Capabilities the guest sees: PM, MSI, vendor-specific, PCI Express, MSI-X.
CAP_ID_PM: Final = 0x01
KEPT_CAPABILITIES: Final = frozenset({CAP_ID_PM, c.CAP_ID_MSI, c.CAP_ID_VNDR, c.CAP_ID_EXP, c.CAP_ID_MSIX})

# MSI capability (PCI Local Bus 3.0, 6.8.1).
MSI_CONTROL_ENABLE: Final = 0x0001
MSI_CONTROL_MMC: Final = 0x000E  # multiple message capable (log2), read-only
MSI_CONTROL_MME: Final = 0x0070  # multiple message enable (log2)
MSI_CONTROL_64BIT: Final = 0x0080
MSI_CONTROL_PVM: Final = 0x0100  # per-vector masking


class Source(enum.IntEnum):
    SHADOW = 0
    DEVICE = 1
    ZERO = 2


@frozen
class MsiLayout:
    """Where the fields of an MSI capability at ``offset`` are."""

    offset: int
    control: int  # the device's Message Control (read-only bits as they are)

    @property
    def is_64bit(self) -> bool:
        return bool(self.control & MSI_CONTROL_64BIT)

    @property
    def per_vector_mask(self) -> bool:
        return bool(self.control & MSI_CONTROL_PVM)

    @property
    def vectors(self) -> int:
        """How many vectors the device can send (2^MMC, at most 32)."""
        return 1 << min((self.control & MSI_CONTROL_MMC) >> 1, 5)

    @property
    def data_offset(self) -> int:
        return self.offset + (12 if self.is_64bit else 8)

    @property
    def mask_offset(self) -> int | None:
        return self.offset + (16 if self.is_64bit else 12) if self.per_vector_mask else None

    @property
    def length(self) -> int:
        return (24 if self.is_64bit else 20) if self.per_vector_mask else (14 if self.is_64bit else 10)


@frozen
class MsixLayout:
    """An MSI-X capability at ``offset``: vectors, and where the table and PBA are."""

    offset: int
    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    length: int = 12


def walk_capabilities(raw: bytes) -> list[tuple[int, int]]:
    """``(offset, id)`` of each capability of a physical config space, bounded as Linux does."""
    if len(raw) < c.LEGACY_CONFIG_SIZE or not raw[c.STATUS] & c.STATUS_CAP_LIST:
        return []
    found: list[tuple[int, int]] = []
    seen: set[int] = set()
    offset = raw[c.CAPABILITY_LIST] & ~3
    while c.FIRST_CAPABILITY <= offset <= c.LEGACY_CONFIG_SIZE - 4 and offset not in seen and len(seen) < 48:
        seen.add(offset)
        if raw[offset] == 0xFF:
            break
        found.append((offset, raw[offset]))
        offset = raw[offset + 1] & ~3
    return found


def build_shadow(raw: bytes, config: c.PciConfigSpace) -> tuple[bytearray, MsiLayout | None, MsixLayout | None]:
    """Fill ``config`` (already holding the header) with the kept capabilities' shadow and
    return the per-byte sources and the MSI / MSI-X layouts."""
    sources = bytearray([Source.SHADOW] * c.FIRST_CAPABILITY + [Source.DEVICE] * (c.LEGACY_CONFIG_SIZE - 0x40))
    caps = walk_capabilities(raw)
    msi: MsiLayout | None = None
    msix: MsixLayout | None = None
    kept: list[int] = []
    for index, (offset, cap_id) in enumerate(caps):
        following = caps[index + 1][0] if index + 1 < len(caps) else c.LEGACY_CONFIG_SIZE
        room = (following - offset) if following > offset else c.LEGACY_CONFIG_SIZE - offset
        room = min(room, c.LEGACY_CONFIG_SIZE - offset)
        if cap_id == c.CAP_ID_MSI and msi is None:
            layout = MsiLayout(offset, int.from_bytes(raw[offset + 2: offset + 4], "little"))
            if layout.length <= c.LEGACY_CONFIG_SIZE - offset:
                msi = layout
                _shadow_msi(config, sources, layout)
                kept.append(offset)
                continue
        elif cap_id == c.CAP_ID_MSIX and msix is None and offset + 12 <= c.LEGACY_CONFIG_SIZE:
            control = int.from_bytes(raw[offset + 2: offset + 4], "little")
            table = int.from_bytes(raw[offset + 4: offset + 8], "little")
            pba = int.from_bytes(raw[offset + 8: offset + 12], "little")
            msix = MsixLayout(offset, (control & 0x7FF) + 1, table & 7, table & ~7, pba & 7, pba & ~7)
            _shadow_msix(config, sources, msix, control)
            kept.append(offset)
            continue
        elif cap_id in KEPT_CAPABILITIES and cap_id not in (c.CAP_ID_MSI, c.CAP_ID_MSIX):
            # the header is shadowed (its next pointer re-linked); the body stays Source.DEVICE
            sources[offset: offset + 2] = bytes([Source.SHADOW] * 2)
            config.set(offset, 1, cap_id)
            kept.append(offset)
            continue
        # hidden: the header and what the guest would take as its body read as zero
        sources[offset: offset + min(room, 4)] = bytes([Source.ZERO] * min(room, 4))
        for at in range(offset, offset + min(room, 4)):
            config.set(at, 1, 0)
    link = c.CAPABILITY_LIST
    for offset in kept:
        config.set(link, 1, offset)
        link = offset + 1
    config.set(link, 1, 0)
    status = config.get(c.STATUS, 2)
    config.set(c.STATUS, 2, (status | c.STATUS_CAP_LIST) if kept else (status & ~c.STATUS_CAP_LIST))
    return sources, msi, msix


def _shadow_msi(config: c.PciConfigSpace, sources: bytearray, msi: MsiLayout) -> None:
    o = msi.offset
    sources[o: o + msi.length] = bytes([Source.SHADOW] * msi.length)
    config.set(o, 1, c.CAP_ID_MSI)
    config.set(o + 2, 2, msi.control & (MSI_CONTROL_MMC | MSI_CONTROL_64BIT | MSI_CONTROL_PVM))
    config.set_writable(o + 2, 2, MSI_CONTROL_ENABLE | MSI_CONTROL_MME)
    config.set_writable(o + 4, 4, 0xFFFF_FFFC)
    if msi.is_64bit:
        config.set_writable(o + 8, 4, 0xFFFF_FFFF)
    config.set_writable(msi.data_offset, 2, 0xFFFF)
    if msi.mask_offset is not None:
        config.set_writable(msi.mask_offset, 4, (1 << msi.vectors) - 1 if msi.vectors < 32 else 0xFFFF_FFFF)


def _shadow_msix(config: c.PciConfigSpace, sources: bytearray, msix: MsixLayout, control: int) -> None:
    o = msix.offset
    sources[o: o + msix.length] = bytes([Source.SHADOW] * msix.length)
    config.set(o, 1, c.CAP_ID_MSIX)
    config.set(o + 2, 2, control & 0x07FF)
    config.set_writable(o + 2, 2, 0xC000)  # MSI-X enable, function mask
    config.set(o + 4, 4, msix.table_offset | msix.table_bar)
    config.set(o + 8, 4, msix.pba_offset | msix.pba_bar)
