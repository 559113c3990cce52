"""The Machine: builds one VM from a ``VmConfig`` and owns its lifecycle and threads.

It asks the registries for the hypervisor, the architecture and each device type, wires the
devices onto the buses, loads the payload, and runs one OS thread per vCPU (named ``vcpuN``).
It names no backend, architecture or device: those come from plugins.
"""

from __future__ import annotations

import enum
import platform
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from vmmkit.arch import Architecture, BootInfo, MemoryLayout
from vmmkit.bus import Bus
from vmmkit.config import VmConfig
from vmmkit.device import DeviceRequest, PlacedDevice, check_devices
from vmmkit.device_manager import DeviceManager, default_virtio_transport
from vmmkit.errors import BootError, DeviceError, NotSupportedError, VmmError
from vmmkit.eventloop import EventLoop
from vmmkit.hypervisor import ExitReason, Hypervisor, Vcpu, Vm
from vmmkit.irq import InterruptLine
from vmmkit.log import get_logger
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.paths import PathError, require_regular_file
from vmmkit.ratelimit import RateLimiter, RateLimitGroups
from vmmkit.registry import AUTO, Registries
from vmmkit.sandbox import VCPU, VMM, activate_landlock, enter_thread, resolve_seccomp_mode
from vmmkit.sandbox import deactivate as deactivate_landlock
from vmmkit.sandbox.landlock import vm_rules as landlock_rules

if TYPE_CHECKING:
    from vmmkit.device_memory import DeviceMemoryRegion
    from vmmkit.memory_hotplug import MemoryHotplug, VirtioMemHotplug
    from vmmkit.memory_zones import ZoneHotplug
    from vmmkit.snapshot import SnapshotImage

log = get_logger()

_HEADER_BYTES = 64 * 1024


class MachineState(enum.StrEnum):
    """The VM states of Cloud Hypervisor's ``VmInfo.state``."""

    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"


class StopReason(enum.StrEnum):
    POWER_OFF = "guest-poweroff"
    TRIPLE_FAULT = "triple-fault"
    INTERNAL_ERROR = "internal-error"
    REQUESTED = "requested"


@attrs.frozen
class MachineExit:
    """How the machine stopped, and the status the VMM process should exit with."""

    reason: StopReason
    status: int
    detail: str = ""


def host_architecture() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def preload(config: VmConfig, registries: Registries, *, hypervisor: str = AUTO, arch: str | None = None) -> None:
    """Import the code a boot of ``config`` will run: the architecture's builders, the
    implementations of the devices it asks for, the VM's virtio transport. Builds nothing and
    reports nothing: :meth:`Machine.build` reports what is wrong. The API calls this at
    ``vm.create``, so that ``vm.boot`` spends its time on the VM, not on imports."""
    arch_name = arch or host_architecture()
    try:
        config = config.assign_ids()
        registries.select_hypervisor(hypervisor, arch_name).preload()
        architecture = registries.architectures.get(arch_name)()
        architecture.preload(config)
        requests = list(architecture.platform_devices(config))
        for device_type in registries.devices:
            requests.extend(device_type.requests(config))
        for name in dict.fromkeys(request.type for request in requests):
            if name in registries.devices:
                registries.devices.get(name).preload()
        if config.memory.hotplug_size:
            import vmmkit.memory_hotplug  # noqa: F401
        virtio = default_virtio_transport(config, architecture.default_virtio_transport)
        for transport in registries.transports:
            if transport.family == "platform" or virtio in (transport.name, transport.alias):
                transport.preload()
    except Exception as exc:  # whatever is wrong, build() says it properly
        log.debug("vm.preload_failed", error=str(exc))


class VcpuDispatch:
    """The :class:`vmmkit.hypervisor.VcpuOps` every vCPU uses: accesses go to the buses."""

    __slots__ = ("pio", "mmio")

    def __init__(self, pio: Bus, mmio: Bus) -> None:
        self.pio = pio
        self.mmio = mmio

    def pio_read(self, port: int, size: int) -> bytes:
        data = self.pio.read(port, size)
        return b"\xff" * size if data is None else _fit(data, size)

    def pio_write(self, port: int, data: bytes) -> None:
        self.pio.write(port, data)

    def mmio_read(self, addr: int, size: int) -> bytes:
        data = self.mmio.read(addr, size)
        return b"\xff" * size if data is None else _fit(data, size)

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.mmio.write(addr, data)


def _fit(data: bytes, size: int) -> bytes:
    """Devices must answer ``size`` bytes; a short or long answer is padded or cut."""
    if len(data) == size:
        return data
    return (bytes(data) + b"\xff" * size)[:size]


