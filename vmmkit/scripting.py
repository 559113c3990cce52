"""Scripting a VM in a few lines: :class:`Vm` and :func:`run` (exported as ``vmmkit.Vm`` and
``vmmkit.run``).

    import vmmkit

    with vmmkit.Vm(kernel="vmlinux", cmdline="console=ttyS0", memory="512M", cpus=2) as vm:
        vm.start()
        result = vm.wait(timeout=60)
    print(result.status, result.serial)

A :class:`Vm` wraps one :class:`vmmkit.machine.Machine`, built from keyword arguments in Cloud
Hypervisor's option syntax (the ``vmmkit`` command's options, without the dashes) or from a
:class:`vmmkit.config.VmConfig`, with the installed plugins. By default it captures the legacy
serial port (``serial="capture"``): :attr:`Vm.serial` and :attr:`VmExit.serial` hold what the
guest wrote. Errors are :class:`vmmkit.errors.VmmError` (a bad option:
:class:`vmmkit.config.ConfigError`); an unknown keyword, or a value of the wrong type (a list
where an option string goes, ``"no"`` for a flag), is a ``TypeError``: nothing is converted
or dropped in silence.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import attrs

from vmmkit.errors import VmmError

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.machine import Machine

#: ``serial=`` value that captures the serial port into :attr:`Vm.serial` (the default).
CAPTURE = "capture"

# Keywords that take one option value (Cloud Hypervisor's syntax), as VmConfig.from_cli names them.
_SINGLE = ("cmdline", "rng", "console", "vsock", "platform", "balloon", "debug_console")
# Keywords that take one option value or a list of them.
_REPEATABLE = ("disks", "net", "fs", "pmem", "devices", "plugin_devices", "memory_zones", "generic_vhost_user")
_PATHS = ("kernel", "initramfs", "firmware")
_FLAGS = ("watchdog", "pvpanic")
OPTIONS = frozenset((*_SINGLE, *_REPEATABLE, *_PATHS, *_FLAGS, "cpus", "memory"))


@attrs.frozen
class VmExit:
    """How a VM ended.

    ``status`` is what the ``vmmkit`` command would exit with: the guest's status after a
    power-off (0 after a clean ACPI power-off), 1 after a triple fault or an internal error,
    0 when it was stopped from outside. ``reason`` is one of ``guest-poweroff``,
    ``triple-fault``, ``internal-error``, ``requested``; ``serial`` is the captured serial
    output ("" when not captured)."""

    status: int
    reason: str
    detail: str = ""
    serial: str = ""

    @property
    def ok(self) -> bool:
        """The guest powered off with status 0."""
        return self.reason == "guest-poweroff" and self.status == 0


def build_config(**options: Any) -> VmConfig:
    """A :class:`VmConfig` from keyword arguments (see :class:`Vm`); raises ``ConfigError``
    for a bad value and ``TypeError`` for an unknown keyword."""
    from vmmkit.config import VmConfig

    unknown = sorted(set(options) - OPTIONS - {"serial"})
    if unknown:
        raise TypeError(f"unknown VM option(s): {', '.join(unknown)} (known: {', '.join(sorted(OPTIONS))}, serial)")
    kwargs: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name in _PATHS:
            if not isinstance(value, str | os.PathLike):
                raise TypeError(f"{name}: expected a path, got {value!r}")
            kwargs[name] = os.fspath(value)
        elif name in _SINGLE or name == "serial":
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected an option string, got {value!r}")
            kwargs[name] = value
        elif name in _FLAGS:
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected True or False, got {value!r}")
            kwargs[name] = value
        elif name == "cpus":
            kwargs[name] = _spec(value, "boot")
        elif name == "memory":
            kwargs[name] = _spec(value, "size")
        elif name == "plugin_devices":
            pair = isinstance(value, tuple) and len(value) == 2 and all(isinstance(part, str) for part in value)
            kwargs[name] = [value] if pair else list(value)
        else:  # repeatable: one option string or a list of them
            values = [value] if isinstance(value, str) else list(value)
            if not all(isinstance(item, str) for item in values):
                raise TypeError(f"{name}: expected an option string or a list of them, got {value!r}")
            kwargs[name] = values
    return VmConfig.from_cli(**kwargs)


def _spec(value: object, key: str) -> str:
    """``2`` → ``boot=2``, ``"512M"`` → ``size=512M``; a full spec (``boot=2,max=4``) as is."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"expected an int or a {key}=... option string, got {value!r}")
    text = str(value)
    return text if "=" in text else f"{key}={text}"


