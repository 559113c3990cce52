"""KVM-arm64's in-kernel GICv3 and ITS state, in use, from one VM into another on a real arm64
``/dev/kvm`` (run inside the AArch64 lab by ``snapshot_aarch64_inside.py``; skipped elsewhere).

The self-test guest's ``test=spin`` never enables its GIC, so the snapshot test restores a GIC
at rest. Here a VM's GIC is set up as a guest that uses it leaves it - distributor enabled, an
SPI made level-triggered, routed, prioritised, enabled and its line high, SGIs/PPIs enabled at both redistributors,
LPIs enabled with their property and pending tables, the CPU interfaces' priority mask and
group enable, the ITS enabled with its command queue and device/collection tables in guest RAM,
a vCPU's virtual timer armed - then saved, put into a second VM, and saved again: the two states
are equal, so every register went in and KVM accepted the order (LPI tables before EnableLPIs,
``KVM_DEV_ARM_ITS_RESTORE_TABLES`` before GITS_CTLR).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from vmmkit import aarch64_platform as P
from vmmkit.aarch64 import CNTV_CTL_ENABLE, VirtualTimer

RAM_BASE = 0x4000_0000
RAM_SIZE = 0x20_0000
SPI = 40


class NoOps:
    def pio_read(self, port: int, size: int) -> bytes:
        raise AssertionError("no I/O expected")

    pio_write = mmio_read = mmio_write = pio_read


@pytest.fixture
def kvm() -> Iterator[Any]:
    from vmmkit_kvm.arm64 import KvmArm64Hypervisor

    availability = KvmArm64Hypervisor.is_available()
    if not availability:
        pytest.skip(f"needs KVM on an arm64 host (the AArch64 lab): {availability.reason}")
    hypervisor = KvmArm64Hypervisor()
    yield hypervisor
    hypervisor.close()


def new_vm(hypervisor: Any) -> tuple[Any, Any]:
    from vmmkit.memory import GuestMemory, MemoryRange

    vm = hypervisor.create_vm("aarch64")
    memory = GuestMemory.allocate([MemoryRange(RAM_BASE, RAM_SIZE)])
    vm.add_memory_region(0, RAM_BASE, RAM_SIZE, memory.host_address(RAM_BASE, RAM_SIZE))
    vm.set_gic_layout(0x0800_0000, 0x080A_0000)
    assert vm.set_gic_its(0x0808_0000)
    vm.setup_interrupt_controller()
    for index in range(2):
        vm.create_vcpu(index, NoOps())
    vm.finalize()
    return vm, memory


def use_the_gic(vm: Any) -> None:
    """What a guest's GIC and ITS drivers leave behind, written as KVM's uaccess takes it."""
    from vmmkit_kvm import arm64_state as S
    from vmmkit_kvm.arm64 import _ioctl

    gic, its = S.DeviceAttrs(vm._gic_fd, _ioctl), S.DeviceAttrs(vm._its_fd, _ioctl)
    dist, redist, cpu = (S.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, S.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                         S.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS)
    gic.set(dist, P.GICD_IGROUPR + 4 * (SPI // 32), 1 << (SPI % 32))
    gic.set(dist, P.GICD_IPRIORITYR + SPI, 0xA0 << 0)
    gic.set(dist, P.GICD_IROUTER + 8 * SPI, 1)  # vCPU 1 (Aff0 = 1)
    gic.set(dist, P.GICD_ISENABLER + 4 * (SPI // 32), 1 << (SPI % 32))
    gic.set(dist, P.GICD_CTLR, 0x2)  # EnableGrp1
    icfgr = P.GICD_ICFGR + 4 * (SPI // 16)  # KVM's SPIs start edge-triggered (0b10): make this one level
    gic.set(dist, icfgr, gic.get(dist, icfgr) & ~(0b11 << 2 * (SPI % 16)))
    vm.set_irq_line(SPI, True)
    for index, vcpu in enumerate(vm.vcpus):
        mpidr = S.mpidr_attr(vcpu.mpidr())
        gic.set(redist, mpidr | P.GICR_IGROUPR0, 0xFFFF_FFFF)
        gic.set(redist, mpidr | P.GICR_ISENABLER0, (1 << 1) | (1 << 27))  # SGI 1, the virtual timer's PPI
        gic.set(redist, mpidr | P.GICR_IPRIORITYR0, 0x80)
        gic.set(redist, mpidr | P.GICR_PROPBASER, 0x3_0000 + RAM_BASE | 13)  # 14 ID bits
        gic.set(redist, mpidr | P.GICR_PENDBASER, 0x4_0000 + 0x1_0000 * index + RAM_BASE)
        gic.set(redist, mpidr | P.GICR_CTLR, P.GICR_CTLR_ENABLE_LPIS)
        gic.set(cpu, mpidr | 0xC230, 0xF0, 8)  # ICC_PMR_EL1 (3, 0, 4, 6, 0)
        gic.set(cpu, mpidr | 0xC667, 1, 8)  # ICC_IGRPEN1_EL1 (3, 0, 12, 12, 7)
    its_regs = S.KVM_DEV_ARM_VGIC_GRP_ITS_REGS
    its.set(its_regs, P.GITS_CBASER, (1 << 63) | (RAM_BASE + 0x1_0000), 8)  # one 4 KiB page of commands
    for n, offset in enumerate((0x2_0000, 0x6_0000)):  # device, collection table (KVM's ITS: 64 KiB pages)
        baser = its.get(its_regs, P.GITS_BASER + 8 * n, 8)
        its.set(its_regs, P.GITS_BASER + 8 * n, baser | (1 << 63) | (RAM_BASE + offset), 8)
    its.set(its_regs, P.GITS_CTLR, P.GITS_CTLR_ENABLED, 8)


def test_a_gic_and_its_in_use_go_into_another_vm(kvm: Any) -> None:
    vm, memory = new_vm(kvm)
    other, other_memory = new_vm(kvm)
    try:
        use_the_gic(vm)
        vcpu = vm.vcpus[0]
        vcpu._one_reg().set_int(0x6030_0000_0013_DF02, 0x1234_5678)  # KVM_REG_ARM_TIMER_CVAL
        vcpu._one_reg().set_int(0x6030_0000_0013_DF19, CNTV_CTL_ENABLE)  # KVM_REG_ARM_TIMER_CTL
        saved = vm.save_state()
        parsed = P.parse_platform_state(saved)
        assert parsed.gic is not None and parsed.its is not None
        assert parsed.gic.in_use() == "the guest enabled the GICv3 distributor (GICD_CTLR)"
        assert parsed.its.in_use() == "the guest enabled the GICv3 ITS (GITS_CTLR)"
        cpus = [v.save_cpu_state() for v in vm.vcpus]
        assert cpus[0].timer.cval == 0x1234_5678 and cpus[0].timer.interrupt_armed
        assert [c.power.value for c in cpus] == ["on", "off"]

        other_memory.write(RAM_BASE, memory.read(RAM_BASE, RAM_SIZE))  # the tables KVM saved into RAM
        other.restore_state(saved)
        for target, state in zip(other.vcpus, cpus, strict=True):
            target.restore_cpu_state(state)
        assert other.save_state() == saved
        again = [v.save_cpu_state() for v in other.vcpus]
        assert [c.timer.count for c in again] == [min(c.timer.count for c in cpus)] * 2  # set on the first run
        assert [(c.sysregs, c.x, c.pc, c.power, VirtualTimer(0, c.timer.cval, c.timer.ctl)) for c in again] == \
               [(c.sysregs, c.x, c.pc, c.power, VirtualTimer(0, c.timer.cval, c.timer.ctl)) for c in cpus]
        # The SPI's line is high; ISPENDR reads a level interrupt's pending latch only (0 here), its
        # level travels in LEVEL_INFO (devices/arm-vgic-v3.rst: saved and restored separately).
        pending = parsed.gic.distributor[P.GICD_ISPENDR + 4 * (SPI // 32)]
        assert (parsed.gic.line_levels[0], pending) == (1 << (SPI - 32), 0), (
            f"line levels {parsed.gic.line_levels[:2]}, ISPENDR1 {pending:#x}, "
            f"ICFGR2 {parsed.gic.distributor[P.GICD_ICFGR + 8]:#x}")
    finally:
        vm.close()
        other.close()
        memory.close()
        other_memory.close()
