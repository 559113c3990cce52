"""Landlock rules: ``--landlock-rules path=<path>,access=r|w|rw`` (CH's ``LandlockConfig``)."""

from __future__ import annotations

from typing import ClassVar

import attrs

from vmmkit.config.codec import _Config
from vmmkit.config.errors import _cli_errors
from vmmkit.config.fields import _choice, _is_str, _path
from vmmkit.config.options import OptionParser, _make

#: What ``access`` may say (Cloud Hypervisor's ``vmm/src/landlock.rs``): read, write, both.
LANDLOCK_ACCESS = ("r", "w", "rw")


@attrs.frozen(kw_only=True)
class LandlockConfig(_Config):
    """A path the Landlocked VMM may still reach after set-up, and how. A rule on a directory
    covers what lies beneath it (where disks to be hot-added later live)."""

    path: str = attrs.field(converter=_path, validator=_is_str)
    access: str = attrs.field(validator=_choice(*LANDLOCK_ACCESS))

    _PARSER: ClassVar[OptionParser] = OptionParser("--landlock-rules", ("path", "access"))

    @classmethod
    def parse(cls, spec: str) -> LandlockConfig:
        """Parse a ``--landlock-rules`` value."""
        o = cls._PARSER.parse(spec)
        with _cli_errors(o.option):
            return _make(cls, path=o.get("path"), access=o.get("access"))
