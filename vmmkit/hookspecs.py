"""Hook specifications: every way a plugin can extend vmmkit.

A plugin module implements any of these with ``@vmmkit.hookimpl`` and is found through the
``vmmkit`` entry-point group (or registered explicitly). All hooks are prefixed ``vmmkit_``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmmkit import hookspec

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from vmmkit.arch import Architecture, BootInfo, MemoryLayout
    from vmmkit.config import VmConfig
    from vmmkit.device import DeviceRequest, DeviceType
    from vmmkit.hypervisor import Hypervisor
    from vmmkit.machine import Machine
    from vmmkit.memory import GuestMemory
    from vmmkit.registry import Registry
    from vmmkit.transport import Transport

# -- start-up ----------------------------------------------------------------------------------


@hookspec
def vmmkit_add_cli_options(parser: argparse.ArgumentParser) -> None:
    """Add command-line options to ``vmmkit`` (and ``vmmkit run``).

    Prefix option names with the plugin's name to avoid clashes (``--kvm-quirks``). Device
    types get their option from :attr:`vmmkit.device.DeviceType.option` without this hook.

    :param parser: the argument parser, before parsing.
    """


@hookspec
def vmmkit_configure(options: argparse.Namespace) -> None:
    """Read the parsed command line once, before any VM is built.

    :param options: every option, including those added by :func:`vmmkit_add_cli_options`.
    """


@hookspec
def vmmkit_load_on_demand() -> bool | None:
    """Declare that this plugin matters only to a VM that runs on a hypervisor or guest
    architecture it registers: its other hooks do nothing for any other VM, and the device
    types it registers serve only such VMs. A ``vmmkit`` boot that uses none of them then does
    not import the plugin at all (:mod:`vmmkit.plugin_index`). Ignored, and the plugin loaded
    at every start, when the plugin also implements :func:`vmmkit_add_cli_options` or
    :func:`vmmkit_configure` (they act before the VM is chosen), registers a transport or a
    device type with a command-line option, or registers no hypervisor and no architecture.

    :return: True to be loaded only on demand (``None`` or False: at every start).
    """


# -- backends ----------------------------------------------------------------------------------


@hookspec
def vmmkit_register_hypervisors(registry: Registry[type[Hypervisor]]) -> None:
    """Register hypervisor backends: ``registry.add(MyHypervisor)``.

    Each class carries ``name``, ``priority`` (the order ``--hypervisor auto`` tries them in,
    lower first), ``architectures`` and an ``is_available()`` probe.

    :param registry: the hypervisor registry.
    """


@hookspec
def vmmkit_register_architectures(registry: Registry[type[Architecture]]) -> None:
    """Register guest architectures: ``registry.add(X86_64)``.

    :param registry: the architecture registry.
    """


# -- boot --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def vmmkit_load_kernel(
    arch: str, path: Path, header: bytes, memory: GuestMemory, config: VmConfig, layout: MemoryLayout
) -> BootInfo | None:
    """Load the kernel image at ``path`` into guest memory if this loader recognises it.

    Stops at first non-None result.

    :param arch: the guest architecture's name (``x86_64``, ``aarch64``); return ``None`` for
        others.
    :param path: the kernel image.
    :param header: the image's first 64 KiB (or all of it if shorter), for cheap recognition.
    :param memory: guest RAM, to load into.
    :param config: the VM configuration (initramfs and command line are in ``config.payload``).
    :param layout: the architecture's guest-physical layout.
    :return: where and how to enter the kernel, or ``None`` if the image is not of this
        loader's format. Raise :class:`vmmkit.errors.BootError` for an image of this format that
        is corrupt or does not fit.
    """


@hookspec
def vmmkit_kernel_cmdline(machine: Machine, cmdline: str) -> Sequence[str] | None:
    """Kernel arguments this plugin needs the guest to get, for this VM (a hypervisor
    backend whose host needs the guest kernel configured a certain way).

    Called each time the payload is loaded (boot and every reboot), after the architecture
    has completed the command line. Every implementation's arguments are appended, in call
    order, before a ``--`` (what follows it is for init); arguments already present are not
    repeated. Log what you add: the user wrote the command line.

    :param machine: the machine; ``machine.vm`` and ``machine.hypervisor`` exist.
    :param cmdline: the command line so far.
    :return: arguments to append, or ``None``.
    """


# -- devices -----------------------------------------------------------------------------------


@hookspec
def vmmkit_register_devices(registry: Registry[type[DeviceType]]) -> None:
    """Register device types: ``registry.add(VirtioBlock)``.

    :param registry: the device-type registry.
    """


@hookspec
def vmmkit_register_transports(registry: Registry[type[Transport]]) -> None:
    """Register transports: ``registry.add(MyTransport)``, a :class:`vmmkit.transport.Transport`
    that places the devices of its ``family`` (the core registers ``platform``, ``pci``,
    ``virtio-mmio`` and ``virtio-pci`` itself).

    :param registry: the transport registry.
    """


@hookspec
def vmmkit_platform_devices(machine: Machine) -> Sequence[DeviceRequest] | None:
    """Fixed devices this plugin adds to the VM, after the architecture's platform devices:
    for a backend that cannot provide one the platform normally gets from the hypervisor (a
    userspace PIT where the in-kernel one is unusable).

    :param machine: the machine being built; ``machine.vm`` exists, no device does yet.
    :return: device requests (built from the device registry like any other), or ``None``.
    """


# -- sandbox -----------------------------------------------------------------------------------


@hookspec
def vmmkit_seccomp_syscalls() -> Mapping[str, Sequence[str]] | None:
    """System calls this plugin's code needs beyond vmmkit's seccomp allow lists, by thread
    kind (:data:`vmmkit.sandbox.KINDS`: ``"device"`` for device workers, ``"vcpu"``,
    ``"event-loop"``, ``"api"``, ``"vmm"``), so that a third-party device works under
    ``--seccomp true``: ``{"device": ["socket", "connect"]}``. Calls a kind declares are
    allowed to the kinds that start such threads too (see :mod:`vmmkit.sandbox.syscalls`). A
    call of :data:`vmmkit.sandbox.syscalls.FORBIDDEN` (``execve``, ``ptrace``...) is refused.

    Threads a plugin starts call :func:`vmmkit.sandbox.enter_thread` first thing.

    :return: kernel system call names by thread kind, or ``None``.
    """


# -- lifecycle ---------------------------------------------------------------------------------


@hookspec
def vmmkit_vm_created(machine: Machine) -> None:
    """The VM exists (memory, devices, vCPUs) but has not started.

    :param machine: the machine.
    """


@hookspec
def vmmkit_vm_state_changed(machine: Machine, old: str, new: str, detail: dict[str, Any]) -> None:
    """The VM moved between lifecycle states (``Created``, ``Running``, ``Paused``,
    ``Shutdown``). Called on the thread that caused the change; do not block.

    :param machine: the machine.
    :param old: the previous state.
    :param new: the new state.
    :param detail: why (e.g. ``{"reason": "guest-poweroff"}``).
    """


@hookspec
def vmmkit_vm_destroyed(machine: Machine) -> None:
    """The VM's resources have been released.

    :param machine: the machine.
    """
