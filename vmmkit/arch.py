"""The architecture interface: guest-physical layout, platform devices, boot, vCPU set-up."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from attrs import field, frozen

from vmmkit.errors import NotSupportedError
from vmmkit.memory import MemoryRange

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.device import DeviceRequest, PlacedDevice
    from vmmkit.hypervisor import Hypervisor, Vcpu, Vm
    from vmmkit.memory import GuestMemory


@frozen
class MemoryLayout:
    """Where things live in guest-physical space (and the I/O port space, on x86)."""

    ram: tuple[MemoryRange, ...]
    #: Window for MMIO devices the machine places (virtio-mmio), below 4 GiB.
    device_mmio: MemoryRange
    pci_mmio32: MemoryRange | None = None
    pci_mmio64: MemoryRange | None = None
    pci_ecam: MemoryRange | None = None
    #: I/O ports the machine may hand out (PCI I/O BARs); ``None`` on architectures without.
    pio: MemoryRange | None = None
    #: Legacy interrupt numbers the machine may allocate to devices, inclusive.
    device_irqs: tuple[int, int] = (5, 23)
    #: GSIs available for MSI routes, inclusive.
    msi_gsis: tuple[int, int] = (24, 1023)
    #: The ACPI PCI hotplug register block (:mod:`vmmkit.pci.hotplug`), ``None``: no PCI
    #: hotplug on this architecture.
    pci_hotplug: MemoryRange | None = None
    #: Guest-physical space for RAM plugged while the guest runs (``--memory hotplug_size=``),
    #: outside every RAM range and window; ``None``: no memory hotplug.
    memory_hotplug: MemoryRange | None = None
    #: The ACPI memory hotplug register block (:mod:`vmmkit.acpi.memory_hotplug`), placed
    #: when :attr:`memory_hotplug` is set; ``None``: no ACPI memory hotplug on this architecture.
    memory_hotplug_registers: MemoryRange | None = None
    #: The ACPI CPU hotplug register block (:mod:`vmmkit.cpu_hotplug`), ``None``: no vCPU
    #: hotplug on this architecture.
    cpu_hotplug: MemoryRange | None = None


@frozen
class BootInfo:
    """How to enter a loaded kernel. Written by a kernel loader, read by the architecture."""

    protocol: str  #: e.g. "pvh", "linux64", "linux32", "arm64-image"
    entry: int
    kernel: MemoryRange
    cmdline: bytes = b""
    initramfs: MemoryRange | None = None
    #: Loader-specific facts for the architecture (setup header fields, ELF notes, ...).
    extra: Mapping[str, Any] = field(factory=dict)


class Architecture(ABC):
    """A guest architecture, registered by :attr:`name` (``x86_64``, ``aarch64``)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: Where virtio devices go unless the configuration says (``--platform virtio_transport=``).
    #: The machine reads it after :meth:`configure_vm`, which may set it for the VM from what the
    #: backend offers (AArch64: ``pci`` where the backend has a GICv3 ITS for MSIs, else ``mmio``).
    default_virtio_transport: str = "pci"

    @abstractmethod
    def memory_layout(self, config: VmConfig) -> MemoryLayout:
        """RAM ranges (split around holes), device windows and interrupt ranges."""

    @abstractmethod
    def platform_devices(self, config: VmConfig) -> Sequence[DeviceRequest]:
        """The devices every VM of this architecture has, with fixed placements (serial
        port, RTC, power management, ...). Built from the device registry by type name."""

    def preload(self, config: VmConfig) -> None:
        """Import what building and booting ``config`` will run (loaders, firmware table
        builders), so a boot requested later (``vm.boot``) pays no imports. Optional."""

    def kernel_cmdline(self, config: VmConfig, devices: Sequence[PlacedDevice]) -> str:
        """The command line handed to the kernel; may append what the platform implies
        (``virtio_mmio.device=`` entries on x86)."""
        return config.payload.cmdline or ""

    def vcpu_id(self, config: VmConfig, index: int) -> int:
        """The hypervisor's id for the ``index``-th vCPU (on x86, its APIC ID, which gaps
        when a topology level is not a power of two)."""
        return index

    def inject_nmi(self, vm: Vm) -> None:
        """Deliver a non-maskable interrupt to every vCPU (``vm.nmi``).

        :raises vmmkit.errors.NotSupportedError: the architecture has no NMI (the default)."""
        raise NotSupportedError(f"NMI injection is not supported on {self.name}")

    def processor_entry(self, config: VmConfig, index: int) -> bytes:
        """vCPU ``index`` as the guest's firmware describes an enabled processor to a CPU
        hotplug method (ACPI ``_MAT``: on x86 its MADT Local APIC entry). Only needed where
        the layout has :attr:`MemoryLayout.cpu_hotplug`.

        :raises vmmkit.errors.NotSupportedError: the architecture has no ACPI CPU hotplug."""
        raise NotSupportedError(f"vCPU hotplug is not supported on {self.name}")

    @abstractmethod
    def configure_vm(self, vm: Vm, hypervisor: Hypervisor, config: VmConfig) -> None:
        """Per-VM set-up before vCPUs exist (interrupt controller, ...)."""

    @abstractmethod
    def prepare_boot(
        self,
        memory: GuestMemory,
        config: VmConfig,
        layout: MemoryLayout,
        boot: BootInfo,
        devices: Sequence[PlacedDevice],
    ) -> BootInfo:
        """Write boot structures and firmware tables (boot params, page tables, ACPI or a
        device tree) for the placed devices; return the final boot info."""

    @abstractmethod
    def configure_vcpu(
        self, vcpu: Vcpu, index: int, hypervisor: Hypervisor, config: VmConfig, boot: BootInfo
    ) -> None:
        """Registers, CPUID, MSRs etc. for vCPU ``index``; secondary vCPUs wait for the guest
        to start them."""

    # -- snapshots (vmmkit.snapshot) -----------------------------------------------------------

    #: The layout version of :meth:`save_vcpu`'s state (0: this architecture cannot save vCPUs).
    vcpu_state_version: ClassVar[int] = 0

    def save_vcpu(self, vcpu: Vcpu, hypervisor: Hypervisor) -> Mapping[str, Any]:
        """The state of a paused vCPU, JSON-able, through the backend-neutral register types.

        :raises vmmkit.state.NotSnapshottable: the architecture or the backend cannot."""
        from vmmkit.state import NotSnapshottable

        raise NotSnapshottable(f"architecture {self.name} cannot save vCPU state")

    def restore_vcpu(
        self, vcpu: Vcpu, index: int, hypervisor: Hypervisor, config: VmConfig, state: Mapping[str, Any]
    ) -> None:
        """Set vCPU ``index`` up as :meth:`configure_vcpu` would (CPUID...) and then to ``state``.

        :raises vmmkit.state.StateError: malformed, or a piece the backend cannot take."""
        from vmmkit.state import StateError

        raise StateError(f"architecture {self.name} cannot restore vCPU state")
