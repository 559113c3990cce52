"""Plugin discovery and the registries the plugins fill."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import attrs
import pluggy

from vmmkit import PROJECT_NAME, hookspecs
from vmmkit.entrypoints import Distribution, EntryPoint, entry_points
from vmmkit.errors import PluginError
from vmmkit.registry import Registries

ENTRY_POINT_GROUP = PROJECT_NAME
DISABLE_ENV = "VMMKIT_DISABLE_PLUGINS"


@attrs.frozen
class BrokenPlugin:
    """An installed plugin whose entry point could not be loaded."""

    name: str  #: the entry point's name (what ``$VMMKIT_DISABLE_PLUGINS`` takes)
    value: str  #: ``module:attribute``
    distribution: str  #: ``name version`` of the distribution that declares it
    error: str  #: ``ExceptionType: message``

    def describe(self) -> str:
        """What failed, and what the user can do about it."""
        return (f"plugin {self.name!r} (entry point {self.name} = {self.value} in {self.distribution}) "
                f"failed to load: {self.error}. Fix or uninstall {self.distribution.split()[0]}, or "
                f"skip it with {DISABLE_ENV}={self.name}")


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, finding entry points with :mod:`vmmkit.entrypoints` (start-up cost)."""

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        self._entry_point_dists: list[tuple[Any, Distribution]] = []
        #: Entry points that failed to load (kept by ``make_plugin_manager(keep_broken=True)``).
        self.broken: list[BrokenPlugin] = []

    def load_setuptools_entrypoints(self, group: str, name: str | None = None) -> int:
        """Load and register the plugins of entry-point ``group``, as pluggy's method of this
        name does: a name already registered or blocked is skipped. One that fails to import
        is recorded in :attr:`broken` and skipped."""
        found = [ep for ep in entry_points(group) if name is None or ep.name == name]
        return len(self.load_entry_points(found))

    def load_entry_points(self, found: Iterable[EntryPoint]) -> list[Any]:
        """Load and register the plugins of the entry points ``found`` (skipping, as
        :meth:`load_setuptools_entrypoints` does, names registered or blocked and recording
        failures in :attr:`broken`); returns the plugins registered."""
        loaded = []
        for entry_point in found:
            if self.get_plugin(entry_point.name) or self.is_blocked(entry_point.name):
                continue
            try:
                plugin = entry_point.load()
            except Exception as exc:  # any error of third-party code, reported by name
                dist = entry_point.dist
                self.broken.append(BrokenPlugin(entry_point.name, entry_point.value,
                                                f"{dist.project_name} {dist.version}",
                                                f"{type(exc).__name__}: {exc}"))
                continue
            self.register(plugin, name=entry_point.name)
            self._entry_point_dists.append((plugin, entry_point.dist))
            loaded.append(plugin)
        return loaded

    def list_plugin_distinfo(self) -> list[tuple[Any, Any]]:
        return [*self._entry_point_dists, *super().list_plugin_distinfo()]


def make_plugin_manager(autoload: bool = True, plugins: Iterable[Any] = (), *,
                        keep_broken: bool = False, found: Sequence[EntryPoint] | None = None,
                        defer: Collection[str] = ()) -> PluginManager:
    """A plugin manager with vmmkit's hooks, the installed plugins (unless ``autoload`` is
    off) and ``plugins`` registered. ``found``: the installed entry points when the caller
    has them already; ``defer``: entry-point names not to load now
    (:mod:`vmmkit.plugin_index` loads them when a VM needs them).

    Plugins named in ``$VMMKIT_DISABLE_PLUGINS`` (comma separated entry-point names) are
    blocked. A hook implementation that matches no specification is an error. An installed
    plugin that fails to import is an error naming it, its distribution and the remedy, unless
    ``keep_broken`` (``vmmkit plugins``): then it is left out and listed in ``pm.broken``.
    """
    pm = PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in os.environ.get(DISABLE_ENV, "").split(","):
        if name.strip():
            pm.set_blocked(name.strip())
    if autoload:
        if found is None:
            found = entry_points(ENTRY_POINT_GROUP)
        try:
            pm.load_entry_points(ep for ep in found if ep.name not in defer)
        except Exception as exc:  # registering a third-party plugin failed: not a traceback
            raise PluginError(f"loading plugins of entry-point group {ENTRY_POINT_GROUP!r}: {exc}") from exc
        if pm.broken and not keep_broken:
            raise PluginError("; ".join(broken.describe() for broken in pm.broken))
    for plugin in plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    return pm


def plugin_label(pm: pluggy.PluginManager, plugin: Any) -> str:
    """``distribution version`` for an entry-point plugin, else the registered name."""
    for registered, dist in pm.list_plugin_distinfo():
        if registered is plugin:
            return f"{dist.project_name} {dist.version}"
    return pm.get_name(plugin) or repr(plugin)


def collect_registries(pm: pluggy.PluginManager, *, registries: Registries | None = None,
                       plugins: Collection[Any] | None = None) -> Registries:
    """Call every ``vmmkit_register_*`` hook, recording which plugin registered what; only
    those of ``plugins`` (registered since) into ``registries`` when given."""
    registries = Registries() if registries is None else registries
    calls = (
        ("vmmkit_register_hypervisors", registries.hypervisors),
        ("vmmkit_register_architectures", registries.architectures),
        ("vmmkit_register_devices", registries.devices),
        ("vmmkit_register_transports", registries.transports),
    )
    for hook_name, registry in calls:
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            if plugins is not None and not any(impl.plugin is plugin for plugin in plugins):
                continue
            registry.current_plugin = plugin_label(pm, impl.plugin)
            impl.function(registry=registry)
    return registries
