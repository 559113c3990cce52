"""The VM configuration: frozen attrs classes mirroring Cloud Hypervisor's ``VmConfig``.

Field names are the JSON property names of CH's OpenAPI schema (``vm.create`` bodies) and
defaults are CH's, so a CH JSON body round-trips. A configuration comes from:

- the command line: each class has ``parse(spec)`` for its option's ``k=v,...`` value, with CH's
  syntax (``--disk path=a.img,readonly=on``), and :meth:`VmConfig.from_cli` builds the whole VM;
- JSON: :meth:`VmConfig.from_json` / :meth:`VmConfig.to_json` (sizes are integers in bytes);
- Python: ``VmConfig(memory=MemoryConfig(size="1G"), disks=[DiskConfig(path="a.img")])``;
  change one with ``attrs.evolve`` or the ``with_*`` / ``without_device`` helpers.

Every rejected value raises :class:`ConfigError` (a ``ValueError`` and a
:class:`vmmkit.errors.VmmError`), whichever way it came in.

Differences from Cloud Hypervisor, on purpose:

- The default serial port is ``tty`` and the default virtio console ``off`` (CH: serial ``null``,
  console ``tty``): a vmmkit guest talks on its serial port, like most kernels expect.
- ``NetConfig.mac`` defaults to ``None`` (a MAC is generated when the VM is created) where CH picks
  a random one while parsing, so parsing is deterministic.
- ``max_vcpus`` is at most 254 (:data:`MAX_VCPUS`: 8-bit xAPIC ids, 255 being the broadcast
  id); recent CH versions allow more.
- ``iommu`` is kept as given; CH turns it on when any device asks for an IOMMU, which
  :attr:`VmConfig.iommu_required` reports instead.
- Unknown JSON keys are ignored (CH rejects them) and missing ones take vmmkit's defaults, see
  :meth:`VmConfig.from_json`.
- Validation happens on construction, not at VM creation; ``attrs.evolve`` re-validates.

vmmkit extensions (optional, left out of ``to_json()`` while unset, so CH JSON round-trips):
``transport`` (``"pci"`` | ``"mmio"`` | ``None`` for the VM default) on every virtio device
config, ``PlatformConfig.virtio_transport`` (the VM default, ``"pci"``) and
``VmConfig.plugin_devices`` (:class:`PluginDeviceConfig`, devices from third-party plugins).
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Final, Self, TypeVar, Union, cast, get_args, get_origin

import attrs

from vmmkit.errors import VmmError
from vmmkit.units import SIZE_SYNTAX, U64_MAX, KiB, MiB, parse_size

__all__ = [
    "ConfigError",
    "OptionParser",
    "ParsedOptions",
    "split_commas",
    "PayloadConfig",
    "CpuTopology",
    "CpuAffinity",
    "CpuFeatures",
    "CpusConfig",
    "MemoryConfig",
    "TokenBucket",
    "RateLimiterConfig",
    "VirtQueueAffinity",
    "DiskConfig",
    "NetConfig",
    "RngConfig",
    "BalloonConfig",
    "FsConfig",
    "PmemConfig",
    "SerialConfig",
    "ConsoleConfig",
    "DebugConsoleConfig",
    "DeviceConfig",
    "VsockConfig",
    "PlatformConfig",
    "PluginDeviceConfig",
    "VmConfig",
    "MAX_VCPUS",
    "TRANSPORTS",
]

T = TypeVar("T")

MAX_VCPUS: Final = 254
DEFAULT_MEMORY_SIZE: Final = 512 * MiB
DEFAULT_MAX_PHYS_BITS: Final = 46
DEFAULT_RNG_SOURCE: Final = "/dev/urandom"
DEFAULT_DEBUG_CONSOLE_IOBASE: Final = 0xE9
PAGE_SIZE: Final = 4 * KiB
PMEM_ALIGNMENT: Final = 2 * MiB
MAX_PCI_SEGMENTS: Final = 96
VIRTIO_FS_TAG_LEN: Final = 36
VIRTIO_BLK_ID_BYTES: Final = 20
MIN_MTU: Final = 1280
TRANSPORTS: Final = ("pci", "mmio")
CONSOLE_MODES: Final = ("Off", "Pty", "Tty", "File", "Socket", "Null")
U8: Final = 0xFF
U16: Final = 0xFFFF
U32: Final = 0xFFFF_FFFF


# --- errors ---------------------------------------------------------------------------------


class ConfigError(VmmError, ValueError):
    """A configuration value was rejected.

    ``option`` says where: a CLI option (``"--memory"``, with the key inside it in ``key``) or a
    JSON path (``"memory.size"``, ``"disks[1].id"``). ``value`` is the offending value and
    ``expected`` describes what is accepted. ``str()`` reads like
    ``--memory: invalid value '12Q' for size (expected a size such as 512M, 1G or a byte count)``.
    """

    def __init__(
        self,
        option: str,
        value: object,
        expected: str,
        *,
        key: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(option, value, expected)
        self.option = option
        self.value = value
        self.expected = expected
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        reason = self.reason
        if reason is None:
            reason = f"invalid value {self.value!r}"
            if self.key:
                reason += f" for {self.key}"
        return f"{self.option}: {reason} (expected {self.expected})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (self.option, self.value, self.expected, self.key, self.reason))


def _rebuild_error(
    option: str, value: object, expected: str, key: str | None, reason: str | None
) -> ConfigError:
    return ConfigError(option, value, expected, key=key, reason=reason)


def _relabel(err: ConfigError, option: str, key: str | None) -> ConfigError:
    return ConfigError(option, err.value, err.expected, key=key, reason=err.reason)


def _within(err: ConfigError, path: str) -> ConfigError:
    """``"size"`` raised by a class becomes ``"memory.size"`` when that class sits at ``path``."""
    if not path or err.option.startswith("-"):
        return err
    return _relabel(err, f"{path}.{err.option}" if err.option else path, err.key)


def _field_head(path: str) -> str:
    return path.split(".", 1)[0].split("[", 1)[0]


def _for_cli(err: ConfigError, option: str, cli_keys: Mapping[str, str]) -> ConfigError:
    """A class-level error (``"boot_vcpus"``) becomes a CLI one (``"--cpus"``, key ``"boot"``)."""
    if err.option.startswith("-"):
        return err
    head = _field_head(err.option)
    return _relabel(err, option, cli_keys.get(head, head) or err.key)


@contextmanager
def _cli_errors(option: str, cli_keys: Mapping[str, str] | None = None) -> Iterator[None]:
    try:
        yield
    except ConfigError as err:
        raise _for_cli(err, option, cli_keys or {}) from None


# --- validators and converters ----------------------------------------------------------------

_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _int_range(lo: int, hi: int, *, optional: bool = False) -> _Validator:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if type(value) is not int or not lo <= value <= hi:
            raise ConfigError(attr.name, value, f"an integer from {lo} to {hi}")

    return check


def _queue_size(lo: int) -> _Validator:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if type(value) is not int or not lo <= value <= 32768 or value & (value - 1):
            raise ConfigError(attr.name, value, f"a power of two from {lo} to 32768")

    return check


def _is_bool(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not bool:
        raise ConfigError(attr.name, value, "true or false")


def _is_str(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(attr.name, value, "a non-empty string")


def _is_opt_str(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _is_str(inst, attr, value)


def _is_opt_text(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(attr.name, value, "a string")


def _is_id(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value or value.startswith("__")):
        raise ConfigError(attr.name, value, "a non-empty id not starting with '__' (reserved)")


def _choice(*choices: str, optional: bool = False) -> _Validator:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if value not in choices or not isinstance(value, str):
            raise ConfigError(attr.name, value, "one of: " + ", ".join(choices))

    return check


def _tuple_of(check_item: Callable[[Any], bool], what: str) -> _Validator:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, tuple):
            raise ConfigError(attr.name, value, f"a list of {what}")
        for index, item in enumerate(value):
            if not check_item(item):
                raise ConfigError(f"{attr.name}[{index}]", item, what)

    return check


def _instance(cls: type[Any], *, optional: bool = False) -> _Validator:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, cls):
            raise ConfigError(attr.name, value, f"a {cls.__name__}")

    return check


def _is_u32(value: Any) -> bool:
    return type(value) is int and 0 <= value <= U32


def _is_u16(value: Any) -> bool:
    return type(value) is int and 0 <= value <= U16


def _is_nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _tuple(value: Iterable[Any]) -> tuple[Any, ...]:
    """Lists become tuples; anything else is left for the field's validator to reject."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value  # type: ignore[return-value]


