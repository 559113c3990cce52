"""Host quirks: what the KVM backend does differently on a host whose KVM is not the usual one.

Some ``/dev/kvm`` implementations run guests with gaps that a VMM can paper over. A *quirk
set* (:class:`HostQuirks`) describes one such host: CPUID bits to hide, whether the in-kernel
PIT may be used, platform devices and kernel arguments the guest then needs, and a per-VM
handler (:class:`VmQuirks`) that sees every vCPU exit before the VMM does and may resolve it
(return ``True``: the vCPU runs on, the exit never leaves the backend).

Known sets (``--kvm-quirks``):

``none``
    a normal KVM host: nothing changes.
``pvm``
    the nested ``kvm_pvm`` module (:mod:`vmmkit_kvm.quirks.pvm`).
``auto`` (default)
    ``pvm`` when ``/sys/module/kvm_pvm`` exists, else ``none``.

The choice comes from, in order: the ``quirks`` argument of
:class:`~vmmkit_kvm.hypervisor.KvmHypervisor`, the ``--kvm-quirks`` option (through
:func:`configure`), the ``VMMKIT_KVM_QUIRKS`` environment variable, ``auto``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from attrs import define

from vmmkit.device import DeviceRequest
from vmmkit.hypervisor import VmExit
from vmmkit.x86 import CpuIdEntry

if TYPE_CHECKING:
    from vmmkit_kvm.hypervisor import KvmExitInfo, KvmVcpu, KvmVm

__all__ = [
    "AUTO",
    "MODES",
    "HostQuirks",
    "VmQuirks",
    "QuirkSettings",
    "configure",
    "detect",
    "describe",
    "settings",
    "select",
]

AUTO = "auto"
NONE = "none"
PVM = "pvm"
MODES: tuple[str, ...] = (AUTO, PVM, NONE)
ENV_MODE = "VMMKIT_KVM_QUIRKS"
ENV_DILATION = "VMMKIT_KVM_CLOCK_DILATION"
#: The module whose presence means the host's /dev/kvm is PVM.
PVM_SYSFS = Path("/sys/module/kvm_pvm")
DEFAULT_DILATION = 10


@define
class QuirkSettings:
    """What ``--kvm-quirks`` and ``--kvm-clock-dilation`` chose (``None``: not given)."""

    mode: str | None = None
    dilation: int | None = None


_settings = QuirkSettings()


def settings() -> QuirkSettings:
    """The process-wide choice made on the command line (see :func:`configure`)."""
    return _settings


def configure(mode: str | None = None, dilation: int | None = None) -> None:
    """Record the command line's choice for the VMs this process creates.

    :raises ValueError: an unknown mode or a dilation below 1.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown KVM quirks mode {mode!r} (known: {', '.join(MODES)})")
    if dilation is not None and dilation < 1:
        raise ValueError(f"the clock dilation must be at least 1, not {dilation}")
    _settings.mode = mode
    _settings.dilation = dilation


def detect(sysfs: Path = PVM_SYSFS) -> str:
    """The quirk set this host needs: ``pvm`` or ``none``."""
    return PVM if sysfs.exists() else NONE


def _requested_mode(mode: str | None) -> str:
    requested = mode or _settings.mode or os.environ.get(ENV_MODE) or AUTO
    if requested not in MODES:
        raise ValueError(f"unknown KVM quirks mode {requested!r} (known: {', '.join(MODES)})")
    return requested


def _wanted_dilation(dilation: int | None) -> int:
    if dilation is not None:
        return dilation
    if _settings.dilation is not None:
        return _settings.dilation
    env = os.environ.get(ENV_DILATION)
    return int(env) if env else DEFAULT_DILATION


def select(mode: str | None = None, dilation: int | None = None) -> HostQuirks:
    """The quirk set for ``mode`` (``None``: the configured one, see the module docstring).

    :raises ValueError: an unknown mode.
    """
    requested = _requested_mode(mode)
    chosen = detect() if requested == AUTO else requested
    if chosen == PVM:
        from vmmkit_kvm.quirks.pvm import PvmQuirks

        return PvmQuirks(dilation=_wanted_dilation(dilation), detected=requested == AUTO)
    return HostQuirks()


def describe() -> str:
    """One phrase for ``vmmkit plugins``: the quirk set this host would get (empty if none)."""
    try:
        quirks = select()
    except ValueError as exc:
        return f"host quirks: {exc}"
    return quirks.summary()


class VmQuirks:
    """Per-VM quirk state: sees each vCPU exit on the vCPU's own thread."""

    def handle_exit(self, vcpu: KvmVcpu, exit_: VmExit, info: KvmExitInfo) -> bool:
        """Resolve ``exit_`` if it is one of this host's gaps; ``True`` if the vCPU should
        simply run on (the VMM never sees the exit)."""
        return False

    def vcpu_created(self, vcpu: KvmVcpu) -> None:
        """A vCPU of this VM exists (not yet running)."""

    def start(self) -> None:
        """The VM is complete and about to run a guest (the machine built it)."""

    def counts(self, vcpu: KvmVcpu) -> dict[str, int]:
        """Per-vCPU counters merged into :meth:`KvmVcpu.exit_counts` (``quirk-...`` keys)."""
        return {}

    def restored(self) -> None:
        """The VM's state came from a snapshot, its vCPUs not yet run (:meth:`vmmkit.hypervisor.Vm.restored`)."""

    def reset(self) -> None:
        """The guest is being reset, its vCPUs stopped (:meth:`vmmkit.hypervisor.Vm.reset`)."""

    def close(self) -> None:
        """The VM is being closed."""


class HostQuirks:
    """The quirk set of a normal KVM host: changes nothing. Subclasses override."""

    name: ClassVar[str] = NONE
    #: Whether the in-kernel PIT (KVM_CREATE_PIT2) may be used.
    in_kernel_pit: ClassVar[bool] = True
    #: How many times slower than wall-clock time the guest's clocks run.
    dilation: int = 1

    @property
    def active(self) -> bool:
        return self.name != NONE

    def summary(self) -> str:
        return ""

    def preload(self) -> None:
        """Import what a VM with these quirks will run (see ``Hypervisor.preload``)."""

    def supported_cpuid(self, entries: Sequence[CpuIdEntry]) -> list[CpuIdEntry]:
        """``KVM_GET_SUPPORTED_CPUID`` trimmed to what really works on this host."""
        return list(entries)

    def kernel_args(self, tsc_khz: int | None) -> list[str]:
        """Arguments a Linux guest needs on this host (``tsc_khz``: KVM_GET_TSC_KHZ)."""
        return []

    def platform_devices(self) -> list[DeviceRequest]:
        """Platform devices the VM needs because the host lacks them (a userspace PIT)."""
        return []

    def attach(self, vm: KvmVm) -> VmQuirks | None:
        """The per-VM handler for a new VM (``None``: no exit handling)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def merge_args(cmdline: str, args: Sequence[str]) -> list[str]:
    """The ``args`` whose parameter name ``cmdline`` does not already set: the user's own
    ``tsc_early_khz=`` or ``clearcpuid=`` wins."""
    present = {word.split("=", 1)[0] for word in cmdline.split()}
    return [arg for arg in args if arg.split("=", 1)[0] not in present]
