"""Contract tests of the VFIO plugin against a **simulated** ``/dev/vfio``
(:mod:`vmmkit_devices.vfio.simulator`): no VFIO device or IOMMU is involved. The guest's side is
real (the device manager, PCI root, buses, a guest's config cycles and MMIO, eventfds, the event
loop, guest RAM), and so is the plugin's kernel side up to the system call: the same struct
bytes reach the simulator that would reach ``ioctl(2)``."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest
from pci_support import eventfd_count, wait_for
from vfio_support import (
    CAP_SATA,
    MSI_ADDRESS,
    NVME_PBA,
    NVME_TABLE,
    NVME_VECTORS,
    Lab,
    VfioVm,
    edu_like,
    io_like,
    nvme_like,
)
from vmmkit_devices.vfio import uapi
from vmmkit_devices.vfio.device import VfioPciFunction

from vmmkit.device_manager import DeviceManager
from vmmkit.errors import DeviceError

MIB = 1 << 20
INTX, MSI, MSIX = uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX


def _nvme(lab: Lab, **kwargs: object) -> tuple[VfioPciFunction, int]:
    placed = lab.place(lab.add(nvme_like()), **kwargs)  # type: ignore[arg-type]
    return placed.device, int(placed.properties["slot"])


# -- placement, identity, DMA ------------------------------------------------------------------


def test_placement_shows_the_device_and_maps_all_guest_ram_for_dma(lab: Lab) -> None:
    function, slot = _nvme(lab)
    guest = lab.machine.guest.function(slot)
    assert (guest.read16(0x00), guest.read16(0x02)) == (0x1B36, 0x0010)
    assert guest.read32(0x08) >> 8 == 0x010802
    assert guest.read8(0x0E) == 0 and guest.read32(0x30) == 0  # type 0, no expansion ROM
    regions = lab.machine.memory.regions
    assert lab.sim.dma == {r.start: (r.size, r.host_address) for r in regions} and len(regions) == 2
    assert lab.sim.iommu == uapi.VFIO_TYPE1v2_IOMMU
    # the kernel's order: container, group into it, IOMMU, DMA, and only then the device fd
    order = [request for _kind, request in lab.sim.calls]
    assert order.index(uapi.VFIO_SET_IOMMU) < order.index(uapi.VFIO_IOMMU_MAP_DMA) < order.index(
        uapi.VFIO_GROUP_GET_DEVICE_FD)
    assert lab.machine.get("vfio0").properties["host_device"] == "0000:01:00.0"
    assert function.counters()["config_reads"] > 0


def test_bar_sizing_as_linux_probes_it(lab: Lab) -> None:
    _function, slot = _nvme(lab)
    bars = lab.machine.guest.function(slot).read_bases()
    assert set(bars) == {0}
    assert bars[0].size == 0x4000 and bars[0].mem64 and not bars[0].io
    edu = lab.place(lab.add(edu_like()), "edu")
    edu_bars = lab.machine.guest.function(int(edu.properties["slot"])).read_bases()
    assert edu_bars[0].size == MIB and not edu_bars[0].mem64


# -- BARs: mmapped into memory slots, or trapped -----------------------------------------------


def test_mappable_bar_parts_become_memory_slots_without_the_msix_pages(lab: Lab) -> None:
    function, slot = _nvme(lab)
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    base = lab.machine.pci_segment().bar_base(function, 0)
    assert base is not None
    assert vm.bar_slots() == [(base, NVME_TABLE)]  # 0x2000-0x4000 (table, PBA) stay trapped
    # the slot is the device's memory: a write through it is what the device (and pread) sees
    (gpa, size, hva) = next(iter(vm.slots.values()))
    ctypes.memmove(hva + 0x10, b"\xde\xad\xbe\xef", 4)
    assert lab.sim.devices["0000:01:00.0"].memory[0][0x10:0x14] == b"\xde\xad\xbe\xef"
    assert lab.machine.get("vfio0").properties["mmap_bars"] == [0]


def test_trapped_bars_go_through_pread_and_pwrite(lab: Lab) -> None:
    placed = lab.place(lab.add(io_like()), "io")
    function: VfioPciFunction = placed.device
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    assert vm.slots == {}  # neither BAR may be mmapped
    root = lab.machine.pci_segment()
    io_base, mem_base = root.bar_base(function, 0), root.bar_base(function, 2)
    assert io_base is not None and mem_base is not None
    device = lab.sim.devices["0000:03:00.0"]
    lab.machine.pio_bus.write(io_base + 4, b"\x5a")
    lab.machine.guest.write(mem_base + 0x20, 4, 0x12345678)
    assert device.bar_writes == [(0, 4, b"\x5a"), (2, 0x20, struct.pack("<I", 0x12345678))]
    device.memory[2][0x30:0x34] = b"\x01\x02\x03\x04"
    assert lab.machine.guest.read(mem_base + 0x30, 4) == 0x04030201
    assert lab.machine.guest.function(int(placed.properties["slot"])).read8(0x3D) == 0  # no INTx pin


def test_excluded_bars_are_trapped(lab: Lab) -> None:
    _nvme(lab, exclude_mmap=frozenset({0}))
    assert lab.machine.vm.slots == {}  # type: ignore[attr-defined]


def test_relocation_and_decode_disable_move_the_slots(lab: Lab) -> None:
    function, slot = _nvme(lab)
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    guest = lab.machine.guest.function(slot)
    device = lab.sim.devices["0000:01:00.0"]
    command = guest.read16(0x04)
    guest.write16(0x04, command & ~0x2)  # memory decode off: the BAR leaves the bus and the slots go
    assert vm.slots == {} and device.config[0x04] & 0x2 == 0  # the command reached the device
    new_base = 0xC800_0000
    guest.write32(0x10, new_base | 0x4)
    guest.write32(0x14, 0)
    guest.write16(0x04, command | 0x6)  # memory and bus master on
    assert vm.bar_slots() == [(new_base, NVME_TABLE)]
    assert device.config[0x04] & 0x6 == 0x6
    assert lab.machine.pci_segment().bar_base(function, 0) == new_base
    assert lab.machine.guest.read(new_base + NVME_TABLE + 12, 4) == 1  # the MSI-X table is there, masked
    guest.write32(0x10, (new_base + 0x1000) | 0x4)  # not aligned to its size: stays where the masks put it
    assert guest.read32(0x10) & ~0xF == new_base


# -- configuration space: capability list, filtering -------------------------------------------


def test_the_capability_walk_hides_what_vmmkit_does_not_expose(lab: Lab) -> None:
    _function, slot = _nvme(lab)
    guest = lab.machine.guest.function(slot)
    found = [guest.find_capability(cap) for cap in (0x01, 0x05, 0x10, 0x11, CAP_SATA)]
    assert all(found[:4]) and found[4] == 0
    raw = lab.sim.devices["0000:01:00.0"].config
    physical = {raw[o]: o for o in range(0x40, 0x100, 4) if raw[o] in (0x01, 0x05, 0x10, 0x11, CAP_SATA)}
    assert found[:4] == [physical[0x01], physical[0x05], physical[0x10], physical[0x11]]  # same offsets
    sata = physical[CAP_SATA]
    assert guest.read32(sata) == 0  # hidden: its header reads as zero
    assert guest.read16(found[2]) == 0x10 | physical[0x11] << 8  # PCIe's next skips SATA
    assert lab.machine.guest.function(slot, ecam=True).read32(0x100) == 0xFFFF_FFFF  # no extended space


def test_read_only_fields_stay_read_only(lab: Lab) -> None:
    _function, slot = _nvme(lab)
    guest = lab.machine.guest.function(slot)
    before = [guest.read32(offset) for offset in (0x00, 0x08, 0x2C, 0x30)]
    for offset in (0x00, 0x08, 0x2C, 0x30):
        guest.write32(offset, 0xFFFF_FFFF)
    assert [guest.read32(offset) for offset in (0x00, 0x08, 0x2C, 0x30)] == before
    device = lab.sim.devices["0000:01:00.0"]
    assert all(offset == 0x04 or offset >= 0x40 for offset, _ in device.config_writes)  # header stayed ours


def test_passthrough_capability_bodies_reach_the_device(lab: Lab) -> None:
    _function, slot = _nvme(lab)
    guest = lab.machine.guest.function(slot)
    pm = guest.find_capability(0x01)
    guest.write16(pm + 4, 0x0003)  # PMCSR: D3hot
    device = lab.sim.devices["0000:01:00.0"]
    assert (pm + 4, b"\x03\x00") in device.config_writes
    device.config[pm + 2] = 0x23
    assert guest.read8(pm + 2) == 0x23


# -- MSI -----------------------------------------------------------------------------------------


def test_msi_is_virtualized_and_routed(lab: Lab) -> None:
    function, slot = _nvme(lab)
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    device = lab.sim.devices["0000:01:00.0"]
    guest = lab.machine.guest.function(slot)
    assert device.triggers[INTX]  # INTx armed at placement
    msi = guest.find_capability(0x05)
    control = guest.read16(msi + 2)
    assert control & 0x0E == 2 << 1 and control & 0x180 == 0x180  # 4 vectors, 64-bit, per-vector mask
    guest.write32(msi + 4, MSI_ADDRESS)
    guest.write32(msi + 8, 0)
    guest.write16(msi + 12, 0x40)
    guest.write32(msi + 16, 0b0010)  # vector 1 masked
    guest.write16(msi + 2, control | 2 << 4 | 1)  # MME = 4 vectors, enable
    assert not device.triggers[INTX]  # one interrupt type at a time
    assert len(device.triggers[MSI]) == 4
    assert [device.triggers[MSI][i] for i in range(4)] == [v.irqfd for v in function.msi_vectors]
    assert device.fire(MSI, 2) and device.fire(MSI, 1)
    assert vm.delivered() == [(MSI_ADDRESS, 0x42)]  # vector 1 is masked
    guest.write32(msi + 16, 0)  # unmask: KVM injects what the eventfd holds when the irqfd comes back
    assert eventfd_count(vm.irqfds[function.msi_vectors[1].gsi]) == 1
    guest.write16(msi + 2, control)  # MSI off: INTx again
    assert device.triggers[MSI] == {} and device.triggers[INTX]


def test_edu_msi_single_vector_without_irqfd(make_lab: object) -> None:
    lab: Lab = make_lab(VfioVm(irqfd=False))  # type: ignore[operator]
    placed = lab.place(lab.add(edu_like()), "edu")
    guest = lab.machine.guest.function(int(placed.properties["slot"]))
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    msi = guest.find_capability(0x05)
    guest.write32(msi + 4, MSI_ADDRESS)
    guest.write16(msi + 8, 0x31)
    guest.write16(msi + 2, 1)
    device = lab.sim.devices["0000:02:00.0"]
    assert device.fire(MSI, 0)  # our eventfd, read by the event loop, becomes vm.signal_msi
    assert wait_for(lambda: vm.msis == [(MSI_ADDRESS, 0x31)])


# -- MSI-X ---------------------------------------------------------------------------------------


def _msix_setup(lab: Lab) -> tuple[VfioPciFunction, int, int, int]:
    function, slot = _nvme(lab)
    base = lab.machine.pci_segment().bar_base(function, 0)
    assert base is not None
    guest = lab.machine.guest
    entry = base + NVME_TABLE + 3 * 16
    guest.write(entry, 4, MSI_ADDRESS)
    guest.write(entry + 4, 4, 0)
    guest.write(entry + 8, 4, 0x55)
    guest.write(entry + 12, 4, 0)  # unmask vector 3
    cap = guest.function(slot).find_capability(0x11)
    guest.function(slot).write16(cap + 2, 0x8000)  # MSI-X enable
    return function, slot, base, cap


def test_msix_table_is_emulated_and_vectors_go_through_irqfds(lab: Lab) -> None:
    function, _slot, base, _cap = _msix_setup(lab)
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    device = lab.sim.devices["0000:01:00.0"]
    assert len(device.triggers[MSIX]) == NVME_VECTORS and not device.triggers[INTX]
    assert device.bar_writes == []  # no guest table write reached the device
    assert device.fire(MSIX, 3)
    assert vm.delivered() == [(MSI_ADDRESS, 0x55)]
    assert device.fire(MSIX, 4) and vm.delivered() == []  # vector 4 is masked
    assert lab.machine.guest.read(base + NVME_TABLE + 3 * 16 + 8, 4) == 0x55
    assert function.msix is not None and not function.msix.masked(3)


def test_msix_masking_and_the_pba(lab: Lab) -> None:
    _function, _slot, base, _cap = _msix_setup(lab)
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    device = lab.sim.devices["0000:01:00.0"]
    guest = lab.machine.guest
    guest.write(base + NVME_TABLE + 3 * 16 + 12, 4, 1)  # mask vector 3
    assert device.fire(MSIX, 3) and vm.delivered() == []
    assert guest.read(base + NVME_PBA, 8) == 1 << 3  # pending
    guest.write(base + NVME_PBA, 8, 0)  # the PBA is read-only
    assert guest.read(base + NVME_PBA, 8) == 1 << 3
    guest.write(base + NVME_TABLE + 3 * 16 + 12, 4, 0)  # unmask: delivered once
    assert vm.delivered() == [(MSI_ADDRESS, 0x55)]
    assert guest.read(base + NVME_PBA, 8) == 0


def test_msix_function_mask_and_disable(lab: Lab) -> None:
    _function, slot, _base, cap = _msix_setup(lab)
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    device = lab.sim.devices["0000:01:00.0"]
    fn = lab.machine.guest.function(slot)
    fn.write16(cap + 2, 0xC000)  # enabled, function masked
    assert device.fire(MSIX, 3) and vm.delivered() == []
    fn.write16(cap + 2, 0x8000)
    assert vm.delivered() == [(MSI_ADDRESS, 0x55)]
    fn.write16(cap + 2, 0)  # disabled: VFIO's vectors released, INTx back
    assert device.triggers[MSIX] == {} and device.triggers[INTX]
    assert not device.fire(MSIX, 3)


# -- INTx ----------------------------------------------------------------------------------------


def test_intx_uses_a_resampling_irqfd(lab: Lab) -> None:
    placed = lab.place(lab.add(edu_like()), "edu")
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    device = lab.sim.devices["0000:02:00.0"]
    gsi = placed.irq
    assert gsi is not None and vm.resample[gsi] == (device.triggers[INTX][0], device.intx_unmask_fd)
    assert lab.machine.guest.function(int(placed.properties["slot"])).read8(0x3D) == 1  # INTA


@pytest.mark.parametrize("vm_options", [{"irqfd": False}, {"refuse_resample": True}], ids=["no-irqfd", "arm64-early"])
def test_intx_in_userspace_asserts_the_line_until_the_guest_touches_the_device(
        make_lab: object, vm_options: dict[str, bool]) -> None:
    lab: Lab = make_lab(VfioVm(**vm_options))  # type: ignore[operator]
    placed = lab.place(lab.add(edu_like()), "edu")
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    device = lab.sim.devices["0000:02:00.0"]
    gsi = placed.irq
    base = lab.machine.pci_segment().bar_base(placed.device, 0)
    assert gsi is not None and base is not None and vm.bar_slots() == [(base, MIB)] and vm.resample == {}
    assert device.fire(INTX)
    assert wait_for(lambda: vm.lines.get(gsi) is True)
    assert vm.slots == {}  # while the line is high every access traps, so the EOI is seen
    lab.machine.guest.read(base, 4)  # the driver reads its status register: EOI
    assert vm.lines[gsi] is False and device.intx_unmasks == 1
    assert vm.bar_slots() == [(base, MIB)]


# -- lifecycle -----------------------------------------------------------------------------------


def test_vm_reset_resets_the_device_and_its_interrupts(lab: Lab) -> None:
    function, slot, _base, _cap = _msix_setup(lab)
    device = lab.sim.devices["0000:01:00.0"]
    guest = lab.machine.guest.function(slot)
    guest.write32(0x10, 0xC800_0004)
    lab.machine.reset()
    assert device.resets == 1
    assert device.triggers[MSIX] == {} and device.triggers[INTX]
    assert function.msix is not None and function.msix.masked(3)
    base = lab.machine.pci_segment().bar_base(function, 0)
    assert base is not None and base != 0xC800_0000  # back where vmmkit placed it
    assert lab.machine.vm.bar_slots() == [(base, NVME_TABLE)]  # type: ignore[attr-defined]


def test_hot_remove_releases_everything(lab: Lab) -> None:
    function, _slot, _base, _cap = _msix_setup(lab)
    vm: VfioVm = lab.machine.vm  # type: ignore[assignment]
    device = lab.sim.devices["0000:01:00.0"]
    lab.machine.remove("vfio0")
    assert vm.slots == {} and vm.resample == {}
    assert not any(v.irqfd in vm.irqfds.values() for v in function.msix.vectors)  # type: ignore[union-attr]
    assert not device.opened and lab.sim.open_groups == set()
    assert lab.sim.containers == set() and lab.sim.dma == {}  # the last group closed the container
    assert not device.fire(MSIX, 3)
    function.close()  # twice is harmless


def test_two_functions_of_one_group_share_it_and_the_container(lab: Lab) -> None:
    first = lab.add(nvme_like("0000:01:00.0", group="7"))
    second = lab.add(edu_like("0000:01:00.1", group="7"))
    lab.place(first, "a")
    lab.place(second, "b")
    assert lab.sim.open_groups == {"7"} and len(lab.sim.containers) == 1
    lab.machine.remove("a")
    assert lab.sim.open_groups == {"7"} and lab.sim.dma  # still in use by b
    lab.machine.remove("b")
    assert lab.sim.open_groups == set() and lab.sim.containers == set()


def test_exit_closes_the_device(lab: Lab) -> None:
    _nvme(lab)
    device = lab.sim.devices["0000:01:00.0"]
    DeviceManager.close(lab.machine)  # what the machine does at exit (the fixture stops the rest)
    assert not device.opened and lab.sim.containers == set()


# -- error paths -----------------------------------------------------------------------------------


def test_no_dev_vfio(lab: Lab) -> None:
    path = lab.add(nvme_like())
    lab.sim.present = False
    with pytest.raises(DeviceError, match=r"/sim/dev/vfio/vfio is missing: this host has no VFIO"):
        lab.place(path)
    assert "vfio0" not in lab.machine


@pytest.mark.skipif(os.path.exists("/dev/vfio"), reason="this host has /dev/vfio")
def test_no_dev_vfio_on_this_host(lab: Lab) -> None:
    """The real host kernel: not simulated."""
    from vmmkit_devices.vfio.container import VfioContainer
    from vmmkit_devices.vfio.kernel import HostKernel

    with pytest.raises(DeviceError, match=r"^/dev/vfio is missing: this host has no VFIO"):
        VfioContainer(HostKernel())


def test_a_group_that_is_not_viable(lab: Lab) -> None:
    path = lab.add(nvme_like(), viable=False)
    with pytest.raises(DeviceError, match="IOMMU group 7 is not viable: every device in it must be bound to vfio-pci"):
        lab.place(path)
    assert lab.sim.open_groups == set() and lab.sim.containers == set()


def test_a_device_already_in_use(lab: Lab) -> None:
    device = nvme_like()
    device.in_use_elsewhere = True
    path = lab.add(device)
    with pytest.raises(DeviceError, match=r"device 0000:01:00.0 is already in use"):
        lab.place(path)
    assert lab.sim.open_groups == set() and lab.sim.containers == set()


def test_the_same_device_twice(lab: Lab) -> None:
    path = lab.add(nvme_like())
    lab.place(path, "a")
    with pytest.raises(DeviceError, match="already in use"):
        lab.place(path, "b")
    assert lab.sim.open_groups == {"7"}  # a keeps it


def test_a_group_another_process_holds(lab: Lab) -> None:
    path = lab.add(nvme_like())
    lab.sim.open(f"{lab.sim.dev_dir}/7")
    with pytest.raises(DeviceError, match="IOMMU group 7 is already in use"):
        lab.place(path)


def test_a_device_without_an_iommu_group(lab: Lab) -> None:
    from vmmkit_devices.vfio.simulator import sysfs_device

    lab.sim.add_device(nvme_like())
    path = sysfs_device(lab.sysfs, "0000:01:00.0", None)
    with pytest.raises(DeviceError, match=r"has no IOMMU group \(.*iommu_group is missing\)"):
        lab.place(path)
    with pytest.raises(DeviceError, match="no such device in sysfs"):
        lab.place(lab.sysfs + "/bus/pci/devices/0000:09:00.0")
    assert lab.sim.containers == set()


def test_a_bridge_is_refused(lab: Lab) -> None:
    device = nvme_like()
    device.config[0x0E] = 1
    with pytest.raises(DeviceError, match="only type-0 functions"):
        lab.place(lab.add(device))
    assert lab.sim.open_groups == set() and not device.opened


def test_hot_plugged_ram_is_mapped_for_dma_and_ejected_ram_unmapped(lab: Lab) -> None:
    """A DIMM plugged after the device (vm.resize) is in the IOMMU's map, and leaves it when the
    guest ejects it; the last group's release stops following the memory."""
    from vmmkit.memory import MemoryRange, close_region, map_region

    placed = lab.place(lab.add(nvme_like()))
    memory = lab.machine.memory
    dimm = map_region(MemoryRange(1 << 32, 128 * MIB), 9, shared=False, hugepages=False, hugepage_size=None,
                      thp=False, mergeable=False, prefault=False)
    try:
        memory.add_region(dimm)
        assert lab.sim.dma[1 << 32] == (128 * MIB, dimm.host_address)
        memory.remove_region(1 << 32)
        assert 1 << 32 not in lab.sim.dma and len(lab.sim.dma) == len(memory.regions)
        lab.machine.remove(placed.id)
        assert lab.sim.dma == {}
        memory.add_region(dimm)  # no container any more: nothing is mapped, nothing fails
        assert lab.sim.dma == {}
        memory.remove_region(1 << 32)
    finally:
        close_region(dimm)
