"""The GICv3 ITS: the device tree describes it (and PCI hosts map their requester IDs to it) only
when the backend created one; the arm64 KVM backend's routing-table and ``kvm_msi`` layouts
checked against Linux's UAPI (include/uapi/linux/kvm.h: struct kvm_irq_routing_entry, 48 bytes;
struct kvm_msi, 32 bytes). That backend runs for real in the lab (tests/lab/test_lab_its_aarch64.py)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import libfdt
import pytest
from aarch64_helpers import make_config, placed
from vmmkit_aarch64 import layout as L
from vmmkit_aarch64.arch import Aarch64
from vmmkit_aarch64.fdt import build_fdt
from vmmkit_kvm import arm64 as K

from vmmkit.aarch64 import mpidr_for
from vmmkit.bus import Bus
from vmmkit.memory import MemoryRange
from vmmkit.pci.host import PciRoot

RAM = (MemoryRange(L.RAM_START, 256 << 20),)
ITS_NODE = f"/intc@{L.GIC_DIST.start:x}/msi-controller@{L.GIC_ITS.start:x}"
PCI_NODE = f"/pcie@{L.PCI_ECAM.start:x}"


def prop(fdt: libfdt.Fdt, path: str, name: str) -> bytes:
    return bytes(fdt.getprop(fdt.path_offset(path), name))


def cells(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 4], "big") for i in range(0, len(data), 4)]


def strings(data: bytes) -> list[str]:
    return data.rstrip(b"\0").decode().split("\0")


def vm_fdt(its: MemoryRange | None) -> bytes:
    root = PciRoot(mmio_bus=Bus("mmio"), pio_bus=Bus("pio"), mmio32=L.PCI_MMIO32, ecam=L.PCI_ECAM)
    host = placed("pci-host", mmio=(L.PCI_ECAM.start, L.PCI_ECAM.size), device=root)
    return build_fdt(ram=RAM, mpidrs=[mpidr_for(0), mpidr_for(1)], cmdline="", initrd=None,
                     devices=[host], its=its)


def test_the_its_is_a_child_of_the_gic_and_pci_maps_requester_ids_to_it(tmp_path: Path) -> None:
    blob = vm_fdt(L.GIC_ITS)
    fdt = libfdt.Fdt(blob)
    assert strings(prop(fdt, ITS_NODE, "compatible")) == ["arm,gic-v3-its"]
    assert prop(fdt, ITS_NODE, "msi-controller") == b""
    assert cells(prop(fdt, ITS_NODE, "#msi-cells")) == [1]
    assert cells(prop(fdt, ITS_NODE, "reg")) == [0, 0x0808_0000, 0, 0x2_0000]
    its = cells(prop(fdt, ITS_NODE, "phandle"))[0]
    assert its != cells(prop(fdt, f"/intc@{L.GIC_DIST.start:x}", "phandle"))[0]
    assert cells(prop(fdt, PCI_NODE, "msi-map")) == [0, its, 0, 0x1_0000]
    if shutil.which("dtc"):
        (tmp_path / "vm.dtb").write_bytes(blob)
        result = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(tmp_path / "vm.dtb")],
                                capture_output=True, text=True)
        assert result.returncode == 0 and "warning" not in result.stderr.lower(), result.stderr


def test_no_its_no_msi_map() -> None:
    fdt = libfdt.Fdt(vm_fdt(None))
    with pytest.raises(libfdt.FdtException):
        fdt.path_offset(ITS_NODE)
    with pytest.raises(libfdt.FdtException):
        fdt.getprop(fdt.path_offset(PCI_NODE), "msi-map")


def test_its_layout_fits_between_distributor_and_redistributors() -> None:
    assert L.GIC_DIST.end <= L.GIC_ITS.start and L.GIC_ITS.end <= L.GIC_REDIST_BASE
    assert L.GIC_ITS.start % 0x1_0000 == 0


class ItsVm:
    firmware_in_hypervisor = True

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.its: int | None = None

    def set_firmware_handler(self, handler: object) -> None: ...

    def set_gic_layout(self, distributor: int, redistributors: int) -> None: ...

    def set_gic_its(self, base: int) -> bool:
        self.its = base
        return self.answer

    def setup_interrupt_controller(self) -> None:
        assert self.its is not None  # asked for before the GIC is created


@pytest.mark.parametrize("answer", [True, False])
def test_the_architecture_asks_the_backend_for_the_its(answer: bool) -> None:
    arch, vm = Aarch64(), ItsVm(answer)
    arch.configure_vm(vm, None, make_config())  # type: ignore[arg-type]
    assert vm.its == L.GIC_ITS.start
    assert arch._its is answer


def test_emu_has_no_its() -> None:
    emu = pytest.importorskip("vmmkit_emu.arm64")
    vm = object.__new__(emu.Arm64Vm)
    assert vm.set_gic_its(L.GIC_ITS.start) is False


# -- the KVM backend's structures (Linux UAPI) ---------------------------------------------------


def test_its_ioctls_and_constants_match_linux() -> None:
    assert K.KVM_SET_GSI_ROUTING == 0x4008AE6A
    assert K.KVM_SIGNAL_MSI == 0x4020AEA5
    assert K.KVM_DEV_TYPE_ARM_VGIC_ITS == 8 and K.KVM_VGIC_ITS_ADDR_TYPE == 4
    assert (K.KVM_CAP_IRQ_ROUTING, K.KVM_CAP_SIGNAL_MSI, K.KVM_CAP_MSI_DEVID) == (25, 77, 131)


def test_routing_table_keeps_the_default_spi_routes_beside_the_msi_ones() -> None:
    table = K.routing_table({96: (0x0809_0040, 3, 0x08), 97: (0x1_0809_0040, 4, 0x10)})
    count, flags = struct.unpack_from("<II", table)
    spis = K.GIC_NR_IRQS - 32
    assert flags == 0 and count == spis  # 224 KVM GSIs: 222 SPI routes + 2 MSI routes
    assert len(table) == 8 + count * K.ROUTING_ENTRY_SIZE
    entries = [table[8 + i * 48 : 8 + (i + 1) * 48] for i in range(count)]
    gsi, kind, eflags, _, chip, pin = struct.unpack_from("<IIIIII", entries[0])
    assert (gsi, kind, eflags, chip, pin) == (0, K.KVM_IRQ_ROUTING_IRQCHIP, 0, 0, 0)
    irqchip_gsis = {struct.unpack_from("<I", e)[0] for e in entries if struct.unpack_from("<I", e, 4)[0] == 1}
    assert 64 not in irqchip_gsis and 65 not in irqchip_gsis and 63 in irqchip_gsis and 66 in irqchip_gsis
    assert struct.unpack_from("<IIIIIIII", entries[-2]) == (64, K.KVM_IRQ_ROUTING_MSI, K.KVM_MSI_VALID_DEVID, 0,
                                                             0x0809_0040, 0, 3, 0x08)
    assert struct.unpack_from("<IIIIIIII", entries[-1])[4:] == (0x0809_0040, 1, 4, 0x10)


def test_kvm_msi_layout() -> None:
    raw = K.kvm_msi(0x0809_0040, 9, 0x28)
    assert len(raw) == 32
    assert struct.unpack("<IIIII12x", raw) == (0x0809_0040, 0, 9, K.KVM_MSI_VALID_DEVID, 0x28)


def test_msis_without_an_its_or_a_device_id_are_refused_by_name() -> None:
    from vmmkit.errors import CapabilityError

    vm = object.__new__(K.KvmArm64Vm)
    vm._its_fd = None
    with pytest.raises(CapabilityError, match="GICv3 ITS"):
        vm.signal_msi(0x0809_0040, 1, devid=8)
    vm._its_fd = -1  # never used: the check comes first
    with pytest.raises(CapabilityError, match="device ID"):
        vm.set_msi_route(96, 0x0809_0040, 1)
