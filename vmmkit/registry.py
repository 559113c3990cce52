"""Registries: how a user's choice of backend, architecture or device type is resolved.

Plugins fill them from their ``vmmkit_register_*`` hooks; the choice is made by name (or
``auto``), never by pluggy's call order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from vmmkit.errors import RegistryError

if TYPE_CHECKING:
    from vmmkit.arch import Architecture
    from vmmkit.device import DeviceType
    from vmmkit.hypervisor import Hypervisor
    from vmmkit.transport import Transport


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)

AUTO = "auto"


class Registry(Generic[T]):
    """Classes keyed by their ``name``, remembering which plugin registered each."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        self.current_plugin = "?"

    def add(self, item: T) -> T:
        name = item.name
        if name in self._items:
            raise RegistryError(
                f"{self.kind} {name!r} registered twice (by {self._owners[name]} and {self.current_plugin})"
            )
        self._items[name] = item
        self._owners[name] = self.current_plugin
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r} (registered: {known})") from None

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)


class Registries:
    """Everything the plugins registered, and the core's own transports."""

    def __init__(self) -> None:
        from vmmkit.transport import BUILTIN_TRANSPORTS

        self.hypervisors: Registry[type[Hypervisor]] = Registry("hypervisor")
        self.architectures: Registry[type[Architecture]] = Registry("architecture")
        self.devices: Registry[type[DeviceType]] = Registry("device type")
        self.transports: Registry[type[Transport]] = Registry("transport")
        self.transports.current_plugin = "vmmkit"
        for transport in BUILTIN_TRANSPORTS:
            self.transports.add(transport)

    def all(self) -> tuple[Registry[Any], ...]:
        return self.hypervisors, self.architectures, self.devices, self.transports

    def hypervisor_order(self) -> list[type[Hypervisor]]:
        """Backends in the order ``auto`` tries them: by ``priority`` (lower first), then name.

        Hardware backends use 10-49 (kvm 10, mshv 20); software emulation 90 and above."""
        return sorted(self.hypervisors, key=lambda h: (h.priority, h.name))

    def select_hypervisor(self, name: str = AUTO, arch: str | None = None) -> type[Hypervisor]:
        """The backend called ``name``; for ``auto`` the first usable one in priority order
        that can run ``arch``."""
        if name != AUTO:
            return self.hypervisors.get(name)
        reasons = []
        for backend in self.hypervisor_order():
            if arch is not None and arch not in backend.architectures:
                reasons.append(f"{backend.name}: cannot run {arch} guests")
                continue
            availability = backend.is_available()
            if availability and availability.auto:
                return backend
            if availability:
                reasons.append(f"{backend.name}: only when named ({availability.reason})")
                continue
            reasons.append(f"{backend.name}: {availability.reason}")
        detail = "; ".join(reasons) or "no hypervisor plugin is installed"
        raise RegistryError(f"no usable hypervisor on this host ({detail})")
