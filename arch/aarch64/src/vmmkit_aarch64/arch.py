"""The AArch64 architecture: layout and platform devices. Loading an arm64 Image, the device
tree and vCPU set-up are not written yet; boot fails with a clear error instead."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from vmmkit.arch import Architecture, BootInfo, MemoryLayout
from vmmkit.device import DeviceRequest, PlacedDevice
from vmmkit.errors import BootError
from vmmkit_aarch64 import layout


class Aarch64(Architecture):
    name: ClassVar[str] = "aarch64"
    description: ClassVar[str] = "AArch64 (layout only: Image boot and device tree not yet implemented)"

    def memory_layout(self, config: Any) -> MemoryLayout:
        return layout.memory_layout(config.memory.size)

    def platform_devices(self, config: Any) -> Sequence[DeviceRequest]:
        return ()

    def configure_vm(self, vm: Any, hypervisor: Any, config: Any) -> None:
        vm.setup_interrupt_controller()

    def prepare_boot(self, memory: Any, config: Any, layout: MemoryLayout, boot: BootInfo,
                     devices: Sequence[PlacedDevice]) -> BootInfo:
        raise BootError(config.payload.kernel, "AArch64 boot (device tree generation) is not implemented yet")

    def configure_vcpu(self, vcpu: Any, index: int, hypervisor: Any, config: Any, boot: BootInfo) -> None:
        raise BootError(config.payload.kernel, "AArch64 vCPU set-up is not implemented yet")
