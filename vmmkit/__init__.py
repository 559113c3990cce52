"""vmmkit: a plugin-based, hypervisor-agnostic Virtual Machine Monitor framework.

A plugin needs only ``from vmmkit import hookimpl``; everything else it implements
comes from the interfaces in :mod:`vmmkit.hypervisor`, :mod:`vmmkit.arch` and
:mod:`vmmkit.device`.
"""

from __future__ import annotations

import pluggy

from vmmkit import _codecache

_codecache.install()

__all__ = ["hookimpl", "hookspec", "__version__", "PROJECT_NAME"]

__version__ = "0.1.0"
PROJECT_NAME = "vmmkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
