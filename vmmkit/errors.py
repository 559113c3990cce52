"""The exception hierarchy shared by the core and every plugin."""

from __future__ import annotations


class VmmError(Exception):
    """Base class of every error vmmkit raises on purpose."""


class PluginError(VmmError):
    """A plugin could not be loaded or registered something invalid."""


class RegistryError(VmmError):
    """A name was not found in a registry, or registered twice."""


class HypervisorError(VmmError):
    """A hypervisor call failed.

    ``call`` names the operation (for KVM, the ioctl, e.g. ``KVM_SET_USER_MEMORY_REGION``) and
    ``errno`` is the OS error number when there is one.
    """

    def __init__(self, call: str, errno: int | None = None, detail: str = "") -> None:
        self.call = call
        self.errno = errno
        self.detail = detail
        text = call
        if errno is not None:
            import os

            text += f" failed: [errno {errno}] {os.strerror(errno)}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)


class CapabilityError(HypervisorError):
    """The hypervisor lacks a capability the VM needs (reported at VM creation)."""


class GuestMemoryError(VmmError):
    """A guest-physical access fell outside guest RAM or crossed a region boundary."""


class BusError(VmmError):
    """A bus range could not be inserted (overlap, zero length) or was not found."""


class DeviceError(VmmError):
    """A device could not be created or failed; the VM may keep running without it."""


class BootError(VmmError):
    """The payload (kernel, initramfs, firmware) could not be loaded."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class NotSupportedError(VmmError):
    """An operation this VM, architecture or backend does not offer (``vm.nmi`` on AArch64)."""
