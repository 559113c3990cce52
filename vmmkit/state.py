"""The state contract: how anything with guest-visible state takes part in a snapshot.

A device (or transport, backend VM, architecture piece) implements :class:`Snapshottable`:
a class attribute :attr:`~Snapshottable.state_version` and two methods. ``save_state`` returns a
JSON-able mapping (``dict``/``list``/``str``/``int``/``float``/``bool``/``None``; bytes go
through :func:`pack_bytes`); ``restore_state`` takes what ``save_state`` returned on a machine
built from the same configuration and not yet running. A snapshot records each piece's
``state_version`` and a restore refuses a piece whose version differs (:func:`check_version`).

A placed device that does not implement the contract makes ``vm.snapshot`` fail with its id
(:class:`NotSnapshottable`), never a silently incomplete snapshot. Shaped after Cloud
Hypervisor's ``Snapshottable`` trait (``vm-migration/src/lib.rs``: ``id()``, ``snapshot()``,
``restore``), with the version checked per piece instead of per VMM build.

Everything in a state mapping came from a file: ``restore_state`` must treat it as untrusted
input and raise :class:`StateError` (with what is wrong) rather than fail half-way.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

from vmmkit.errors import VmmError


@runtime_checkable
class Snapshottable(Protocol):
    """Something whose state a snapshot saves and a restore puts back."""

    #: The layout of :meth:`save_state`'s mapping; bump it when the layout changes.
    state_version: ClassVar[int]

    def save_state(self) -> Mapping[str, Any]:
        """The state, JSON-able (called on a paused VM)."""
        ...

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Take ``state`` (from :meth:`save_state` of the same class and version) before the
        VM runs. :raises StateError: the state is malformed."""
        ...


class StateError(VmmError):
    """A saved state cannot be restored (malformed, another version, another backend)."""


class SnapshotError(VmmError):
    """A snapshot cannot be taken or restored (bad URL, damaged or mismatched directory)."""


class NotSnapshottable(VmmError):
    """A piece of the VM does not implement :class:`Snapshottable`."""


def is_snapshottable(obj: object) -> bool:
    return isinstance(obj, Snapshottable) and isinstance(getattr(obj, "state_version", None), int)


def pack_bytes(data: bytes) -> str:
    """``data`` as text for a state mapping (base64)."""
    import base64  # snapshots and migration only: not on a boot's import path

    return base64.b64encode(bytes(data)).decode("ascii")


def unpack_bytes(text: Any, what: str, size: int | None = None) -> bytes:
    """The bytes :func:`pack_bytes` made, checked (``size``: exactly that many).

    :raises StateError: not base64 text, or the wrong size."""
    if not isinstance(text, str):
        raise StateError(f"{what}: expected base64 text, found {type(text).__name__}")
    import base64

    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise StateError(f"{what}: not valid base64") from None
    if size is not None and len(data) != size:
        raise StateError(f"{what}: {len(data)} bytes, expected {size}")
    return data


def field(state: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``state[key]``, checked to be of ``kind`` (``bool`` is not an ``int`` here).

    :raises StateError: missing or of another type."""
    if not isinstance(state, Mapping) or key not in state:
        raise StateError(f"{what}: missing {key!r}")
    value = state[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise StateError(f"{what}.{key}: expected {'/'.join(k.__name__ for k in kinds)}, found bool")
    if not isinstance(value, kinds):
        raise StateError(f"{what}.{key}: expected {'/'.join(k.__name__ for k in kinds)}, "
                         f"found {type(value).__name__}")
    return value


def int_field(state: Mapping[str, Any], key: str, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    value: int = field(state, key, int, what)
    if not lo <= value <= hi:
        raise StateError(f"{what}.{key}: {value} is outside [{lo}, {hi}]")
    return value


def check_version(piece: str, saved: Any, current: int) -> None:
    """Refuse a state saved with another layout version.

    :raises StateError: naming the piece and both versions."""
    if saved != current:
        raise StateError(f"{piece}: state version {saved!r} in the snapshot, this vmmkit restores version {current}")


#: How :func:`save_fields` / :func:`restore_fields` carry an attribute: ``int``, ``bool``,
#: ``float``, ``int?`` (or None), ``bytes`` (a bytearray, kept in place), ``ints`` (a list of ints).
FieldKind = str


def save_fields(obj: object, spec: Mapping[str, FieldKind]) -> dict[str, Any]:
    """The attributes ``spec`` names, JSON-able (a device's registers)."""
    out: dict[str, Any] = {}
    for name, kind in spec.items():
        value = getattr(obj, name)
        if kind == "bytes":
            out[name] = pack_bytes(bytes(value))
        elif kind == "ints":
            out[name] = [int(v) for v in value]
        else:
            out[name] = value
    return out


def restore_fields(obj: object, state: Mapping[str, Any], spec: Mapping[str, FieldKind], what: str) -> None:
    """Set the attributes ``spec`` names from ``state``, every one checked before any is set.

    :raises StateError: a value is missing or of the wrong kind."""
    values: dict[str, Any] = {}
    for name, kind in spec.items():
        key = name.lstrip("_")
        source = dict(state)
        if key not in source:
            raise StateError(f"{what}: missing {key!r}")
        value = source[key]
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "int?":
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind == "bytes":
            current = getattr(obj, name)
            value = unpack_bytes(value, f"{what}.{key}", len(current))
            ok = True
        elif kind == "ints":
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        else:
            raise ValueError(f"unknown field kind {kind!r}")
        if not ok:
            raise StateError(f"{what}.{key}: {value!r} is not a valid {kind}")
        values[name] = value
    for name, value in values.items():
        if spec[name] == "bytes":
            getattr(obj, name)[:] = value
        else:
            setattr(obj, name, value)


def save_named(obj: object, spec: Mapping[str, FieldKind]) -> dict[str, Any]:
    """:func:`save_fields` with keys without the leading underscore."""
    return {name.lstrip("_"): value for name, value in save_fields(obj, spec).items()}