def _to_size(value: Any, name: str) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise ConfigError(name, value, SIZE_SYNTAX) from None


def _size(value: int | str) -> int:
    return _to_size(value, "size")


def _opt_size(value: int | str | None) -> int | None:
    return None if value is None else _to_size(value, "size")


def _opt_hotplug_size(value: int | str | None) -> int | None:
    return None if value is None else _to_size(value, "hotplug_size")


def _opt_hotplugged_size(value: int | str | None) -> int | None:
    return None if value is None else _to_size(value, "hotplugged_size")


def _opt_hugepage_size(value: int | str | None) -> int | None:
    return None if value is None else _to_size(value, "hugepage_size")


_MAC_RE: Final = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def _is_mac(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not _MAC_RE.fullmatch(value)):
        raise ConfigError(attr.name, value, "a MAC address such as 12:34:56:78:9a:bc")


def _check_console(mode: str, file: str | None, socket: str | None) -> None:
    if mode == "File" and file is None:
        raise ConfigError("file", None, "file=<path>", reason="mode File needs a file path")
    if mode == "Socket" and socket is None:
        raise ConfigError("socket", None, "socket=<path>", reason="mode Socket needs a socket path")


def _byte_len(text: str) -> int:
    """UTF-8 length; undecodable command-line bytes (lone surrogates) count one byte each."""
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def _path(value: str | os.PathLike[str]) -> str:
    """``os.PathLike`` values become strings; anything else is left for the validator."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _opt_path(value: str | os.PathLike[str] | None) -> str | None:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


_EXTENSION: Final = {"vmmkit_extension": True}
"""Field metadata marking a vmmkit extension (left out of JSON while at its default)."""


def _transport_field() -> Any:
    return attrs.field(default=None, validator=_choice(*TRANSPORTS, optional=True), metadata=_EXTENSION)


# --- the option parser ----------------------------------------------------------------------

_INT_RE: Final = re.compile(r"[0-9]{1,20}")
_HEX_RE: Final = re.compile(r"0x[0-9a-fA-F]{1,16}")
_SYNTAX: Final = "comma-separated key=value items, with balanced [ ] and double quotes"


def split_commas(text: str, *, option: str = "option") -> list[str]:
    """Split ``text`` on the commas outside ``[...]`` and ``"..."`` (CH's ``split_commas``).

    Double quotes are removed: ``cmdline="a,b",x=[1,2]`` gives ``['cmdline=a,b', 'x=[1,2]']``.

    :raises ConfigError: unbalanced brackets or quotes.
    """
    items: list[str] = []
    current: list[str] = []
    depth = 0
    quoted = False
    for char in text.strip():
        if char == '"':
            quoted = not quoted
            continue
        if not quoted:
            if char == "[":
                depth += 1
            elif char == "]":
                depth -= 1
                if depth < 0:
                    break
            elif char == "," and depth == 0:
                items.append("".join(current))
                current = []
                continue
        current.append(char)
    if depth or quoted:
        raise ConfigError(option, text, _SYNTAX, reason=f"invalid syntax in {text!r}")
    items.append("".join(current))
    return items


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class OptionParser:
    """The grammar of one CLI option's value: ``k=v,k=[a,b],flag`` (CH's ``OptionParser``).

    ``keys`` take a value, ``flags`` stand alone (``--serial tty``). With ``any_key`` every
    ``k=v`` is accepted (plugin devices). :meth:`parse` returns :class:`ParsedOptions`, whose typed
    getters raise :class:`ConfigError` naming ``option`` and the key.
    """

    option: str
    keys: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    flags: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    any_key: bool = False

    def parse(self, spec: str) -> ParsedOptions:
        """Split ``spec``; a key given twice keeps its last value (as CH). Empty ``spec``: no keys.

        :raises ConfigError: bad syntax, unknown key (listing the accepted ones), a flag with a
            value or a key without one.
        """
        if not isinstance(spec, str):
            raise ConfigError(self.option, spec, _SYNTAX)
        values: dict[str, str] = {}
        if spec.strip():
            for item in split_commas(spec, option=self.option):
                key, sep, value = item.partition("=")
                if key in self.flags:
                    if sep:
                        raise ConfigError(
                            self.option, item, f"{key} on its own", reason=f"{key} takes no value"
                        )
                    values[key] = ""
                elif key in self.keys or (self.any_key and key):
                    if not sep:
                        raise ConfigError(
                            self.option, item, f"{key}=<value>", reason=f"missing value for {key}"
                        )
                    values[key] = value.strip()
                else:
                    accepted = ", ".join(self.flags + self.keys) or "key=value items"
                    raise ConfigError(self.option, key, f"one of: {accepted}", reason=f"unknown key {key!r}")
        return ParsedOptions(self.option, values)


@attrs.frozen(eq=False)
class ParsedOptions:
    """The keys of one option value. An empty value (``tap=``) counts as not set, as in CH."""

    option: str
    values: Mapping[str, str]

    def error(self, key: str, value: object, expected: str) -> ConfigError:
        """A :class:`ConfigError` about ``key``."""
        return ConfigError(self.option, value, expected, key=key)

    def is_set(self, key: str) -> bool:
        """Whether ``key`` appeared at all (even as ``key=``)."""
        return key in self.values

    def get(self, key: str) -> str | None:
        """The raw string, ``None`` if absent or empty."""
        return self.values.get(key) or None

    def toggle(self, key: str) -> bool | None:
        """``on``/``off``/``true``/``false`` (any case); ``key=`` means off, as in CH."""
        if key not in self.values:
            return None
        raw = self.values[key].lower()
        if raw in ("on", "true"):
            return True
        if raw in ("off", "false", ""):
            return False
        raise self.error(key, self.values[key], "on or off")

    def integer(self, key: str, lo: int = 0, hi: int = U64_MAX) -> int | None:
        """A decimal integer in ``[lo, hi]``."""
        raw = self.get(key)
        if raw is None:
            return None
        if not _INT_RE.fullmatch(raw) or not lo <= int(raw) <= hi:
            raise self.error(key, raw, f"an integer from {lo} to {hi}")
        return int(raw)

    def hex_integer(self, key: str, hi: int) -> int | None:
        """A ``0x``-prefixed hexadecimal integer up to ``hi`` (``iobase=0xe9``)."""
        raw = self.get(key)
        if raw is None:
            return None
        if not _HEX_RE.fullmatch(raw) or int(raw, 16) > hi:
            raise self.error(key, raw, f"a hexadecimal number from 0x0 to {hi:#x}, such as 0xe9")
        return int(raw, 16)

    def size(self, key: str) -> int | None:
        """A size: ``512M``, ``1G``, ``4096``."""
        raw = self.get(key)
        if raw is None:
            return None
        try:
            return parse_size(raw)
        except ValueError:
            raise self.error(key, raw, SIZE_SYNTAX) from None

    def choice(self, key: str, choices: Mapping[str, str]) -> str | None:
        """A value from ``choices`` (CLI spelling, any case, to canonical spelling)."""
        raw = self.get(key)
        if raw is None:
            return None
        try:
            return choices[raw.lower()]
        except KeyError:
            raise self.error(key, raw, "one of: " + ", ".join(choices)) from None

    def integer_list(self, key: str, hi: int = U64_MAX) -> tuple[int, ...] | None:
        """``[1,3-5]`` or ``1-3`` or ``4``: integers and inclusive ranges (CH's ``IntegerList``)."""
        raw = self.get(key)
        if raw is None:
            return None
        return self._integer_list(key, raw, hi)

    def _integer_list(self, key: str, raw: str, hi: int) -> tuple[int, ...]:
        expected = f"a list of integers up to {hi} and ranges, such as [0,2-3]"
        out: list[int] = []
        for part in raw.strip().strip("[]").split(","):
            first, dash, last = part.partition("-")
            if not _INT_RE.fullmatch(first) or (dash and not _INT_RE.fullmatch(last)):
                raise self.error(key, raw, expected)
            start = int(first)
            end = int(last) if dash else start
            if (dash and end <= start) or end > hi or end - start > 4096:
                raise self.error(key, raw, expected)
            out.extend(range(start, end + 1))
        return tuple(out)

    def string_list(self, key: str) -> tuple[str, ...] | None:
        """``[a,b]`` or ``a`` (CH's ``StringList``)."""
        raw = self.get(key)
        if raw is None:
            return None
        return tuple(raw.strip().strip("[]").split(","))

    def pairs(self, key: str, hi: int = U64_MAX) -> tuple[tuple[int, tuple[int, ...]], ...] | None:
        """``[0@[0-1],1@[2]]``: integers each with an integer list (CH's ``Tuple``)."""
        raw = self.get(key)
        if raw is None:
            return None
        expected = "a list of <index>@<integer list>, such as [0@[0-1],1@[2]]"
        body = raw.strip()
        if not (body.startswith("[") and body.endswith("]")):
            raise self.error(key, raw, expected)
        out = []
        try:
            items = split_commas(body[1:-1], option=self.option)
        except ConfigError:
            raise self.error(key, raw, expected) from None
        for item in items:
            index, at, rest = item.partition("@")
            if not at or not _INT_RE.fullmatch(index) or int(index) > hi:
                raise self.error(key, raw, expected)
            out.append((int(index), self._integer_list(key, rest, U16)))
        return tuple(out)


def _make(cls: Callable[..., T], **kwargs: Any) -> T:
    """``cls(**kwargs)`` without the ``None`` values, so that the defaults apply."""
    return cls(**{name: value for name, value in kwargs.items() if value is not None})


_PCI_KEYS: Final = ("id", "iommu", "pci_segment", "pci_device_id")


def _pci_options(o: ParsedOptions, *, iommu: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": o.get("id"),
        "pci_segment": o.integer("pci_segment", hi=U16),
        "pci_device_id": o.integer("pci_device_id", hi=31),
    }
    if iommu:
        out["iommu"] = o.toggle("iommu")
    return out


def _transport_option(o: ParsedOptions) -> str | None:
    return o.choice("transport", {name: name for name in TRANSPORTS})


# --- JSON -----------------------------------------------------------------------------------

_CODEC: Final = "vmmkit_json_codec"


@attrs.frozen
class _JsonContext:
    strict: bool
    ignored: list[str] | None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _decode(tp: Any, value: Any, path: str, ctx: _JsonContext) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        (inner,) = [arg for arg in get_args(tp) if arg is not type(None)]
        return _decode(inner, value, path, ctx)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, "a JSON array")
        item_type = get_args(tp)[0]
        return tuple(_decode(item_type, v, f"{path}[{i}]", ctx) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
        return value
    if tp is int:
        if type(value) is not int:
            raise ConfigError(path, value, "an integer")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "a string")
        return value
    if isinstance(tp, type) and attrs.has(tp):
        return _decode_object(tp, value, path, ctx)
    raise TypeError(f"no JSON decoding for {tp!r}")  # pragma: no cover - a bug in this module


