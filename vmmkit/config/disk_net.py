"""Block and network devices (``--disk``, ``--net``) and their rate limits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

import attrs

from vmmkit.config.codec import _Config
from vmmkit.config.errors import ConfigError, _cli_errors
from vmmkit.config.fields import (
    MIN_MTU,
    U16,
    VIRTIO_BLK_ID_BYTES,
    _byte_len,
    _choice,
    _instance,
    _int_range,
    _is_bool,
    _is_id,
    _is_mac,
    _is_opt_str,
    _is_str,
    _is_u32,
    _opt_path,
    _queue_size,
    _transport_field,
    _tuple,
    _tuple_of,
)
from vmmkit.config.options import _PCI_KEYS, OptionParser, ParsedOptions, _make, _pci_options, _transport_option
from vmmkit.units import U64_MAX

# --- rate limiting ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TokenBucket(_Config):
    """A token bucket: ``size`` tokens, refilled every ``refill_time`` ms (both at least 1: CH
    reads a zero as "no bucket", vmmkit refuses it so a limit is never silently dropped)."""

    size: int = attrs.field(validator=_int_range(1, U64_MAX))
    one_time_burst: int | None = attrs.field(default=None, validator=_int_range(0, U64_MAX, optional=True))
    refill_time: int = attrs.field(validator=_int_range(1, U64_MAX))


@attrs.frozen(kw_only=True)
class RateLimiterConfig(_Config):
    """Independent bytes/s (``bandwidth``) and operations/s (``ops``) limits."""

    bandwidth: TokenBucket | None = attrs.field(default=None, validator=_instance(TokenBucket, optional=True))
    ops: TokenBucket | None = attrs.field(default=None, validator=_instance(TokenBucket, optional=True))


_RATE_KEYS: Final = tuple(
    f"{kind}_{part}" for kind in ("bw", "ops") for part in ("size", "one_time_burst", "refill_time")
)


def _parse_rate_limiter(o: ParsedOptions) -> RateLimiterConfig | None:
    """``bw_size=..,bw_refill_time=..,ops_...``. CH makes a bucket when size and refill time are
    both non-zero and silently drops it otherwise; vmmkit refuses a bucket given in part or with
    a zero, so a limit the user wrote is never ignored."""
    buckets: dict[str, TokenBucket | None] = {}
    for kind, name in (("bw", "bandwidth"), ("ops", "ops")):
        given = {part: o.integer(f"{kind}_{part}", lo=0 if part == "one_time_burst" else 1)
                 for part in ("size", "refill_time", "one_time_burst")}
        if all(value is None for value in given.values()):
            buckets[name] = None
            continue
        expected = f"{kind}_size and {kind}_refill_time (ms) both given and at least 1"
        for part in ("size", "refill_time"):
            value = given[part]
            if value is None:
                raise ConfigError(o.option, None, expected, key=f"{kind}_{part}",
                                  reason=f"{kind}_{part} missing (a {kind} limit needs it)")
        buckets[name] = TokenBucket(size=given["size"] or 0, refill_time=given["refill_time"] or 0,
                                    one_time_burst=given["one_time_burst"] or 0)
    if buckets["bandwidth"] is None and buckets["ops"] is None:
        return None
    return RateLimiterConfig(bandwidth=buckets["bandwidth"], ops=buckets["ops"])


@attrs.frozen(kw_only=True)
class RateLimitGroupConfig(_Config):
    """A rate limit shared by the disks that name it (``--rate-limit-group id=g0,bw_size=..,
    bw_refill_time=..``, then ``--disk ..,rate_limit_group=g0``), CH's ``RateLimiterGroupConfig``."""

    id: str = attrs.field(validator=_is_str)
    rate_limiter_config: RateLimiterConfig = attrs.field(validator=_instance(RateLimiterConfig))

    def __attrs_post_init__(self) -> None:
        if not self.id:
            raise ConfigError("id", self.id, "a non-empty group id")

    _CLI_KEYS: ClassVar[Mapping[str, str]] = {"rate_limiter_config": "bw_*/ops_*"}
    _PARSER: ClassVar[OptionParser] = OptionParser("--rate-limit-group", ("id", *_RATE_KEYS))

    @classmethod
    def parse(cls, spec: str) -> RateLimitGroupConfig:
        """Parse a ``--rate-limit-group`` value."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option, cls._CLI_KEYS):
            limits = _parse_rate_limiter(o)
            if o.get("id") is None:
                raise ConfigError(o.option, None, "id=<group id>", key="id", reason="missing id")
            if limits is None:
                raise ConfigError(o.option, None, "bw_size=..,bw_refill_time=.. and/or ops_size=..,ops_refill_time=..",
                                  reason="a rate limit group without limits")
            return _make(cls, id=o.get("id"), rate_limiter_config=limits)


@attrs.frozen(kw_only=True)
class VirtQueueAffinity(_Config):
    """The host CPUs serving one queue of a device."""

    queue_index: int = attrs.field(validator=_int_range(0, U16))
    host_cpus: tuple[int, ...] = attrs.field(
        converter=_tuple, validator=_tuple_of(_is_u32, "a host CPU number")
    )

    def __attrs_post_init__(self) -> None:
        if not self.host_cpus:
            raise ConfigError("host_cpus", self.host_cpus, "at least one host CPU")


# --- disks and nets ---------------------------------------------------------------------------

_IMAGE_TYPES: Final = {"raw": "Raw", "qcow2": "Qcow2", "vhd": "FixedVhd", "vhdx": "Vhdx"}
_LOCK_GRANULARITY: Final = {"byte-range": "ByteRange", "full": "Full"}


@attrs.frozen(kw_only=True)
class DiskConfig(_Config):
    """A virtio-block disk: ``--disk path=a.img,readonly=on,direct=on,num_queues=2,
    queue_size=256,id=disk0,serial=abc`` (also ``vhost_user=on,socket=..``, ``bw_*``/``ops_*``
    rate limits, ``queue_affinity=[0@[1]]``, ``image_type=raw``, ``lock_granularity=full``,
    ``pci_segment``, ``pci_device_id``, ``iommu``).

    Exactly one of ``path`` and (with ``vhost_user``) ``vhost_socket``; ``queue_size`` is a power
    of two from 4 to 32768; ``serial`` has at most 20 bytes.
    ``transport`` (vmmkit extension): ``"pci"``, ``"mmio"`` or ``None`` for the VM default.
    """

    path: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    readonly: bool = attrs.field(default=False, validator=_is_bool)
    direct: bool = attrs.field(default=False, validator=_is_bool)
    iommu: bool = attrs.field(default=False, validator=_is_bool)
    num_queues: int = attrs.field(default=1, validator=_int_range(1, U16))
    queue_size: int = attrs.field(default=128, validator=_queue_size(4))
    vhost_user: bool = attrs.field(default=False, validator=_is_bool)
    vhost_socket: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    rate_limiter_config: RateLimiterConfig | None = attrs.field(
        default=None, validator=_instance(RateLimiterConfig, optional=True)
    )
    pci_segment: int = attrs.field(default=0, validator=_int_range(0, U16))
    pci_device_id: int | None = attrs.field(default=None, validator=_int_range(0, 31, optional=True))
    id: str | None = attrs.field(default=None, validator=_is_id)
    serial: str | None = attrs.field(default=None, validator=_is_opt_str)
    rate_limit_group: str | None = attrs.field(default=None, validator=_is_opt_str)
    queue_affinity: tuple[VirtQueueAffinity, ...] = attrs.field(
        default=(),
        converter=_tuple,
        validator=_tuple_of(lambda v: isinstance(v, VirtQueueAffinity), "a VirtQueueAffinity"),
    )
    backing_files: bool = attrs.field(default=False, validator=_is_bool)
    sparse: bool = attrs.field(default=True, validator=_is_bool)
    image_type: str = attrs.field(
        default="Unknown", validator=_choice("FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown")
    )
    lock_granularity: str = attrs.field(default="ByteRange", validator=_choice("ByteRange", "Full"))
    transport: str | None = _transport_field()

    _CLI_KEYS: ClassVar[Mapping[str, str]] = {"vhost_socket": "socket", "rate_limiter_config": "bw_*/ops_*"}

    def __attrs_post_init__(self) -> None:
        if self.vhost_user:
            if self.vhost_socket is None:
                raise ConfigError("vhost_socket", None, "socket=<path>", reason="vhost_user needs a socket")
            if self.path is not None:
                raise ConfigError("path", self.path, "a path or a vhost-user socket, not both")
            if self.iommu:
                raise ConfigError("iommu", True, "iommu off for a vhost-user disk")
        elif self.path is None:
            raise ConfigError("path", None, "path=<disk image>", reason="missing path")
        elif self.vhost_socket is not None:
            raise ConfigError("vhost_socket", self.vhost_socket, "a socket only with vhost_user")
        if self.serial is not None and _byte_len(self.serial) > VIRTIO_BLK_ID_BYTES:
            raise ConfigError("serial", self.serial, f"at most {VIRTIO_BLK_ID_BYTES} bytes")
        if self.rate_limiter_config is not None and self.rate_limit_group is not None:
            raise ConfigError(
                "rate_limit_group", self.rate_limit_group, "either a rate limit group or bw/ops limits"
            )
        seen: set[int] = set()
        for index, affinity in enumerate(self.queue_affinity):
            if affinity.queue_index >= self.num_queues or affinity.queue_index in seen:
                raise ConfigError(
                    f"queue_affinity[{index}].queue_index",
                    affinity.queue_index,
                    f"a distinct queue index below num_queues ({self.num_queues})",
                )
            seen.add(affinity.queue_index)

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--disk",
        (
            "path",
            "readonly",
            "direct",
            "num_queues",
            "queue_size",
            "vhost_user",
            "socket",
            *_RATE_KEYS,
            "serial",
            "rate_limit_group",
            "queue_affinity",
            "backing_files",
            "sparse",
            "image_type",
            "lock_granularity",
            *_PCI_KEYS,
            "transport",
        ),
    )

    @classmethod
    def parse(cls, spec: str) -> DiskConfig:
        """Parse a ``--disk`` value."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option, cls._CLI_KEYS):
            pairs = o.pairs("queue_affinity", hi=U16)
            return _make(
                cls,
                path=o.get("path"),
                readonly=o.toggle("readonly"),
                direct=o.toggle("direct"),
                num_queues=o.integer("num_queues", hi=U16),
                queue_size=o.integer("queue_size", hi=U16),
                vhost_user=o.toggle("vhost_user"),
                vhost_socket=o.get("socket"),
                rate_limiter_config=_parse_rate_limiter(o),
                serial=o.get("serial"),
                rate_limit_group=o.get("rate_limit_group"),
                queue_affinity=None
                if pairs is None
                else tuple(VirtQueueAffinity(queue_index=q, host_cpus=c) for q, c in pairs),
                backing_files=o.toggle("backing_files"),
                sparse=o.toggle("sparse"),
                image_type=o.choice("image_type", _IMAGE_TYPES),
                lock_granularity=o.choice("lock_granularity", _LOCK_GRANULARITY),
                transport=_transport_option(o),
                **_pci_options(o),
            )


