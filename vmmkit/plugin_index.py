"""Which installed plugin provides what, cached, so that a boot imports only the plugins its VM
needs (issue 20: an x86-64 KVM boot has no use for the MSHV or emu backends).

A plugin that answers :func:`~vmmkit.hookspecs.vmmkit_load_on_demand` with True is *on
demand*: it matters only to a VM that runs on a hypervisor or architecture it registers. The
index records, per entry point, whether it is on demand and what hypervisors (name, priority,
architectures) and architectures it registers; it is written after a full discovery (every
plugin imported, as ``vmmkit plugins`` and every start did before) to
``$XDG_CACHE_HOME/vmmkit/plugin-index-<python>.marshal``.

A boot then loads every other plugin as usual, parses its options (the ``--hypervisor`` and
``--arch`` choices include what the deferred plugins register, in the same order) and loads a
deferred plugin only when the VM uses it: the hypervisor or architecture named, or, for
``--hypervisor auto``, every backend tried before the first usable one (the same walk as
:meth:`vmmkit.registry.Registries.select_hypervisor`).

The index is used only while it matches what is installed: the same entry points, from the
same distribution metadata (directory and ``entry_points.txt`` modification times: any pip
install, upgrade or uninstall changes them), the same vmmkit version, interpreter and host
machine, and unchanged source files of the plugin modules, hook implementations and
registered classes (an edited editable install). Anything else, an unreadable or foreign
file, or an entry point it does not know (new, or blocked or broken when it was built) means
a full discovery, which writes a new index. ``VMMKIT_NO_PLUGIN_INDEX=1`` turns it off; like
Python's bytecode cache it is not written under ``PYTHONDONTWRITEBYTECODE``.
"""

from __future__ import annotations

import marshal
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from vmmkit import __version__
from vmmkit.entrypoints import EntryPoint, entry_points

if TYPE_CHECKING:
    from vmmkit.plugin import PluginManager
    from vmmkit.registry import Registries

FORMAT = 1
DISABLE_ENV = "VMMKIT_NO_PLUGIN_INDEX"

#: Hooks that act before the VM is chosen: a plugin implementing one is loaded at every start.
EVERY_START_HOOKS = frozenset({"vmmkit_add_cli_options", "vmmkit_configure"})
_REGISTER_HOOKS = ("vmmkit_register_hypervisors", "vmmkit_register_architectures", "vmmkit_register_devices",
                   "vmmkit_register_transports")


class PluginEntry:
    """What the index knows of one entry point."""

    __slots__ = ("name", "value", "on_demand", "hypervisors", "architectures")

    def __init__(self, name: str, value: str, on_demand: bool,
                 hypervisors: Sequence[tuple[str, int, tuple[str, ...]]], architectures: Sequence[str]) -> None:
        self.name = name
        self.value = value
        self.on_demand = on_demand
        self.hypervisors = list(hypervisors)  # (name, priority, architectures)
        self.architectures = list(architectures)

    def as_data(self) -> tuple[Any, ...]:
        return (self.name, self.value, self.on_demand, [list(h) for h in self.hypervisors], self.architectures)

    @classmethod
    def from_data(cls, data: Any) -> PluginEntry:
        name, value, on_demand, hypervisors, architectures = data
        return cls(str(name), str(value), bool(on_demand),
                   [(str(h), int(p), tuple(str(a) for a in arches)) for h, p, arches in hypervisors],
                   [str(a) for a in architectures])


def index_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vmmkit", f"plugin-index-{sys.implementation.cache_tag}.marshal")


def enabled() -> bool:
    return not os.environ.get(DISABLE_ENV)


def _key(found: Sequence[EntryPoint]) -> tuple[Any, ...]:
    """What the index is valid for: the entry points, their distributions' metadata, vmmkit,
    the interpreter and the host."""
    dists = []
    for ep in found:
        stamps = []
        for path in (ep.dist_path, os.path.join(ep.dist_path, "entry_points.txt")):
            try:
                stamps.append(os.stat(path).st_mtime_ns)
            except OSError:
                stamps.append(-1)
        dists.append((ep.name, ep.value, ep.dist_path, *stamps))
    return (FORMAT, __version__, sys.implementation.cache_tag, os.uname().machine, tuple(dists))


