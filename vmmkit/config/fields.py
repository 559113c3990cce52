"""Limits, defaults, and the validators and converters the configuration classes share."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

import attrs

from vmmkit.config.errors import ConfigError
from vmmkit.transport import BUILTIN_TRANSPORTS
from vmmkit.units import SIZE_SYNTAX, KiB, MiB, parse_size

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
#: The virtio transports a configuration may name (``transport=``, ``virtio_transport=``): the
#: short names of the core's virtio transports (:data:`vmmkit.transport.BUILTIN_TRANSPORTS`).
TRANSPORTS: Final = tuple(t.alias for t in BUILTIN_TRANSPORTS if t.family == "virtio" and t.alias)
CONSOLE_MODES: Final = ("Off", "Pty", "Tty", "File", "Socket", "Null")
U8: Final = 0xFF
U16: Final = 0xFFFF
U32: Final = 0xFFFF_FFFF

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


_NUL: Final = "\0"
_NO_NUL: Final = "a value without NUL bytes"


def _is_str(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(attr.name, value, "a non-empty string")
    if _NUL in value:
        raise ConfigError(attr.name, value, _NO_NUL, reason="a NUL byte in the value")


def _is_opt_str(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _is_str(inst, attr, value)


def _is_opt_text(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(attr.name, value, "a string")
    if value is not None and _NUL in value:
        raise ConfigError(attr.name, value, _NO_NUL, reason="a NUL byte in the value")


def _is_id(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value or value.startswith("__")):
        raise ConfigError(attr.name, value, "a non-empty id not starting with '__' (reserved)")
    if value is not None and _NUL in value:
        raise ConfigError(attr.name, value, _NO_NUL, reason="a NUL byte in the value")


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
    return isinstance(value, str) and bool(value) and _NUL not in value


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

