"""The VMM: holds at most one VM (a :class:`VmConfig` and, once booted, its :class:`Machine`),
as Cloud Hypervisor's ``Vmm`` does, and carries out the management API's requests.

Lifecycle, as in CH::

    (nothing) --create--> Created --boot--> Running <--pause/resume--> Paused
                 ^                            |  reboot: reset in place, Running again
                 |                            |  power-button: the guest is asked to power off
                 +----------delete------------+--shutdown--> Shutdown --boot--> Running (a new VM)

- ``create`` only stores the configuration (refusing what is not supported yet, see
  :func:`vmmkit.config.check_supported`); ``boot`` builds the machine and starts it.
- ``add-*`` / ``remove-device`` before boot change the stored configuration. After boot
  they hot-add a PCI device (answering CH's ``PciDeviceInfo``, ``{"id", "bdf"}``) or ask the
  guest to eject one (ACPI PCI hotplug, :mod:`vmmkit.pci.hotplug`), and keep the stored
  configuration in step; ``remove-device`` returns once the guest ejected the device (at
  most :data:`EJECT_TIMEOUT`; then :class:`EjectTimeout`, the request staying pending) and
  the monitor reports ``vm``/``device-removed`` as CH's does.
- When the guest powers off (or the VM fails), the VMM exits, as CH's does:
  :meth:`Vmm.wait` returns the machine's exit. ``vm.shutdown`` stops the VM but keeps the VMM.
- ``vmm.shutdown`` deletes the VM and makes :meth:`Vmm.wait` return ``None``.
- ``snapshot`` writes a paused VM to a directory; ``restore`` (no VM created) builds the VM a
  snapshot describes and leaves it Paused (:mod:`vmmkit.snapshot`).

Methods raise :class:`VmmError` subclasses that say what went wrong, which the API server
turns into HTTP statuses: :class:`NotCreated` (404), :class:`InvalidState` (405),
:class:`AlreadyExists` (409), :class:`NoSuchDevice` (404), :class:`NotSupported` (501),
:class:`EjectTimeout` (504), :class:`vmmkit.errors.DeviceError` (a device the VM cannot take, 400),
:class:`vmmkit.config.ConfigError` and :class:`vmmkit.errors.BootError` (bad input, 400).
Every method is thread-safe; state queries (``ping``, ``info``) never wait behind a lifecycle
operation in progress.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import pluggy

from vmmkit import __version__
from vmmkit.config import (
    ConfigError,
    DeviceConfig,
    DiskConfig,
    FsConfig,
    GenericVhostUserConfig,
    NetConfig,
    PmemConfig,
    VmConfig,
    VsockConfig,
)
from vmmkit.device import DeviceRequest, check_devices
from vmmkit.errors import VmmError
from vmmkit.log import get_logger
from vmmkit.machine import (
    Machine,
    MachineExit,
    MachineState,
    StopReason,
    activate_sandbox,
    preload,
)
from vmmkit.memory import GuestMemory, MemoryAllocationError, MemoryRange, check_allocatable
from vmmkit.registry import AUTO, Registries
from vmmkit.sandbox import VMM, enter_thread, resolve_seccomp_mode

if TYPE_CHECKING:
    from vmmkit.arch import MemoryLayout
    from vmmkit.snapshot import SnapshotImage

log = get_logger()

#: How long ``vm.reboot`` waits for the guest's reset to be carried out.
REBOOT_TIMEOUT = 10.0
#: How long ``vm.shutdown`` waits for the vCPU threads to stop.
SHUTDOWN_TIMEOUT = 10.0
#: How long ``vm.remove-device`` waits for the guest to eject the device.
EJECT_TIMEOUT = 30.0
#: How long ``vm.resize`` waits for the guest to eject the vCPUs it is asked to remove (Linux
#: offlines each first: two took ~40 s on a loaded kvm_pvm host, where guest kernel code is emulated).
VCPU_EJECT_TIMEOUT = 60.0


class NotCreated(VmmError):
    """No VM has been created (``vm.create``)."""


class InvalidState(VmmError):
    """The VM's state does not allow the operation (pause a VM that is not running...)."""


class AlreadyExists(VmmError):
    """A VM is already created, or a device with that id already exists."""


class NoSuchDevice(VmmError):
    """No device has the given id."""


class NotSupported(VmmError):
    """vmmkit does not implement this (yet): device hotplug, NMI on this backend..."""


class EjectTimeout(VmmError):
    """The guest did not eject a device it was asked to remove in time."""


class ResizePending(VmmError):
    """A ``vm.resize`` cannot start: the guest has not ejected the vCPUs an earlier one asked
    it to remove (CH answers 429)."""


class Restoring(VmmError):
    """``--restore`` is still building the VM after :data:`RESTORE_WAIT` seconds (503: retry)."""


#: Seconds a ``vm.*`` request waits for a ``--restore`` in progress before it is answered 503.
RESTORE_WAIT: Final = 60.0


class EventSink(Protocol):
    """Where VMM-level events go (an :class:`vmmkit.events.EventMonitor`)."""

    def event(self, source: str, event: str, properties: Mapping[str, Any] | None = None) -> None: ...

    def __call__(self, name: str, properties: dict[str, Any]) -> None: ...