class Vm:
    """One VM, scripted. ``start()`` → ``wait()``; ``close()`` (or the ``with`` block) releases it.

    :param config: a complete :class:`VmConfig`; or give the options as keywords instead:
        ``kernel``, ``cmdline``, ``initramfs``, ``firmware`` (paths and text); ``cpus`` (an
        int, or ``"boot=2,max=4"``); ``memory`` (an int of bytes, ``"512M"`` or
        ``"size=512M,shared=on"``); ``disks``, ``net``, ``fs``, ``pmem``, ``devices`` (one
        option string or a list, e.g. ``disks=["path=a.img,readonly=on"]``); ``rng``,
        ``console``, ``vsock``, ``platform``, ``balloon``, ``debug_console`` (an option
        string); ``plugin_devices`` (``(type, spec)`` pairs); ``watchdog``, ``pvpanic``.
    :param serial: ``"capture"`` (default) keeps the serial output for :attr:`serial`; any
        ``--serial`` value (``"tty"``, ``"off"``, ``"file=/tmp/s.log"``) sets the port; ``None``
        keeps what ``config`` says.
    :param hypervisor: a backend name (``"kvm"``, ``"emu"``...) or ``"auto"``: the first usable one.
    :param arch: the guest architecture (default: the host's).
    :param plugins: plugin objects to register besides the installed ones.
    :param seccomp: ``"true"`` (the default, or ``$VMMKIT_SECCOMP``), ``"log"`` or ``"false"``:
        the VM's threads' seccomp filters, as the command's ``--seccomp`` (:mod:`vmmkit.sandbox`).
    """

    def __init__(
        self,
        config: VmConfig | None = None,
        *,
        serial: str | None = CAPTURE,
        hypervisor: str = "auto",
        arch: str | None = None,
        plugins: Iterable[object] = (),
        seccomp: str | None = None,
        **options: Any,
    ) -> None:
        from vmmkit.config import ConfigError, SerialConfig
        from vmmkit.sandbox import resolve_seccomp_mode

        if config is not None and options:
            raise TypeError(f"give either a VmConfig or keyword options, not both ({', '.join(sorted(options))})")
        if config is None:
            config = build_config(**options)
        if config.payload.kernel is None:
            raise ConfigError("kernel", None, "the path of a kernel image", reason="no kernel given")
        self._serial_path: Path | None = None
        self._remove_workdir: weakref.finalize[..., Any] | None = None
        if serial == CAPTURE:
            workdir = tempfile.mkdtemp(prefix="vmmkit-vm-")
            # Removed by close(), or when the Vm is collected or the interpreter exits.
            self._remove_workdir = weakref.finalize(self, shutil.rmtree, workdir, ignore_errors=True)
            self._serial_path = Path(workdir) / "serial.log"
            config = attrs.evolve(config, serial=SerialConfig(mode="File", file=str(self._serial_path)))
        elif serial is not None:
            config = attrs.evolve(config, serial=SerialConfig.parse(serial))
        self.config: VmConfig = config
        self.hypervisor_name = hypervisor
        self.arch_name = arch
        self._plugins: Sequence[object] = tuple(plugins)
        self.seccomp = resolve_seccomp_mode(seccomp)
        self._machine: Machine | None = None
        self._started = False
        self._closed = False
        self._kept_serial: bytes | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def machine(self) -> Machine:
        """The underlying :class:`vmmkit.machine.Machine` (created on first use, not built)."""
        if self._machine is None:
            if self._closed:
                raise VmmError("this VM is closed")
            from vmmkit.machine import Machine
            from vmmkit.plugin import collect_registries, make_plugin_manager

            pm = make_plugin_manager(plugins=self._plugins)
            self._machine = Machine(self.config, registries=collect_registries(pm), plugin_manager=pm,
                                    hypervisor=self.hypervisor_name, arch=self.arch_name, seccomp=self.seccomp)
        return self._machine

    def start(self) -> Vm:
        """Build the VM (memory, devices, payload, vCPUs) and boot it. Returns ``self``."""
        with self._lock:
            if self._closed:
                raise VmmError("this VM is closed")
            if self._started:
                raise VmmError("this VM was started already")
            self._started = True
        self.machine.boot()
        return self

    def wait(self, timeout: float | None = None) -> VmExit:
        """Wait for the guest to stop (power-off, fault, :meth:`stop`).

        :raises TimeoutError: ``timeout`` seconds passed first; the VM keeps running."""
        if not self._started:
            raise VmmError("the VM is not started (call start() first)")
        exit_ = self.machine.wait(timeout)
        if exit_ is None:
            raise TimeoutError(f"the VM did not stop within {timeout} s")
        return VmExit(exit_.status, exit_.reason.value, exit_.detail, self.serial)

    def stop(self) -> VmExit:
        """Stop the VM from outside (no guest power-off) and wait until it has stopped."""
        if not self._started:
            raise VmmError("the VM is not started (call start() first)")
        exit_ = self.machine.shutdown()
        return VmExit(exit_.status, exit_.reason.value, exit_.detail, self.serial)

    def pause(self) -> None:
        self.machine.pause()

    def resume(self) -> None:
        self.machine.resume()

    def power_button(self) -> None:
        """Press the ACPI power button (the guest decides what to do, usually power off)."""
        self.machine.power_button()

    @property
    def state(self) -> str:
        """``Created``, ``Running``, ``Paused`` or ``Shutdown`` (Cloud Hypervisor's names)."""
        return self.machine.state.value

    @property
    def serial(self) -> str:
        """What the guest wrote to its serial port so far ("" unless ``serial="capture"``)."""
        return self.serial_bytes.decode("utf-8", errors="replace")

    @property
    def serial_bytes(self) -> bytes:
        if self._kept_serial is not None:
            return self._kept_serial
        if self._serial_path is None:
            return b""
        try:
            return self._serial_path.read_bytes()
        except FileNotFoundError:
            return b""

    def close(self) -> None:
        """Stop the VM if it runs and release everything (idempotent)."""
        machine, self._machine, self._closed = self._machine, None, True
        try:
            if machine is not None:
                machine.close()
        finally:
            if self._remove_workdir is not None and self._remove_workdir.alive:
                self._kept_serial = self.serial_bytes
                self._remove_workdir()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self._machine.state.value if self._machine is not None else "Created"
        return f"<vmmkit.Vm kernel={self.config.payload.kernel!r} state={state}>"


def run(config: VmConfig | None = None, *, timeout: float | None = None, serial: str | None = CAPTURE,
        hypervisor: str = "auto", arch: str | None = None, plugins: Iterable[object] = (),
        **options: Any) -> VmExit:
    """Boot a VM, wait for the guest to stop and release it: ``vmmkit.run(kernel=..., cmdline=...)``.

    Takes :class:`Vm`'s arguments.

    :raises TimeoutError: the guest ran longer than ``timeout`` seconds (it is stopped first).
    """
    with Vm(config, serial=serial, hypervisor=hypervisor, arch=arch, plugins=plugins, **options) as vm:
        vm.start()
        try:
            return vm.wait(timeout)
        except TimeoutError:
            vm.stop()
            raise
