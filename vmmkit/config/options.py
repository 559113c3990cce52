"""The grammar of Cloud Hypervisor's command-line option values, ``k=v,k=[a,b],flag`` (CH's
``OptionParser``), and the helpers each section's ``parse()`` shares."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import attrs

from vmmkit.config.errors import ConfigError
from vmmkit.config.fields import TRANSPORTS, U16, T
from vmmkit.units import SIZE_SYNTAX, U64_MAX, parse_size

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