def _decode_object(cls: type[Any], value: Any, path: str, ctx: _JsonContext) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(path or "$", value, "a JSON object")
    attrs.resolve_types(cls)  # the string annotations, evaluated once per class on first use
    fields = attrs.fields_dict(cls)
    aliases: Mapping[str, str] = getattr(cls, "_JSON_ALIASES", {})
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        here = _join(path, str(key))
        name = aliases.get(key, key)
        field = fields.get(name) if isinstance(name, str) else None
        if field is None:
            if item is None:
                continue
            if ctx.strict:
                raise ConfigError(here, key, "one of: " + ", ".join(fields), reason=f"unknown key {key!r}")
            if ctx.ignored is not None:
                ctx.ignored.append(here)
            continue
        if item is None or (name != key and name in value):
            continue  # null means "the default"; a key beats its deprecated alias
        codec = field.metadata.get(_CODEC)
        kwargs[name] = codec[0](item, here) if codec else _decode(field.type, item, here, ctx)
    for name, field in fields.items():
        if field.default is attrs.NOTHING and name not in kwargs:
            raise ConfigError(_join(path, name), None, f"a value for {name}", reason=f"missing key {name!r}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise _within(err, path) from None


def _encode(value: Any) -> Any:
    if attrs.has(type(value)):
        return _encode_object(value)
    if isinstance(value, tuple):
        return [_encode(item) for item in value]
    return value


def _encode_object(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        if value is None or value == ():
            continue
        if field.metadata.get("vmmkit_extension") and value == field.default:
            continue
        codec = field.metadata.get(_CODEC)
        out[field.name] = codec[1](value) if codec else _encode(value)
    return out


class _Config:
    """JSON conversion shared by every configuration class."""

    __slots__ = ()

    @classmethod
    def from_json(
        cls, obj: Mapping[str, Any], *, strict: bool = False, ignored: list[str] | None = None
    ) -> Self:
        """Build from a CH JSON object. See :meth:`VmConfig.from_json`."""
        return cast(Self, _decode_object(cls, obj, "", _JsonContext(strict, ignored)))

    def to_json(self) -> dict[str, Any]:
        """The CH JSON object (``None`` and empty lists left out, as CH does)."""
        return _encode_object(self)


# --- payload and CPUs -----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PayloadConfig(_Config):
    """What to boot: ``--kernel``, ``--cmdline``, ``--initramfs``, ``--firmware`` (all optional)."""

    firmware: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    kernel: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    cmdline: str | None = attrs.field(default=None, validator=_is_opt_text)
    initramfs: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    igvm: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    host_data: str | None = attrs.field(default=None, validator=_is_opt_text)


@attrs.frozen(kw_only=True)
class CpuTopology(_Config):
    """``topology=<threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>``."""

    threads_per_core: int = attrs.field(validator=_int_range(1, MAX_VCPUS))
    cores_per_die: int = attrs.field(validator=_int_range(1, MAX_VCPUS))
    dies_per_package: int = attrs.field(validator=_int_range(1, MAX_VCPUS))
    packages: int = attrs.field(validator=_int_range(1, MAX_VCPUS))

    @property
    def vcpus(self) -> int:
        """The number of vCPUs the topology describes."""
        return self.threads_per_core * self.cores_per_die * self.dies_per_package * self.packages

    def __str__(self) -> str:
        return f"{self.threads_per_core}:{self.cores_per_die}:{self.dies_per_package}:{self.packages}"


@attrs.frozen(kw_only=True)
class CpuAffinity(_Config):
    """The host CPUs one vCPU may run on."""

    vcpu: int = attrs.field(validator=_int_range(0, MAX_VCPUS - 1))
    host_cpus: tuple[int, ...] = attrs.field(
        converter=_tuple, validator=_tuple_of(_is_u32, "a host CPU number")
    )

    def __attrs_post_init__(self) -> None:
        if not self.host_cpus:
            raise ConfigError("host_cpus", self.host_cpus, "at least one host CPU")


@attrs.frozen(kw_only=True)
class CpuFeatures(_Config):
    """Optional CPU features (``features=amx``)."""

    amx: bool = attrs.field(default=False, validator=_is_bool)


_CORE_SCHEDULING: Final = {"vm": "Vm", "vcpu": "Vcpu", "off": "Off"}


@attrs.frozen(kw_only=True)
class CpusConfig(_Config):
    """vCPUs: ``--cpus boot=2,max=4,topology=1:2:1:2,kvm_hyperv=on,max_phys_bits=46,
    affinity=[0@[0-1]],features=amx,nested=on,core_scheduling=vm``.

    ``max_vcpus`` defaults to ``boot_vcpus``; ``1 <= boot_vcpus <= max_vcpus <= 254``
    (:data:`MAX_VCPUS`). A topology's product must equal ``max_vcpus``.
    """

    boot_vcpus: int = attrs.field(default=1, validator=_int_range(1, MAX_VCPUS))
    max_vcpus: int = attrs.field(validator=_int_range(1, MAX_VCPUS))
    topology: CpuTopology | None = attrs.field(default=None, validator=_instance(CpuTopology, optional=True))
    kvm_hyperv: bool = attrs.field(default=False, validator=_is_bool)
    max_phys_bits: int = attrs.field(default=DEFAULT_MAX_PHYS_BITS, validator=_int_range(1, 64))
    affinity: tuple[CpuAffinity, ...] = attrs.field(
        default=(),
        converter=_tuple,
        validator=_tuple_of(lambda v: isinstance(v, CpuAffinity), "a CpuAffinity"),
    )
    features: CpuFeatures = attrs.field(factory=CpuFeatures, validator=_instance(CpuFeatures))
    nested: bool = attrs.field(default=True, validator=_is_bool)
    core_scheduling: str = attrs.field(default="Vm", validator=_choice("Vm", "Vcpu", "Off"))

    _CLI_KEYS: ClassVar[Mapping[str, str]] = {"boot_vcpus": "boot", "max_vcpus": "max"}

    @max_vcpus.default
    def _max_vcpus_default(self) -> int:
        return self.boot_vcpus

    def __attrs_post_init__(self) -> None:
        if self.max_vcpus < self.boot_vcpus:
            raise ConfigError("max_vcpus", self.max_vcpus, f"at least boot_vcpus ({self.boot_vcpus})")
        if self.topology is not None and self.topology.vcpus != self.max_vcpus:
            raise ConfigError(
                "topology",
                str(self.topology),
                f"a topology whose product equals max_vcpus ({self.max_vcpus})",
            )
        seen: set[int] = set()
        for index, affinity in enumerate(self.affinity):
            if affinity.vcpu >= self.max_vcpus or affinity.vcpu in seen:
                raise ConfigError(
                    f"affinity[{index}].vcpu",
                    affinity.vcpu,
                    f"a distinct vCPU index below max_vcpus ({self.max_vcpus})",
                )
            seen.add(affinity.vcpu)

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--cpus",
        (
            "boot",
            "max",
            "topology",
            "kvm_hyperv",
            "max_phys_bits",
            "affinity",
            "features",
            "nested",
            "core_scheduling",
        ),
    )

    @classmethod
    def parse(cls, spec: str) -> CpusConfig:
        """Parse a ``--cpus`` value (``""`` gives the defaults)."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option, cls._CLI_KEYS):
            return _make(
                cls,
                boot_vcpus=o.integer("boot", hi=U32),
                max_vcpus=o.integer("max", hi=U32),
                topology=_parse_topology(o),
                kvm_hyperv=o.toggle("kvm_hyperv"),
                max_phys_bits=o.integer("max_phys_bits", hi=U8),
                affinity=_parse_affinity(o),
                features=_parse_features(o),
                nested=o.toggle("nested"),
                core_scheduling=o.choice("core_scheduling", _CORE_SCHEDULING),
            )


def _parse_topology(o: ParsedOptions) -> CpuTopology | None:
    raw = o.get("topology")
    if raw is None:
        return None
    parts = raw.split(":")
    if len(parts) != 4 or not all(_INT_RE.fullmatch(p) for p in parts):
        raise o.error("topology", raw, "<threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>")
    threads, cores, dies, packages = (int(p) for p in parts)
    try:
        return CpuTopology(
            threads_per_core=threads, cores_per_die=cores, dies_per_package=dies, packages=packages
        )
    except ConfigError as err:
        raise o.error("topology", raw, f"each part from 1 to {MAX_VCPUS}") from err


def _parse_affinity(o: ParsedOptions) -> tuple[CpuAffinity, ...] | None:
    pairs = o.pairs("affinity", hi=MAX_VCPUS - 1)
    if pairs is None:
        return None
    return tuple(CpuAffinity(vcpu=vcpu, host_cpus=cpus) for vcpu, cpus in pairs)


def _parse_features(o: ParsedOptions) -> CpuFeatures | None:
    names = o.string_list("features")
    if names is None:
        return None
    for name in names:
        if name != "amx":
            raise o.error("features", name, "a list of: amx")
    return CpuFeatures(amx=True)


# --- memory ---------------------------------------------------------------------------------


_HOTPLUG_METHODS: Final = {"acpi": "Acpi", "virtio-mem": "VirtioMem"}


@attrs.frozen(kw_only=True)
class MemoryConfig(_Config):
    """Guest RAM: ``--memory size=512M,shared=on,hugepages=on,hotplug_size=1G,hotplug_method=acpi``.

    Sizes accept ``"512M"``-style strings and are stored in bytes. ``size`` (default 512 MiB) and
    the hotplug sizes are multiples of 4 KiB; ``hugepage_size`` is a power of two and needs
    ``hugepages``; ``hotplugged_size`` needs ``hotplug_size`` and fits in it.
    """

    size: int = attrs.field(default=DEFAULT_MEMORY_SIZE, converter=_size)
    mergeable: bool = attrs.field(default=False, validator=_is_bool)
    shared: bool = attrs.field(default=False, validator=_is_bool)
    hugepages: bool = attrs.field(default=False, validator=_is_bool)
    hugepage_size: int | None = attrs.field(default=None, converter=_opt_hugepage_size)
    hotplug_method: str = attrs.field(default="Acpi", validator=_choice("Acpi", "VirtioMem"))
    hotplug_size: int | None = attrs.field(default=None, converter=_opt_hotplug_size)
    hotplugged_size: int | None = attrs.field(default=None, converter=_opt_hotplugged_size)
    prefault: bool = attrs.field(default=False, validator=_is_bool)
    reserve: bool = attrs.field(default=False, validator=_is_bool)
    thp: bool = attrs.field(default=True, validator=_is_bool)

    def __attrs_post_init__(self) -> None:
        page = f"a positive multiple of {PAGE_SIZE} bytes (4K), such as 512M"
        if self.size <= 0 or self.size % PAGE_SIZE:
            raise ConfigError("size", self.size, page)
        for name in ("hotplug_size", "hotplugged_size"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % PAGE_SIZE):
                raise ConfigError(name, value, page)
        if self.hotplugged_size is not None and (
            self.hotplug_size is None or self.hotplugged_size > self.hotplug_size
        ):
            raise ConfigError(
                "hotplugged_size", self.hotplugged_size, "at most hotplug_size (which must be set)"
            )
        if self.hugepage_size is not None:
            if not self.hugepages:
                raise ConfigError("hugepage_size", self.hugepage_size, "hugepage_size only with hugepages=on")
            if self.hugepage_size <= 0 or self.hugepage_size & (self.hugepage_size - 1):
                raise ConfigError("hugepage_size", self.hugepage_size, "a power of two, such as 2M")

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--memory",
        (
            "size",
            "mergeable",
            "shared",
            "hugepages",
            "hugepage_size",
            "hotplug_method",
            "hotplug_size",
            "hotplugged_size",
            "prefault",
            "thp",
        ),
    )

    @classmethod
    def parse(cls, spec: str) -> MemoryConfig:
        """Parse a ``--memory`` value (``""`` gives the defaults)."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option):
            return _make(
                cls,
                size=o.size("size"),
                mergeable=o.toggle("mergeable"),
                shared=o.toggle("shared"),
                hugepages=o.toggle("hugepages"),
                hugepage_size=o.size("hugepage_size"),
                hotplug_method=o.choice("hotplug_method", _HOTPLUG_METHODS),
                hotplug_size=o.size("hotplug_size"),
                hotplugged_size=o.size("hotplugged_size"),
                prefault=o.toggle("prefault"),
                thp=o.toggle("thp"),
            )


# --- rate limiting --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TokenBucket(_Config):
    """A token bucket: ``size`` tokens, refilled every ``refill_time`` ms."""

    size: int = attrs.field(validator=_int_range(0, U64_MAX))
    one_time_burst: int | None = attrs.field(default=None, validator=_int_range(0, U64_MAX, optional=True))
    refill_time: int = attrs.field(validator=_int_range(0, U64_MAX))


@attrs.frozen(kw_only=True)
class RateLimiterConfig(_Config):
    """Independent bytes/s (``bandwidth``) and operations/s (``ops``) limits."""

    bandwidth: TokenBucket | None = attrs.field(default=None, validator=_instance(TokenBucket, optional=True))
    ops: TokenBucket | None = attrs.field(default=None, validator=_instance(TokenBucket, optional=True))


_RATE_KEYS: Final = tuple(
    f"{kind}_{part}" for kind in ("bw", "ops") for part in ("size", "one_time_burst", "refill_time")
)


def _parse_rate_limiter(o: ParsedOptions) -> RateLimiterConfig | None:
    """``bw_size=..,bw_refill_time=..,ops_...``: as CH, a bucket exists when size and refill
    time are both non-zero."""
    buckets: dict[str, TokenBucket | None] = {}
    for kind, name in (("bw", "bandwidth"), ("ops", "ops")):
        size = o.integer(f"{kind}_size") or 0
        refill = o.integer(f"{kind}_refill_time") or 0
        burst = o.integer(f"{kind}_one_time_burst") or 0
        buckets[name] = (
            TokenBucket(size=size, one_time_burst=burst, refill_time=refill) if size and refill else None
        )
    if buckets["bandwidth"] is None and buckets["ops"] is None:
        return None
    return RateLimiterConfig(bandwidth=buckets["bandwidth"], ops=buckets["ops"])


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


# --- devices --------------------------------------------------------------------------------

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

    _CLI_KEYS: ClassVar[Mapping[str, str]] = {"vhost_socket": "socket"}

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

    _CLI_KEYS: ClassVar[Mapping[str, str]] = {"vhost_socket": "socket", "fds": "fd"}

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

    ``size`` must stay below guest RAM. ``transport`` (vmmkit extension) as for disks.
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
        "--balloon", ("size", "deflate_on_oom", "free_page_reporting", "transport")
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


_MODE_FLAGS: Final = {"off": "Off", "pty": "Pty", "tty": "Tty", "null": "Null"}
_MODE_SYNTAX: Final = "off, pty, tty, null, file=<path> or socket=<path>"


def _parse_mode(o: ParsedOptions, *, socket: bool = True) -> dict[str, Any]:
    """The ``off|pty|tty|null|file=<path>|socket=<path>`` part of a console option."""
    given = [key for key in (*_MODE_FLAGS, "file", "socket") if o.is_set(key)]
    syntax = _MODE_SYNTAX if socket else _MODE_SYNTAX.replace(" or socket=<path>", "")
    if not given:
        raise ConfigError(o.option, dict(o.values), syntax, reason="no mode given")
    if len(given) > 1:
        raise ConfigError(o.option, given, syntax, reason=f"more than one mode given ({', '.join(given)})")
    (mode,) = given
    if mode in _MODE_FLAGS:
        return {"mode": _MODE_FLAGS[mode]}
    path = o.get(mode)
    if path is None:
        raise ConfigError(o.option, None, f"{mode}=<path>", reason=f"missing path for {mode}")
    return {"mode": mode.capitalize(), mode: path}


@attrs.frozen(kw_only=True)
class SerialConfig(_Config):
    """The legacy serial port: ``--serial off|pty|tty|file=<path>|socket=<path>|null``.

    ``mode`` is one of ``Off``, ``Pty``, ``Tty``, ``File``, ``Socket``, ``Null``; ``File`` needs
    ``file`` and ``Socket`` needs ``socket``. vmmkit's default is ``Tty`` (CH's: ``Null``).
    """

    file: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    socket: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    mode: str = attrs.field(default="Tty", validator=_choice(*CONSOLE_MODES))

    def __attrs_post_init__(self) -> None:
        _check_console(self.mode, self.file, self.socket)

    _PARSER: ClassVar[OptionParser] = OptionParser("--serial", ("file", "socket"), flags=tuple(_MODE_FLAGS))

    @classmethod
    def parse(cls, spec: str) -> SerialConfig:
        """Parse a ``--serial`` value."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option):
            return cls(**_parse_mode(o))


@attrs.frozen(kw_only=True)
class ConsoleConfig(_Config):
    """The virtio console: ``--console off|pty|tty|file=<path>|socket=<path>|null,iommu=on``
    (also ``id``, ``pci_segment``, ``pci_device_id``).

    Modes as :class:`SerialConfig`. vmmkit's default is ``Off`` (CH's: ``Tty``).
    ``transport`` (vmmkit extension): ``"pci"``, ``"mmio"`` or ``None`` for the VM default.
    """

    file: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    socket: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    mode: str = attrs.field(default="Off", validator=_choice(*CONSOLE_MODES))
    iommu: bool = attrs.field(default=False, validator=_is_bool)
    id: str | None = attrs.field(default=None, validator=_is_id)
    pci_segment: int = attrs.field(default=0, validator=_int_range(0, U16))
    pci_device_id: int | None = attrs.field(default=None, validator=_int_range(0, 31, optional=True))
    transport: str | None = _transport_field()

    def __attrs_post_init__(self) -> None:
        _check_console(self.mode, self.file, self.socket)

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--console", ("file", "socket", *_PCI_KEYS, "transport"), flags=tuple(_MODE_FLAGS)
    )

    @classmethod
    def parse(cls, spec: str) -> ConsoleConfig:
        """Parse a ``--console`` value."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option):
            return _make(cls, transport=_transport_option(o), **_parse_mode(o), **_pci_options(o))