def _stamp(path: str) -> tuple[str, int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return (path, -1, -1)
    return (path, info.st_mtime_ns, info.st_size)


def read(found: Sequence[EntryPoint]) -> dict[str, PluginEntry] | None:
    """The index of the plugins ``found``, or None when there is none that is still valid."""
    if not enabled():
        return None
    try:
        with open(index_path(), "rb") as stream:
            data = marshal.loads(stream.read())
        format_, key, files, plugins = data
        if format_ != FORMAT or key != _key(found):
            return None
        if any(_stamp(path) != (path, mtime, size) for path, mtime, size in files):
            return None
        entries = {entry.name: entry for entry in map(PluginEntry.from_data, plugins)}
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if any(ep.name not in entries for ep in found):
        return None  # new since, or blocked or broken when the index was built
    return entries


def write(pm: PluginManager, found: Sequence[EntryPoint]) -> None:
    """Index the entry-point plugins of ``pm`` (a full discovery: every plugin of ``found``
    that is not blocked is loaded). Failing to write is not an error: the next start
    discovers again."""
    if not enabled() or sys.dont_write_bytecode:
        return
    from vmmkit.registry import Registries

    entries, files = [], set()
    for ep in found:
        plugin = pm.get_plugin(ep.name)
        if plugin is None:  # blocked: not indexed, so a start without the block discovers again
            continue
        registries = Registries()
        builtin_transports = set(registries.transports.names())
        hooks = {caller.name for caller in pm.get_hookcallers(plugin) or ()}
        declared = False
        for caller_name in (*_REGISTER_HOOKS, "vmmkit_load_on_demand"):
            for impl in getattr(pm.hook, caller_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                files.add(sys.modules[impl.function.__module__].__file__ or "")
                if caller_name == "vmmkit_load_on_demand":
                    declared = declared or impl.function() is True
                else:
                    registry = getattr(registries, caller_name.rsplit("_", 1)[1])
                    impl.function(registry=registry)
        for registry in registries.all():
            for item in registry:
                files.add(getattr(sys.modules.get(item.__module__), "__file__", None) or "")
        files.add(getattr(plugin, "__file__", None) or "")
        hypervisors = [(h.name, h.priority, tuple(h.architectures)) for h in registries.hypervisors]
        architectures = registries.architectures.names()
        on_demand = (declared and not hooks & EVERY_START_HOOKS and (bool(hypervisors) or bool(architectures))
                     and set(registries.transports.names()) == builtin_transports
                     and not any(device.option for device in registries.devices))
        entries.append(PluginEntry(ep.name, ep.value, on_demand, hypervisors, architectures).as_data())
    files.discard("")
    data = (FORMAT, _key(found), sorted(_stamp(path) for path in files), entries)
    path = index_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as stream:
            stream.write(marshal.dumps(data))
        os.replace(temporary, path)
    except OSError:
        pass


class LeanPlugins:
    """A boot's plugins: those loaded at every start, and the on-demand ones, loaded when the
    VM turns out to need them (:meth:`load_for`)."""

    def __init__(self, pm: PluginManager, registries: Registries,
                 deferred: Iterable[tuple[EntryPoint, PluginEntry]], indexed: Sequence[PluginEntry] = ()) -> None:
        self.pm = pm
        self.registries = registries
        self.deferred = {ep.name: (ep, entry) for ep, entry in deferred}
        self._indexed = list(indexed)  # every entry point's, in discovery order

    def hypervisor_names(self) -> list[str]:
        """Every backend, loaded or not, in ``--hypervisor auto`` order."""
        return [name for _priority, name, _plugin in self._hypervisor_order()]

    def architecture_names(self) -> list[str]:
        """Every architecture, loaded or not, in the order a full discovery registers them."""
        loaded = self.registries.architectures.names()
        names = [a for entry in self._indexed if not self.pm.is_blocked(entry.name) for a in entry.architectures
                 if a in loaded or entry.name in self.deferred]
        return names + [a for a in loaded if a not in names]

    def _hypervisor_order(self) -> list[tuple[int, str, str | None]]:
        order: list[tuple[int, str, str | None]] = [(h.priority, h.name, None) for h in self.registries.hypervisors]
        order += [(priority, name, plugin) for plugin, (_ep, entry) in self.deferred.items()
                  for name, priority, _arches in entry.hypervisors]
        return sorted(order, key=lambda item: (item[0], item[1]))

    def load_for(self, hypervisor: str, arch: str | None) -> None:
        """Load the deferred plugins a VM on ``hypervisor`` (a name or ``auto``) and ``arch``
        (None: the host's) may use."""
        from vmmkit.machine import host_architecture
        from vmmkit.registry import AUTO

        arch = arch or host_architecture()
        self.load(plugin for plugin, (_ep, entry) in list(self.deferred.items()) if arch in entry.architectures)
        if hypervisor != AUTO:
            self.load(plugin for plugin, (_ep, entry) in list(self.deferred.items())
                      if any(name == hypervisor for name, _p, _a in entry.hypervisors))
            return
        for _priority, name, plugin in self._hypervisor_order():  # as select_hypervisor walks them
            if plugin is not None:
                self.load([plugin])
            backend = self.registries.hypervisors.get(name) if name in self.registries.hypervisors else None
            if backend is None or arch not in backend.architectures:
                continue
            availability = backend.is_available()
            if availability and availability.auto:
                return

    def load_all(self) -> None:
        self.load(list(self.deferred))

    def load(self, names: Iterable[str]) -> None:
        import pluggy

        from vmmkit.errors import PluginError
        from vmmkit.plugin import collect_registries

        eps = [self.deferred.pop(name)[0] for name in list(names) if name in self.deferred]
        if not eps:
            return
        plugins = self.pm.load_entry_points(eps)
        if self.pm.broken:
            raise PluginError("; ".join(broken.describe() for broken in self.pm.broken))
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc)) from exc
        collect_registries(self.pm, registries=self.registries, plugins=plugins)


def lean_plugins() -> tuple[PluginManager, Registries, LeanPlugins | None]:
    """The plugin manager and registries of a boot: with a valid index, without the on-demand
    plugins (the :class:`LeanPlugins` loads them when needed); else after a full discovery,
    which writes the index (and the third element is None)."""
    from vmmkit.plugin import ENTRY_POINT_GROUP, collect_registries, make_plugin_manager

    found = entry_points(ENTRY_POINT_GROUP)
    index = read(found)
    if index is None:
        pm = make_plugin_manager(found=found)
        registries = collect_registries(pm)
        write(pm, found)
        return pm, registries, None
    deferred = [(ep, index[ep.name]) for ep in found if index[ep.name].on_demand]
    pm = make_plugin_manager(found=found, defer={ep.name for ep, _entry in deferred})
    deferred = [(ep, entry) for ep, entry in deferred if not pm.is_blocked(ep.name)]
    registries = collect_registries(pm)
    return pm, registries, LeanPlugins(pm, registries, deferred, [index[ep.name] for ep in found])
