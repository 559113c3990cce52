"""The vmmkit plugin: registers :class:`~vmmkit_kvm.hypervisor.KvmHypervisor`, and applies
the host quirks (:mod:`vmmkit_kvm.quirks`) to the VMs it runs: ``--kvm-quirks``, the
platform devices and kernel arguments a quirk set needs."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vmmkit import hookimpl
from vmmkit.log import get_logger

if TYPE_CHECKING:
    from vmmkit.device import DeviceRequest
    from vmmkit.hypervisor import Hypervisor
    from vmmkit.registry import Registry

log = get_logger()


def host_is_arm64(machine: str | None = None) -> bool:
    return (machine or platform.machine()) in ("aarch64", "arm64")


@hookimpl
def vmmkit_register_hypervisors(registry: Registry[type[Hypervisor]]) -> None:
    """Register the KVM backend (``--hypervisor kvm``) of this host's architecture: the x86-64
    one (cffi run loop, host quirks) or the arm64 one (:mod:`vmmkit_kvm.arm64`, ctypes)."""
    if host_is_arm64():
        from vmmkit_kvm.arm64 import KvmArm64Hypervisor

        registry.add(KvmArm64Hypervisor)
        return
    from vmmkit_kvm.hypervisor import KvmHypervisor

    registry.add(KvmHypervisor)


@hookimpl
def vmmkit_add_cli_options(parser: argparse.ArgumentParser) -> None:
    from vmmkit_kvm.quirks import DEFAULT_DILATION, MODES

    group = parser.add_argument_group("KVM backend")
    group.add_argument(
        "--kvm-quirks", choices=MODES, default=None,
        help="host quirks: auto (default: pvm when /sys/module/kvm_pvm exists), pvm, none",
    )
    group.add_argument(
        "--kvm-clock-dilation", type=_positive_int, default=None, metavar="N",
        help=f"with pvm quirks: how many times slower the guest's clocks run (default {DEFAULT_DILATION})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


@hookimpl
def vmmkit_configure(options: argparse.Namespace) -> None:
    from vmmkit_kvm import quirks

    quirks.configure(getattr(options, "kvm_quirks", None), getattr(options, "kvm_clock_dilation", None))


def _kvm_vm(machine: Any) -> Any:
    """The machine's :class:`KvmVm` when it runs with active host quirks, else ``None``."""
    vm = getattr(machine, "vm", None)
    quirks = getattr(vm, "quirks", None)
    if quirks is None or not getattr(quirks, "active", False):
        return None
    from vmmkit_kvm.hypervisor import KvmVm

    return vm if isinstance(vm, KvmVm) else None


@hookimpl
def vmmkit_platform_devices(machine: Any) -> Sequence[DeviceRequest] | None:
    """The devices the host lacks (pvm: a userspace PIT in place of KVM's)."""
    vm = _kvm_vm(machine)
    return None if vm is None else vm.quirks.platform_devices()


@hookimpl
def vmmkit_kernel_cmdline(machine: Any, cmdline: str) -> Sequence[str] | None:
    """The kernel arguments the host quirks imply, except those the user already set."""
    vm = _kvm_vm(machine)
    if vm is None:
        return None
    from vmmkit_kvm.quirks import merge_args
    from vmmkit_kvm.quirks.payload import is_linux_kernel

    kernel = machine.config.payload.kernel
    if kernel is None or not is_linux_kernel(kernel):
        return None  # the quirks' parameters are Linux's; other guests keep their command line

    tsc_khz = machine.hypervisor.tsc_khz() if hasattr(machine.hypervisor, "tsc_khz") else None
    args = merge_args(cmdline, vm.quirks.kernel_args(tsc_khz))
    if args:
        log.warning("kvm.quirks.cmdline", quirks=vm.quirks.name, appended=" ".join(args))
    return args


@hookimpl
def vmmkit_vm_state_changed(machine: Any, old: str, new: str, detail: dict[str, Any]) -> None:
    """Start the quirks' helper thread once the vCPUs run (not before: a boot waits for every
    thread it starts)."""
    if new == "Running":
        vm = _kvm_vm(machine)
        if vm is not None:
            vm.start_quirks()
