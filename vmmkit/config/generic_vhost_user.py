"""``--generic-vhost-user``: a virtio device of any type served by a vhost-user backend (Cloud
Hypervisor's ``GenericVhostUserConfig``, ``vmm/src/config.rs``; ``vm.add-generic-vhost-user``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar, Final

import attrs

from vmmkit.config.codec import _Config
from vmmkit.config.errors import ConfigError, _cli_errors
from vmmkit.config.fields import (
    U16,
    _int_range,
    _is_id,
    _is_str,
    _path,
    _transport_field,
    _tuple,
    _tuple_of,
)
from vmmkit.config.options import OptionParser, _make, _pci_options, _transport_option

#: Virtio device IDs (virtio 1.3, section 5 "Device Types"); 0 and the unassigned numbers are
#: refused, a typo there would only show as a guest that finds no driver.
VIRTIO_DEVICE_IDS: Final[Mapping[int, str]] = {
    1: "network card", 2: "block device", 3: "console", 4: "entropy source",
    5: "traditional memory balloon", 6: "ioMemory", 7: "rpmsg", 8: "SCSI host", 9: "9P transport",
    10: "mac80211 wlan", 11: "rproc serial", 12: "virtio CAIF", 13: "memory balloon", 16: "GPU device",
    17: "timer/clock device", 18: "input device", 19: "socket device", 20: "crypto device",
    21: "signal distribution module", 22: "pstore device", 23: "IOMMU device", 24: "memory device",
    25: "sound device", 26: "file system device", 27: "PMEM device", 28: "RPMB device",
    29: "mac80211 hwsim wireless simulation device", 30: "video encoder device", 31: "video decoder device",
    32: "SCMI device", 33: "NitroSecureModule", 34: "I2C adapter", 35: "watchdog", 36: "CAN device",
    38: "parameter server", 39: "audio policy device", 40: "Bluetooth device", 41: "GPIO device",
    42: "RDMA device", 43: "camera device", 44: "ISM device", 45: "SPI master",
}
#: Queues a generic device may have (each needs its own MSI-X vector on PCI; Linux's virtio-pci
#: and vmmkit's transports stay well below this).
MAX_QUEUES: Final = 256
_INT: Final = re.compile(r"\d+")


def _is_queue_size(value: object) -> bool:
    return type(value) is int and 1 <= value <= 32768 and not value & (value - 1)


def _check_device_type(_inst: object, attr: attrs.Attribute[int], value: object) -> None:
    if type(value) is not int or value not in VIRTIO_DEVICE_IDS:
        raise ConfigError(attr.name, value, "a virtio device ID (virtio 1.3, 5: 1 net, 2 block, 4 entropy, "
                          "26 file system...)", reason=f"{value!r} is not a virtio device ID")


@attrs.frozen(kw_only=True)
class GenericVhostUserConfig(_Config):
    """A generic vhost-user device: ``--generic-vhost-user socket=/run/snd.sock,virtio_id=25,
    queue_sizes=[64,64,64,64]`` (also ``device_type=`` for ``virtio_id=``, as newer Cloud
    Hypervisor spells it, ``id``, ``pci_segment``, ``pci_device_id``).

    ``device_type`` (JSON, as Cloud Hypervisor's OpenAPI document) is the virtio device ID;
    ``queue_sizes`` has one entry per queue, each a power of two up to 32768. The configuration
    space and the device features are the backend's. Needs shared guest memory (``--memory
    shared=on`` or hugepages). ``transport`` (vmmkit extension) as for disks.
    """

    socket: str = attrs.field(converter=_path, validator=_is_str)
    device_type: int = attrs.field(validator=_check_device_type)
    queue_sizes: tuple[int, ...] = attrs.field(
        converter=_tuple, validator=_tuple_of(_is_queue_size, "a power of two from 1 to 32768")
    )
    pci_segment: int = attrs.field(default=0, validator=_int_range(0, U16))
    pci_device_id: int | None = attrs.field(default=None, validator=_int_range(0, 31, optional=True))
    id: str | None = attrs.field(default=None, validator=_is_id)
    transport: str | None = _transport_field()

    _CLI_KEYS: ClassVar[Mapping[str, str]] = {"device_type": "virtio_id"}

    def __attrs_post_init__(self) -> None:
        if not self.queue_sizes:
            raise ConfigError("queue_sizes", [], "at least one queue size, such as [128]",
                              reason="a virtio device needs at least one queue")
        if len(self.queue_sizes) > MAX_QUEUES:
            raise ConfigError("queue_sizes", len(self.queue_sizes), f"at most {MAX_QUEUES} queues")

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--generic-vhost-user",
        ("socket", "virtio_id", "device_type", "queue_sizes", "id", "pci_segment", "pci_device_id", "transport"),
    )

    @classmethod
    def parse(cls, spec: str) -> GenericVhostUserConfig:
        """Parse a ``--generic-vhost-user`` value (``socket``, ``virtio_id`` or ``device_type``,
        and ``queue_sizes`` are required)."""
        o = cls._PARSER.parse(spec)
        if o.get("socket") is None:
            raise ConfigError(o.option, None, "socket=<vhost-user socket>", reason="missing socket")
        ids = [key for key in ("virtio_id", "device_type") if o.get(key) is not None]
        if not ids:
            raise ConfigError(o.option, None, "virtio_id=<virtio device ID>", reason="missing virtio_id")
        if len(ids) == 2:
            raise ConfigError(o.option, None, "one of virtio_id= and device_type=",
                              reason="virtio_id and device_type both given (they are the same thing)")
        raw_sizes = o.get("queue_sizes")
        if raw_sizes is None:
            raise ConfigError(o.option, None, "queue_sizes=[<size>,...]", reason="missing queue_sizes")
        sizes = []
        for part in raw_sizes.strip().strip("[]").split(","):
            if not part.strip():
                continue
            if not _INT.fullmatch(part.strip()):
                raise o.error("queue_sizes", raw_sizes, "a list of queue sizes, such as [128,128]")
            sizes.append(int(part))
        raw_id = o.get(ids[0])
        assert raw_id is not None
        if not _INT.fullmatch(raw_id.strip()):
            raise o.error(ids[0], raw_id, "a virtio device ID (a number: 2 block, 26 file system...)")
        with _cli_errors(o.option, {"device_type": ids[0]}):
            return _make(
                cls,
                socket=o.get("socket"),
                device_type=int(raw_id),
                queue_sizes=tuple(sizes),
                transport=_transport_option(o),
                **_pci_options(o, iommu=False),
            )
