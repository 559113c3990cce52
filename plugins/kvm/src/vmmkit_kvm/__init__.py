"""vmmkit-kvm: the Linux KVM backend for vmmkit.

Registered through the ``vmmkit`` entry-point group (:mod:`vmmkit_kvm.plugin`); the public
classes live in :mod:`vmmkit_kvm.hypervisor`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["KvmHypervisor", "KvmVm", "KvmVcpu", "__version__"]


def __getattr__(name: str) -> object:
    # Lazy, so that importing the plugin module (entry-point discovery) does not load the
    # native extension until a backend is actually wanted.
    if name in ("KvmHypervisor", "KvmVm", "KvmVcpu"):
        from vmmkit_kvm import hypervisor

        return getattr(hypervisor, name)
    raise AttributeError(name)
