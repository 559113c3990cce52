"""The AArch64 VM's default virtio transport follows what the backend offers: virtio-pci where
it created the GICv3 ITS (MSI-X: KVM), virtio-mmio where it has none (emu). The choice is made
once per VM in ``configure_vm``, before the machine builds its device manager
(``vmmkit.machine``); ``--platform virtio_transport=`` still wins. On KVM-arm64 for real:
tests/lab/test_lab_its_aarch64.py."""

from __future__ import annotations

import attrs
import pytest
from aarch64_helpers import make_config
from test_aarch64_its import ItsVm
from vmmkit_aarch64.arch import Aarch64

from vmmkit.config import PlatformConfig
from vmmkit.device_manager import default_virtio_transport


@pytest.mark.parametrize(("its", "transport"), [(True, "pci"), (False, "mmio")])
def test_the_default_is_pci_exactly_where_the_backend_has_an_its(its: bool, transport: str) -> None:
    arch = Aarch64()
    assert arch.default_virtio_transport == "mmio"  # before the backend is known (preload)
    arch.configure_vm(ItsVm(its), None, make_config())  # type: ignore[arg-type]
    assert arch.default_virtio_transport == transport
    assert Aarch64.default_virtio_transport == "mmio"  # one VM's choice is not every VM's


def test_a_vm_without_an_its_after_one_with_it_is_mmio_again() -> None:
    arch = Aarch64()
    arch.configure_vm(ItsVm(True), None, make_config())  # type: ignore[arg-type]
    arch.configure_vm(ItsVm(False), None, make_config())  # type: ignore[arg-type]
    assert arch.default_virtio_transport == "mmio"


@pytest.mark.parametrize("chosen", ["mmio", "pci"])
def test_the_configuration_overrides_the_architectures_default(chosen: str) -> None:
    arch = Aarch64()
    config = make_config()
    arch.configure_vm(ItsVm(chosen == "mmio"), None, config)  # type: ignore[arg-type]
    config = attrs.evolve(config, platform=PlatformConfig(virtio_transport=chosen))
    assert default_virtio_transport(config, arch.default_virtio_transport) == chosen
