"""``X86_64``: the x86-64 PC architecture vmmkit registers under the name ``x86_64``.

Every process imports this module (the plugin registers the class); what only building a VM
needs (boot structures, ACPI, CPUID, vCPU state) is imported by the methods that use it.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.arch import Architecture, BootInfo, MemoryLayout
from vmmkit.errors import CapabilityError, VmmError
from vmmkit_x86_64 import layout as layout_
from vmmkit_x86_64 import platform
from vmmkit_x86_64.topology import Topology

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.device import DeviceRequest, PlacedDevice
    from vmmkit.hypervisor import Hypervisor, Vcpu, Vm
    from vmmkit.memory import GuestMemory
    from vmmkit.x86 import CpuIdEntry, SpecialRegisters, X86Hypervisor, X86Vcpu

from vmmkit.log import get_logger

log = get_logger()


class X86_64(Architecture):  # noqa: N801  (the architecture's name)
    name: ClassVar[str] = "x86_64"
    description: ClassVar[str] = "x86-64 PC: vmlinux (PVH or 64-bit entry) and bzImage, ACPI, MP table"

    def __init__(self) -> None:
        self._supported_cpuid: dict[int, list[CpuIdEntry]] = {}
        self._power_on: weakref.WeakKeyDictionary[X86Vcpu, tuple[bytes, SpecialRegisters]] = (
            weakref.WeakKeyDictionary())

    # -- layout and devices --------------------------------------------------------------------

    def memory_layout(self, config: VmConfig) -> MemoryLayout:
        return layout_.layout_for(config)

    def platform_devices(self, config: VmConfig) -> Sequence[DeviceRequest]:
        return platform.platform_devices(config)

    def preload(self, config: VmConfig) -> None:
        import vmmkit.x86  # noqa: F401
        from vmmkit_x86_64 import boot, bootparams, bzimage, cpuid, elf, paging, pvh, vcpu  # noqa: F401

    def kernel_cmdline(self, config: VmConfig, devices: Sequence[PlacedDevice]) -> str:
        return platform.kernel_cmdline(config.payload.cmdline, devices)

    @staticmethod
    def apic_id(config: VmConfig, index: int) -> int:
        """The APIC ID of vCPU ``index``: the ID a backend should create it with."""
        return Topology.from_config(config.cpus).apic_id(index)

    def vcpu_id(self, config: VmConfig, index: int) -> int:
        return self.apic_id(config, index)

    def processor_entry(self, config: VmConfig, index: int) -> bytes:
        """vCPU ``index``'s MADT entry, enabled: its CPU hotplug ``_MAT``."""
        from vmmkit_x86_64.acpi.tables import processor_entry

        return processor_entry(index, self.apic_id(config, index))

    # -- the VM --------------------------------------------------------------------------------

    def configure_vm(self, vm: Vm, hypervisor: Hypervisor, config: VmConfig) -> None:
        vm.setup_interrupt_controller()

    def inject_nmi(self, vm: Vm) -> None:
        """``vm.nmi``: an NMI to every local APIC (an MSI in NMI delivery mode to the xAPIC
        broadcast ID)."""
        vm.signal_msi(layout_.APIC_START | (0xFF << 12), 0b100 << 8)

    def prepare_boot(
        self,
        memory: GuestMemory,
        config: VmConfig,
        layout: MemoryLayout,
        boot: BootInfo,
        devices: Sequence[PlacedDevice],
    ) -> BootInfo:
        from vmmkit_x86_64.boot import prepare_boot

        return prepare_boot(memory, config, layout, boot, devices)

    # -- vCPUs ---------------------------------------------------------------------------------

    def configure_vcpu(
        self, vcpu: Vcpu, index: int, hypervisor: Hypervisor, config: VmConfig, boot: BootInfo
    ) -> None:
        """CPUID, MSRs, FPU and LAPIC for every vCPU; the boot registers for vCPU 0 only (the
        others wait, UNINITIALIZED, for the guest's INIT/SIPI)."""
        from vmmkit.x86 import MpState, X86Hypervisor, X86Vcpu
        from vmmkit_x86_64 import vcpu as vcpu_state
        from vmmkit_x86_64.cpuid import AMD_VENDORS, cpu_vendor

        if not isinstance(vcpu, X86Vcpu):
            raise CapabilityError(
                "x86 vCPU", detail=f"{type(vcpu).__name__} lacks the x86-64 register interface"
            )
        if not isinstance(hypervisor, X86Hypervisor):
            raise CapabilityError(
                "CPUID", detail=f"{type(hypervisor).__name__} cannot report supported CPUID"
            )
        apic_id = Topology.from_config(config.cpus).apic_id(index)
        entries = self._set_cpuid(vcpu, index, hypervisor, config)
        vcpu.set_msrs(vcpu_state.boot_msrs())
        disarm = vcpu_state.reset_msrs(entries)
        if disarm:
            try:
                vcpu.set_msrs(disarm)
            except VmmError as exc:  # only matters after a reset; say so, and boot anyway
                log.warning("vcpu.reset_msrs_refused", index=index, error=str(exc))
        if cpu_vendor(entries) in AMD_VENDORS:
            try:
                vcpu.set_msrs(vcpu_state.amd_msrs())
            except VmmError as exc:  # an older KVM accepts no HWCR.TscFreqSel: Linux warns, no more
                log.debug("vcpu.amd_msrs_refused", index=index, error=str(exc))
        vcpu.set_fpu(vcpu_state.FPU)
        # A reset starts from the state the fresh vCPU had, not from what the last guest left.
        lapic, sregs = self._power_on_state(vcpu)
        backend_id = vcpu_state.lapic_id(lapic)
        if backend_id != apic_id:
            log.warning(
                "vcpu.apic_id_mismatch",
                index=index,
                backend_id=backend_id,
                apic_id=apic_id,
                hint="create vCPUs with X86_64.apic_id(config, index) as their id",
            )
        vcpu.set_lapic(vcpu_state.lapic_with_lints(lapic, apic_id))
        if index == 0:
            vcpu.set_sregs(vcpu_state.boot_special_registers(boot.protocol, sregs))
            vcpu.set_regs(vcpu_state.boot_registers(boot.protocol, boot.entry))
            # After a reset: a vCPU the old guest left in HLT would stay HALTED at the new entry
            # point, waiting for an interrupt that nothing (a reset LAPIC and PIT) will send.
            vcpu.set_mp_state(MpState.RUNNABLE)
        else:
            vcpu.set_mp_state(MpState.UNINITIALIZED)

    def _power_on_state(self, vcpu: X86Vcpu) -> tuple[bytes, SpecialRegisters]:
        """The local APIC page and special registers ``vcpu`` had before it first ran."""
        state = self._power_on.get(vcpu)
        if state is None:
            state = self._power_on[vcpu] = (vcpu.get_lapic(), vcpu.get_sregs())
        return state

    def _set_cpuid(self, vcpu: X86Vcpu, index: int, hypervisor: X86Hypervisor, config: VmConfig) -> list[CpuIdEntry]:
        from vmmkit_x86_64.cpuid import build_cpuid, features_from_config

        topology = Topology.from_config(config.cpus)
        entries = build_cpuid(
            self._supported(hypervisor),
            index=index,
            topology=topology,
            nested=config.cpus.nested,
            features=features_from_config(config.cpus.features),
            max_phys_bits=config.cpus.max_phys_bits,
        )
        vcpu.set_cpuid(entries)
        return entries

    # -- snapshots (vmmkit_x86_64.snapshot) ----------------------------------------------------

    #: :data:`vmmkit_x86_64.snapshot.VCPU_STATE_VERSION` (not imported: every process loads this module).
    vcpu_state_version: ClassVar[int] = 1

    def save_vcpu(self, vcpu: Vcpu, hypervisor: Hypervisor) -> Mapping[str, Any]:
        from vmmkit_x86_64.snapshot import save_vcpu

        return save_vcpu(vcpu, hypervisor)

    def restore_vcpu(
        self, vcpu: Vcpu, index: int, hypervisor: Hypervisor, config: VmConfig, state: Mapping[str, Any]
    ) -> None:
        """CPUID as at boot (the configuration decides it), then the saved state."""
        from vmmkit.x86 import X86Hypervisor, X86Vcpu
        from vmmkit_x86_64.snapshot import restore_vcpu

        if not isinstance(vcpu, X86Vcpu) or not isinstance(hypervisor, X86Hypervisor):
            raise CapabilityError("x86 vCPU", detail=f"{type(vcpu).__name__} lacks the x86-64 register interface")
        from vmmkit_x86_64.snapshot import KVM_CPUID_FEATURES, KVM_FEATURE_CLOCKSOURCES

        self._set_cpuid(vcpu, index, hypervisor, config)
        self._power_on_state(vcpu)  # recorded before the saved state replaces it (for a reboot)
        paravirt_clock = any(entry.function == KVM_CPUID_FEATURES and entry.eax & KVM_FEATURE_CLOCKSOURCES
                             for entry in self._supported(hypervisor))
        restore_vcpu(vcpu, state, paravirt_clock=paravirt_clock)

    def _supported(self, hypervisor: X86Hypervisor) -> list[CpuIdEntry]:
        key = id(hypervisor)
        if key not in self._supported_cpuid:
            self._supported_cpuid = {key: list(hypervisor.supported_cpuid())}
        return self._supported_cpuid[key]
