"""Platform settings (``--platform``): PCI segments, IOMMU, DMI strings, confidential VMs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs

from vmmkit.config.codec import _Config
from vmmkit.config.errors import ConfigError, _cli_errors
from vmmkit.config.fields import (
    _EXTENSION,
    MAX_PCI_SEGMENTS,
    TRANSPORTS,
    U8,
    U16,
    _choice,
    _int_range,
    _is_bool,
    _is_nonempty_str,
    _is_opt_str,
    _is_u16,
    _tuple,
    _tuple_of,
)
from vmmkit.config.options import OptionParser, _make


@attrs.frozen(kw_only=True)
class PlatformConfig(_Config):
    """Platform settings: ``--platform num_pci_segments=2,iommu_segments=[1],
    iommu_address_width=48,system_serial_number=..,system_uuid=..,oem_strings=[a,b],
    virtio_transport=mmio`` (also the other ``system_*`` DMI strings, ``chassis_asset_tag``,
    ``iommufd``, ``vfio_p2p_dma``, ``tdx``, ``sev_snp``; ``serial_number`` and ``uuid`` are
    deprecated aliases, in JSON too).

    ``virtio_transport`` (vmmkit extension): how virtio devices without their own
    ``transport`` attach, ``"pci"`` (default) or ``"mmio"``.
    """

    num_pci_segments: int = attrs.field(default=1, validator=_int_range(1, MAX_PCI_SEGMENTS))
    iommu_segments: tuple[int, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of(_is_u16, "a PCI segment number")
    )
    iommu_address_width_bits: int = attrs.field(default=64, validator=_int_range(1, 64))
    system_serial_number: str | None = attrs.field(default=None, validator=_is_opt_str)
    system_uuid: str | None = attrs.field(default=None, validator=_is_opt_str)
    oem_strings: tuple[str, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of(_is_nonempty_str, "a non-empty string")
    )
    system_manufacturer: str | None = attrs.field(default=None, validator=_is_opt_str)
    system_product_name: str | None = attrs.field(default=None, validator=_is_opt_str)
    system_version: str | None = attrs.field(default=None, validator=_is_opt_str)
    system_family: str | None = attrs.field(default=None, validator=_is_opt_str)
    system_sku_number: str | None = attrs.field(default=None, validator=_is_opt_str)
    chassis_asset_tag: str | None = attrs.field(default=None, validator=_is_opt_str)
    tdx: bool = attrs.field(default=False, validator=_is_bool)
    sev_snp: bool = attrs.field(default=False, validator=_is_bool)
    iommufd: bool = attrs.field(default=False, validator=_is_bool)
    vfio_p2p_dma: bool = attrs.field(default=True, validator=_is_bool)
    virtio_transport: str | None = attrs.field(
        default=None, validator=_choice(*TRANSPORTS, optional=True), metadata=_EXTENSION
    )

    _CLI_KEYS: ClassVar[Mapping[str, str]] = {"iommu_address_width_bits": "iommu_address_width"}
    _JSON_ALIASES: ClassVar[Mapping[str, str]] = {
        "serial_number": "system_serial_number",
        "uuid": "system_uuid",
    }
    _DMI_KEYS: ClassVar[tuple[str, ...]] = (
        "system_manufacturer",
        "system_product_name",
        "system_version",
        "system_serial_number",
        "system_uuid",
        "system_sku_number",
        "system_family",
        "chassis_asset_tag",
    )

    def __attrs_post_init__(self) -> None:
        for index, segment in enumerate(self.iommu_segments):
            if segment >= self.num_pci_segments:
                raise ConfigError(
                    f"iommu_segments[{index}]",
                    segment,
                    f"a segment below num_pci_segments ({self.num_pci_segments})",
                )

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--platform",
        (
            "num_pci_segments",
            "iommu_segments",
            "iommu_address_width",
            "serial_number",
            "uuid",
            "oem_strings",
            "iommufd",
            "vfio_p2p_dma",
            *_DMI_KEYS,
            "tdx",
            "sev_snp",
            "virtio_transport",
        ),
    )

    @classmethod
    def parse(cls, spec: str) -> PlatformConfig:
        """Parse a ``--platform`` value."""
        o = cls._PARSER.parse(spec)
        dmi = {key: o.get(key) for key in cls._DMI_KEYS}
        dmi["system_serial_number"] = dmi["system_serial_number"] or o.get("serial_number")
        dmi["system_uuid"] = dmi["system_uuid"] or o.get("uuid")
        with _cli_errors(o.option, cls._CLI_KEYS):
            return _make(
                cls,
                num_pci_segments=o.integer("num_pci_segments", hi=U16),
                iommu_segments=o.integer_list("iommu_segments", hi=U16),
                iommu_address_width_bits=o.integer("iommu_address_width", hi=U8),
                oem_strings=o.string_list("oem_strings"),
                iommufd=o.toggle("iommufd"),
                vfio_p2p_dma=o.toggle("vfio_p2p_dma"),
                tdx=o.toggle("tdx"),
                sev_snp=o.toggle("sev_snp"),
                virtio_transport=o.choice("virtio_transport", {t: t for t in TRANSPORTS}),
                **dmi,
            )

