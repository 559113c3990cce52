"""The KVM backend: :class:`KvmHypervisor` -> :class:`KvmVm` -> :class:`KvmVcpu`.

These classes implement :mod:`vmmkit.hypervisor` (and the x86 protocols of :mod:`vmmkit.x86`)
on top of the checked bindings in :mod:`vmmkit_kvm.bindings`; they never touch ``ffi``.

Pausing: :meth:`KvmVcpu.kick` sets ``kvm_run->immediate_exit`` and signals the thread that is
inside :meth:`KvmVcpu.run` (a real-time signal whose handler does nothing and is installed
without ``SA_RESTART``), so a ``KVM_RUN`` blocked in the guest or in HLT returns ``EINTR``.
An exit being dispatched when the kick lands is not lost: KVM completes a pending port or
MMIO read on the next ``KVM_RUN`` before it looks at ``immediate_exit``, so the guest sees the
data, and :meth:`KvmVcpu.run` then returns ``INTERRUPTED`` without running further guest code.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from attrs import frozen

from vmmkit import x86_platform
from vmmkit.errors import CapabilityError, HypervisorError
from vmmkit.hypervisor import (
    Availability,
    ExitReason,
    Hypervisor,
    PortSink,
    Vcpu,
    VcpuOps,
    Vm,
    VmExit,
)
from vmmkit.state import StateError
from vmmkit.x86 import (
    CpuIdEntry,
    FpuState,
    MsrEntry,
    SpecialRegisters,
    StandardRegisters,
)
from vmmkit_kvm import bindings, dirty_ring, quirks
from vmmkit_kvm import platform_state as kvm_state
from vmmkit_kvm.bindings import Cap, ExitCode, RawExit, VcpuEventsState
from vmmkit_kvm.quirks import HostQuirks, VmQuirks

__all__ = [
    "KvmHypervisor",
    "KvmVm",
    "KvmVcpu",
    "KvmExitInfo",
    "VcpuEventsState",
    "Cap",
    "REQUIRED_CAPS",
]

from vmmkit.log import get_logger

log = get_logger()

KVM_DEVICE = "/dev/kvm"

#: Capabilities a VM cannot do without; :meth:`KvmHypervisor.create_vm` checks them.
REQUIRED_CAPS: tuple[Cap, ...] = (
    Cap.USER_MEMORY,
    Cap.SET_TSS_ADDR,
    Cap.EXT_CPUID,
    Cap.IRQCHIP,
    Cap.IRQ_ROUTING,
    Cap.IRQFD,
    Cap.IOEVENTFD,
    Cap.IMMEDIATE_EXIT,  # kicks are lossless only with it
    Cap.MP_STATE,
)

#: Where :meth:`KvmVm.setup_interrupt_controller` puts the TSS (three pages) and the EPT
#: identity-map page, just below the 4 GiB BIOS area (as Firecracker does).
DEFAULT_TSS_ADDR = 0xFFFB_D000
DEFAULT_IDENTITY_MAP_ADDR = 0xFFFB_C000


def _host_architectures() -> tuple[str, ...]:
    return ("x86_64",) if platform.machine() in ("x86_64", "AMD64") else ()


@frozen
class KvmExitInfo:
    """The last non-I/O exit in KVM's terms, for code that needs more than :class:`VmExit`
    (a host-quirks module reading an emulation failure's instruction bytes, a debugger)."""

    reason: ExitReason
    kvm_reason: int
    words: tuple[int, ...] = ()
    #: For an emulation failure that carries them: the instruction bytes KVM could not run.
    instruction: bytes = b""


class _Description:
    """``KvmHypervisor.description``: the base text plus the host quirks this host gets."""

    BASE = "Linux KVM (/dev/kvm): in-kernel irqchip, irqfd, ioeventfd"

    def __get__(self, obj: object, owner: type | None = None) -> str:
        summary = quirks.describe()
        return f"{self.BASE}; {summary}" if summary else self.BASE


class KvmHypervisor(Hypervisor):
    """Linux KVM through ``/dev/kvm``.

    ``quirks`` selects the host-quirk set (``auto``, ``pvm``, ``none``; ``None``: what
    ``--kvm-quirks`` or ``VMMKIT_KVM_QUIRKS`` chose, else ``auto``), see
    :mod:`vmmkit_kvm.quirks`.
    """

    name: ClassVar[str] = "kvm"
    description: ClassVar[str] = _Description()  # type: ignore[assignment]
    priority: ClassVar[int] = 10
    architectures: ClassVar[tuple[str, ...]] = _host_architectures()

    @classmethod
    def preload(cls) -> None:
        try:
            quirks.select().preload()
        except ValueError:
            pass  # an unknown quirk mode: creating the hypervisor reports it

    def __init__(self, path: str = KVM_DEVICE, *, quirks: str | None = None) -> None:
        self.quirks: HostQuirks = _select_quirks(quirks)
        self._system = bindings.KvmSystem.open(path)
        try:
            version = self._system.api_version()
            if version != bindings.API_VERSION:
                raise CapabilityError(
                    "KVM_GET_API_VERSION", None, f"KVM API version {version}, expected {bindings.API_VERSION}"
                )
            self._mmap_size = self._system.vcpu_mmap_size()
        except BaseException:
            self._system.close()
            raise
        self._tsc_khz: int | None = None
        self._tsc_known = False

    @classmethod
    def is_available(cls, path: str = KVM_DEVICE) -> Availability:
        if not cls.architectures:
            return Availability(False, f"KVM backend supports x86-64 hosts, not {platform.machine()}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return Availability(False, f"{path} not found")
        except PermissionError:
            return Availability(False, f"{path}: permission denied")
        except OSError as exc:
            return Availability(False, f"{path}: {os.strerror(exc.errno or 0)}")
        system = bindings.KvmSystem(fd, path)
        try:
            version = system.api_version()
            dirty_log = dirty_ring.describe(system.check_extension)
        except HypervisorError as exc:
            return Availability(False, f"{path}: {exc}")
        finally:
            system.close()
        if version != bindings.API_VERSION:
            return Availability(False, f"KVM API version {version}, expected {bindings.API_VERSION}")
        return Availability(True, dirty_log)

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on ``/dev/kvm`` (0: absent)."""
        return self._system.check_extension(cap)

    def create_vm(self, arch: str = "x86_64") -> KvmVm:
        if arch not in self.architectures:
            raise CapabilityError("KVM_CREATE_VM", None, f"cannot run {arch} guests on this host")
        missing = [cap.name for cap in REQUIRED_CAPS if self._system.check_extension(cap) <= 0]
        if missing:
            raise CapabilityError(
                "KVM_CHECK_EXTENSION", None, "missing " + ", ".join(f"KVM_CAP_{name}" for name in missing)
            )
        vm_fd = bindings.KvmVmFd(self._system.create_vm(), self._system)
        try:
            return KvmVm(vm_fd, self._mmap_size, quirks=self.quirks)
        except BaseException:
            vm_fd.close()
            raise

    # X86Hypervisor

    @property
    def guest_clock_dilation(self) -> int:
        return self.quirks.dilation

    def supported_cpuid(self) -> list[CpuIdEntry]:
        return self.quirks.supported_cpuid(self._system.supported_cpuid())

    def msr_index_list(self) -> list[int]:
        return self._system.msr_index_list()

    def tsc_khz(self) -> int | None:
        """The TSC frequency KVM gives guests (asked of a throw-away vCPU, then cached)."""
        if not self._tsc_known:
            if self._system.check_extension(Cap.GET_TSC_KHZ) <= 0:
                self._tsc_khz = None
            else:
                vm = bindings.KvmVmFd(self._system.create_vm(), self._system)
                try:
                    fd = vm.create_vcpu(0)
                    try:
                        self._tsc_khz = bindings.KvmVcpuFd.tsc_khz_of(fd)
                    finally:
                        os.close(fd)
                finally:
                    vm.close()
            self._tsc_known = True
        return self._tsc_khz

    def close(self) -> None:
        self._system.close()


class KvmVm(Vm):
    """A KVM virtual machine."""

    supports_dirty_log = True  # KVM_CAP_USER_MEMORY's KVM_MEM_LOG_DIRTY_PAGES: every x86 KVM has it

    def __init__(self, fd: bindings.KvmVmFd, mmap_size: int, *, quirks: HostQuirks | None = None) -> None:
        self._fd = fd
        self._mmap_size = mmap_size
        #: The host-quirk set this VM runs under (see :mod:`vmmkit_kvm.quirks`).
        self.quirks = quirks if quirks is not None else HostQuirks()
        caps = {cap: fd.check_extension(cap) for cap in Cap}
        self.capabilities: dict[str, int] = {cap.name.lower(): value for cap, value in caps.items()}
        self.supports_irqfd = caps[Cap.IRQFD] > 0
        self.supports_ioeventfd = caps[Cap.IOEVENTFD] > 0
        if caps[Cap.IRQ_ROUTING] > 0:
            fd.max_gsi = caps[Cap.IRQ_ROUTING]
        self._ring_page = caps[Cap.COALESCED_MMIO]
        # The sync area as KVM offers it; vCPUs ask only for the general registers: every
        # bit costs every exit (the special registers ~0.16 us on the PVM host, issue 20), and
        # KvmVcpu.set_sync_sregs() adds them where the exits read them (the PVM quirks).
        self._sync_available = caps[Cap.SYNC_REGS] & (bindings.SYNC_REGS | bindings.SYNC_SREGS)
        self._sync_regs = self._sync_available & bindings.SYNC_REGS
        if caps[Cap.EXIT_ON_EMULATION_FAILURE] > 0:
            # Emulation failures then carry the instruction bytes.
            try:
                fd.enable_cap(Cap.EXIT_ON_EMULATION_FAILURE, 1)
            except HypervisorError as exc:
                log.debug("kvm.cap.unavailable", cap="EXIT_ON_EMULATION_FAILURE", error=str(exc))
        # The dirty ring goes on before any vCPU exists, or never (dirty_ring.py).
        #: Where get_dirty_log reads guest writes: KVM's dirty ring, or None for KVM_GET_DIRTY_LOG.
        self.dirty_rings = dirty_ring.create(fd, lambda: list(self._slots))
        #: "bitmap" or "ring (N entries[, acq_rel])", as vmmkit's logs show it.
        self.dirty_log_mode = self.dirty_rings.name if self.dirty_rings is not None else "bitmap"
        self._slots: dict[int, tuple[int, int, int, bool, bool]] = {}
        self._dirty_logging = False  # start_dirty_log: every writable slot logs guest writes
        self._msi_routes: dict[int, tuple[int, int]] = {}
        self._irqchip = False
        self._pit = False
        self._vcpus: list[KvmVcpu] = []
        self._vm_quirks: VmQuirks | None = self.quirks.attach(self)
        log.debug("kvm.vm.created", fd=fd.fd, ring_page=self._ring_page, sync_regs=self._sync_regs,
                  quirks=self.quirks.name, dirty_log=self.dirty_log_mode)

    # memory

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
        if size <= 0:
            raise ValueError("a memory region needs a positive size")
        if readonly and self.capabilities["readonly_mem"] <= 0:
            raise CapabilityError("KVM_SET_USER_MEMORY_REGION", None, "KVM_CAP_READONLY_MEM is missing")
        log_dirty = log_dirty or (self._dirty_logging and not readonly)  # a slot added while migrating
        self._fd.set_user_memory_region(
            slot, guest_addr, size, host_addr, readonly=readonly, log_dirty=log_dirty
        )
        # A new table, never changed in place: the PVM quirks read it from vCPU threads while a
        # slot is plugged from another (memory hotplug).
        self._slots = {**self._slots, slot: (guest_addr, size, host_addr, readonly, log_dirty)}

    def remove_memory_region(self, slot: int) -> None:
        if slot not in self._slots:
            raise ValueError(f"memory slot {slot} is not in use")
        guest_addr, _, host_addr, readonly, _ = self._slots[slot]
        self._fd.set_user_memory_region(slot, guest_addr, 0, host_addr, readonly=readonly)
        self._slots = {key: value for key, value in self._slots.items() if key != slot}

    def memory_slots(self) -> list[tuple[int, int, int]]:
        """``(guest_addr, size, host_addr)`` of every memory slot."""
        return [(guest, size, host) for guest, size, host, _ro, _dirty in self._slots.values()]

    def get_dirty_log(self, slot: int) -> bytes:
        """Pages of ``slot`` written since the last call, one bit per page (the region must
        have been added with ``log_dirty=True``, or :meth:`start_dirty_log` called)."""
        if slot not in self._slots:
            raise ValueError(f"memory slot {slot} is not in use")
        if self.dirty_rings is not None:
            return self.dirty_rings.take(slot, self._slots[slot][1])
        return self._fd.get_dirty_log(slot, self._slots[slot][1])

    def start_dirty_log(self) -> None:
        """``KVM_MEM_LOG_DIRTY_PAGES`` on every writable slot (``KVM_SET_USER_MEMORY_REGION``
        changing only the flags, which KVM allows on a live slot); each log is then read once
        to start empty."""
        self._dirty_logging = True
        self._set_dirty_logging(True)
        log.info("kvm.dirty_log.start", mode=self.dirty_log_mode)
        if self.dirty_rings is not None:
            self.dirty_rings.discard()
            return
        for slot, (_guest, _size, _host, readonly, _dirty) in self._slots.items():
            if not readonly:
                self.get_dirty_log(slot)

    def stop_dirty_log(self) -> None:
        self._dirty_logging = False
        self._set_dirty_logging(False)
        if self.dirty_rings is not None:
            self.dirty_rings.discard()  # entries of the last writes: their slots no longer log

    def _set_dirty_logging(self, on: bool) -> None:
        for slot, (guest_addr, size, host_addr, readonly, log_dirty) in list(self._slots.items()):
            if not readonly and log_dirty != on:
                self.add_memory_region(slot, guest_addr, size, host_addr, log_dirty=on)

    # vCPUs

    def create_vcpu(self, index: int, ops: VcpuOps, *, callback: bool = False) -> KvmVcpu:
        """Create vCPU ``index``. ``callback`` selects the Python dispatch path: the native
        loop calls into Python per access instead of returning from the run call (both are
        measured by ``bench/exits.py``; the default is the faster on the hosts measured)."""
        missing = [name for name in _OPS_METHODS if not callable(getattr(ops, name, None))]
        if missing:
            raise TypeError(f"ops lacks {', '.join(missing)} (a VcpuOps is needed)")
        fd = self._fd.create_vcpu(index)
        try:
            native = bindings.KvmVcpuFd(
                self._fd, fd, self._mmap_size, ops, ring_page=self._ring_page, sync_regs=self._sync_regs,
                callback=callback,
            )
        except BaseException:
            os.close(fd)
            raise
        if self.dirty_rings is not None:
            try:
                self.dirty_rings.attach(fd)
            except BaseException:
                native.close()
                raise
        vcpu = KvmVcpu(index, native, quirks=self._vm_quirks, sync_available=self._sync_available,
                       dirty_rings=self.dirty_rings)
        self._vcpus.append(vcpu)
        if self._vm_quirks is not None:
            self._vm_quirks.vcpu_created(vcpu)
        return vcpu

    # interrupts

    def setup_interrupt_controller(
        self,
        *,
        pit: bool = True,
        tss_addr: int = DEFAULT_TSS_ADDR,
        identity_map_addr: int = DEFAULT_IDENTITY_MAP_ADDR,
    ) -> None:
        """TSS and identity-map pages, the in-kernel IOAPIC + PIC + LAPICs with the PC's
        interrupt routing, and (unless ``pit=False``, for a userspace PIT, or the host quirks
        forbid it) the in-kernel PIT.

        Legacy interrupt numbers are ISA IRQs: GSI n (``set_irq_line``, an irqfd, a
        :class:`vmmkit.irq.GsiLine`) drives IOAPIC pin n and, below 16, PIC input n, except
        GSI 0, which drives IOAPIC pin 2 and PIC input 0
        (:data:`vmmkit_kvm.bindings.PC_IRQ_ROUTES`, QEMU's table). So a
        PIT raises GSI 0, the userspace one and KVM's alike, and the guest finds it on the
        pin the MADT's interrupt source override names; GSI 2 goes nowhere."""
        if pit and not self.quirks.in_kernel_pit:
            log.debug("kvm.quirks.no_in_kernel_pit", quirks=self.quirks.name)
            pit = False
        if self._vcpus:
            raise HypervisorError("KVM_CREATE_IRQCHIP", None, "must come before the first vCPU")
        self._fd.set_tss_addr(tss_addr)
        if self.capabilities["set_identity_map_addr"] > 0:
            self._fd.set_identity_map_addr(identity_map_addr)
        self._fd.create_irqchip()
        self._irqchip = True
        # Replace KVM's default routing (GSI n -> IOAPIC pin n) before anything can raise IRQ 0.
        self._fd.set_gsi_routing(self._msi_routes)
        if pit:
            if self.capabilities["pit2"] <= 0:
                raise CapabilityError("KVM_CREATE_PIT2", None, "KVM_CAP_PIT2 is missing")
            self._fd.create_pit2()
        self._pit = pit

    def set_irq_line(self, gsi: int, level: bool) -> None:
        self._fd.irq_line(gsi, level)

    def irq_line_status(self, gsi: int, level: bool) -> int:
        """Drive ``gsi`` and return KVM's status (> 0 delivered, 0 coalesced, < 0 masked)."""
        return self._fd.irq_line(gsi, level)

    def signal_msi(self, address: int, data: int, *, devid: int | None = None) -> None:
        # x86: the LAPIC is named by address and data; KVM x86 has no use for a device ID
        self._fd.signal_msi(address, data)

    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        self._fd.irqfd(fd, gsi, resample_fd=resample_fd)

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        self._fd.irqfd(fd, gsi, deassign=True)

    def set_msi_route(self, gsi: int, address: int, data: int, *, devid: int | None = None) -> None:
        if not self._irqchip:
            raise HypervisorError("KVM_SET_GSI_ROUTING", None, "MSI routes need the in-kernel irqchip")
        routes = {**self._msi_routes, gsi: (address, data)}
        self._fd.set_gsi_routing(routes)
        self._msi_routes = routes

    def remove_msi_route(self, gsi: int) -> None:
        if gsi in self._msi_routes:
            routes = {g: r for g, r in self._msi_routes.items() if g != gsi}
            self._fd.set_gsi_routing(routes)
            self._msi_routes = routes

    def register_ioeventfd(
        self, fd: int, addr: int, *, pio: bool, length: int = 0, datamatch: int | None = None
    ) -> None:
        self._fd.ioeventfd(fd, addr, pio=pio, length=length, datamatch=datamatch)

    def unregister_ioeventfd(
        self, fd: int, addr: int, *, pio: bool, length: int = 0, datamatch: int | None = None
    ) -> None:
        self._fd.ioeventfd(fd, addr, pio=pio, length=length, datamatch=datamatch, deassign=True)

    # native port handling

    def add_port_sink(self, sink: PortSink) -> bool:
        return self._fd.add_sink(
            sink.port, sink.fd, timestamp=sink.timestamp, read_value=sink.read_value, label=sink.label,
            json=sink.json,
        )

    def remove_port_sink(self, port: int) -> None:
        self._fd.remove_sink(port)

    def register_coalesced_mmio(self, addr: int, size: int) -> None:
        """Buffer guest writes to ``[addr, addr+size)`` in the ring instead of exiting; they
        reach :class:`VcpuOps` at the next exit of any vCPU (for write-only registers whose
        writes need no immediate effect)."""
        if self._ring_page <= 0:
            raise CapabilityError("KVM_REGISTER_COALESCED_MMIO", None, "KVM_CAP_COALESCED_MMIO is missing")
        self._fd.coalesced_zone(addr, size, pio=False)

    def unregister_coalesced_mmio(self, addr: int, size: int) -> None:
        self._fd.coalesced_zone(addr, size, pio=False, register=False)

    def register_coalesced_pio(self, port: int, size: int) -> None:
        """Buffer guest port writes in the ring; writes to a port sink are then served in C
        when the ring is drained (the 0x80 boot-progress port)."""
        if self._ring_page <= 0 or self.capabilities["coalesced_pio"] <= 0:
            raise CapabilityError("KVM_REGISTER_COALESCED_PIO", None, "KVM_CAP_COALESCED_PIO is missing")
        self._fd.coalesced_zone(port, size, pio=True)

    def unregister_coalesced_pio(self, port: int, size: int) -> None:
        self._fd.coalesced_zone(port, size, pio=True, register=False)

    # clock

    def get_clock(self) -> int:
        """kvmclock's value in ns (KVM_GET_CLOCK)."""
        return self._fd.get_clock()

    def set_clock(self, ns: int) -> None:
        self._fd.set_clock(ns)

    # snapshots (vmmkit.state.Snapshottable; the layout is vmmkit.x86_platform's)

    state_version: ClassVar[int] = x86_platform.STATE_VERSION

    def save_state(self) -> dict[str, Any]:
        """The in-kernel IOAPIC and PICs in the backend-neutral layout, the in-kernel PIT
        (KVM's own layout: only KVM takes it) and kvmclock."""
        if not self._irqchip:
            return x86_platform.platform_state(clock_ns=self.get_clock())
        pit = self._fd.get_pit2() if self._has_pit() else None
        return x86_platform.platform_state(
            ioapic=kvm_state.ioapic_from_kvm(self._fd.get_irqchip(kvm_state.KVM_IRQCHIP_IOAPIC)),
            pics=[kvm_state.pic_from_kvm(self._fd.get_irqchip(chip))
                  for chip in (kvm_state.KVM_IRQCHIP_PIC_MASTER, kvm_state.KVM_IRQCHIP_PIC_SLAVE)],
            kvm_pit2=pit,
            clock_ns=self.get_clock(),
        )

    def restore_state(self, state: Mapping[str, Any]) -> None:
        parsed = x86_platform.parse_platform_state(state)
        if parsed.ioapic is not None or parsed.pics:
            if not self._irqchip:
                raise StateError("the snapshot has an in-kernel interrupt controller state; this VM has none")
            if parsed.ioapic is not None:
                current = self._fd.get_irqchip(kvm_state.KVM_IRQCHIP_IOAPIC)
                self._fd.set_irqchip(kvm_state.KVM_IRQCHIP_IOAPIC, kvm_state.ioapic_to_kvm(parsed.ioapic, current))
            for chip, pic in zip((kvm_state.KVM_IRQCHIP_PIC_MASTER, kvm_state.KVM_IRQCHIP_PIC_SLAVE),
                                 parsed.pics, strict=False):
                self._fd.set_irqchip(chip, kvm_state.pic_to_kvm(pic, self._fd.get_irqchip(chip)))
        if parsed.kvm_pit2 is not None:
            if not self._has_pit():
                raise StateError("the snapshot has KVM's in-kernel PIT; this VM runs without it")
            self._fd.set_pit2(parsed.kvm_pit2)
        elif self._has_pit():
            raise StateError("this VM has KVM's in-kernel PIT but the snapshot has no PIT state for it")
        if parsed.clock_ns is not None:
            self.set_clock(parsed.clock_ns)

    def _has_pit(self) -> bool:
        return self._irqchip and self._pit

    def restored(self) -> None:
        if self._vm_quirks is not None:
            self._vm_quirks.restored()

    def reset(self) -> None:
        if self._vm_quirks is not None:
            self._vm_quirks.reset()

    def start_quirks(self) -> None:
        """Start the host quirks' helpers for a VM the machine has built (see
        :meth:`vmmkit_kvm.quirks.VmQuirks.start`)."""
        if self._vm_quirks is not None:
            self._vm_quirks.start()

    @property
    def in_kernel_pit(self) -> bool:
        """Whether guests of this VM get KVM's PIT (else a userspace one is needed)."""
        return self.quirks.in_kernel_pit

    def close(self) -> None:
        if self._vm_quirks is not None:
            self._vm_quirks.close()
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        if self.dirty_rings is not None:
            self.dirty_rings.close()
        self._fd.close()


_OPS_METHODS = ("pio_read", "pio_write", "mmio_read", "mmio_write")

_SYSTEM_EVENT_NAMES = {
    bindings.SYSTEM_EVENT_SHUTDOWN: "shutdown",
    bindings.SYSTEM_EVENT_RESET: "reset",
    bindings.SYSTEM_EVENT_CRASH: "crash",
}
_BAD_RUN_WHAT = {1: "KVM_EXIT_IO size/count/data_offset", 2: "KVM_EXIT_MMIO len", 3: "coalesced ring index"}


class KvmVcpu(Vcpu):
    """A KVM vCPU; implements :class:`vmmkit.x86.X86Vcpu`."""

    def __init__(self, index: int, fd: bindings.KvmVcpuFd, *, quirks: VmQuirks | None = None,
                 sync_available: int = 0, dirty_rings: dirty_ring.DirtyRings | None = None) -> None:
        self.index = index
        self._fd = fd
        self._dirty_rings = dirty_rings
        self._ring_full_exits = 0
        self._quirks = quirks
        self._sync_available = sync_available
        self.last_exit: KvmExitInfo | None = None

    # running

    def run(self) -> VmExit:
        """Run until an exit the caller must handle. Exits the host quirks resolve (see
        :mod:`vmmkit_kvm.quirks`) never come back from here: the vCPU simply runs on."""
        while True:
            raw = self._fd.run()
            if (raw.code == ExitCode.UNKNOWN and raw.kvm_reason == bindings.EXIT_DIRTY_RING_FULL
                    and self._dirty_rings is not None):
                # The ring reached its soft limit: harvest (this vCPU's ring with the others)
                # and reset, then KVM lets it run again (api.rst, KVM_EXIT_DIRTY_RING_FULL).
                self._dirty_rings.harvest(full_exit=True)
                self._ring_full_exits += 1
                continue
            exit_, info = _translate(raw)
            self.last_exit = info
            if self._quirks is None or not self._quirks.handle_exit(self, exit_, info):
                return exit_

    def kick(self) -> None:
        self._fd.kick()

    def clear_kick(self) -> None:
        self._fd.clear_kick()

    @property
    def kicked(self) -> bool:
        return self._fd.kicked()

    def exit_counts(self) -> dict[str, int]:
        counts = self._fd.counts()
        if self._dirty_rings is not None:
            counts["dirty-ring-full"] = self._ring_full_exits
        if self._quirks is not None:
            counts.update(self._quirks.counts(self))
        return counts

    def set_ops(self, ops: VcpuOps) -> None:
        """Replace the I/O callback object (only while the vCPU is not running)."""
        self._fd.set_ops(ops)

    def set_sync_sregs(self, enabled: bool) -> None:
        """Have KVM store the special registers on every exit from the next run on (where
        KVM offers it), for exit handlers that read them each time: :meth:`get_sregs` is then
        free instead of an ioctl, and every other exit costs a little more."""
        bits = self._fd.sync_regs & ~bindings.SYNC_SREGS
        if enabled:
            bits |= self._sync_available & bindings.SYNC_SREGS
        if bits != self._fd.sync_regs:
            self._fd.set_sync_regs(bits)

    @property
    def callback_dispatch(self) -> bool:
        return self._fd.callback

    @callback_dispatch.setter
    def callback_dispatch(self, enabled: bool) -> None:
        self._fd.set_callback(enabled)

    def close(self) -> None:
        if self._dirty_rings is not None and self._fd.fd >= 0:
            self._dirty_rings.detach(self._fd.fd)  # the ring's mapping goes before the fd
        self._fd.close()

    # X86Vcpu

    def get_regs(self) -> StandardRegisters:
        return self._fd.get_regs()

    def set_regs(self, regs: StandardRegisters) -> None:
        self._fd.set_regs(regs)

    def get_sregs(self) -> SpecialRegisters:
        return self._fd.get_sregs()

    def set_sregs(self, sregs: SpecialRegisters) -> None:
        self._fd.set_sregs(sregs)

    def get_fpu(self) -> FpuState:
        return self._fd.get_fpu()

    def set_fpu(self, fpu: FpuState) -> None:
        self._fd.set_fpu(fpu)

    def get_msrs(self, indices: Sequence[int]) -> list[MsrEntry]:
        return self._fd.get_msrs(indices)

    def set_msrs(self, msrs: Sequence[MsrEntry]) -> None:
        self._fd.set_msrs(msrs)

    def set_cpuid(self, entries: Sequence[CpuIdEntry]) -> None:
        # KVM refuses KVM_SET_CPUID2 once the vCPU has run unless the table is unchanged; a
        # VM reset re-applies the same table, which needs no ioctl at all.
        table = tuple(entries)
        if table == getattr(self, "_cpuid_set", None):
            return
        self._fd.set_cpuid(table)
        self._cpuid_set = table

    def get_cpuid(self) -> list[CpuIdEntry]:
        return self._fd.get_cpuid()

    def get_lapic(self) -> bytes:
        return self._fd.get_lapic()

    def set_lapic(self, state: bytes) -> None:
        self._fd.set_lapic(state)

    def get_mp_state(self) -> int:
        return self._fd.get_mp_state()

    def set_mp_state(self, state: int) -> None:
        self._fd.set_mp_state(state)

    # KVM extras

    def get_xcrs(self) -> dict[int, int]:
        return self._fd.get_xcrs()

    def set_xcrs(self, xcrs: dict[int, int]) -> None:
        # A host without XSAVE has no XCRs: KVM_GET_XCRS reports none and KVM_SET_XCRS fails
        # (EINVAL) even for none, so an empty set (what get_xcrs gave there) is a no-op.
        if xcrs:
            self._fd.set_xcrs(xcrs)

    def get_xsave(self) -> bytes:
        return self._fd.get_xsave()

    def set_xsave(self, area: bytes) -> None:
        self._fd.set_xsave(area)

    def get_vcpu_events(self) -> VcpuEventsState:
        return self._fd.get_vcpu_events()

    def set_vcpu_events(self, events: VcpuEventsState) -> None:
        self._fd.set_vcpu_events(events)

    def tsc_khz(self) -> int:
        return self._fd.get_tsc_khz()

    def set_guest_debug(
        self,
        *,
        enable: bool = True,
        single_step: bool = False,
        software_breakpoints: bool = False,
        hw_breakpoints: Sequence[int] = (),
    ) -> None:
        """KVM_SET_GUEST_DEBUG: hits come back from :meth:`run` as ``ExitReason.DEBUG``."""
        self._fd.set_guest_debug(
            enable=enable, single_step=single_step, software_breakpoints=software_breakpoints,
            hw_breakpoints=hw_breakpoints,
        )


def _select_quirks(mode: str | None) -> HostQuirks:
    try:
        selected = quirks.select(mode)
    except ValueError as exc:
        raise CapabilityError("host quirks", None, str(exc)) from None
    if selected.active:
        log.info("kvm.quirks", quirks=selected.name, summary=selected.summary())
    return selected


def _translate(raw: RawExit) -> tuple[VmExit, KvmExitInfo]:
    code, words = raw.code, raw.words
    instruction = b""
    if code == ExitCode.HLT:
        reason, detail = ExitReason.HLT, ""
    elif code == ExitCode.INTERRUPTED:
        reason, detail = ExitReason.INTERRUPTED, "kicked"
    elif code == ExitCode.SHUTDOWN:
        reason, detail = ExitReason.SHUTDOWN, "triple fault"
    elif code == ExitCode.SYSTEM_EVENT:
        kind = words[0] if words else 0
        name = _SYSTEM_EVENT_NAMES.get(kind, f"type {kind}")
        reason = {bindings.SYSTEM_EVENT_RESET: ExitReason.RESET,
                  bindings.SYSTEM_EVENT_SHUTDOWN: ExitReason.POWER_OFF}.get(kind, ExitReason.SHUTDOWN)
        detail = f"system event: {name}"
        if len(words) > 1:
            detail += " data " + " ".join(f"{w:#x}" for w in words[1:])
    elif code == ExitCode.INTERNAL_ERROR:
        reason = ExitReason.INTERNAL_ERROR
        suberror = words[0] if words else 0
        data = words[1:]
        detail = f"suberror {suberror}"
        if suberror == bindings.INTERNAL_ERROR_EMULATION:
            detail += " (emulation failure)"
            if data and data[0] & bindings.INTERNAL_ERROR_FLAG_INSN_BYTES and len(data) >= 3:
                raw_bytes = data[1].to_bytes(8, "little") + data[2].to_bytes(8, "little")
                size = min(raw_bytes[0], 15)
                instruction = raw_bytes[1 : 1 + size]
                detail += ": instruction " + instruction.hex(" ")
        if data:
            detail += "; data " + " ".join(f"{w:#x}" for w in data)
    elif code == ExitCode.FAIL_ENTRY:
        reason = ExitReason.FAIL_ENTRY
        detail = f"hardware entry failure reason {words[0]:#x} on cpu {words[1]}"
    elif code == ExitCode.DEBUG:
        reason = ExitReason.DEBUG
        detail = f"exception {words[0]} at pc {words[1]:#x} dr6 {words[2]:#x} dr7 {words[3]:#x}"
    elif code == ExitCode.BAD_RUN:
        reason = ExitReason.INTERNAL_ERROR
        what = _BAD_RUN_WHAT.get(words[0], "field") if words else "field"
        detail = f"kvm_run {what} out of bounds: " + " ".join(f"{w:#x}" for w in words[1:])
    else:
        reason = ExitReason.INTERNAL_ERROR
        detail = f"unhandled KVM exit reason {raw.kvm_reason}"
    return VmExit(reason, detail), KvmExitInfo(reason, raw.kvm_reason, words, instruction)