@attrs.frozen(kw_only=True)
class DebugConsoleConfig(_Config):
    """The x86 debug port (0xe9): ``--debug-console off|pty|tty|null|file=<path>,iobase=0xe9``.

    Default ``Off``, as CH. ``Socket`` is not supported.
    """

    file: str | None = attrs.field(default=None, converter=_opt_path, validator=_is_opt_str)
    mode: str = attrs.field(default="Off", validator=_choice("Off", "Pty", "Tty", "File", "Null"))
    iobase: int | None = attrs.field(
        default=DEFAULT_DEBUG_CONSOLE_IOBASE, validator=_int_range(0, U16, optional=True)
    )

    def __attrs_post_init__(self) -> None:
        _check_console(self.mode, self.file, None)

    _PARSER: ClassVar[OptionParser] = OptionParser(
        "--debug-console", ("file", "iobase"), flags=tuple(_MODE_FLAGS)
    )

    @classmethod
    def parse(cls, spec: str) -> DebugConsoleConfig:
        """Parse a ``--debug-console`` value."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option):
            return _make(cls, iobase=o.hex_integer("iobase", U16), **_parse_mode(o, socket=False))


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


# --- the VM ---------------------------------------------------------------------------------


def _tuple_of_type(cls: type[Any]) -> _Validator:
    return _tuple_of(lambda v: isinstance(v, cls), f"a {cls.__name__}")


@attrs.frozen(kw_only=True)
class VmConfig(_Config):
    """A whole VM, as CH's ``VmConfig`` (``vm.create`` body) plus vmmkit's ``plugin_devices``.

    Build it with :meth:`from_cli`, :meth:`from_json` or directly. Besides each section's own
    checks: device ids are unique (``__``-prefixed ids are reserved), vhost-user devices and
    virtio-fs need shared memory, ``pci_segment`` values exist on the platform, devices on an
    ``iommu_segments`` segment have ``iommu`` on, VFIO paths are unique and the balloon is
    smaller than RAM. Whether there is something to boot is not checked (see :attr:`bootable`).
    """

    cpus: CpusConfig = attrs.field(factory=CpusConfig, validator=_instance(CpusConfig))
    memory: MemoryConfig = attrs.field(factory=MemoryConfig, validator=_instance(MemoryConfig))
    payload: PayloadConfig = attrs.field(factory=PayloadConfig, validator=_instance(PayloadConfig))
    disks: tuple[DiskConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(DiskConfig)
    )
    net: tuple[NetConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(NetConfig)
    )
    rng: RngConfig = attrs.field(factory=RngConfig, validator=_instance(RngConfig))
    balloon: BalloonConfig | None = attrs.field(
        default=None, validator=_instance(BalloonConfig, optional=True)
    )
    fs: tuple[FsConfig, ...] = attrs.field(default=(), converter=_tuple, validator=_tuple_of_type(FsConfig))
    pmem: tuple[PmemConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(PmemConfig)
    )
    serial: SerialConfig = attrs.field(factory=SerialConfig, validator=_instance(SerialConfig))
    console: ConsoleConfig = attrs.field(factory=ConsoleConfig, validator=_instance(ConsoleConfig))
    debug_console: DebugConsoleConfig = attrs.field(
        factory=DebugConsoleConfig, validator=_instance(DebugConsoleConfig)
    )
    devices: tuple[DeviceConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_tuple_of_type(DeviceConfig)
    )
    vsock: VsockConfig | None = attrs.field(default=None, validator=_instance(VsockConfig, optional=True))
    iommu: bool = attrs.field(default=False, validator=_is_bool)
    watchdog: bool = attrs.field(default=False, validator=_is_bool)
    pvpanic: bool = attrs.field(default=False, validator=_is_bool)
    platform: PlatformConfig | None = attrs.field(
        default=None, validator=_instance(PlatformConfig, optional=True)
    )
    plugin_devices: tuple[PluginDeviceConfig, ...] = attrs.field(
        default=(),
        converter=_tuple,
        validator=_tuple_of_type(PluginDeviceConfig),
        metadata=_EXTENSION,
    )

    def __attrs_post_init__(self) -> None:
        ids: dict[str, str] = {}
        for path, device in self._all_devices():
            if device.id is None:
                continue
            if device.id in ids:
                raise ConfigError(
                    f"{path}.id",
                    device.id,
                    "an id no other device uses",
                    reason=f"duplicate id {device.id!r} (also {ids[device.id]})",
                )
            ids[device.id] = path
        shared = self.memory.shared or self.memory.hugepages
        needs_shared = [f"disks[{i}]" for i, d in enumerate(self.disks) if d.vhost_user]
        needs_shared += [f"net[{i}]" for i, n in enumerate(self.net) if n.vhost_user]
        needs_shared += [f"fs[{i}]" for i in range(len(self.fs))]
        if needs_shared and not shared:
            raise ConfigError(
                needs_shared[0],
                None,
                "memory with shared=on or hugepages=on",
                reason="vhost-user devices (and virtio-fs) need shared guest memory",
            )
        segments = self.platform.num_pci_segments if self.platform else 1
        iommu_segments = self.platform.iommu_segments if self.platform else ()
        for path, device in self._all_devices():
            segment = getattr(device, "pci_segment", None)
            if segment is None:
                continue
            if segment >= segments:
                raise ConfigError(
                    f"{path}.pci_segment", segment, f"a segment below num_pci_segments ({segments})"
                )
            if segment not in iommu_segments or _field_head(path) in ("rng", "console", "balloon"):
                continue  # CH checks only these hot-pluggable devices against IOMMU segments
            if _field_head(path) == "fs":
                raise ConfigError(
                    f"{path}.pci_segment", segment, "a segment not behind the IOMMU (virtio-fs cannot be)"
                )
            if not device.iommu:
                raise ConfigError(f"{path}.iommu", False, f"iommu on (segment {segment} is behind the IOMMU)")
        paths: set[str] = set()
        for index, vfio in enumerate(self.devices):
            if vfio.path.rstrip("/") in paths:
                raise ConfigError(f"devices[{index}].path", vfio.path, "a device not given twice")
            paths.add(vfio.path.rstrip("/"))
        if self.balloon is not None and self.balloon.size >= self.memory.size:
            raise ConfigError(
                "balloon.size", self.balloon.size, f"less than the memory size ({self.memory.size})"
            )

    # -- queries --

    def _all_devices(self) -> Iterator[tuple[str, Any]]:
        """``(JSON path, config)`` of every device config that has an ``id``."""
        for name in ("disks", "net", "fs", "pmem", "devices", "plugin_devices"):
            for index, device in enumerate(getattr(self, name)):
                yield f"{name}[{index}]", device
        yield "rng", self.rng
        yield "console", self.console
        for name in ("balloon", "vsock"):
            if getattr(self, name) is not None:
                yield name, getattr(self, name)

    @property
    def bootable(self) -> bool:
        """Whether the payload names a kernel, firmware or IGVM file."""
        p = self.payload
        return bool(p.kernel or p.firmware or p.igvm)

    @property
    def virtio_transport(self) -> str:
        """The VM's default virtio transport (``PlatformConfig.virtio_transport``, else pci)."""
        return (self.platform.virtio_transport if self.platform else None) or "pci"

    def transport_of(self, device: Any) -> str:
        """How a virtio device config attaches: its ``transport``, else the VM default."""
        return getattr(device, "transport", None) or self.virtio_transport

    @property
    def iommu_required(self) -> bool:
        """Whether the VM needs a virtual IOMMU (CH sets ``iommu`` itself in this case)."""
        return (
            self.iommu
            or any(getattr(d, "iommu", False) for _, d in self._all_devices())
            or bool(self.platform and self.platform.iommu_segments)
        )

    # -- changes --

    def with_disk(self, disk: DiskConfig) -> VmConfig:
        """A copy with ``disk`` added (``vm.add-disk``); :meth:`assign_ids` names it."""
        return attrs.evolve(self, disks=(*self.disks, disk))

    def with_net(self, net: NetConfig) -> VmConfig:
        """A copy with ``net`` added (``vm.add-net``)."""
        return attrs.evolve(self, net=(*self.net, net))

    def with_fs(self, fs: FsConfig) -> VmConfig:
        """A copy with ``fs`` added (``vm.add-fs``)."""
        return attrs.evolve(self, fs=(*self.fs, fs))

    def with_pmem(self, pmem: PmemConfig) -> VmConfig:
        """A copy with ``pmem`` added (``vm.add-pmem``)."""
        return attrs.evolve(self, pmem=(*self.pmem, pmem))

    def with_device(self, device: DeviceConfig) -> VmConfig:
        """A copy with VFIO ``device`` added (``vm.add-device``)."""
        return attrs.evolve(self, devices=(*self.devices, device))

    def with_vsock(self, vsock: VsockConfig) -> VmConfig:
        """A copy with ``vsock`` set (``vm.add-vsock``); a VM has at most one."""
        if self.vsock is not None:
            raise ConfigError("vsock", vsock, "no vsock device yet", reason="vsock already present")
        return attrs.evolve(self, vsock=vsock)

    def with_plugin_device(self, device: PluginDeviceConfig) -> VmConfig:
        """A copy with plugin ``device`` added."""
        return attrs.evolve(self, plugin_devices=(*self.plugin_devices, device))

    def without_device(self, device_id: str) -> VmConfig:
        """A copy without the disk, net, fs, pmem, VFIO, vsock or plugin device ``device_id``
        (``vm.remove-device``).

        :raises ConfigError: no such removable device.
        """
        for name in ("disks", "net", "fs", "pmem", "devices", "plugin_devices"):
            items = getattr(self, name)
            kept = tuple(device for device in items if device.id != device_id)
            if len(kept) != len(items):
                changes: dict[str, Any] = {name: kept}
                return attrs.evolve(self, **changes)
        if self.vsock is not None and self.vsock.id == device_id:
            return attrs.evolve(self, vsock=None)
        raise ConfigError(
            "id",
            device_id,
            "the id of a disk, net, fs, pmem, VFIO, vsock or plugin device",
            reason=f"no device with id {device_id!r}",
        )

    def assign_ids(self) -> VmConfig:
        """A copy where every disk, net, fs, pmem, vsock, VFIO and plugin device has an id.

        Missing ids are made as CH does at VM creation: prefix (``_disk``, ``_net``, ``_fs``,
        ``_pmem``, ``_vsock``, ``_vfio``, ``_<type>`` for plugin devices) plus one counter shared
        by all devices, skipping names in use (``_disk0``, ``_net1``...). rng, console and balloon
        keep ``None``: CH names them ``__rng``, ``__console``, ``__balloon`` internally.
        """
        used = {device.id for _, device in self._all_devices() if device.id is not None}
        counter = 0

        def name(prefix: str) -> str:
            nonlocal counter
            while f"{prefix}{counter}" in used:
                counter += 1
            used.add(f"{prefix}{counter}")
            counter += 1
            return f"{prefix}{counter - 1}"

        def fill(items: tuple[Any, ...], prefix: Callable[[Any], str]) -> tuple[Any, ...]:
            return tuple(
                item if item.id is not None else attrs.evolve(item, id=name(prefix(item))) for item in items
            )

        disks = fill(self.disks, lambda _: "_disk")
        net = fill(self.net, lambda _: "_net")
        fs = fill(self.fs, lambda _: "_fs")
        pmem = fill(self.pmem, lambda _: "_pmem")
        vsock = self.vsock
        if vsock is not None and vsock.id is None:
            vsock = attrs.evolve(vsock, id=name("_vsock"))
        devices = fill(self.devices, lambda _: "_vfio")
        plugins = fill(self.plugin_devices, lambda d: f"_{d.type}")
        return attrs.evolve(
            self,
            disks=disks,
            net=net,
            fs=fs,
            pmem=pmem,
            vsock=vsock,
            devices=devices,
            plugin_devices=plugins,
        )

    # -- construction --

    @classmethod
    def from_json(
        cls, obj: Mapping[str, Any], *, strict: bool = False, ignored: list[str] | None = None
    ) -> Self:
        """Build from a CH ``VmConfig`` JSON object (already decoded, e.g. by ``json.loads``).

        Types are checked strictly (sizes are integers in bytes, booleans are ``true``/``false``);
        ``null`` means "the default". Keys vmmkit does not know (``numa``, ``rate_limit_groups``,
        ``memory.zones``...) are ignored so that any CH body is accepted: pass a list as
        ``ignored`` to receive their JSON paths (``"numa"``, ``"serial.iommu"``), or
        ``strict=True`` to reject them. Unknown keys whose value is ``null`` (older CH versions
        write every unset option) are dropped without a report. Errors name the JSON path
        (``memory.size``, ``disks[1].id``).
        """
        return super().from_json(obj, strict=strict, ignored=ignored)

    @classmethod
    def from_cli(
        cls,
        *,
        kernel: str | None = None,
        cmdline: str | None = None,
        initramfs: str | None = None,
        firmware: str | None = None,
        cpus: str | None = None,
        memory: str | None = None,
        disks: Iterable[str] | None = (),
        net: Iterable[str] | None = (),
        rng: str | None = None,
        serial: str | None = None,
        console: str | None = None,
        fs: Iterable[str] | None = (),
        pmem: Iterable[str] | None = (),
        vsock: str | None = None,
        devices: Iterable[str] | None = (),
        platform: str | None = None,
        plugin_devices: Iterable[PluginDeviceConfig | tuple[str, str]] | None = (),
        debug_console: str | None = None,
        balloon: str | None = None,
        watchdog: bool = False,
        pvpanic: bool = False,
    ) -> VmConfig:
        """Build from raw command-line option values, CH's syntax (``None``: the default).

        Repeatable options take a list of values (``None`` is an empty list, as argparse's
        ``append`` leaves it); a plugin device is a :class:`PluginDeviceConfig` or a
        ``(type_name, spec)`` pair. Errors name the option (``--cpus``).
        """

        def many(values: Iterable[Any] | None) -> list[Any]:
            return [values] if isinstance(values, str) else list(values or ())

        plugins = [_plugin_device(d) for d in many(plugin_devices)]
        sections = dict(
            cpus=CpusConfig.parse(cpus) if cpus is not None else None,
            memory=MemoryConfig.parse(memory) if memory is not None else None,
            disks=tuple(DiskConfig.parse(spec) for spec in many(disks)),
            net=tuple(NetConfig.parse(spec) for spec in many(net)),
            rng=RngConfig.parse(rng) if rng is not None else None,
            balloon=BalloonConfig.parse(balloon) if balloon is not None else None,
            fs=tuple(FsConfig.parse(spec) for spec in many(fs)),
            pmem=tuple(PmemConfig.parse(spec) for spec in many(pmem)),
            serial=SerialConfig.parse(serial) if serial is not None else None,
            console=ConsoleConfig.parse(console) if console is not None else None,
            debug_console=DebugConsoleConfig.parse(debug_console) if debug_console is not None else None,
            devices=tuple(DeviceConfig.parse(spec) for spec in many(devices)),
            vsock=VsockConfig.parse(vsock) if vsock is not None else None,
            platform=PlatformConfig.parse(platform) if platform is not None else None,
            plugin_devices=tuple(plugins),
        )
        try:
            payload = PayloadConfig(kernel=kernel, cmdline=cmdline, initramfs=initramfs, firmware=firmware)
        except ConfigError as err:
            raise _relabel(err, f"--{err.option}", None) from None
        try:
            return _make(cls, payload=payload, watchdog=watchdog, pvpanic=pvpanic, **sections)
        except ConfigError as err:
            raise _vm_error_for_cli(err, plugins) from None


