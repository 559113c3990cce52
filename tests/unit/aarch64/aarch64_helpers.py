"""Shared by the AArch64 unit tests: configs, placed devices, a fake vCPU, arm64 Image files."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from vmmkit.aarch64 import BOOT_PSTATE, CoreRegisters, PowerState, SysReg, mpidr_for
from vmmkit.config import CpusConfig, MemoryConfig, PayloadConfig, VmConfig
from vmmkit.device import DeviceRequest, PlacedDevice


def make_config(kernel: str | Path = "/nonexistent/Image", *, cmdline: str | None = "console=ttyAMA0",
                initramfs: str | Path | None = None, memory: str | int = "64M", boot_vcpus: int = 1) -> VmConfig:
    return VmConfig(
        payload=PayloadConfig(kernel=str(kernel), cmdline=cmdline,
                              initramfs=None if initramfs is None else str(initramfs)),
        memory=MemoryConfig(size=memory),
        cpus=CpusConfig(boot_vcpus=boot_vcpus, max_vcpus=boot_vcpus),
    )


def placed(kind: str, *, mmio: tuple[int, int] | None = None, irq: int | None = None,
           device: Any = None) -> PlacedDevice:
    return PlacedDevice(device, DeviceRequest(kind, f"_{kind}"), kind, mmio=mmio, irq=irq)


def image_header(*, text_offset: int = 0x80000, image_size: int = 0x200000, flags: int = 0x2,
                 magic: bytes = b"ARM\x64") -> bytes:
    """A 64-byte arm64 Image header (code0 = a branch over it)."""
    return (struct.pack("<IIQQQQQQ", 0x14000010, 0, text_offset, image_size, flags, 0, 0, 0)
            + magic + b"\0\0\0\0")


def write_image(path: Path, body: bytes = b"\x1f\x20\x03\xd5" * 64, **header: Any) -> Path:
    path.write_bytes(image_header(**header) + body)
    return path


class FakeVcpu:
    """An :class:`vmmkit.aarch64.Aarch64Vcpu` that records what is done to it."""

    def __init__(self, index: int, *, on: bool = True) -> None:
        self.index = index
        self.regs = CoreRegisters()
        self.sysregs: dict[SysReg, int] = {SysReg.SCTLR_EL1: 0x00C5_0838}
        self.state = PowerState.ON if on else PowerState.OFF
        self.started: list[tuple[int, int]] = []

    def get_core_registers(self) -> CoreRegisters:
        return self.regs

    def set_core_registers(self, regs: CoreRegisters) -> None:
        self.regs = regs

    def get_sys_reg(self, reg: SysReg) -> int:
        return self.sysregs.get(reg, 0)

    def set_sys_reg(self, reg: SysReg, value: int) -> None:
        self.sysregs[reg] = value

    def mpidr(self) -> int:
        return mpidr_for(self.index)

    def power_state(self) -> PowerState:
        return self.state

    def power_on(self, entry: int, context: int) -> None:
        self.started.append((entry, context))
        self.regs = CoreRegisters(x=(context,), pc=entry, pstate=BOOT_PSTATE)
        self.state = PowerState.ON

    def power_off(self) -> None:
        self.state = PowerState.OFF
