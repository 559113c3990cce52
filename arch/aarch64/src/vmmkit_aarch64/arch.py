"""``Aarch64``: the AArch64 ``virt``-style machine vmmkit registers under the name ``aarch64``.

Boot follows Linux's arm64 boot protocol: the Image at RAM + text_offset, entered at its first
instruction in EL1h with the MMU off, interrupts masked and x0 = the DTB's address. Secondary
vCPUs start powered off and are brought up by the guest through PSCI CPU_ON, which the
hypervisor serves itself (KVM) or this architecture serves (:mod:`vmmkit_aarch64.psci`) for a
backend that traps ``hvc`` (emu).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from vmmkit.arch import Architecture, BootInfo, MemoryLayout
from vmmkit.device import DeviceContext, DeviceRequest, DeviceType, PlacedDevice
from vmmkit.errors import BootError, CapabilityError
from vmmkit.log import get_logger

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.hypervisor import Hypervisor, Vcpu, Vm
    from vmmkit.memory import GuestMemory
    from vmmkit_aarch64.psci import PsciPower

# This module is imported on every host (registering the architecture and the PSCI device
# type), so it imports only vmmkit's core at load time; the AArch64 register interface
# (vmmkit.aarch64), the device-tree writer (libfdt), the Image loader, the layout and PSCI are
# imported by the methods that use them, i.e. only when an AArch64 VM is built.

log = get_logger()

PROTOCOL: Final = "arm64-image"
#: SCTLR_EL1 bits a boot CPU must start with clear: M (MMU), C (data cache), I (instruction cache).
_SCTLR_BOOT_CLEAR: Final = (1 << 0) | (1 << 2) | (1 << 12)

#: The arm64 Image header (see :mod:`vmmkit_aarch64.image`): its size and magic, which the
#: plugin checks on every boot (``--arch`` guess) without importing the loader.
HEADER_SIZE: Final = 64
MAGIC: Final = b"ARM\x64"
MAGIC_OFFSET: Final = 0x38


def recognise(header: bytes) -> bool:
    """Whether ``header`` (the first bytes of a kernel file) is an arm64 Image's."""
    return len(header) >= HEADER_SIZE and header[MAGIC_OFFSET : MAGIC_OFFSET + 4] == MAGIC


def platform_devices(config: Any) -> list[DeviceRequest]:
    """The devices every AArch64 VM has (type names are the contract with the devices plugin)::

        id           type         MMIO          IRQ (GSI)   what
        _serial      pl011        0x09000000    33 (SPI 1)  the console (config = VmConfig.serial;
                                                            left out if Off)
        _rtc         rtc-pl031    0x09010000    34 (SPI 2)  PL031 real-time clock
        _debug_exit  debug-exit   0x09020000    -           a write sets the VMM's exit status
        _psci        psci         0x09030000    -           PSCI's power callbacks (not in the DT)
    """
    from vmmkit.config import NotSupportedYet
    from vmmkit_aarch64 import layout as L

    # x86 I/O-port devices: refused by name rather than left out in silence
    if getattr(config, "pvpanic", False):
        raise NotSupportedYet("pvpanic", True, "pvpanic on AArch64 guests (an x86 I/O-port device)")
    debug_console = getattr(config, "debug_console", None)
    if debug_console is not None and str(getattr(debug_console, "mode", "Off")) != "Off":
        raise NotSupportedYet("debug_console", debug_console, "the debug console on AArch64 guests (x86 port 0xe9)")
    requests = []
    if str(getattr(config.serial, "mode", "Tty")) != "Off":
        requests.append(DeviceRequest("pl011", "_serial", config.serial,
                                      mmio=(L.UART_PL011.start, L.UART_PL011.size), irq=L.UART_IRQ))
    requests += [
        DeviceRequest("rtc-pl031", "_rtc", mmio=(L.RTC_PL031.start, L.RTC_PL031.size), irq=L.RTC_IRQ),
        DeviceRequest("debug-exit", "_debug_exit", mmio=(L.DEBUG_EXIT.start, L.DEBUG_EXIT.size)),
        DeviceRequest("psci", "_psci", mmio=(L.PSCI_POWER.start, L.PSCI_POWER.size)),
    ]
    return requests


