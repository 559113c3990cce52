"""The architecture: platform devices, boot preparation, vCPU set-up, the --arch guess."""

from __future__ import annotations

import argparse
from pathlib import Path

import attrs
import libfdt
import pytest
from aarch64_helpers import FakeVcpu, make_config, placed, write_image
from vmmkit_aarch64 import image, plugin
from vmmkit_aarch64 import layout as L
from vmmkit_aarch64.arch import Aarch64, platform_devices
from vmmkit_aarch64.psci import PsciPower

from vmmkit.aarch64 import BOOT_PSTATE, PowerState, SysReg
from vmmkit.config import DebugConsoleConfig, NotSupportedYet
from vmmkit.errors import BootError, CapabilityError


class FakeVm:
    firmware_in_hypervisor = False

    def __init__(self) -> None:
        self.handler = None
        self.irqchip = False

    def setup_interrupt_controller(self) -> None:
        self.irqchip = True

    def set_firmware_handler(self, handler) -> None:
        self.handler = handler

    def set_gic_layout(self, distributor: int, redistributors: int) -> None:
        self.gic = (distributor, redistributors)

    def set_gic_its(self, base: int) -> bool:
        self.its = base
        return False


def test_platform_devices_and_their_placements() -> None:
    requests = {r.type: r for r in platform_devices(make_config())}
    assert requests["pl011"].mmio == (0x0900_0000, 0x1000) and requests["pl011"].irq == 33
    assert requests["rtc-pl031"].mmio == (0x0901_0000, 0x1000) and requests["rtc-pl031"].irq == 34
    assert requests["debug-exit"].mmio == (0x0902_0000, 0x1000)
    assert requests["psci"].mmio == (0x0903_0000, 0x1000)


@pytest.mark.parametrize(("change", "named"), [
    ({"pvpanic": True}, "pvpanic: not supported yet"),
    ({"debug_console": DebugConsoleConfig(mode="Tty")}, "debug_console: not supported yet"),
])
def test_x86_port_devices_are_refused_not_left_out(change: dict[str, object], named: str) -> None:
    """--pvpanic and --debug-console are x86 I/O-port devices: an AArch64 VM refuses them by name
    (issue #12: nothing accepted in silence)."""
    with pytest.raises(NotSupportedYet) as info:
        platform_devices(attrs.evolve(make_config(), **change))
    assert str(info.value).startswith(named)


def test_configure_vm_installs_psci_for_a_trapping_backend() -> None:
    arch, vm = Aarch64(), FakeVm()
    arch.configure_vm(vm, None, make_config())  # type: ignore[arg-type]
    assert vm.irqchip and vm.handler is arch.psci
    assert vm.gic == (0x0800_0000, 0x080A_0000)


def boot(tmp_path: Path, guest, cpus: int = 2):
    layout, memory = guest()
    kernel = write_image(tmp_path / "Image")
    config = make_config(kernel, cmdline="hello", boot_vcpus=cpus)
    arch = Aarch64()
    arch.configure_vm(FakeVm(), None, config)  # type: ignore[arg-type]
    loaded = image.load(kernel, memory, config, layout)
    power = PsciPower("_psci", lambda reason: None, lambda reason: None)
    devices = [placed("pl011", mmio=(0x0900_0000, 0x1000), irq=33), placed("psci", mmio=(0x0903_0000, 0x1000),
                                                                             device=power)]
    info = arch.prepare_boot(memory, config, layout, loaded, devices)
    return arch, config, memory, info, power


def test_prepare_boot_writes_the_dtb_and_binds_psci(tmp_path: Path, guest) -> None:
    arch, _, memory, info, power = boot(tmp_path, guest)
    fdt_address = info.extra["fdt"]
    blob = memory.read(fdt_address, info.extra["fdt_size"])
    fdt = libfdt.Fdt(blob)
    assert bytes(fdt.getprop(fdt.path_offset("/chosen"), "bootargs")) == b"hello\0"
    assert fdt.path_offset("/cpus/cpu@1") > 0
    assert arch.psci.power is power
    assert arch.psci.ram == (info.kernel.__class__(L.RAM_START, 64 << 20),)


def test_the_boot_cpu_enters_with_x0_the_dtb_and_the_others_stay_off(tmp_path: Path, guest) -> None:
    arch, config, _, info, _ = boot(tmp_path, guest)
    boot_cpu, second = FakeVcpu(0), FakeVcpu(1)
    boot_cpu.sysregs[SysReg.SCTLR_EL1] = 0x00C5_183D  # MMU and caches left on by a previous run
    arch.configure_vcpu(boot_cpu, 0, None, config, info)  # type: ignore[arg-type]
    arch.configure_vcpu(second, 1, None, config, info)  # type: ignore[arg-type]
    assert boot_cpu.regs.pc == info.entry == L.RAM_START + 0x80000
    assert boot_cpu.regs.x[:4] == (info.extra["fdt"], 0, 0, 0)
    assert boot_cpu.regs.pstate == BOOT_PSTATE
    assert boot_cpu.sysregs[SysReg.SCTLR_EL1] & 0x1005 == 0
    assert second.power_state() is PowerState.OFF
    assert arch.psci.vcpus == {0: boot_cpu, 1: second}


def test_a_vcpu_without_the_aarch64_interface_is_refused(tmp_path: Path, guest) -> None:
    arch, config, _, info, _ = boot(tmp_path, guest)
    with pytest.raises(CapabilityError, match="AArch64 register interface"):
        arch.configure_vcpu(object(), 0, None, config, info)  # type: ignore[arg-type]


def test_another_boot_protocol_is_refused(tmp_path: Path, guest) -> None:
    import attrs

    arch, config, memory, info, _ = boot(tmp_path, guest)
    layout, _ = guest()
    with pytest.raises(BootError, match="arm64 Images"):
        arch.prepare_boot(memory, config, layout, attrs.evolve(info, protocol="pvh"), [])


def test_too_many_vcpus_for_the_redistributor_window() -> None:
    with pytest.raises(CapabilityError, match="redistributor"):
        Aarch64().memory_layout(make_config(boot_vcpus=L.MAX_VCPUS + 1))


@pytest.mark.parametrize(("content", "reason"), [(b"\x7fELF" + bytes(60), "ELF"), (b"\x1f\x8b" + bytes(62), "gzip"),
                                                  (bytes(64), "not an arm64 Image")])
def test_unrecognised_images_get_a_clear_error(tmp_path: Path, content: bytes, reason: str) -> None:
    with pytest.raises(BootError, match=reason):
        plugin.reject_unknown_image("aarch64", tmp_path / "k", content, None, None, None)  # type: ignore[arg-type]
    assert plugin.reject_unknown_image("x86_64", tmp_path / "k", content, None, None, None) is None  # type: ignore[arg-type]


def test_an_arm64_image_selects_the_aarch64_architecture(tmp_path: Path) -> None:
    kernel = write_image(tmp_path / "Image")
    options = argparse.Namespace(arch=None, kernel=str(kernel))
    plugin.vmmkit_configure(options)
    assert options.arch == "aarch64"
    chosen = argparse.Namespace(arch="x86_64", kernel=str(kernel))
    plugin.vmmkit_configure(chosen)
    assert chosen.arch == "x86_64"
    other = argparse.Namespace(arch=None, kernel=str(tmp_path / "missing"))
    plugin.vmmkit_configure(other)
    assert other.arch is None
