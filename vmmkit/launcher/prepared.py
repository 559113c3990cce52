"""What the launcher server prepared before forking, for the CLI of a VMM process it forked.

Imported by the CLI on every start (cold ones too), so it imports nothing. The server sets the
state (:func:`vmmkit.launcher.server.warm`); :func:`plugins` is ``None`` everywhere else.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DISABLE_ENV = "VMMKIT_DISABLE_PLUGINS"  # vmmkit.plugin.DISABLE_ENV, without importing pluggy

_plugins: tuple[Any, Any] | None = None
_disabled: str | None = None
_in_vmm = False


def prepare(plugin_manager: Any, registries: Any) -> None:
    """The server's plugin manager and registries, built from its own environment."""
    global _plugins, _disabled
    _plugins, _disabled = (plugin_manager, registries), os.environ.get(DISABLE_ENV, "")


def enter_vmm() -> None:
    """This process is a VMM forked by the server (the only place :func:`plugins` answers)."""
    global _in_vmm
    _in_vmm = True


def plugins() -> tuple[Any, Any] | None:
    """``(plugin manager, registries)`` as ``make_plugin_manager()`` and ``collect_registries``
    would build them here, already built: only in a VMM process forked by the server, and only
    when this launch's ``$VMMKIT_DISABLE_PLUGINS`` is the server's (the server has checked that
    the interpreter, ``sys.path`` and the installed distributions are its own)."""
    if not _in_vmm or _plugins is None or os.environ.get(DISABLE_ENV, "") != _disabled:
        return None
    return _plugins