class _DeviceContext:
    """The :class:`vmmkit.device.DeviceContext` the machine hands to device types."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine

    @property
    def memory(self) -> GuestMemory:
        assert self._machine.memory is not None
        return self._machine.memory

    @property
    def config(self) -> VmConfig:
        return self._machine.config

    @property
    def event_loop(self) -> EventLoop:
        return self._machine.event_loop

    def interrupt_line(self, irq: int | None = None) -> tuple[int, InterruptLine]:
        return self._machine.manager.allocate_irq(irq)

    def request_shutdown(self, reason: str) -> None:
        self._machine.request_stop(StopReason.POWER_OFF, reason)

    def map_device_memory(self, host_address: int, size: int, *, alignment: int,
                          at: int | None = None) -> DeviceMemoryRegion:
        return self._machine.manager.device_memory.map(host_address, size, alignment=alignment, at=at)

    def request_reset(self, reason: str) -> None:
        self._machine.request_reset(reason)

    @property
    def guest_clock_dilation(self) -> int:
        """:attr:`vmmkit.hypervisor.Hypervisor.guest_clock_dilation` of the VM's backend."""
        hypervisor = self._machine.hypervisor
        return hypervisor.guest_clock_dilation if hypervisor is not None else 1

    def set_exit_status(self, status: int) -> None:
        self._machine.guest_exit_status = status

    def emit_event(self, name: str, **properties: Any) -> None:
        self._machine.emit(name, **properties)

    def rate_limit_group(self, group_id: str) -> RateLimiter:
        return self._machine.rate_limit_groups.get(group_id)

    @property
    def log_fd(self) -> int | None:
        return self._machine.log_fd