class Aarch64(Architecture):
    name: ClassVar[str] = "aarch64"
    description: ClassVar[str] = ("AArch64 virt: arm64 Image, device tree, PSCI 1.0, PL011, PL031, "
                                  "virtio-pci (ECAM, MSI-X through the GICv3 ITS) or virtio-mmio")
    #: Until :meth:`configure_vm` knows the backend: virtio-mmio, whose interrupts (one SPI per
    #: device) every backend delivers. With a GICv3 ITS (KVM) the VM's default is virtio-pci, as
    #: on QEMU ``virt`` and Cloud Hypervisor: MSI-X, a vector per queue.
    #: A backend without one (emu) keeps virtio-mmio: its virtio-pci would fall back to INTx,
    #: four shared pins for every function.
    default_virtio_transport: str = "mmio"

    def __init__(self) -> None:
        from vmmkit_aarch64.psci import Psci

        self.psci = Psci()
        self._vm: Vm | None = None
        #: Whether the backend created the GICv3 ITS (the device tree then describes it).
        self._its = False

    # -- layout and devices --------------------------------------------------------------------

    def memory_layout(self, config: VmConfig) -> MemoryLayout:
        from vmmkit_aarch64 import layout as L

        cpus = config.cpus.boot_vcpus
        if cpus > L.MAX_VCPUS:
            raise CapabilityError("aarch64", None, f"at most {L.MAX_VCPUS} vCPUs fit the GIC redistributor window")
        return L.memory_layout(config.memory.boot_size)

    def platform_devices(self, config: VmConfig) -> Sequence[DeviceRequest]:
        return platform_devices(config)

    # -- the VM --------------------------------------------------------------------------------

    def configure_vm(self, vm: Vm, hypervisor: Hypervisor, config: VmConfig) -> None:
        from vmmkit.aarch64 import Aarch64Vm
        from vmmkit_aarch64 import layout as L

        self._vm = vm
        self._its = False
        if isinstance(vm, Aarch64Vm):
            vm.set_gic_layout(L.GIC_DIST.start, L.GIC_REDIST_BASE)
            self._its = vm.set_gic_its(L.GIC_ITS.start)
        self.default_virtio_transport = "pci" if self._its else "mmio"
        vm.setup_interrupt_controller()
        if isinstance(vm, Aarch64Vm) and not vm.firmware_in_hypervisor:
            vm.set_firmware_handler(self.psci)

    def _firmware_in_hypervisor(self) -> bool:
        from vmmkit.aarch64 import Aarch64Vm

        return isinstance(self._vm, Aarch64Vm) and bool(self._vm.firmware_in_hypervisor)

    def prepare_boot(
        self,
        memory: GuestMemory,
        config: VmConfig,
        layout: MemoryLayout,
        boot: BootInfo,
        devices: Sequence[PlacedDevice],
    ) -> BootInfo:
        from vmmkit.aarch64 import mpidr_for
        from vmmkit_aarch64 import fdt as fdt_
        from vmmkit_aarch64 import image
        from vmmkit_aarch64 import layout as L
        from vmmkit_aarch64.psci import PsciPower

        if boot.protocol != PROTOCOL:
            raise BootError(config.payload.kernel, f"an AArch64 VM boots arm64 Images, not {boot.protocol!r}")
        self.psci.ram = tuple(layout.ram)
        self.psci.power = next((p.device for p in devices if isinstance(p.device, PsciPower)), None)
        mpidrs = [mpidr_for(i) for i in range(config.cpus.boot_vcpus)]
        blob = fdt_.build_fdt(
            ram=layout.ram,
            mpidrs=mpidrs,
            cmdline=boot.cmdline.decode(errors="replace"),
            initrd=boot.initramfs,
            devices=devices,
            its=L.GIC_ITS if self._its else None,
        )
        address = image.fdt_address(layout.ram[0])
        if address < boot.kernel.end:
            raise BootError(config.payload.kernel, "no room for the device tree above the kernel")
        memory.write(address, blob)
        log.debug("aarch64.fdt", address=hex(address), size=len(blob))
        return attrs.evolve(boot, extra={**boot.extra, "fdt": address, "fdt_size": len(blob)})

    # -- vCPUs ---------------------------------------------------------------------------------

    def configure_vcpu(
        self, vcpu: Vcpu, index: int, hypervisor: Hypervisor, config: VmConfig, boot: BootInfo
    ) -> None:
        """vCPU 0 enters the kernel with x0 = the DTB; the others stay off for PSCI CPU_ON."""
        from vmmkit.aarch64 import BOOT_PSTATE, Aarch64Vcpu, CoreRegisters, PowerState, SysReg

        if not isinstance(vcpu, Aarch64Vcpu):
            raise CapabilityError("aarch64 vCPU", None,
                                  f"{type(vcpu).__name__} lacks the AArch64 register interface (vmmkit.aarch64)")
        self.psci.add_vcpu(index, vcpu)
        if index != 0:
            if not self._firmware_in_hypervisor():
                vcpu.power_off()
            return
        fdt_address = int(boot.extra["fdt"])
        if vcpu.power_state() is PowerState.OFF:
            vcpu.power_on(boot.entry, fdt_address)
        sctlr = vcpu.get_sys_reg(SysReg.SCTLR_EL1)
        if sctlr & _SCTLR_BOOT_CLEAR:
            vcpu.set_sys_reg(SysReg.SCTLR_EL1, sctlr & ~_SCTLR_BOOT_CLEAR)
        vcpu.set_core_registers(CoreRegisters(x=(fdt_address, 0, 0, 0), pc=boot.entry, pstate=BOOT_PSTATE))

    def attach_firmware(self, ram: Sequence[Any], devices: Sequence[PlacedDevice]) -> None:
        """Give PSCI the machine's RAM and power device (done by :meth:`prepare_boot` at boot; a
        restored machine, which skips the boot, gets them here from the plugin's
        ``vmmkit_vm_created``)."""
        from vmmkit_aarch64.psci import PsciPower

        self.psci.ram = tuple(ram)
        self.psci.power = next((p.device for p in devices if isinstance(p.device, PsciPower)), None)

    # -- snapshots (vmmkit_aarch64.snapshot) ---------------------------------------------------

    #: :data:`vmmkit_aarch64.snapshot.VCPU_STATE_VERSION` (not imported: every process loads this module).
    vcpu_state_version: ClassVar[int] = 1

    def save_vcpu(self, vcpu: Vcpu, hypervisor: Hypervisor) -> Mapping[str, Any]:
        """The vCPU's :class:`vmmkit.aarch64.CpuState` from the backend, as JSON."""
        from vmmkit.aarch64 import Aarch64VcpuSnapshot
        from vmmkit.state import NotSnapshottable
        from vmmkit_aarch64.snapshot import cpu_state_to_json

        if not isinstance(vcpu, Aarch64VcpuSnapshot):
            raise NotSnapshottable(f"vCPU {vcpu.index}: backend {hypervisor.name} cannot save AArch64 vCPU state "
                                   f"({type(vcpu).__name__} lacks vmmkit.aarch64.Aarch64VcpuSnapshot)")
        return cpu_state_to_json(vcpu.save_cpu_state())

    def restore_vcpu(
        self, vcpu: Vcpu, index: int, hypervisor: Hypervisor, config: VmConfig, state: Mapping[str, Any]
    ) -> None:
        """Register the vCPU with PSCI as at boot, then hand the saved state to the backend."""
        from vmmkit.aarch64 import Aarch64Vcpu, Aarch64VcpuSnapshot
        from vmmkit.state import StateError
        from vmmkit_aarch64.snapshot import cpu_state_from_json

        if not isinstance(vcpu, Aarch64Vcpu) or not isinstance(vcpu, Aarch64VcpuSnapshot):
            raise StateError(f"vcpu{index}: backend {hypervisor.name} cannot restore AArch64 vCPU state")
        parsed = cpu_state_from_json(state, f"vcpu{index}")
        self.psci.add_vcpu(index, vcpu)
        vcpu.restore_cpu_state(parsed)


class PsciPowerType(DeviceType):
    """``psci``: the PSCI power device (:class:`vmmkit_aarch64.psci.PsciPower`), requested by
    :func:`platform_devices`."""

    name: ClassVar[str] = "psci"
    description: ClassVar[str] = "PSCI SYSTEM_OFF/SYSTEM_RESET to the machine (AArch64, internal)"

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> PsciPower:
        from vmmkit_aarch64.psci import PsciPower

        return PsciPower(request.id, ctx.request_shutdown, ctx.request_reset)
