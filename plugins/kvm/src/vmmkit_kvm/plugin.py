"""The vmmkit plugin: registers :class:`~vmmkit_kvm.hypervisor.KvmHypervisor`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmmkit import hookimpl

if TYPE_CHECKING:
    from vmmkit.hypervisor import Hypervisor
    from vmmkit.registry import Registry


@hookimpl
def vmmkit_register_hypervisors(registry: Registry[type[Hypervisor]]) -> None:
    """Register the KVM backend (``--hypervisor kvm``)."""
    from vmmkit_kvm.hypervisor import KvmHypervisor

    registry.add(KvmHypervisor)
