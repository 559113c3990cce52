"""The serial port, the virtio console and the debug console (``--serial``, ``--console``,
``--debug-console``)."""

from __future__ import annotations

from typing import Any, ClassVar, Final

import attrs

from vmmkit.config.codec import _Config
from vmmkit.config.errors import ConfigError, _cli_errors
from vmmkit.config.fields import (
    CONSOLE_MODES,
    DEFAULT_DEBUG_CONSOLE_IOBASE,
    U16,
    _check_console,
    _choice,
    _int_range,
    _is_bool,
    _is_id,
    _is_opt_str,
    _opt_path,
    _transport_field,
)
from vmmkit.config.options import _PCI_KEYS, OptionParser, ParsedOptions, _make, _pci_options, _transport_option

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

