"""The other devices: entropy, balloon, virtio-fs, pmem, VFIO, vsock, and third-party plugin
devices."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import attrs

from vmmkit.config.codec import _CODEC, _Config
from vmmkit.config.errors import ConfigError, _cli_errors
from vmmkit.config.fields import (
    DEFAULT_RNG_SOURCE,
    PMEM_ALIGNMENT,
    U8,
    U16,
    U32,
    VIRTIO_FS_TAG_LEN,
    _byte_len,
    _int_range,
    _is_bool,
    _is_id,
    _is_nonempty_str,
    _is_str,
    _opt_size,
    _path,
    _queue_size,
    _size,
    _transport_field,
    _tuple,
    _tuple_of,
)
from vmmkit.config.options import _PCI_KEYS, OptionParser, _make, _pci_options, _transport_option
from vmmkit.units import U64_MAX


@attrs.frozen(kw_only=True)
class RngConfig(_Config):
    """The virtio-rng device: ``--rng src=/dev/urandom,iommu=on``.

    ``transport`` (vmmkit extension): ``"pci"``, ``"mmio"`` or ``None`` for the VM default.
    """

    src: str = attrs.field(default=DEFAULT_RNG_SOURCE, converter=_path, validator=_is_str)
    iommu: bool = attrs.field(default=False, validator=_is_bool)
    id: str | None = attrs.field(default=None, validator=_is_id)
    pci_segment: int = attrs.field(default=0, validator=_int_range(0, U16))
    pci_device_id: int | None = attrs.field(default=None, validator=_int_range(0, 31, optional=True))
    transport: str | None = _transport_field()

    _PARSER: ClassVar[OptionParser] = OptionParser("--rng", ("src", *_PCI_KEYS, "transport"))

    @classmethod
    def parse(cls, spec: str) -> RngConfig:
        """Parse a ``--rng`` value."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option):
            return _make(cls, src=o.get("src"), transport=_transport_option(o), **_pci_options(o))


