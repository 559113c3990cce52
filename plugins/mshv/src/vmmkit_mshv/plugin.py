from __future__ import annotations

from vmmkit import hookimpl
from vmmkit.registry import Registry
from vmmkit_mshv.hypervisor import MshvHypervisor


@hookimpl
def vmmkit_register_hypervisors(registry: Registry) -> None:  # type: ignore[type-arg]
    registry.add(MshvHypervisor)