class Machine:
    """One VM. ``build()`` → ``boot()`` → ``wait()``; or just :meth:`run`."""

    def __init__(
        self,
        config: VmConfig,
        *,
        registries: Registries,
        plugin_manager: pluggy.PluginManager,
        hypervisor: str = AUTO,
        arch: str | None = None,
        log_fd: int | None = None,
        seccomp: str | None = None,
    ) -> None:
        #: Device ids are assigned here, once, wherever the configuration came from.
        self.config = config.assign_ids()
        self.log_fd = log_fd
        self.registries = registries
        self.pm = plugin_manager
        self.arch_name = arch or host_architecture()
        self.hypervisor_name = hypervisor
        self.state = MachineState.CREATED
        self.hypervisor: Hypervisor | None = None
        self.arch: Architecture | None = None
        self.layout: MemoryLayout | None = None
        self.memory: GuestMemory | None = None
        self.vm: Vm | None = None
        self.boot_info: BootInfo | None = None
        self.event_loop = EventLoop()
        #: ``--rate-limit-group``: one limiter per group, shared by the disks naming it.
        self.rate_limit_groups = RateLimitGroups({g.id: g.rate_limiter_config for g in self.config.rate_limit_groups})
        self.device_manager: DeviceManager | None = None
        #: RAM plugged while the guest runs (``--memory hotplug_size=``), once built.
        self.memory_hotplug: MemoryHotplug | VirtioMemHotplug | None = None
        #: The memory zones' virtio-mem devices (``vm.resize-zone``), ``None`` without.
        self.zone_hotplug: ZoneHotplug | None = None
        self.vcpus: list[Vcpu] = []
        self.guest_exit_status: int | None = None
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._exit: MachineExit | None = None
        self._reset_requested: str | None = None
        self._done = threading.Event()
        self._final: MachineExit | None = None
        self._control: threading.Thread | None = None
        self._pause_requested = False
        self._parked = 0
        self._park = threading.Condition(self._lock)
        self._device_ctx = _DeviceContext(self)
        self._started_at = time.monotonic()
        self._restored = False
        #: vCPU hotplug: the positions whose vCPU runs (a thread each), each thread's retire
        #: event, and a removal the guest has been asked for (positions left, done).
        self._active: set[int] = set()
        self._retire: dict[int, tuple[threading.Event, threading.Thread]] = {}
        self._removal: tuple[set[int], threading.Event] | None = None
        self._dispatch: VcpuDispatch | None = None
        #: ``--seccomp``: the filters this VM's threads install (:mod:`vmmkit.sandbox`).
        self.seccomp = resolve_seccomp_mode(seccomp)
        self._landlocked = False

    # -- devices -----------------------------------------------------------------------------

    @property
    def manager(self) -> DeviceManager:
        """The device manager (it exists once :meth:`build` has created the VM)."""
        if self.device_manager is None:
            raise VmmError("the VM has not been built yet")
        return self.device_manager

    @property
    def devices(self) -> list[PlacedDevice]:
        """The placed devices, in placement order (none before :meth:`build`)."""
        return self.device_manager.devices if self.device_manager is not None else []

    @property
    def pio_bus(self) -> Bus:
        return self.manager.pio_bus

    @property
    def mmio_bus(self) -> Bus:
        return self.manager.mmio_bus

    def add_device(self, request: DeviceRequest) -> PlacedDevice | None:
        """Build a device from the registry and place it; ``None`` if the type declined."""
        return self.manager.create(request)

    def remove_device(self, device_id: str) -> PlacedDevice:
        """Take a device off the VM and close it (at once: before the guest runs)."""
        return self.manager.remove(device_id)

    def hotplug_device(self, request: DeviceRequest) -> PlacedDevice:
        """Add a PCI device to the running guest (ACPI PCI hotplug); ``properties["bdf"]``
        says where.

        :raises DeviceError: this VM or this device cannot be hot-added (no hotplug segment,
            not a PCI device, no free slot, bad configuration).
        """
        return self.manager.hotplug(request)

    def unplug_device(self, device_id: str) -> threading.Event:
        """Ask the guest to eject a PCI device; the event is set once it did and the device
        is gone (``vm-device-removed`` is emitted then).

        :raises DeviceError: no such device, or not one that can leave a running VM.
        """
        return self.manager.unplug(device_id)

    def resize_memory(self, desired: int) -> bool:
        """Plug RAM until the guest has ``desired`` bytes, or ask it to eject hot-plugged RAM
        down to that (ACPI memory hotplug, Cloud Hypervisor's ``vm.resize desired_ram``);
        False when there is nothing to do.

        :raises ConfigError: this VM has no hotplug RAM, or ``desired`` cannot be reached
            (beyond ``hotplug_size``, not in 128 MiB steps, no free slot, not whole DIMMs).
        """
        hotplug = self.memory_hotplug
        if hotplug is None:
            from vmmkit.config import ConfigError

            raise ConfigError("desired_ram", desired, "a VM booted with --memory hotplug_size=",
                              reason="this VM has no hotplug memory")
        return hotplug.resize(desired) != 0

    # -- building ----------------------------------------------------------------------------

    def build(self, *, restore: SnapshotImage | None = None, prefault: bool = False,
              memory: GuestMemory | None = None) -> None:
        """Create the VM: memory, devices, payload, vCPUs. Leaves it in ``Created``. With
        ``restore`` (a checked snapshot of this configuration), RAM comes from its memory
        files (``prefault``: populated at once), no payload is loaded and every piece takes its
        saved state instead (:mod:`vmmkit.snapshot`); :meth:`start_paused` then runs it.
        ``memory``: with ``restore``, the guest RAM already received (live migration,
        :mod:`vmmkit.migration`), which the machine owns from now on."""
        if memory is not None:
            self.memory = memory  # closed by close() whatever fails below
        check_devices(self.config, self.registries.devices)
        activate_sandbox(self.seccomp, self.pm)
        self.emit("vm-creating")
        backend = self.registries.select_hypervisor(self.hypervisor_name, self.arch_name)
        if self.arch_name not in backend.architectures:
            raise VmmError(f"hypervisor {backend.name!r} cannot run {self.arch_name} guests "
                           f"(it runs: {', '.join(backend.architectures) or 'nothing here'})")
        availability = backend.is_available()
        if not availability:
            raise VmmError(f"hypervisor {backend.name!r} is not usable: {availability.reason}")
        self.arch = self.registries.architectures.get(self.arch_name)()
        self.hypervisor = backend()
        log.debug("vm.build", hypervisor=backend.name, arch=self.arch_name)
        if restore is not None:
            from vmmkit.snapshot import boot_config, map_memory

            self.config = boot_config(restore, self.config)
        self.layout = self.arch.memory_layout(self.config)
        mem = self.config.memory
        self._restored = restore is not None
        if restore is not None and memory is not None:
            from vmmkit.snapshot import check_ranges

            check_ranges(str(restore.directory), [r.range for r in memory.regions], self.config, self.layout)
            self.memory = memory
        elif restore is not None:
            self.memory = map_memory(restore, self.config, self.layout, prefault=prefault or mem.prefault)
        else:
            self.memory = self._allocate_memory()
        self.vm = self.hypervisor.create_vm(self.arch_name)
        for region in self.memory.regions:
            self.vm.add_memory_region(region.slot, region.start, region.size, region.host_address)
        self.arch.configure_vm(self.vm, self.hypervisor, self.config)
        self.device_manager = DeviceManager(
            vm=self.vm, memory=self.memory, layout=self.layout, config=self.config,
            event_loop=self.event_loop, registries=self.registries, context=self._device_ctx,
            virtio_transport=default_virtio_transport(self.config, self.arch.default_virtio_transport),
            emit=self.emit,
        )
        self._create_devices()
        if restore is None:
            self._load_payload()
        dispatch = self._dispatch = VcpuDispatch(self.pio_bus, self.mmio_bus)
        for index in range(self.config.cpus.boot_vcpus):
            vcpu = self.vm.create_vcpu(self.arch.vcpu_id(self.config, index), dispatch)
            self.vcpus.append(vcpu)
        self._active = set(range(self.config.cpus.boot_vcpus))
        if restore is not None:
            from vmmkit.snapshot import restore_state

            restore_state(self, restore)
            self.vm.restored()
        else:
            self._configure_vcpus()
        self.pm.hook.vmmkit_vm_created(machine=self)

    def _allocate_memory(self) -> GuestMemory:
        assert self.layout is not None
        mem = self.config.memory
        if mem.zones:
            from vmmkit import memory_zones

            return memory_zones.allocate(self.layout.ram, mem)
        return GuestMemory.allocate(
            self.layout.ram,
            shared=mem.shared,
            hugepages=mem.hugepages,
            hugepage_size=mem.hugepage_size,
            thp=mem.thp,
            mergeable=mem.mergeable,
            prefault=mem.prefault,
        )

    def _create_devices(self) -> None:
        assert self.arch is not None
        requests: list[DeviceRequest] = list(self.arch.platform_devices(self.config))
        for extra in self.pm.hook.vmmkit_platform_devices(machine=self):
            requests.extend(extra)
        for device_type in self.registries.devices:
            requests.extend(device_type.requests(self.config))
        self.manager.reserve_irqs(request.irq for request in requests if request.irq is not None)
        for request in requests:
            self.manager.create(request)
        if self.config.memory.hotplug_size:
            from vmmkit import memory_hotplug

            assert self.layout is not None and self.memory is not None and self.vm is not None
            self.memory_hotplug = memory_hotplug.attach(self.manager, self.layout, self.config.memory,
                                                        self.memory, self.vm)
        if any(zone.hotplug_size for zone in self.config.memory.zones):
            self._attach_zone_hotplug()
        self.manager.enable_pci_hotplug()
        self._enable_cpu_hotplug()

    def _attach_zone_hotplug(self) -> None:
        """A virtio-mem device per memory zone with a ``hotplug_size`` (:mod:`vmmkit.memory_zones`)."""
        from vmmkit import memory_zones
        from vmmkit.config import ConfigError

        assert self.layout is not None and self.memory is not None and self.vm is not None
        if self.layout.memory_hotplug is None:
            raise ConfigError("memory.zones", [z.id for z in self.config.memory.zones], "no zone hotplug_size",
                              reason="this architecture has no room for hotplug memory")
        self.zone_hotplug = memory_zones.ZoneHotplug.attach(self.manager, self.layout.memory_hotplug,
                                                            self.config.memory, self.memory, self.vm)

    def resize_zone(self, zone_id: str, desired: int, *, check_only: bool = False) -> bool:
        """Set memory zone ``zone_id``'s RAM to ``desired`` bytes through its virtio-mem device
        (Cloud Hypervisor's ``vm.resize-zone``); False when there is nothing to do.
        ``check_only``: raise if it cannot be done, change nothing.

        :raises ConfigError: no such zone with a ``hotplug_size``, or ``desired`` out of range."""
        if self.zone_hotplug is None:
            from vmmkit.config import ConfigError

            raise ConfigError("id", zone_id, "a VM booted with a --memory-zone hotplug_size=",
                              reason="this VM has no memory zone with hotplug memory")
        if check_only:
            return self.zone_hotplug.device(zone_id).check(desired) != 0
        return self.zone_hotplug.resize(zone_id, desired) != 0

    def _load_payload(self) -> None:
        assert self.arch is not None and self.memory is not None and self.layout is not None
        payload = self.config.payload
        if payload.kernel is None:
            raise BootError("<none>", "no kernel given (use --kernel)")
        path = Path(payload.kernel)
        for option, name in (("--kernel", payload.kernel), ("--initramfs", payload.initramfs)):
            if name:  # a FIFO would block the open below past SIGTERM
                try:
                    require_regular_file(name, option)
                except PathError as exc:
                    raise BootError(f"{option} {name}", exc.reason) from None
        try:
            with path.open("rb") as image:
                header = image.read(_HEADER_BYTES)
        except OSError as exc:
            raise BootError(path, exc.strerror or str(exc)) from None
        cmdline = self.arch.kernel_cmdline(self.config, self.devices)
        for args in self.pm.hook.vmmkit_kernel_cmdline(machine=self, cmdline=cmdline):
            cmdline = append_kernel_args(cmdline, args)
        config = attrs.evolve(self.config, payload=attrs.evolve(payload, cmdline=cmdline))
        boot = self.pm.hook.vmmkit_load_kernel(
            arch=self.arch_name, path=path, header=header, memory=self.memory, config=config, layout=self.layout
        )
        if boot is None:
            raise BootError(path, f"not a kernel image any {self.arch_name} loader recognises")
        self.boot_info = self.arch.prepare_boot(self.memory, config, self.layout, boot, self.devices)
        self._boot_config = config

    def _configure_vcpus(self) -> None:
        assert self.arch is not None and self.hypervisor is not None and self.boot_info is not None
        for index, vcpu in enumerate(self.vcpus):
            self.arch.configure_vcpu(vcpu, index, self.hypervisor, self._boot_config, self.boot_info)

    # -- running -----------------------------------------------------------------------------

    def boot(self) -> None:
        if self.vm is None:
            self.build()
        self.emit("vm-booting")
        if self.config.landlock_enable and not self._landlocked:
            activate_landlock(landlock_rules(self.config))
            self._landlocked = True
        # vCPUs first: the guest needs nothing from the loop's thread yet (its fds are registered
        # with epoll already, and level-triggered), and each thread start costs ~1 ms here.
        self._start_vcpu_threads()
        self.event_loop.start()
        self._set_state(MachineState.RUNNING, reason="boot")
        self._control = threading.Thread(target=self._control_loop, name="vmm-control", daemon=True)
        self._control.start()
        self.emit("vm-booted")

    def start_paused(self) -> None:
        """Run a machine built from a snapshot: its threads start parked, the state is
        ``Paused``; :meth:`resume` lets the guest continue where it was."""
        self.emit("vm-restoring")
        self.manager.pause()
        self._pause_requested = True
        self._start_vcpu_threads()
        self.event_loop.start()
        self._set_state(MachineState.PAUSED, reason="restore")
        self._control = threading.Thread(target=self._control_loop, name="vmm-control", daemon=True)
        self._control.start()
        self.emit("vm-restored")

    def snapshot(self, destination_url: str, *, config: VmConfig | None = None) -> None:
        """Write the paused VM's snapshot (``vm.snapshot``, :mod:`vmmkit.snapshot`); ``config``:
        the configuration to record when it changed since boot (hotplugged devices).

        :raises VmmError: not paused, a piece that cannot be saved, the directory."""
        from vmmkit.snapshot import write_snapshot

        with self._lock:
            if self.state is not MachineState.PAUSED:
                raise VmmError(f"cannot snapshot a VM that is {self.state.value} (vm.pause it first)")
            self.emit("vm-snapshotting")
            write_snapshot(self, destination_url, config=config)
            self.emit("vm-snapshotted")

    def _start_vcpu_threads(self) -> None:
        self._stop.clear()
        self._threads = []
        self._retire.clear()
        for position, vcpu in enumerate(self.vcpus):
            if position in self._active:
                self._start_vcpu_thread(vcpu, position)

    def _start_vcpu_thread(self, vcpu: Vcpu, position: int) -> None:
        retire = threading.Event()
        thread = threading.Thread(target=self._vcpu_loop, args=(vcpu, position, retire), name=f"vcpu{position}",
                                  daemon=True)
        self._retire[position] = (retire, thread)
        self._threads.append(thread)
        thread.start()

    def _vcpu_loop(self, vcpu: Vcpu, position: int, retire: threading.Event) -> None:
        enter_thread(VCPU, f"vcpu{position}")
        vlog = log.bind(vcpu=position)
        while not self._stop.is_set() and not retire.is_set():
            if self._pause_requested:
                self._park_here()
                continue
            try:
                exit_ = vcpu.run()
            except Exception as exc:  # a device's bug too: the VM stops, it never hangs without a vCPU
                vlog.error("vcpu.failed", error=str(exc), exc_info=not isinstance(exc, VmmError))
                self.request_stop(StopReason.INTERNAL_ERROR, str(exc) or type(exc).__name__)
                return
            reason = exit_.reason
            if reason is ExitReason.INTERRUPTED:
                vcpu.clear_kick()
            elif reason is ExitReason.HLT:
                self._stop.wait(0.001)
            elif reason is ExitReason.SHUTDOWN:
                self.request_stop(StopReason.TRIPLE_FAULT, exit_.detail or f"vcpu{position} triple fault")
            elif reason is ExitReason.POWER_OFF:
                self.request_stop(StopReason.POWER_OFF, exit_.detail or "guest power-off")
            elif reason is ExitReason.RESET:
                self.request_reset(exit_.detail or "guest")
            elif reason in (ExitReason.INTERNAL_ERROR, ExitReason.FAIL_ENTRY):
                self.request_stop(StopReason.INTERNAL_ERROR, f"vcpu{position}: {exit_.detail or reason.value}")
            elif reason is ExitReason.DEBUG:
                continue
        with self._park:  # a pause waiting for this thread to park counts it out now
            self._park.notify_all()

    def _park_here(self) -> None:
        with self._park:
            self._parked += 1
            self._park.notify_all()
            while self._pause_requested and not self._stop.is_set():
                self._park.wait()
            self._parked -= 1
            self._park.notify_all()

    def _kick_all(self) -> None:
        for vcpu in self.vcpus:
            vcpu.kick()

    def pause(self, timeout: float = 5.0) -> None:
        """Take every vCPU out of the guest and park it; quiesce devices."""
        with self._lock:
            if self.state is not MachineState.RUNNING:
                raise VmmError(f"cannot pause a VM that is {self.state.value}")
            self.emit("vm-pausing")
            self._pause_requested = True
        self._kick_all()
        deadline = time.monotonic() + timeout
        with self._park:
            while self._parked < len(self._live_threads()) and not self._stop.is_set():
                if not self._park.wait(max(0.0, deadline - time.monotonic())):
                    raise VmmError("vCPUs did not stop in time")
        self.manager.pause()
        self._set_state(MachineState.PAUSED, reason="pause")
        self.emit("vm-paused")

    def resume(self) -> None:
        with self._lock:
            if self.state is not MachineState.PAUSED:
                raise VmmError(f"cannot resume a VM that is {self.state.value}")
            self.emit("vm-resuming")
            self.manager.resume()
            with self._park:
                self._pause_requested = False
                self._park.notify_all()
            self._set_state(MachineState.RUNNING, reason="resume")
            self.emit("vm-resumed")

    def _live_threads(self) -> list[threading.Thread]:
        return [t for t in self._threads if t.is_alive()]

    def request_stop(self, reason: StopReason, detail: str = "") -> None:
        """Ask the machine to stop (from any thread, vCPUs included)."""
        with self._lock:
            if self._exit is None:
                status = 0
                if reason is StopReason.POWER_OFF:
                    status = self.guest_exit_status or 0
                elif reason in (StopReason.TRIPLE_FAULT, StopReason.INTERNAL_ERROR):
                    status = 1
                self._exit = MachineExit(reason, status, detail)
            self._stop.set()
            with self._park:
                self._park.notify_all()
        self._kick_all()

    def request_reset(self, reason: str) -> None:
        with self._lock:
            self._reset_requested = reason
            self._stop.set()
        self._kick_all()

    def wait(self, timeout: float | None = None) -> MachineExit | None:
        """Wait until the machine has stopped for good (guest-requested resets are performed
        by the control thread meanwhile); ``None`` on timeout."""
        if not self._done.wait(timeout):
            return None
        return self._final

    def _control_loop(self) -> None:
        """The machine's control thread: performs resets, and finishes the machine once a
        stop (power-off, fault, request) arrives."""
        enter_thread(VMM, "vmm-control")
        while True:
            self._stop.wait()
            self._join_vcpus()
            with self._lock:
                reset, self._reset_requested = self._reset_requested, None
                if self._exit is None and reset is not None:
                    self._stop.clear()
            if self._exit is None and reset is not None:
                try:
                    self._reboot(reset)
                    continue
                except VmmError as exc:
                    log.error("vm.reset_failed", error=str(exc))
                    self.request_stop(StopReason.INTERNAL_ERROR, f"reset failed: {exc}")
                    continue
            self._final = self._finish()
            self._done.set()
            return

    def _join_vcpus(self) -> None:
        for thread in self._threads:
            while thread.is_alive():
                self._kick_all()
                thread.join(0.05)

    def _finish(self) -> MachineExit:
        exit_ = self._exit or MachineExit(StopReason.REQUESTED, 0)
        if self.state is not MachineState.SHUTDOWN:
            self._set_state(MachineState.SHUTDOWN, reason=exit_.reason.value, detail=exit_.detail)
            self.emit("vm-shutdown", reason=exit_.reason.value)
        return exit_

    def reboot(self) -> None:
        """Reset the VM and boot the guest again (from outside)."""
        self.request_reset("requested")

    def power_button(self) -> None:
        """Press the power button: every device that handles it (the ACPI GED) tells the
        guest, which decides what to do (usually power off).

        :raises NotSupportedError: no device of this VM can deliver the event.
        """
        buttons = self.manager.power_buttons()
        if not buttons:
            raise NotSupportedError("this VM has no device that delivers a power-button event")
        for device in buttons:
            device.press_power_button()

    def nmi(self) -> None:
        """Inject a non-maskable interrupt into every vCPU (the architecture's ``inject_nmi``).

        :raises NotSupportedError: the architecture cannot inject NMIs.
        """
        if self.arch is None or self.vm is None:
            raise VmmError("the VM has not been built yet")
        self.arch.inject_nmi(self.vm)

    def _reboot(self, reason: str) -> None:
        log.info("vm.reset", reason=reason)
        self.emit("vm-rebooting", reason=reason)
        assert self.memory is not None
        for region in self.memory.regions:
            if self._restored:  # MADV_DONTNEED would bring the snapshot's pages back: zero them
                zeros = bytes(1 << 20)
                for offset in range(0, region.size, len(zeros)):
                    length = min(len(zeros), region.size - offset)
                    region.buffer[offset : offset + length] = zeros[:length]
            elif region.backing_file is None:  # a shared zone's file keeps its bytes, as at power-on
                region.discard()
        self.manager.reset()
        assert self.vm is not None
        self.vm.reset()
        self._settle_vcpu_hotplug()
        self._load_payload()
        self._configure_vcpus()
        for vcpu in self.vcpus:
            vcpu.clear_kick()
        self._start_vcpu_threads()
        self.emit("vm-rebooted")

    def shutdown(self) -> MachineExit:
        """Stop the VM from outside (not a guest power-off)."""
        self.request_stop(StopReason.REQUESTED)
        exit_ = self.wait()
        assert exit_ is not None
        return exit_

    def run(self, on_booted: Callable[[], None] | None = None) -> MachineExit:
        """Build, boot and wait for the guest to stop, then release everything.

        :param on_booted: called once the VM runs (the command confines its main thread then).
        """
        try:
            self.boot()
            if on_booted is not None:
                on_booted()
            exit_ = self.wait()
            assert exit_ is not None
            return exit_
        finally:
            self.close()

    def close(self) -> None:
        if self._control is not None:
            self.request_stop(StopReason.REQUESTED)
            self._done.wait()
        elif self._threads:
            self.request_stop(StopReason.REQUESTED)
            self._join_vcpus()
        self.event_loop.stop()  # no more callbacks; devices may still unregister their fds
        if self.device_manager is not None:
            self.device_manager.close()
        self.event_loop.close()
        self.rate_limit_groups.close()
        for vcpu in self.vcpus:
            vcpu.close()
        if self.vm is not None:
            self.vm.close()
        if self.hypervisor is not None:
            self.hypervisor.close()
        if self.memory_hotplug is not None:
            self.memory_hotplug.close()
        if self.zone_hotplug is not None:
            self.zone_hotplug.close()
        if self.memory is not None:
            self.memory.close()
        self.vm = None
        self.memory = None
        if self._landlocked:
            deactivate_landlock()
            self._landlocked = False
        self.pm.hook.vmmkit_vm_destroyed(machine=self)

    # -- vCPU hotplug (ACPI, as Cloud Hypervisor's CpuManager: vmmkit.cpu_hotplug) -------------

    def _enable_cpu_hotplug(self) -> None:
        """Place the CPU hotplug registers when the layout has them, describing every possible
        vCPU (Cloud Hypervisor describes them whatever ``max_vcpus`` is)."""
        assert self.arch is not None
        if self.manager.layout.cpu_hotplug is None:
            return
        cpus = self.config.cpus
        entries = [self.arch.processor_entry(self.config, index) for index in range(cpus.max_vcpus)]
        self.manager.enable_cpu_hotplug(present=cpus.boot_vcpus, processor_entries=entries,
                                        on_eject=self._vcpu_ejected)

    @property
    def present_vcpus(self) -> int:
        """How many vCPUs the guest has now (``boot_vcpus`` until ``vm.resize``)."""
        with self._lock:
            return len(self._active)

    @property
    def vcpu_removal_pending(self) -> bool:
        """The guest was asked to eject vCPUs and has not ejected them all yet."""
        with self._lock:
            return self._removal is not None

    def resize_vcpus(self, desired: int) -> threading.Event:
        """Give the running guest ``desired`` vCPUs (CH's ``CpuManager::resize``). Growing
        creates (or reuses) the vCPUs above, configures them as at boot, starts their threads
        and tells the guest (CINS, the GED's CPU bit); shrinking asks the guest to eject the
        highest ones (CRMV, the same notification). The event is set once the guest has
        ejected them all (at once when growing); :meth:`reap_vcpu_threads` then joins their
        threads.

        :raises DeviceError: this VM has no vCPU hotplug, ``desired`` is not 1..max_vcpus, or
            a removal is still pending.
        """
        controller = self.manager.cpu_hotplug
        if controller is None:
            raise DeviceError(f"this VM cannot hotplug vCPUs (the {self.arch_name} architecture has no ACPI "
                              "CPU hotplug registers)")
        done = threading.Event()
        with self._lock:
            maximum = self.config.cpus.max_vcpus
            if not 1 <= desired <= maximum:
                raise DeviceError(f"desired_vcpus {desired} is not between 1 and max_vcpus ({maximum})")
            if self._removal is not None:
                raise DeviceError("a vCPU removal is still pending (the guest has not ejected them yet)")
            present = len(self._active)
            if desired == present:
                done.set()
                return done
            if desired > present:
                try:
                    self._add_vcpus(desired)
                finally:
                    self.manager.notify_cpus_changed()
                done.set()
                return done
            leaving = set(sorted(self._active)[desired:])
            self._removal = (leaving, done)
            for position in sorted(leaving):
                controller.request_removal(position)
        log.info("vcpu.removal_requested", vcpus=sorted(leaving))
        self.manager.notify_cpus_changed()
        return done

    def _add_vcpus(self, desired: int) -> None:
        """Start the lowest inactive vCPUs until ``desired`` run (under :attr:`_lock`).

        A restored VM was never booted by this process (no :attr:`boot_info`): a hot-added vCPU
        is never vCPU 0, so it takes no boot registers, only the configuration's CPUID and
        topology (both architectures' ``configure_vcpu`` read ``boot`` for vCPU 0 only)."""
        assert self.vm is not None and self.arch is not None and self.hypervisor is not None
        assert self._dispatch is not None and self.manager.cpu_hotplug is not None
        boot_info = self.boot_info or BootInfo(protocol="restored", entry=0, kernel=MemoryRange(0, 0))
        boot_config = self._boot_config if self.boot_info is not None else self.config
        for position in range(self.config.cpus.max_vcpus):
            if len(self._active) >= desired:
                break
            if position in self._active:
                continue
            if position == len(self.vcpus):  # vCPUs are created in order and never destroyed
                self.vcpus.append(self.vm.create_vcpu(self.arch.vcpu_id(self.config, position), self._dispatch))
            vcpu = self.vcpus[position]
            self.arch.configure_vcpu(vcpu, position, self.hypervisor, boot_config, boot_info)
            vcpu.clear_kick()
            self._active.add(position)
            self._set_boot_vcpus(len(self._active))
            self.manager.cpu_hotplug.insert(position)
            self._start_vcpu_thread(vcpu, position)
            log.info("vcpu.added", vcpu=position)

    def _vcpu_ejected(self, position: int) -> bool:
        """The guest ejected vCPU ``position`` (CEJ0, on another vCPU's thread): its thread
        stops. Its last vCPU is never ejected (the VM would hang without one)."""
        with self._lock:
            if position not in self._active or len(self._active) == 1:
                log.warning("vcpu.eject_refused", vcpu=position, present=len(self._active))
                return False
            self._active.discard(position)
            self._set_boot_vcpus(len(self._active))
            retire = self._retire.get(position)
            finished: threading.Event | None = None
            if self._removal is not None:
                self._removal[0].discard(position)
                if not self._removal[0]:
                    finished, self._removal = self._removal[1], None
        if retire is not None:
            retire[0].set()
        self.vcpus[position].kick()
        log.info("vcpu.ejected", vcpu=position)
        if finished is not None:
            finished.set()
        return True

    def reap_vcpu_threads(self, timeout: float = 5.0) -> None:
        """Join the threads of ejected vCPUs (kicking them out of the guest).

        :raises VmmError: one did not stop within ``timeout``."""
        with self._lock:
            retired = [(p, t) for p, (event, t) in self._retire.items() if event.is_set()]
        deadline = time.monotonic() + timeout
        for position, thread in retired:
            while thread.is_alive() and time.monotonic() < deadline:
                self.vcpus[position].kick()
                thread.join(0.05)
            if thread.is_alive():
                raise VmmError(f"the thread of ejected vCPU {position} did not stop")
            with self._lock:
                if self._retire.get(position, (None, None))[1] is thread:
                    del self._retire[position]
                if thread in self._threads:
                    self._threads.remove(thread)

    def _settle_vcpu_hotplug(self) -> None:
        """At a reset: a pending removal is carried out, and the guest boots again with as
        many vCPUs as it had, the lowest ones (the MADT enables the first ``boot_vcpus``)."""
        with self._lock:
            removal, self._removal = self._removal, None
            if removal is not None:
                self._active -= removal[0]
            count = max(len(self._active), 1)
            self._active = set(range(count))
            self._set_boot_vcpus(count)
        controller = self.manager.cpu_hotplug
        if controller is not None:
            controller.set_present(count)
        if removal is not None:
            removal[1].set()

    def _set_boot_vcpus(self, count: int) -> None:
        """The configuration follows the guest's vCPU count (as CH's ``Vm::resize``): a reboot
        keeps it, ``vm.info`` shows it."""
        if self.config.cpus.boot_vcpus != count:
            self.config = attrs.evolve(self.config, cpus=attrs.evolve(self.config.cpus, boot_vcpus=count))

    # -- events ------------------------------------------------------------------------------

    def _set_state(self, new: MachineState, **detail: Any) -> None:
        old, self.state = self.state, new
        self.pm.hook.vmmkit_vm_state_changed(machine=self, old=old.value, new=new.value, detail=detail)

    def emit(self, event: str, **properties: Any) -> None:
        """Tell listeners (the event monitor, the API) what happened."""
        for listener in self.listeners:
            listener(event, properties)

    def counters(self) -> dict[str, dict[str, int]]:
        out = self.device_manager.counters() if self.device_manager is not None else {}
        for position, vcpu in enumerate(self.vcpus):
            out[f"vcpu{position}"] = dict(vcpu.exit_counts())
        return out

    def uptime(self) -> float:
        return time.monotonic() - self._started_at


def activate_sandbox(mode: str, pm: pluggy.PluginManager) -> None:
    """Compile the seccomp filters for ``mode``, with the system calls plugins declare
    (``vmmkit_seccomp_syscalls``)."""
    from vmmkit.sandbox import activate_seccomp

    extra: dict[str, list[str]] = {}
    for declared in pm.hook.vmmkit_seccomp_syscalls():
        for kind, names in declared.items():
            extra.setdefault(kind, []).extend(names)
    activate_seccomp(mode, extra)


def append_kernel_args(cmdline: str | None, args: Sequence[str]) -> str:
    """``cmdline`` with ``args`` it lacks appended, before a ``--`` (what follows is init's)."""
    text = cmdline or ""
    words = text.split()
    extra = [arg for arg in args if arg not in words]
    if not extra:
        return text
    head, sep, tail = f" {text} ".partition(" -- ")
    joined = " ".join(part for part in [head.strip(), *extra] if part)
    return f"{joined} -- {tail.strip()}".rstrip() if sep else joined
