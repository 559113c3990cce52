"""Which KVM backend the plugin registers as ``kvm``: the host's architecture decides."""

from __future__ import annotations

import pytest
from vmmkit_kvm import plugin

from vmmkit.registry import Registry


def registered(monkeypatch: pytest.MonkeyPatch, machine: str) -> type:
    monkeypatch.setattr(plugin.platform, "machine", lambda: machine)
    registry: Registry[type] = Registry("hypervisor")
    plugin.vmmkit_register_hypervisors(registry=registry)
    return registry.get("kvm")


def test_an_arm64_host_gets_the_arm64_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmmkit_kvm.arm64 import KvmArm64Hypervisor

    assert registered(monkeypatch, "aarch64") is KvmArm64Hypervisor


def test_an_x86_64_host_gets_the_x86_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmmkit_kvm.hypervisor import KvmHypervisor

    assert registered(monkeypatch, "x86_64") is KvmHypervisor


def test_pvm_quirks_are_refused_by_name_on_arm64() -> None:
    from vmmkit_kvm.arm64 import _refuse_quirks

    from vmmkit.errors import CapabilityError

    with pytest.raises(CapabilityError, match="x86 KVM_PVM"):
        _refuse_quirks("pvm")
    _refuse_quirks("none")