def _check_netmask(ip: str, mask: str) -> None:
    import ipaddress  # only for a network configuration (start-up cost)

    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise ConfigError("ip", ip, "an IPv4 or IPv6 address") from None
    expected = f"an IPv{address.version} netmask such as " + (
        "255.255.255.0" if address.version == 4 else "ffff:ffff:ffff:ffff::"
    )
    try:
        netmask = ipaddress.ip_address(mask)
    except ValueError:
        raise ConfigError("mask", mask, expected) from None
    bits = 32 if netmask.version == 4 else 128
    inverted = ~int(netmask) & ((1 << bits) - 1)
    if netmask.version != address.version or inverted & (inverted + 1):
        raise ConfigError("mask", mask, expected)


_VHOST_MODES: Final = {"client": "Client", "server": "Server"}


@attrs.frozen(kw_only=True)
class NetConfig(_Config):
    """A virtio-net device: ``--net tap=tap0,mac=12:34:56:78:9a:bc,ip=..,mask=..,fd=[3,4],
    num_queues=4,queue_size=256,id=net0`` (also ``host_mac``, ``mtu``, ``vhost_user=on,socket=..,
    vhost_mode=client|server``, ``offload_tso|ufo|csum``, ``bw_*``/``ops_*``, ``iommu``,
    ``pci_segment``, ``pci_device_id``).

    ``num_queues`` is at least 2; with ``fd`` (``fds``: already-open taps, each > 2), as in CH,
    ``num_queues`` must be twice the number of fds. ``mac=None`` means "generate one".
    ``transport`` (vmmkit extension): ``"pci"``, ``"mmio"`` or ``None`` for the VM default.
    """

    tap: str | None = attrs.field(default=None, validator=_is_opt_str)
    ip: str = attrs.field(default="192.168.249.1", validator=_is_str)
    mask: str = attrs.field(default="255.255.255.0", validator=_is_str)
    mac: str | None = attrs.field(default=None, validator=_is_mac)
    host_mac: str | None = attrs.field(default=None, validator=_is_mac)
    mtu: int | None = attrs.field(default=None, validator=_int_range(MIN_MTU, U16, optional=True))
    iommu: bool = attrs.field(default=False, validator=_is_bool)
    num_queues: int = attrs.field(default=2, validator=_int_range(2, U16))
    queue_size: int = attrs.field(default=256, validator=_queue_size(2))
    vhost_user: bool = attrs.field(default=False, validator=_is_bool)
    vhost_socket: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    vhost_mode: str = attrs.field(default="Client", validator=_choice("Client", "Server"))
    id: str | None = attrs.field(default=None, validator=_is_id)
    fds: tuple[int, ...] = attrs.field(
        default=(),
        converter=_tuple,
        validator=_tuple_of(lambda v: type(v) is int and 2 < v <= 0x7FFF_FFFF, "an fd above 2"),
    )
    pci_segment: int = attrs.field(default=0, validator=_int_range(0, U16))
    pci_device_id: int | None = attrs.field(default=None, validator=_int_range(0, 31, optional=True))
    rate_limiter_config: RateLimiterConfig | None = attrs.field(
        default=None, validator=_instance(RateLimiterConfig, optional=True)
    )
    offload_tso: bool = attrs.field(default=True, validator=_is_bool)
    offload_ufo: bool = attrs.field(default=True, validator=_is_bool)
    offload_csum: bool = attrs.field(default=True, validator=_is_bool)
    transport: str | None = _transport_field()

    _CLI_KEYS: ClassVar[Mapping[str, str]] = {
        "vhost_socket": "socket",
        "fds": "fd",
        "rate_limiter_config": "bw_*/ops_*",
    }

    def __attrs_post_init__(self) -> None:
        _check_netmask(self.ip, self.mask)
        if self.fds and len(self.fds) * 2 != self.num_queues:
            raise ConfigError("num_queues", self.num_queues, f"twice the number of fds ({2 * len(self.fds)})")
        if self.vhost_user:
            if self.vhost_socket is None:
                raise ConfigError("vhost_socket", None, "socket=<path>", reason="vhost_user needs a socket")
            if self.iommu:
                raise ConfigError("iommu", True, "iommu off for a vhost-user net device")
        if not self.offload_csum and (self.offload_tso or self.offload_ufo):
            raise ConfigError("offload_csum", False, "offload_csum on when offload_tso or offload_ufo is on")

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--net",
        (
            "tap",
            "ip",
            "mask",
            "mac",
            "host_mac",
            "mtu",
            "num_queues",
            "queue_size",
            "vhost_user",
            "socket",
            "vhost_mode",
            "fd",
            *_RATE_KEYS,
            "offload_tso",
            "offload_ufo",
            "offload_csum",
            *_PCI_KEYS,
            "transport",
        ),
    )

    @classmethod
    def parse(cls, spec: str) -> NetConfig:
        """Parse a ``--net`` value."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option, cls._CLI_KEYS):
            return _make(
                cls,
                tap=o.get("tap"),
                ip=o.get("ip"),
                mask=o.get("mask"),
                mac=o.get("mac"),
                host_mac=o.get("host_mac"),
                mtu=o.integer("mtu", hi=U16),
                num_queues=o.integer("num_queues", hi=U16),
                queue_size=o.integer("queue_size", hi=U16),
                vhost_user=o.toggle("vhost_user"),
                vhost_socket=o.get("socket"),
                vhost_mode=o.choice("vhost_mode", _VHOST_MODES),
                fds=o.integer_list("fd", hi=0x7FFF_FFFF),
                rate_limiter_config=_parse_rate_limiter(o),
                offload_tso=o.toggle("offload_tso"),
                offload_ufo=o.toggle("offload_ufo"),
                offload_csum=o.toggle("offload_csum"),
                transport=_transport_option(o),
                **_pci_options(o),
            )

