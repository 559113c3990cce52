"""Byte sizes: binary multiples and the ``512M``-style sizes Cloud Hypervisor accepts."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["KiB", "MiB", "GiB", "TiB", "U64_MAX", "SIZE_SYNTAX", "parse_size", "format_size"]

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30
TiB: Final = 1 << 40
U64_MAX: Final = (1 << 64) - 1

SIZE_SYNTAX: Final = "a size such as 512M, 1G or a byte count"
"""How to describe an acceptable size in an error message."""

_SUFFIXES: Final = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE_RE: Final = re.compile(r"([0-9]{1,20})([KMGT]?)")


def parse_size(value: int | str) -> int:
    """Return the number of bytes ``value`` stands for.

    ``value`` is a non-negative int, or a decimal string with an optional binary suffix ``K``,
    ``M``, ``G`` or ``T`` (uppercase, as Cloud Hypervisor's ``ByteSized``): ``"4096"``, ``"2K"``,
    ``"512M"``, ``"1T"``. The result must fit in 64 bits.

    :raises ValueError: anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"not a size: {value!r}")
        size = int(match.group(1)) * _SUFFIXES[match.group(2)]
    else:
        raise ValueError(f"not a size: {value!r}")
    if not 0 <= size <= U64_MAX:
        raise ValueError(f"size out of range: {value!r}")
    return size


def format_size(size: int) -> str:
    """The shortest exact form of ``size`` that :func:`parse_size` reads back (``"512M"``)."""
    for suffix in ("T", "G", "M", "K"):
        unit = _SUFFIXES[suffix]
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