class Vmm:
    """One VMM process's VM and its lifecycle."""

    def __init__(
        self,
        *,
        registries: Registries,
        plugin_manager: pluggy.PluginManager,
        hypervisor: str = AUTO,
        arch: str | None = None,
        log_fd: int | None = None,
        events: EventSink | None = None,
        seccomp: str | None = None,
    ) -> None:
        self.registries = registries
        #: ``--seccomp``: this VMM's threads' filters (:mod:`vmmkit.sandbox`); active at once,
        #: so that the API's threads are confined before the first VM exists.
        self.seccomp = resolve_seccomp_mode(seccomp)
        activate_sandbox(self.seccomp, plugin_manager)
        self.pm = plugin_manager
        self.hypervisor_name = hypervisor
        self.arch_name = arch
        self.log_fd = log_fd
        self.events = events
        self.config: VmConfig | None = None
        self.machine: Machine | None = None
        self._features = self._probe_features()
        self._lock = threading.Lock()  # guards the fields; never held while waiting
        self._op_lock = threading.RLock()  # serializes lifecycle operations
        self._watcher: threading.Thread | None = None
        self._stopping = False  # the VM is being stopped on request (not by the guest)
        self._done = threading.Event()
        self._exit: MachineExit | None = None
        self._net_fds: dict[str, tuple[int, ...]] = {}
        self._restored = threading.Event()  # cleared while --restore builds the VM
        self._restored.set()
        self._event("vmm", "starting")

    # -- --restore: requests wait for the VM instead of finding none ------------------------------

    def expect_restore(self) -> None:
        """``--restore`` will build the VM: until :meth:`restore_ended`, ``vm.*`` requests
        wait for it (:meth:`wait_restored`) rather than answer 404 "no VM" to a client that
        asks ``vm.info`` as soon as the socket answers ``vmm.ping``."""
        self._restored.clear()

    def restore_ended(self) -> None:
        self._restored.set()

    def wait_restored(self, timeout: float = RESTORE_WAIT) -> None:
        """Wait for a ``--restore`` in progress. :raises Restoring: not done in ``timeout``."""
        if not self._restored.wait(timeout):
            raise Restoring(f"the VM is still being restored (--restore) after {timeout:g} s; retry")

    # -- queries ---------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        """``VmmPingResponse``."""
        return {
            "build_version": f"vmmkit {__version__}",
            "version": __version__,
            "pid": os.getpid(),
            "features": list(self._features),
        }

    def info(self) -> dict[str, Any]:
        """``VmInfo``: the configuration, the state and the memory size."""
        machine = self._live_machine()
        if machine is not None:  # the guest may have ejected vCPUs, or rebooted after a removal
            self._follow_vcpus(machine)
        with self._lock:
            config, machine = self.config, self.machine
        if config is None:
            raise NotCreated("the VM is not created (vm.create)")
        state = machine.state.value if machine is not None else MachineState.CREATED.value
        return {
            "config": config.to_json(),
            "state": state,
            "memory_actual_size": config.memory.boot_size + (config.memory.hotplugged_size or 0)
            + sum(zone.hotplugged_size or 0 for zone in config.memory.zones),
        }

    def counters(self) -> dict[str, dict[str, int]]:
        """``VmCounters``: per device (and per vCPU) statistics of the running (or paused) VM.

        A shut-down VM's devices and vCPUs are released, so its counters are gone:
        :class:`InvalidState`, as Cloud Hypervisor answers an error once ``vm.shutdown`` has
        dropped its VM. Waits for a lifecycle operation in progress (a shutdown releasing the
        devices it would read)."""
        with self._op_lock:
            machine = self._running_machine("read the counters of")
            counters = machine.counters()
        return {name: {k: int(v) for k, v in values.items()} for name, values in counters.items()}

    @property
    def state(self) -> str | None:
        """The VM's state (``Created``, ``Running``...), ``None`` without a VM."""
        with self._lock:
            if self.config is None:
                return None
            return self.machine.state.value if self.machine is not None else MachineState.CREATED.value

    # -- lifecycle -------------------------------------------------------------------------------

    def create(self, config: VmConfig) -> None:
        """Store the configuration of the VM to boot (``vm.create``).

        :raises ConfigError: guest RAM this host can never provide (:func:`check_allocatable`).
        """
        _check_memory(config)
        with self._op_lock:
            with self._lock:
                if self.config is not None:
                    raise AlreadyExists("a VM is already created (vm.delete it first)")
                check_devices(config, self.registries.devices)
                self.config = config.assign_ids()
            # Load the code this VM's boot will run now, so vm.boot spends its time on the VM.
            preload(self.config, self.registries, hypervisor=self.hypervisor_name, arch=self.arch_name)

    def boot(self) -> None:
        """Build the VM from the stored configuration and start it (``vm.boot``).

        :raises BootError, ConfigError: the configuration cannot be booted (bad kernel...).
        """
        with self._op_lock:
            with self._lock:
                config, old = self.config, self.machine
            if config is None:
                raise NotCreated("the VM is not created (vm.create)")
            if old is not None and old.state is not MachineState.SHUTDOWN:
                raise InvalidState(f"the VM is already booted ({old.state.value})")
            machine = Machine(config, registries=self.registries, plugin_manager=self.pm,
                              hypervisor=self.hypervisor_name, arch=self.arch_name, log_fd=self.log_fd,
                              seccomp=self.seccomp)
            if self.events is not None:
                machine.listeners.append(self._listener(self.events))
            machine.listeners.append(self._on_device_removed)
            try:
                machine.build()
                machine.boot()
            except BaseException:
                machine.close()
                raise
            with self._lock:
                self.machine = machine
                self._stopping = False
            self._watcher = threading.Thread(target=self._watch, args=(machine,), name="vm-watch", daemon=True)
            self._watcher.start()

    def pause(self) -> None:
        """Take every vCPU out of the guest and park it (``vm.pause``)."""
        with self._op_lock:
            machine = self._booted_machine("pause")
            if machine.state is not MachineState.RUNNING:
                raise InvalidState(f"cannot pause a VM that is {machine.state.value}")
            machine.pause()

    def resume(self) -> None:
        """``vm.resume``."""
        with self._op_lock:
            machine = self._booted_machine("resume")
            if machine.state is not MachineState.PAUSED:
                raise InvalidState(f"cannot resume a VM that is {machine.state.value}")
            machine.resume()

    def reboot(self) -> None:
        """Reset the VM and boot the guest again (``vm.reboot``); returns once it is running.
        A paused VM is resumed first."""
        with self._op_lock:
            machine = self._running_machine("reboot")
            rebooted = threading.Event()

            def on_event(name: str, _properties: dict[str, Any]) -> None:
                if name == "vm-rebooted":
                    rebooted.set()

            machine.listeners.append(on_event)
            try:
                if machine.state is MachineState.PAUSED:
                    machine.resume()
                machine.reboot()
                if not rebooted.wait(REBOOT_TIMEOUT) and machine.state is not MachineState.SHUTDOWN:
                    raise VmmError(f"the VM did not reboot within {REBOOT_TIMEOUT:.0f} s")
            finally:
                machine.listeners.remove(on_event)

    def power_button(self) -> None:
        """Press the ACPI power button (``vm.power-button``): the guest decides what to do."""
        with self._op_lock:
            machine = self._running_machine("press the power button of")
            try:
                machine.power_button()
            except VmmError as exc:
                raise NotSupported(str(exc)) from None

    def nmi(self) -> None:
        """Inject a non-maskable interrupt into every vCPU (``vm.nmi``)."""
        with self._op_lock:
            machine = self._running_machine("inject an NMI into")
            try:
                machine.nmi()
            except VmmError as exc:
                raise NotSupported(str(exc)) from None

    def shutdown(self) -> None:
        """Stop the VM, keeping its configuration and the VMM (``vm.shutdown``)."""
        with self._op_lock:
            machine = self._running_machine("shut down")
            self._stop_machine(machine)

    def delete(self) -> None:
        """Shut the VM down if it runs and forget it (``vm.delete``); no VM is not an error."""
        with self._op_lock:
            with self._lock:
                config, machine = self.config, self.machine
            if config is None:
                return
            if machine is not None and machine.state is not MachineState.SHUTDOWN:
                self._stop_machine(machine)
            with self._lock:
                self.config = None
                self.machine = None
                fds, self._net_fds = self._net_fds, {}
            _close_fds(fd for group in fds.values() for fd in group)
            self._event("vm", "deleted")

    def shutdown_vmm(self) -> None:
        """Delete the VM and let :meth:`wait` return ``None`` (``vmm.shutdown``)."""
        with self._op_lock:
            self.delete()
            self._event("vmm", "shutdown")
            self._done.set()

    # -- snapshots (vmmkit.snapshot) ------------------------------------------------------------

    def snapshot(self, destination_url: str) -> None:
        """``vm.snapshot``: write the paused VM's configuration, state and memory to
        ``file:///dir``.

        :raises InvalidState: not paused. :raises NotSupported: a piece of the VM cannot be
            saved (named). :raises SnapshotError: the URL or the directory."""
        from vmmkit.state import NotSnapshottable

        with self._op_lock:
            machine = self._booted_machine("snapshot")
            if machine.state is not MachineState.PAUSED:
                raise InvalidState(f"cannot snapshot a VM that is {machine.state.value} (vm.pause it first)")
            with self._lock:
                config = self.config  # with the devices added or removed since boot
            try:
                machine.snapshot(destination_url, config=config)
            except NotSnapshottable as exc:
                raise NotSupported(f"cannot snapshot this VM: {exc}") from None

    def restore(self, source_url: str, *, prefault: bool = False, resume: bool = False) -> None:
        """``vm.restore`` / ``--restore``: build the VM a snapshot describes, its state and
        memory restored; it stays paused unless ``resume``.

        :raises AlreadyExists: a VM is created already. :raises SnapshotError: the snapshot
            is damaged, of another version, or cannot be restored on this backend."""
        from vmmkit.snapshot import open_snapshot

        with self._op_lock:
            with self._lock:
                if self.config is not None:
                    raise AlreadyExists("a VM is already created (vm.delete it first)")
            image = open_snapshot(source_url)
            machine = self._start_restored(image, prefault=prefault)
            if resume:
                machine.resume()

    def _start_restored(self, image: SnapshotImage, *, prefault: bool = False,
                        memory: GuestMemory | None = None) -> Machine:
        """Build the VM ``image`` describes (``memory``: its RAM, received by a migration),
        start it paused and make it this VMM's."""
        try:
            check_devices(image.config, self.registries.devices)
        except BaseException:
            if memory is not None:
                memory.close()
            raise
        config = image.config.assign_ids()
        machine = Machine(config, registries=self.registries, plugin_manager=self.pm,
                          hypervisor=self.hypervisor_name, arch=self.arch_name, log_fd=self.log_fd)
        if self.events is not None:
            machine.listeners.append(self._listener(self.events))
        machine.listeners.append(self._on_device_removed)
        try:
            machine.build(restore=image, prefault=prefault, memory=memory)
            machine.start_paused()
        except BaseException:
            machine.close()
            raise
        with self._lock:
            self.config = config
            self.machine = machine
            self._stopping = False
        self._watcher = threading.Thread(target=self._watch, args=(machine,), name="vm-watch", daemon=True)
        self._watcher.start()
        return machine

    # -- live migration (vmmkit.migration) ------------------------------------------------------

    def send_migration(self, destination_url: str, *, local: bool = False,
                       downtime_ms: int = 300) -> Callable[[], None]:
        """``vm.send-migration``: migrate the running (or paused) VM to a VMM waiting in
        ``vm.receive-migration``. On success the VM is stopped here and the returned function,
        called once the caller has answered, makes :meth:`wait` return (this VMM exits, as
        Cloud Hypervisor's does); on failure the VM goes on as it was.

        :raises ConfigError: a malformed URL. :raises MigrationError: the migration failed.
        :raises NotSupported: a piece of the VM cannot be saved."""
        from vmmkit.migration import source
        from vmmkit.migration.transport import parse_url
        from vmmkit.state import NotSnapshottable

        endpoint = parse_url(destination_url, "destination_url")
        with self._op_lock:
            machine = self._running_machine("migrate")
            with self._lock:
                config = self.config
            assert config is not None
            self._event("vm", "migrating", {"destination_url": str(endpoint)})
            try:
                report = source.send(machine, config, endpoint, local=local, downtime_ms=downtime_ms)
            except NotSnapshottable as exc:
                raise NotSupported(f"cannot migrate this VM: {exc}") from None
            self._stop_machine(machine)
            self._event("vm", "migrated", {"destination_url": str(endpoint), "rounds": report.rounds,
                                           "bytes": report.bytes_sent, "total_ms": round(report.total_s * 1e3, 1),
                                           "downtime_ms": round(report.downtime_s * 1e3, 1)})
            self._exit = MachineExit(StopReason.REQUESTED, 0, f"migrated to {endpoint}")

        def finish() -> None:
            self._done.set()

        return finish

    def receive_migration(self, receiver_url: str) -> None:
        """``vm.receive-migration``: wait for one sender at ``receiver_url`` and take its VM;
        returns once the VM runs here. A failed migration leaves no VM (the sender's keeps
        running) and raises.

        :raises ConfigError: a malformed URL. :raises AlreadyExists: this VMM has a VM.
        :raises MigrationError: the address cannot be used, or the migration failed."""
        from vmmkit.migration import destination
        from vmmkit.migration.protocol import MigrationError
        from vmmkit.migration.transport import listen, parse_url

        endpoint = parse_url(receiver_url, "receiver_url")
        with self._lock:
            if self.config is not None:
                raise AlreadyExists("a VM is already created (vm.delete it first)")
        try:
            with listen(endpoint) as listener:
                self._event("vm", "receiving-migration", {"receiver_url": str(endpoint)})
                listener.settimeout(0.5)
                while True:
                    if self._done.is_set():
                        raise MigrationError("the VMM is shutting down")
                    try:
                        conn, _peer = listener.accept()
                        break
                    except TimeoutError:
                        continue
        except OSError as exc:
            raise MigrationError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None
        with conn, self._op_lock:
            conn.settimeout(destination.IO_TIMEOUT)
            with self._lock:
                if self.config is not None:
                    raise AlreadyExists("a VM was created while waiting for the migration")
            try:
                destination.receive(conn, unix=endpoint.family == "unix", source=f"a sender on {endpoint}",
                                    check_layout=self._check_migrated_layout,
                                    build=lambda _config, image, memory: self._start_restored(image, memory=memory))
            except BaseException:
                with self._lock:
                    machine = self.machine
                if machine is not None:  # built, never resumed
                    self.delete()
                raise
        self._event("vm", "migration-received", {"receiver_url": str(endpoint)})

    def _check_migrated_layout(self, config: VmConfig, arch: str, ranges: list[MemoryRange]) -> MemoryLayout:
        from vmmkit.machine import host_architecture
        from vmmkit.migration.protocol import ProtocolError
        from vmmkit.snapshot import check_ranges

        here = self.arch_name or host_architecture()
        if arch != here:
            raise ProtocolError(f"the VM is an {arch} guest, this VMM runs {here} guests")
        if arch not in self.registries.architectures:
            raise ProtocolError(f"no architecture {arch!r} here")
        layout = self.registries.architectures.get(arch)().memory_layout(config)
        check_ranges("the migrated VM", ranges, config, layout)
        # Load the code the build will run now, while the source's guest still runs (the
        # build happens in the downtime).
        preload(config, self.registries, hypervisor=self.hypervisor_name, arch=self.arch_name)
        return layout

    # -- devices ---------------------------------------------------------------------------------

    def add_disk(self, disk: DiskConfig) -> dict[str, str] | None:
        """``vm.add-disk``: before boot, added to the configuration (returns ``None``)."""
        return self._add(disk, VmConfig.with_disk, "disk")

    def add_net(self, net: NetConfig, fds: Iterable[int] = ()) -> dict[str, str] | None:
        """``vm.add-net``. ``fds`` (taps opened by the caller, received over the socket) replace
        any ``fds`` in ``net``; the VMM owns them from now on, also when the call fails."""
        fds = tuple(fds)
        try:
            if fds:
                net = attrs.evolve(net, fds=fds)
            elif net.fds:
                log.warning("api.net_fds_ignored", id=net.id, fds=list(net.fds),
                            hint="fd numbers are only valid when the fds are sent with SCM_RIGHTS")
                net = attrs.evolve(net, fds=())
            result = self._add(net, VmConfig.with_net, "net")
        except BaseException:
            _close_fds(fds)
            raise
        return result

    def add_device(self, device: DeviceConfig) -> dict[str, str] | None:
        """``vm.add-device`` (VFIO): before boot, added to the configuration."""
        return self._add(device, VmConfig.with_device, "device")

    def add_vsock(self, vsock: VsockConfig) -> dict[str, str] | None:
        """``vm.add-vsock`` (a VM has at most one): before boot, added to the configuration; on a
        booted VM, hot-plugged as ``vm.add-disk`` is."""
        return self._add(vsock, VmConfig.with_vsock, "vsock")

    def add_pmem(self, pmem: PmemConfig) -> dict[str, str] | None:
        """``vm.add-pmem``: before boot, added to the configuration; on a booted VM, hot-plugged
        as ``vm.add-disk`` is (the file is mapped into the guest then)."""
        return self._add(pmem, VmConfig.with_pmem, "pmem device")

    def add_fs(self, fs: FsConfig) -> dict[str, str] | None:
        """``vm.add-fs`` (a virtio-fs device served by a vhost-user backend): before boot, added
        to the configuration; on a booted VM, hot-plugged as ``vm.add-disk`` is."""
        return self._add(fs, VmConfig.with_fs, "fs")

    def add_generic_vhost_user(self, device: GenericVhostUserConfig) -> dict[str, str] | None:
        """``vm.add-generic-vhost-user`` (a virtio device of any type served by a vhost-user
        backend): before boot, added to the configuration; on a booted VM, hot-plugged as
        ``vm.add-disk`` is."""
        return self._add(device, VmConfig.with_generic_vhost_user, "generic vhost-user device")

    def remove_device(self, device_id: str, timeout: float | None = None) -> None:
        """``vm.remove-device``: before boot, removed from the configuration; on a booted VM,
        ejected by the guest (waiting at most ``timeout``, default :data:`EJECT_TIMEOUT`, while
        it runs) and removed from the configuration."""
        with self._op_lock:
            machine = self._live_machine()
            if machine is None:
                config = self._config_for_change("remove a device from")
                try:
                    new = config.without_device(device_id)
                except VmmError:
                    raise NoSuchDevice(f"no device with id {device_id!r}") from None
                with self._lock:
                    self.config = new
                    fds = self._net_fds.pop(device_id, ())
                _close_fds(fds)
                return
            if device_id not in machine.manager:
                raise NoSuchDevice(f"no device with id {device_id!r}")
            gone = machine.unplug_device(device_id)
            with self._lock:
                if self.config is not None:
                    try:
                        self.config = self.config.without_device(device_id)
                    except VmmError:
                        pass  # not from the configuration (a plugin's own device)
            running = machine.state is MachineState.RUNNING
        limit = EJECT_TIMEOUT if timeout is None else timeout
        if running and not gone.wait(limit):
            raise EjectTimeout(f"the guest did not eject device {device_id!r} within {limit:.0f} s (does its "
                               "kernel handle ACPI PCI hotplug?); the request stays pending: the device goes "
                               "when the guest ejects it")
        if gone.is_set():
            with self._lock:
                fds = self._net_fds.pop(device_id, ())
            _close_fds(fds)

    def resize_disk(self, disk_id: str, size: int) -> None:
        """``vm.resize-disk``: the running VM's disk ``disk_id`` takes ``size`` bytes (its image
        file is resized) and the guest is told (CH's ``Vm::resize_disk``)."""
        with self._op_lock:
            machine = self._live_machine()
            if machine is None:
                self._require_config()
                raise InvalidState("cannot resize a disk of a VM that is not booted")
            config = self._require_config()
            if disk_id not in {d.id for d in config.disks} or disk_id not in machine.manager:
                raise NoSuchDevice(f"no disk with id {disk_id!r}")
            machine.manager.resize(disk_id, size)

    def resize(self, *, desired_vcpus: int | None = None, desired_ram: int | None = None,
               desired_balloon: int | None = None) -> None:
        """``vm.resize`` with any of its parts, carried out in Cloud Hypervisor's order (vCPUs,
        RAM, balloon) once every part has been checked: a request the VM cannot take in one
        part changes nothing in the others.

        :raises: what :meth:`resize_vcpus`, :meth:`resize_ram` and
            :func:`vmmkit.balloon_resize.resize_balloon` raise.
        """
        from vmmkit.balloon_resize import check_balloon, resize_balloon

        with self._op_lock:
            if desired_vcpus is not None:
                self.check_resize_vcpus(desired_vcpus)
            if desired_ram is not None:
                self.check_resize_ram(desired_ram)
                machine = self._live_machine()
                if machine is not None and machine.memory_hotplug is not None:
                    try:
                        machine.memory_hotplug.check(desired_ram)
                    except ConfigError:
                        self._event("vm", "resizing")  # as CH's: the request reached the memory manager
                        raise
            if desired_balloon is not None:
                check_balloon(self, desired_balloon)
        if desired_vcpus is not None:
            self.resize_vcpus(desired_vcpus)
        if desired_ram is not None:
            self.resize_ram(desired_ram)
        if desired_balloon is not None:
            resize_balloon(self, desired_balloon)

    def check_resize_vcpus(self, desired: int) -> Machine:
        """The running machine, if it can have ``desired`` vCPUs now; else raises as
        :meth:`resize_vcpus` does."""
        with self._op_lock:
            machine = self._live_machine()
            if machine is None:
                self._require_config()
                raise InvalidState("cannot resize the vCPUs of a VM that is not booted")
            if machine.state is not MachineState.RUNNING:
                raise InvalidState(f"cannot resize the vCPUs of a VM that is {machine.state.value}")
            maximum = machine.config.cpus.max_vcpus
            if not 1 <= desired <= maximum:
                raise ConfigError("desired_vcpus", desired, f"1 to max_vcpus ({maximum}; set with --cpus max=)")
            if machine.vcpu_removal_pending:
                raise ResizePending("a vCPU removal is still pending: the guest has not ejected the vCPUs an "
                                    "earlier vm.resize asked it to remove")
            return machine

    def check_resize_ram(self, desired_ram: int) -> None:
        """Raise as :meth:`resize_ram` would before its ``resizing`` event (a size the
        configuration cannot take, no hotplug memory), changing nothing."""
        with self._op_lock:
            config = self._require_config()
            if config.memory.zones:  # CH: Error::InvalidResizeWithMemoryZones
                raise ConfigError("desired_ram", desired_ram, "vm.resize-zone for a VM with memory zones",
                                  reason="this VM's RAM is its memory zones")
            attrs.evolve(config.memory, size=desired_ram)  # validates it (page multiple...)
            machine = self._live_machine()
            if machine is None:
                return
            if machine.memory_hotplug is None:
                raise ConfigError("desired_ram", desired_ram, "a VM booted with --memory hotplug_size=",
                                  reason="this VM has no hotplug memory")

    def resize_ram(self, desired_ram: int) -> None:
        """``vm.resize`` with ``desired_ram``, as Cloud Hypervisor's ``Vm::resize``: on a booted
        VM, plug or unplug RAM (:mod:`vmmkit.memory_hotplug`) and keep the configuration in
        step (ACPI: ``memory.size``, so the next boot has it all; virtio-mem:
        ``hotplugged_size``); before boot, only ``memory.size`` changes. Events
        ``vm``/``resizing`` and ``vm``/``resized`` as CH's.

        :raises ConfigError: ``desired_ram`` cannot be reached (see
            :meth:`vmmkit.machine.Machine.resize_memory`).
        """
        with self._op_lock:
            self.check_resize_ram(desired_ram)  # refused before the "resizing" event
            config = self._require_config()
            machine = self._live_machine()
            memory = attrs.evolve(config.memory, size=desired_ram)
            if machine is not None:
                self._event("vm", "resizing")
                machine.resize_memory(desired_ram)
                if config.memory.hotplug_method == "VirtioMem":  # CH: the boot size stays
                    extra = desired_ram - config.memory.size
                    memory = attrs.evolve(config.memory, hotplugged_size=extra if extra > 0 else None)
            with self._lock:
                if self.config is not None:
                    self.config = attrs.evolve(self.config, memory=memory)
            if machine is not None:
                self._event("vm", "resized")

    def resize_zone(self, zone_id: str, desired_ram: int) -> None:
        """``vm.resize-zone``, as Cloud Hypervisor's ``Vm::resize_zone``: memory zone
        ``zone_id`` of the running VM gets ``desired_ram`` bytes (its ``size`` plus what its
        virtio-mem device plugs); the zone's ``hotplugged_size`` follows in the configuration.
        Events ``vm``/``resizing`` and ``vm``/``resized``.

        :raises InvalidState: the VM is not running. :raises ConfigError: no such zone with a
            ``hotplug_size``, or ``desired_ram`` out of its range.
        """
        from vmmkit.vmm_zones import resize_zone

        resize_zone(self, zone_id, desired_ram)

    def resize_vcpus(self, desired: int, timeout: float | None = None) -> None:
        """``vm.resize`` ``desired_vcpus`` on the running VM (CH's ``Vmm::vm_resize`` and
        ``CpuManager::resize``): more vCPUs are added at once; fewer are ejected by the guest,
        waited for at most ``timeout`` (default :data:`VCPU_EJECT_TIMEOUT`; then
        :class:`EjectTimeout`, the removal staying pending), then their threads are joined.
        The configuration's ``boot_vcpus`` follows. Reports ``vm``/``resizing`` and
        ``vm``/``resized`` as CH does.

        :raises InvalidState: the VM is not running. :raises ConfigError: ``desired`` is not
            1..max_vcpus. :raises ResizePending: an earlier removal is still pending.
            :raises DeviceError: this VM cannot hotplug vCPUs.
        """
        with self._op_lock:
            machine = self.check_resize_vcpus(desired)
            self._event("vm", "resizing")
            ejected = machine.resize_vcpus(desired)
            self._follow_vcpus(machine)
        limit = VCPU_EJECT_TIMEOUT if timeout is None else timeout
        if not ejected.wait(limit):
            raise EjectTimeout(f"the guest did not eject its vCPUs within {limit:.0f} s (does its kernel handle "
                               "ACPI CPU hotplug?); the removal stays pending: they go when the guest ejects them")
        machine.reap_vcpu_threads()
        self._follow_vcpus(machine)
        self._event("vm", "resized")

    def _follow_vcpus(self, machine: Machine) -> None:
        """The stored configuration's ``boot_vcpus`` becomes the machine's."""
        count = machine.config.cpus.boot_vcpus
        with self._lock:
            if self.config is not None and self.config.cpus.boot_vcpus != count:
                self.config = attrs.evolve(self.config, cpus=attrs.evolve(self.config.cpus, boot_vcpus=count))

    def _add(self, device: Any, add: Callable[[VmConfig, Any], VmConfig], what: str) -> dict[str, str] | None:
        with self._op_lock:
            machine = self._live_machine()
            config = self._config_for_change(f"add a {what} to") if machine is None else self._require_config()
            ids = {d.id for _, d in config._all_devices() if d.id is not None}
            if device.id is not None and (device.id in ids or (machine is not None and device.id in machine.manager)):
                raise AlreadyExists(f"a device with id {device.id!r} already exists")
            new = add(config, device).assign_ids()
            check_devices(new, self.registries.devices)
            (added,) = [d.id for _, d in new._all_devices() if d.id is not None and d.id not in ids]
            result = None
            if machine is not None:
                request = self._request_for(new, added)
                placed = machine.hotplug_device(request)
                result = {"id": added, "bdf": str(placed.properties["bdf"])}
            with self._lock:
                self.config = new
                if isinstance(device, NetConfig) and device.fds:
                    self._net_fds[added] = device.fds
            return result

    def _request_for(self, config: VmConfig, device_id: str) -> DeviceRequest:
        """The device request the registered device types make of ``config`` for ``device_id``."""
        for device_type in self.registries.devices:
            for request in device_type.requests(config):
                if request.id == device_id:
                    return request
        raise NotSupported(f"no installed device type builds device {device_id!r}")

    def _on_device_removed(self, name: str, properties: dict[str, Any]) -> None:
        """The guest ejected a device (also one nobody asked it to remove, ``echo 0 >
        /sys/bus/pci/slots/N/power``): it leaves the stored configuration too. Runs on the vCPU
        thread that carried out the eject: takes only :attr:`_lock`."""
        if name != "vm-device-removed":
            return
        device_id = str(properties.get("id"))
        with self._lock:
            if self.config is not None:
                try:
                    self.config = self.config.without_device(device_id)
                except VmmError:
                    pass  # already gone from it (vm.remove-device), or never there

    def _live_machine(self) -> Machine | None:
        """The booted machine, ``None`` before boot or once it shut down."""
        with self._lock:
            machine = self.machine
        if machine is None or machine.state in (MachineState.CREATED, MachineState.SHUTDOWN):
            return None
        return machine

    def _require_config(self) -> VmConfig:
        with self._lock:
            config = self.config
        if config is None:
            raise NotCreated("the VM is not created (vm.create)")
        return config

    # -- waiting and exiting ---------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> MachineExit | None:
        """Block until the VMM should exit: the guest's exit when the VM stopped by itself
        (power-off, triple fault, failure), ``None`` after ``vmm.shutdown``. With a
        ``timeout``, also returns ``None`` when it expires (check :attr:`done`)."""
        self._done.wait(timeout)
        return self._exit

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def request_exit(self, reason: str = "requested") -> None:
        """Stop the VM and end :meth:`wait` (a signal): as ``vmm.shutdown``, from any thread."""
        log.info("vmm.exit_requested", reason=reason)
        threading.Thread(target=self._exit_quietly, name="vmm-exit", daemon=True).start()

    def _exit_quietly(self) -> None:
        enter_thread(VMM, "vmm-exit")
        try:
            self.shutdown_vmm()
        except Exception:
            log.exception("vmm.exit_failed")
            self._done.set()

    def close(self) -> None:
        """Release the VM if one is left (the VMM is exiting)."""
        with self._lock:
            machine = self.machine
        if machine is not None and machine.vm is not None:
            with self._lock:
                self._stopping = True
            machine.request_stop(StopReason.REQUESTED, "vmm exiting")
            if self._watcher is not None:
                self._watcher.join(SHUTDOWN_TIMEOUT)
            _close_machine(machine)
        _close_fds(fd for group in self._net_fds.values() for fd in group)
        self._net_fds = {}

    # -- internals -------------------------------------------------------------------------------

    def _watch(self, machine: Machine) -> None:
        """The ``vm-watch`` thread: waits for the machine to stop (carrying out resets)."""
        enter_thread(VMM, "vm-watch")
        try:
            exit_ = machine.wait()
        except Exception as exc:  # a reset that failed: the VM is gone
            log.exception("vm.watch_failed")
            exit_ = MachineExit(StopReason.INTERNAL_ERROR, 1, str(exc))
            machine.request_stop(StopReason.INTERNAL_ERROR, str(exc))
        with self._lock:
            requested = self._stopping
        if requested:
            return
        # The guest powered off, or the VM failed: the VMM exits, as CH's does.
        log.info("vm.stopped", reason=exit_.reason.value if exit_ else None, detail=exit_.detail if exit_ else "")
        self._exit = exit_
        threading.Thread(target=self._finish_after_guest_exit, args=(machine,), name="vmm-exit",
                         daemon=True).start()

    def _finish_after_guest_exit(self, machine: Machine) -> None:
        enter_thread(VMM, "vmm-exit")
        with self._op_lock:
            with self._lock:
                if self.machine is not machine:
                    return
                self._stopping = True
            _close_machine(machine)
            try:
                self.delete()
            finally:
                self._event("vmm", "shutdown")
                self._done.set()

    def _stop_machine(self, machine: Machine) -> None:
        with self._lock:
            self._stopping = True
        machine.request_stop(StopReason.REQUESTED, "api")
        if self._watcher is not None:
            self._watcher.join(SHUTDOWN_TIMEOUT)
        if self._watcher is not None and self._watcher.is_alive():
            raise VmmError(f"the VM did not stop within {SHUTDOWN_TIMEOUT:.0f} s")
        _close_machine(machine)

    def _booted_machine(self, what: str) -> Machine:
        with self._lock:
            config, machine = self.config, self.machine
        if config is None:
            raise NotCreated("the VM is not created (vm.create)")
        if machine is None:
            raise InvalidState(f"cannot {what} a VM that is not booted")
        return machine

    def _running_machine(self, what: str) -> Machine:
        machine = self._booted_machine(what)
        if machine.state not in (MachineState.RUNNING, MachineState.PAUSED):
            raise InvalidState(f"cannot {what} a VM that is {machine.state.value}")
        return machine

    def _config_for_change(self, what: str) -> VmConfig:
        with self._lock:
            config, machine = self.config, self.machine
        if config is None:
            raise NotCreated("the VM is not created (vm.create)")
        if machine is not None and machine.state is not MachineState.SHUTDOWN:
            raise NotSupported(
                f"cannot {what} a booted VM: device hotplug is not supported yet "
                "(add devices before vm.boot)"
            )
        return config

    def _event(self, source: str, event: str, properties: Mapping[str, Any] | None = None) -> None:
        if self.events is not None:
            self.events.event(source, event, properties)

    @staticmethod
    def _listener(events: EventSink) -> Callable[[str, dict[str, Any]], None]:
        def listener(name: str, properties: dict[str, Any]) -> None:
            try:
                events(name, properties)
            except Exception:
                log.exception("vmm.event_failed", name=name)

        return listener

    def _probe_features(self) -> tuple[str, ...]:
        """The usable hypervisor backends (CH lists its compiled-in features, e.g. ``kvm``)."""
        features = []
        for backend in self.registries.hypervisor_order():
            try:
                availability = backend.is_available()
                if availability and availability.auto:
                    features.append(str(backend.name))
            except Exception:
                continue
        return tuple(features)


def _check_memory(config: VmConfig) -> None:
    memory = config.memory
    try:
        if memory.size:  # 0 with memory zones
            check_allocatable(memory.size, hugepages=memory.hugepages, hugepage_size=memory.hugepage_size)
    except MemoryAllocationError as exc:
        option = "memory.hugepages" if memory.hugepages else "memory.size"
        raise ConfigError(option, memory.size, "memory this host can provide", reason=str(exc)) from None
    for index, zone in enumerate(memory.zones):
        try:
            if zone.size:
                check_allocatable(zone.size, hugepages=zone.hugepages)
        except MemoryAllocationError as exc:
            option = f"memory.zones[{index}].{'hugepages' if zone.hugepages else 'size'}"
            raise ConfigError(option, zone.size, "memory this host can provide", reason=str(exc)) from None


def _close_machine(machine: Machine) -> None:
    """Release a booted machine once (a closed one has no ``vm`` left)."""
    if machine.vm is not None:
        machine.close()


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