@attrs.frozen(kw_only=True)
class BalloonConfig(_Config):
    """The virtio-balloon device: ``--balloon size=256M,deflate_on_oom=on,free_page_reporting=on``.

    ``size`` must stay below guest RAM. ``id``, ``iommu``, ``pci_segment``, ``pci_device_id`` and
    ``transport`` on the command line are vmmkit extensions (Cloud Hypervisor's JSON has the
    first four), as for ``--rng``.
    """

    size: int = attrs.field(default=0, converter=_size)
    deflate_on_oom: bool = attrs.field(default=False, validator=_is_bool)
    free_page_reporting: bool = attrs.field(default=False, validator=_is_bool)
    iommu: bool = attrs.field(default=False, validator=_is_bool)
    id: str | None = attrs.field(default=None, validator=_is_id)
    pci_segment: int = attrs.field(default=0, validator=_int_range(0, U16))
    pci_device_id: int | None = attrs.field(default=None, validator=_int_range(0, 31, optional=True))
    transport: str | None = _transport_field()

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--balloon", ("size", "deflate_on_oom", "free_page_reporting", *_PCI_KEYS, "transport")
    )

    @classmethod
    def parse(cls, spec: str) -> BalloonConfig:
        """Parse a ``--balloon`` value."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option):
            return _make(
                cls,
                size=o.size("size"),
                deflate_on_oom=o.toggle("deflate_on_oom"),
                free_page_reporting=o.toggle("free_page_reporting"),
                transport=_transport_option(o),
                **_pci_options(o),
            )


@attrs.frozen(kw_only=True)
class FsConfig(_Config):
    """A virtio-fs share served by a vhost-user daemon: ``--fs tag=myfs,socket=/tmp/virtiofsd.sock``
    (also ``num_queues``, ``queue_size``, ``id``, ``pci_segment``, ``pci_device_id``).

    ``tag`` has at most 36 bytes. Needs shared guest memory (``--memory shared=on`` or
    hugepages). ``transport`` (vmmkit extension) as for disks.
    """

    tag: str = attrs.field(validator=_is_str)
    socket: str = attrs.field(converter=_path, validator=_is_str)
    num_queues: int = attrs.field(default=1, validator=_int_range(1, U16))
    queue_size: int = attrs.field(default=1024, validator=_queue_size(2))
    pci_segment: int = attrs.field(default=0, validator=_int_range(0, U16))
    pci_device_id: int | None = attrs.field(default=None, validator=_int_range(0, 31, optional=True))
    id: str | None = attrs.field(default=None, validator=_is_id)
    transport: str | None = _transport_field()

    def __attrs_post_init__(self) -> None:
        if _byte_len(self.tag) > VIRTIO_FS_TAG_LEN:
            raise ConfigError("tag", self.tag, f"a tag of at most {VIRTIO_FS_TAG_LEN} bytes")

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--fs",
        ("tag", "socket", "num_queues", "queue_size", "id", "pci_segment", "pci_device_id", "transport"),
    )

    @classmethod
    def parse(cls, spec: str) -> FsConfig:
        """Parse a ``--fs`` value (``tag`` and ``socket`` are required)."""
        o = cls._PARSER.parse(spec)
        for key, what in (("tag", "<tag_name>"), ("socket", "<socket_path>")):
            if o.get(key) is None:
                raise ConfigError(o.option, None, f"{key}={what}", reason=f"missing {key}")
        with _cli_errors(o.option):
            return _make(
                cls,
                tag=o.get("tag"),
                socket=o.get("socket"),
                num_queues=o.integer("num_queues", hi=U16),
                queue_size=o.integer("queue_size", hi=U16),
                transport=_transport_option(o),
                **_pci_options(o, iommu=False),
            )


@attrs.frozen(kw_only=True)
class PmemConfig(_Config):
    """A virtio-pmem device: ``--pmem file=/path/img,size=1G,discard_writes=on`` (also ``iommu``,
    ``id``, ``pci_segment``, ``pci_device_id``).

    ``size`` (default: the file's size) is a multiple of 2 MiB. ``transport`` (vmmkit extension)
    as for disks.
    """

    file: str = attrs.field(converter=_path, validator=_is_str)
    size: int | None = attrs.field(default=None, converter=_opt_size)
    iommu: bool = attrs.field(default=False, validator=_is_bool)
    discard_writes: bool = attrs.field(default=False, validator=_is_bool)
    pci_segment: int = attrs.field(default=0, validator=_int_range(0, U16))
    pci_device_id: int | None = attrs.field(default=None, validator=_int_range(0, 31, optional=True))
    id: str | None = attrs.field(default=None, validator=_is_id)
    transport: str | None = _transport_field()

    def __attrs_post_init__(self) -> None:
        if self.size is not None and (self.size <= 0 or self.size % PMEM_ALIGNMENT):
            raise ConfigError("size", self.size, "a positive multiple of 2M")

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--pmem", ("file", "size", "discard_writes", *_PCI_KEYS, "transport")
    )

    @classmethod
    def parse(cls, spec: str) -> PmemConfig:
        """Parse a ``--pmem`` value (``file`` is required)."""
        o = cls._PARSER.parse(spec)
        if o.get("file") is None:
            raise ConfigError(o.option, None, "file=<backing_file_path>", reason="missing file")
        with _cli_errors(o.option):
            return _make(
                cls,
                file=o.get("file"),
                size=o.size("size"),
                discard_writes=o.toggle("discard_writes"),
                transport=_transport_option(o),
                **_pci_options(o),
            )

@attrs.frozen(kw_only=True)
class DeviceConfig(_Config):
    """A VFIO passthrough device: ``--device path=/sys/bus/pci/devices/0000:01:00.0/,id=gpu0``
    (also ``iommu``, ``pci_segment``, ``pci_device_id``, ``x_nv_gpudirect_clique``)."""

    path: str = attrs.field(converter=_path, validator=_is_str)
    iommu: bool = attrs.field(default=False, validator=_is_bool)
    pci_segment: int = attrs.field(default=0, validator=_int_range(0, U16))
    pci_device_id: int | None = attrs.field(default=None, validator=_int_range(0, 31, optional=True))
    id: str | None = attrs.field(default=None, validator=_is_id)
    x_nv_gpudirect_clique: int | None = attrs.field(
        default=None, validator=_int_range(0, 0x7F, optional=True)
    )
    x_exclude_mmap_bars: tuple[int, ...] = attrs.field(
        default=(),
        converter=_tuple,
        validator=_tuple_of(lambda v: type(v) is int and 0 <= v <= 5, "a BAR index from 0 to 5"),
    )

    _PARSER: ClassVar[OptionParser] = OptionParser("--device", ("path", *_PCI_KEYS, "x_nv_gpudirect_clique"))

    @classmethod
    def parse(cls, spec: str) -> DeviceConfig:
        """Parse a ``--device`` value (``path`` is required)."""
        o = cls._PARSER.parse(spec)
        if o.get("path") is None:
            raise ConfigError(o.option, None, "path=<device_path>", reason="missing path")
        with _cli_errors(o.option):
            return _make(
                cls,
                path=o.get("path"),
                x_nv_gpudirect_clique=o.integer("x_nv_gpudirect_clique", hi=U8),
                **_pci_options(o),
            )


@attrs.frozen(kw_only=True)
class VsockConfig(_Config):
    """The virtio-vsock device: ``--vsock cid=3,socket=/tmp/vm.vsock`` (also ``iommu``, ``id``,
    ``pci_segment``, ``pci_device_id``).

    ``cid`` is from 3 to 2**32 - 2 (0, 1, 2 and -1 are reserved). ``transport`` (vmmkit
    extension) as for disks.
    """

    cid: int = attrs.field(validator=_int_range(3, U32 - 1))
    socket: str = attrs.field(converter=_path, validator=_is_str)
    iommu: bool = attrs.field(default=False, validator=_is_bool)
    pci_segment: int = attrs.field(default=0, validator=_int_range(0, U16))
    pci_device_id: int | None = attrs.field(default=None, validator=_int_range(0, 31, optional=True))
    id: str | None = attrs.field(default=None, validator=_is_id)
    transport: str | None = _transport_field()

    _PARSER: ClassVar[OptionParser] = OptionParser("--vsock", ("cid", "socket", *_PCI_KEYS, "transport"))

    @classmethod
    def parse(cls, spec: str) -> VsockConfig:
        """Parse a ``--vsock`` value (``cid`` and ``socket`` are required)."""
        o = cls._PARSER.parse(spec)
        for key, what in (("cid", "<context_id>"), ("socket", "<socket_path>")):
            if o.get(key) is None:
                raise ConfigError(o.option, None, f"{key}={what}", reason=f"missing {key}")
        with _cli_errors(o.option):
            return _make(
                cls,
                cid=o.integer("cid", hi=U64_MAX),
                socket=o.get("socket"),
                transport=_transport_option(o),
                **_pci_options(o),
            )

def _options(value: Any) -> tuple[tuple[str, str], ...]:
    """A mapping or ``(key, value)`` pairs, as a tuple of pairs."""
    if isinstance(value, Mapping):
        return tuple(value.items())
    return _tuple(value)


def _check_options(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    expected = "pairs of non-empty key and string value, keys unique"
    if not isinstance(value, tuple):
        raise ConfigError(attr.name, value, expected)
    seen: set[str] = set()
    for index, pair in enumerate(value):
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not _is_nonempty_str(pair[0])
            or not isinstance(pair[1], str)
            or "\0" in pair[1]
            or pair[0] in seen
            or pair[0] == "id"
        ):
            raise ConfigError(f"{attr.name}[{index}]", pair, expected + ", not 'id'")
        seen.add(pair[0])


def _decode_options(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, value, "a JSON object of string values")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ConfigError(f"{path}.{key}", item, "a string")
    return tuple(value.items())


_TYPE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _is_type_name(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not _TYPE_RE.fullmatch(value):
        raise ConfigError(attr.name, value, "a device type name such as virtio-foo")


@attrs.frozen(kw_only=True)
class PluginDeviceConfig(_Config):
    """A device contributed by a third-party device plugin (vmmkit extension).

    The plugin's own CLI option (``--<option> k=v,...``) fills it: ``type`` is the registered
    device type name, ``options`` the ``k=v`` pairs in order (as strings, for the plugin to
    interpret) and ``id`` the ``id=`` key. In JSON ``options`` is an object.
    """

    type: str = attrs.field(validator=_is_type_name)
    options: tuple[tuple[str, str], ...] = attrs.field(
        default=(), converter=_options, validator=_check_options, metadata={_CODEC: (_decode_options, dict)}
    )
    id: str | None = attrs.field(default=None, validator=_is_id)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of option ``key``, else ``default``."""
        return dict(self.options).get(key, default)

    @classmethod
    def parse(cls, type_name: str, spec: str, *, option: str | None = None) -> PluginDeviceConfig:
        """Parse ``k=v,k=[a,b],...`` for device type ``type_name``; ``id=`` becomes :attr:`id`.

        Errors name ``option`` (default ``--<type_name>``).
        """
        parser = OptionParser(option or f"--{type_name}", any_key=True)
        o = parser.parse(spec)
        with _cli_errors(o.option):
            options = [(k, v) for k, v in o.values.items() if k != "id"]
            return cls(type=type_name, options=tuple(options), id=o.get("id"))

