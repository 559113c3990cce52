"""The guest-physical layout, the platform devices and the plugin's hooks."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest
from vmmkit_x86_64 import layout as L
from vmmkit_x86_64 import plugin
from vmmkit_x86_64.arch import X86_64
from vmmkit_x86_64.platform import kernel_cmdline
from x86_helpers import build_elf, make_config, pc_devices, placed

from vmmkit.config import DebugConsoleConfig, SerialConfig
from vmmkit.errors import BootError, VmmError
from vmmkit.memory import MemoryRange
from vmmkit.plugin import collect_registries, make_plugin_manager

MiB = 1 << 20
GiB = 1 << 30


def assert_disjoint(named: dict[str, MemoryRange]) -> None:
    for (a, ra), (b, rb) in combinations(named.items(), 2):
        assert not ra.overlaps(rb), f"{a} {ra} overlaps {b} {rb}"


@pytest.mark.parametrize("size", [2 * MiB, 64 * MiB, 3 * GiB, 3 * GiB + 4096, 16 * GiB, 1 << 40])
def test_no_placement_overlaps(size: int) -> None:
    layout = L.memory_layout(size)
    assert_disjoint(L.fixed_regions(layout))
    assert sum(r.size for r in layout.ram) == size
    assert layout.ram[0].start == 0 and layout.ram[0].end <= 3 * GiB
    if size > 3 * GiB:
        assert layout.ram[1].start == 4 * GiB
    assert layout.pci_mmio64 is not None and layout.pci_mmio64.start >= layout.ram[-1].end
    assert layout.pci_mmio64.start % GiB == 0
    # Everything device-like sits in the 32-bit hole, below the IOAPIC.
    for region in (layout.device_mmio, layout.pci_mmio32, layout.pci_ecam, L.HYPERVISOR_PRIVATE):
        assert 3 * GiB <= region.start and region.end <= L.IOAPIC_START


def test_boot_area_is_below_1mib_and_disjoint() -> None:
    area = L.boot_area()
    assert_disjoint(area)
    for region in area.values():
        assert region.end <= L.HIGH_RAM_START


def test_port_and_interrupt_ranges() -> None:
    layout = L.memory_layout(GiB)
    assert layout.pio == MemoryRange(0x1000, 0xF000)
    assert layout.device_irqs == (5, 23)
    assert layout.msi_gsis[0] == 24
    assert layout.pci_ecam == MemoryRange(0xE8000000, 256 * MiB)


def test_mmio64_is_clipped_to_the_physical_address_width() -> None:
    assert L.memory_layout(GiB, max_phys_bits=34).pci_mmio64 == MemoryRange(4 * GiB, 12 * GiB)
    assert L.memory_layout(GiB, max_phys_bits=32).pci_mmio64 is None


def test_too_little_ram() -> None:
    with pytest.raises(VmmError, match="at least 2 MiB"):
        L.memory_layout(MiB)


def test_layout_from_config() -> None:
    config = make_config(memory="5G")
    assert X86_64().memory_layout(config) == L.memory_layout(5 * GiB, config.cpus.max_phys_bits)


# -- platform devices ---------------------------------------------------------------------------


def test_platform_devices() -> None:
    config = make_config()
    requests = {r.id: r for r in X86_64().platform_devices(config)}
    expected = {
        "_serial": ("serial-16550", (0x3F8, 8), 4),
        "_rtc": ("rtc-cmos", (0x70, 2), 8),
        "_i8042": ("i8042", (0x60, 5), 1),
        "_debug_port": ("debug-port", (0x80, 1), None),
        "_debug_exit": ("debug-exit", (0xF4, 4), None),
        "_acpi_pm": ("acpi-pm", (0x600, 8), 9),
        "_acpi_ged": ("acpi-ged", None, 23),
    }
    assert {k: (r.type, r.pio, r.irq) for k, r in requests.items()} == expected
    assert requests["_acpi_ged"].mmio == (L.DEVICE_MMIO.end - 0x1000, 1)
    assert requests["_serial"].config is config.serial
    assert "_debug_console" not in requests  # off by default
    ports = {k: MemoryRange(*r.pio) for k, r in requests.items() if r.pio}
    ports["pci-config"] = MemoryRange(0xCF8, 8)
    ports["pci-bars"] = L.PCI_PIO
    assert_disjoint(ports)
    irqs = [r.irq for r in requests.values() if r.irq is not None]
    assert len(irqs) == len(set(irqs))


def test_debug_console_and_serial_follow_their_config() -> None:
    import attrs

    config = attrs.evolve(
        make_config(),
        serial=SerialConfig(mode="Off"),
        debug_console=DebugConsoleConfig(mode="Tty", iobase=0x402),
    )
    requests = {r.id: r for r in X86_64().platform_devices(config)}
    assert "_serial" not in requests
    assert requests["_debug_console"].type == "debug-console"
    assert requests["_debug_console"].pio == (0x402, 1)
    assert requests["_debug_console"].config is config.debug_console


def test_kernel_cmdline() -> None:
    devices = pc_devices()
    assert X86_64().kernel_cmdline(make_config(cmdline="console=ttyS0"), devices) == (
        "console=ttyS0 virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6"
    )
    assert kernel_cmdline(None, [placed("virtio-mmio", mmio=(0xD0000000, 0x200), irq=20)]) == (
        "virtio_mmio.device=512@0xd0000000:20"
    )
    # Idempotent, and init arguments after "--" stay last.
    once = kernel_cmdline("quiet -- single", devices)
    assert once == ("quiet virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6 -- single")
    assert kernel_cmdline(once, devices) == once
    assert kernel_cmdline("quiet", []) == "quiet"
    # "--" splits only as a whole word, whatever whitespace bounds it.
    ours = "virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6"
    assert kernel_cmdline("a--b --c", devices) == f"a--b --c {ours}"
    assert kernel_cmdline("a\t--\tb -- c", devices) == f"a {ours}\t--\tb -- c"
    assert kernel_cmdline("a --", devices) == f"a {ours} --"
    assert kernel_cmdline("-- single", devices) == f"{ours} -- single"
    assert kernel_cmdline(kernel_cmdline("-- single", devices), devices) == f"{ours} -- single"


# -- the plugin ---------------------------------------------------------------------------------


def test_plugin_registers_the_architecture() -> None:
    pm = make_plugin_manager(autoload=False, plugins=[plugin])
    registries = collect_registries(pm)
    assert registries.architectures.get("x86_64") is X86_64


def test_load_kernel_hooks(tmp_path: Path, guest) -> None:
    pm = make_plugin_manager(autoload=False, plugins=[plugin])
    layout, memory = guest()
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(build_elf([(0x200000, b"\x90", 0x1000)], entry=0x200000))
    config = make_config(kernel)
    header = kernel.read_bytes()[:65536]
    call = pm.hook.vmmkit_load_kernel
    boot = call(arch="x86_64", path=kernel, header=header, memory=memory, config=config, layout=layout)
    assert boot.protocol == "linux64"
    assert (
        call(arch="aarch64", path=kernel, header=header, memory=memory, config=config, layout=layout) is None
    )
    junk = tmp_path / "junk"
    junk.write_bytes(b"junk")
    with pytest.raises(BootError, match="not an ELF, bzImage or PVH kernel"):
        call(arch="x86_64", path=junk, header=b"junk", memory=memory, config=config, layout=layout)
    assert (
        call(arch="aarch64", path=junk, header=b"junk", memory=memory, config=config, layout=layout) is None
    )


def test_an_earlier_loader_wins_over_the_fallback(tmp_path: Path, guest) -> None:
    from vmmkit import hookimpl

    class ThirdParty:
        @hookimpl
        def vmmkit_load_kernel(self, arch, path, header, memory, config, layout):  # noqa: ANN001
            return "mine" if header.startswith(b"MINE") else None

    pm = make_plugin_manager(autoload=False, plugins=[plugin, ThirdParty()])
    layout, memory = guest()
    result = pm.hook.vmmkit_load_kernel(
        arch="x86_64", path=tmp_path / "x", header=b"MINE", memory=memory, config=make_config(), layout=layout
    )
    assert result == "mine"
