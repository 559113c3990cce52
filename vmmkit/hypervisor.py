"""The backend-neutral hypervisor interface: ``Hypervisor`` -> ``Vm`` -> ``Vcpu``.

Shaped after Cloud Hypervisor's ``hypervisor`` crate. Port and MMIO accesses are dispatched
*inside* :meth:`Vcpu.run` through a :class:`VcpuOps` callback object, so exit layouts such as
``struct kvm_run`` never leave the backend; ``run()`` returns only the small set of exits in
:class:`ExitReason` that the VM's owner must act on.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Protocol

from attrs import frozen


class VcpuOps(Protocol):
    """How a backend hands guest port and MMIO accesses to the VMM (CH's ``VmOps``).

    Reads return exactly ``size`` bytes; accesses nobody claims read as all ones.
    """

    def pio_read(self, port: int, size: int) -> bytes: ...

    def pio_write(self, port: int, data: bytes) -> None: ...

    def mmio_read(self, addr: int, size: int) -> bytes: ...

    def mmio_write(self, addr: int, data: bytes) -> None: ...


class ExitReason(enum.Enum):
    HLT = "hlt"  #: the vCPU halted and the backend does not park it itself
    SHUTDOWN = "shutdown"  #: triple fault (the guest can no longer run)
    POWER_OFF = "power-off"  #: the guest asked the hypervisor to power off (PSCI SYSTEM_OFF)
    RESET = "reset"  #: the guest asked for a reset
    INTERRUPTED = "interrupted"  #: :meth:`Vcpu.kick` made the vCPU leave the guest
    DEBUG = "debug"  #: a guest-debug breakpoint or single step
    INTERNAL_ERROR = "internal-error"  #: the hypervisor could not go on (detail says why)
    FAIL_ENTRY = "fail-entry"  #: the hypervisor refused to enter the guest


@frozen
class VmExit:
    reason: ExitReason
    detail: str = ""


@frozen
class PortSink:
    """A port whose guest writes a backend may serve natively, without a callback: the
    bytes are written to ``fd`` (with ``timestamp``, each byte becomes a line
    ``[seconds.micros] <label> 0xNN``, for boot-progress ports; with ``json`` too, a JSON object
    ``{"code": "0xNN", "elapsed": "S.UUUUUU", "event": "<label>", "level": "info",
    "timestamp": "<ISO 8601 UTC>"}``, as the JSON log renders it). Reads return ``read_value``."""

    port: int
    fd: int
    timestamp: bool = False
    label: str = ""
    json: bool = False
    read_value: int = 0xFF


@frozen
class Availability:
    """Whether a backend can be used on this host, and if not, why. ``auto`` False: usable
    only when named (``--hypervisor NAME``), never picked by ``--hypervisor auto`` (a backend
    running on a simulated kernel for a contract test says so)."""

    usable: bool
    reason: str = ""
    auto: bool = True

    def __bool__(self) -> bool:
        return self.usable


class Hypervisor(ABC):
    """A virtualization backend. Subclasses are registered by name in the hypervisor registry."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: Guest architectures this backend can run on this host.
    architectures: ClassVar[tuple[str, ...]] = ()
    #: Whether guests get interrupts and exceptions delivered (a software backend may only poll);
    #: :meth:`delivers_interrupts_to` answers per guest architecture.
    delivers_interrupts: ClassVar[bool] = True
    #: The order ``--hypervisor auto`` tries backends in, lower first: hardware backends 10-49
    #: (kvm 10, mshv 20), software emulation 90 and above.
    priority: ClassVar[int] = 50

    @classmethod
    @abstractmethod
    def is_available(cls) -> Availability:
        """Probe the host cheaply, without side effects (e.g. open and close /dev/kvm)."""

    @classmethod
    def delivers_interrupts_to(cls, arch: str) -> bool:
        """Whether ``arch`` guests get interrupts and exceptions delivered (default:
        :attr:`delivers_interrupts`, for every architecture)."""
        return cls.delivers_interrupts

    @classmethod
    def preload(cls) -> None:
        """Import what creating and running a VM will need, so a boot requested later
        (``vm.boot``) pays no imports. Optional; no side effects on the host."""

    @property
    def guest_clock_dilation(self) -> int:
        """How many times slower than wall-clock time the guest's clocks run (1: real time). A
        host quirk may slow them (KVM on a PVM host); a device whose timer the guest must keep
        up with (a watchdog) stretches its wall-clock timeouts by this factor."""
        return 1

    @abstractmethod
    def create_vm(self, arch: str) -> Vm:
        """Create an empty VM for guest architecture ``arch``.

        Raises :class:`vmmkit.errors.CapabilityError` here, not later, when a capability the
        VM needs is missing."""

    def close(self) -> None:
        """Release host resources (file descriptors)."""


class Vm(ABC):
    """One virtual machine: memory slots, interrupt plumbing and vCPUs."""

    #: Whether eventfd-based notification is offered (else devices use the slow path).
    supports_ioeventfd: bool = False
    supports_irqfd: bool = False

    @abstractmethod
    def add_memory_region(
        self,
        slot: int,
        guest_addr: int,
        size: int,
        host_addr: int,
        *,
        readonly: bool = False,
        log_dirty: bool = False,
    ) -> None:
        """Map host memory at ``host_addr`` into the guest at ``guest_addr``.

        Guest writes to a read-only region arrive as MMIO writes."""

    @abstractmethod
    def remove_memory_region(self, slot: int) -> None: ...

    @abstractmethod
    def create_vcpu(self, index: int, ops: VcpuOps) -> Vcpu: ...

    @abstractmethod
    def setup_interrupt_controller(self) -> None:
        """Create the architecture's in-hypervisor interrupt controller (IOAPIC+PIC+LAPICs,
        GIC) if the backend has one. Called once, before any vCPU is created."""

    @abstractmethod
    def set_irq_line(self, gsi: int, level: bool) -> None:
        """Drive interrupt line ``gsi`` high or low. On x86 GSIs 0-15 are ISA IRQs, routed as on a
        PC and as the firmware tables say: IRQ 0 (the PIT) reaches IOAPIC pin 2, IRQ n pin n."""

    @abstractmethod
    def signal_msi(self, address: int, data: int, *, devid: int | None = None) -> None:
        """Inject one message-signalled interrupt. ``devid`` is the sender's device ID (a PCI
        function's requester ID, ``segment << 16 | bus << 8 | devfn``): an interrupt controller
        that translates MSIs per device (a GICv3 ITS) needs it; x86 MSIs name their target in
        the address and data alone, so x86 backends need not look at it."""

    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        raise NotImplementedError("irqfd")

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        raise NotImplementedError("irqfd")

    def set_msi_route(self, gsi: int, address: int, data: int, *, devid: int | None = None) -> None:
        """Route ``gsi`` to an MSI message (so an irqfd on ``gsi`` raises that MSI); ``devid``
        as for :meth:`signal_msi`."""
        raise NotImplementedError("MSI routing")

    def register_ioeventfd(
        self, fd: int, addr: int, *, pio: bool, length: int = 0, datamatch: int | None = None
    ) -> None:
        raise NotImplementedError("ioeventfd")

    def unregister_ioeventfd(
        self, fd: int, addr: int, *, pio: bool, length: int = 0, datamatch: int | None = None
    ) -> None:
        raise NotImplementedError("ioeventfd")

    def add_port_sink(self, sink: PortSink) -> bool:
        """Serve ``sink.port`` natively; ``False`` if the backend cannot (the device then
        handles the port through :class:`VcpuOps` as usual)."""
        return False

    def remove_port_sink(self, port: int) -> None:
        """Stop serving ``port`` natively."""

    #: Whether :meth:`start_dirty_log`, :meth:`get_dirty_log` and :meth:`stop_dirty_log`
    #: work on this VM (live migration's pre-copy; without it a migration stops the VM first
    #: and copies all of its RAM).
    supports_dirty_log: bool = False

    def start_dirty_log(self) -> None:
        """Log guest writes to every memory slot from now on (slots added later too), each
        slot's log starting empty. Writes the VMM makes itself are not logged."""
        raise NotImplementedError("dirty page logging")

    def stop_dirty_log(self) -> None:
        """Stop logging guest writes (the slots' logs are dropped)."""
        raise NotImplementedError("dirty page logging")

    def get_dirty_log(self, slot: int) -> bytes:
        """The pages of ``slot`` the guest wrote since the last call (or since logging started),
        one bit per page (bit ``i % 8`` of byte ``i // 8``), and clear them."""
        raise NotImplementedError("dirty page logging")

    def restored(self) -> None:
        """Every piece of the VM's state was loaded from a snapshot; its vCPUs have not run."""

    def reset(self) -> None:
        """The guest is being reset (every vCPU is stopped; RAM, devices and vCPU state are
        about to start over): forget what the backend learned about the old guest."""

    def close(self) -> None:
        """Release the VM's host resources."""


class Vcpu(ABC):
    """One virtual CPU. :meth:`run` is called from the vCPU's own thread only."""

    index: int

    @abstractmethod
    def run(self) -> VmExit:
        """Run the guest until an exit the caller must handle; I/O is dispatched inside."""

    @abstractmethod
    def kick(self) -> None:
        """Make a concurrent or the next :meth:`run` return ``INTERRUPTED`` promptly.

        Safe to call from any thread; an exit being handled when the kick lands is completed,
        never lost."""

    def clear_kick(self) -> None:
        """Forget a pending kick (called by the owner before it runs the vCPU again)."""

    def exit_counts(self) -> dict[str, int]:
        """Exits taken so far, by reason (for counters and benchmarks)."""
        return {}

    def close(self) -> None:
        """Release the vCPU's host resources."""


def first_usable(backends: Sequence[type[Hypervisor]]) -> type[Hypervisor] | None:
    for backend in backends:
        availability = backend.is_available()
        if availability and availability.auto:
            return backend
    return None
