"""JSON: Cloud Hypervisor's ``VmConfig`` objects to and from the configuration classes."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Final, Self, Union, cast, get_args, get_origin

import attrs

from vmmkit.config.errors import ConfigError, _within
from vmmkit.config.support import NOT_SUPPORTED, table_path, unmodelled_refusal

_CODEC: Final = "vmmkit_json_codec"


@attrs.frozen
class _JsonContext:
    strict: bool
    ignored: list[str] | None
    section: str = ""  #: the VmConfig section a lone device's object belongs to ("disks")


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
                entry = _join(ctx.section, here)  # a vm.add-disk body's key is a disks[] key
                refused = unmodelled_refusal(entry, item)
                if refused is not None:
                    raise refused
                if table_path(entry) not in NOT_SUPPORTED:
                    raise ConfigError(here, key, "one of: " + ", ".join(fields), reason=f"unknown key {key!r}")
                continue  # a not-supported key at its default value asks for nothing
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
        cls, obj: Mapping[str, Any], *, strict: bool = True, ignored: list[str] | None = None, section: str = ""
    ) -> Self:
        """Build from a CH JSON object. See :meth:`VmConfig.from_json`. ``section``: the
        ``VmConfig`` section the object is an item of (``"disks"`` for a ``vm.add-disk`` body),
        for the not-supported table's entries."""
        return cast(Self, _decode_object(cls, obj, "", _JsonContext(strict, ignored, section)))

    def to_json(self) -> dict[str, Any]:
        """The CH JSON object (``None`` and empty lists left out, as CH does)."""
        return _encode_object(self)