def _plugin_device(value: Any) -> PluginDeviceConfig:
    if isinstance(value, PluginDeviceConfig):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(part, str) for part in value):
        return PluginDeviceConfig.parse(*value)
    raise ConfigError("plugin_devices", value, "a PluginDeviceConfig or a (type_name, spec) pair of strings")


_CLI_OPTIONS: Final[Mapping[str, tuple[str, type[Any] | None]]] = {
    "cpus": ("--cpus", CpusConfig),
    "memory": ("--memory", MemoryConfig),
    "disks": ("--disk", DiskConfig),
    "net": ("--net", NetConfig),
    "rng": ("--rng", RngConfig),
    "balloon": ("--balloon", BalloonConfig),
    "fs": ("--fs", FsConfig),
    "pmem": ("--pmem", PmemConfig),
    "serial": ("--serial", SerialConfig),
    "console": ("--console", ConsoleConfig),
    "debug_console": ("--debug-console", DebugConsoleConfig),
    "devices": ("--device", DeviceConfig),
    "vsock": ("--vsock", VsockConfig),
    "platform": ("--platform", PlatformConfig),
    "watchdog": ("--watchdog", None),
    "pvpanic": ("--pvpanic", None),
}


def _vm_error_for_cli(err: ConfigError, plugins: Sequence[PluginDeviceConfig]) -> ConfigError:
    """Name the CLI option behind a VmConfig-level error (``disks[1].id`` -> ``--disk``, id)."""
    if err.option.startswith("-"):
        return err
    head, _, rest = err.option.partition(".")
    section = _field_head(head)
    if section == "payload":
        return _relabel(err, f"--{rest}", None)
    if section == "plugin_devices":
        match = re.fullmatch(r"plugin_devices\[(\d+)\]", head)
        option = f"--{plugins[int(match.group(1))].type}" if match else "--plugin"
        return _relabel(err, option, _field_head(rest) or None)
    option, config_class = _CLI_OPTIONS.get(section, (section, None))
    cli_keys: Mapping[str, str] = getattr(config_class, "_CLI_KEYS", {})
    key = _field_head(rest) if rest else None
    return _relabel(err, option, cli_keys.get(key, key) if key else None)


