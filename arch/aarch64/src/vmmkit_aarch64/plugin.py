from __future__ import annotations

from vmmkit import hookimpl
from vmmkit.registry import Registry
from vmmkit_aarch64.arch import Aarch64


@hookimpl
def vmmkit_register_architectures(registry: Registry) -> None:  # type: ignore[type-arg]
    registry.add(Aarch64)
