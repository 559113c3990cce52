"""vmmkit: a plugin-based, hypervisor-agnostic Virtual Machine Monitor framework.

A plugin needs only ``from vmmkit import hookimpl``; everything else it implements
comes from the interfaces in :mod:`vmmkit.hypervisor`, :mod:`vmmkit.arch` and
:mod:`vmmkit.device`. A script drives a VM with :class:`vmmkit.Vm` or :func:`vmmkit.run`
(:mod:`vmmkit.scripting`).

Importing vmmkit has no side effects: it patches nothing (the ``vmmkit`` command alone
installs the attrs code cache, :mod:`vmmkit._codecache`), loads no native module, and
imports the scripting API only when one of its names is first used.
"""

from __future__ import annotations

# Not ``typing.TYPE_CHECKING``: importing typing (with re, contextlib...) costs the ``vmmkit``
# command's launcher client more than the rest of its start-up; mypy knows this name.
TYPE_CHECKING = False

__version__ = "0.1.0"
PROJECT_NAME = "vmmkit"

# Public names loaded on first use: name -> module.
_LAZY = {
    "Vm": "vmmkit.scripting",
    "VmExit": "vmmkit.scripting",
    "run": "vmmkit.scripting",
    "demo_kernel": "vmmkit.demo",
    "VmConfig": "vmmkit.config",
    "ConfigError": "vmmkit.config",
    "VmmError": "vmmkit.errors",
}

__all__ = [
    "hookimpl", "hookspec", "__version__", "PROJECT_NAME",
    "Vm", "VmExit", "run", "demo_kernel", "VmConfig", "ConfigError", "VmmError",
]

if TYPE_CHECKING:
    from typing import Any

    import pluggy

    hookspec: pluggy.HookspecMarker
    hookimpl: pluggy.HookimplMarker

    from vmmkit.config import ConfigError, VmConfig
    from vmmkit.demo import demo_kernel
    from vmmkit.errors import VmmError
    from vmmkit.scripting import Vm, VmExit, run


def __getattr__(name: str) -> Any:
    if name in ("hookspec", "hookimpl"):
        # Made on first use, so that the ``vmmkit`` command's launcher client (which imports
        # this package) starts without pluggy's import; pluggy's markers are stateless.
        return _markers()[name]
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vmmkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _markers() -> dict[str, Any]:
    import pluggy

    markers = {"hookspec": pluggy.HookspecMarker(PROJECT_NAME), "hookimpl": pluggy.HookimplMarker(PROJECT_NAME)}
    for key, marker in markers.items():
        globals().setdefault(key, marker)
    return {key: globals()[key] for key in markers}


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "hookspec", "hookimpl"})
