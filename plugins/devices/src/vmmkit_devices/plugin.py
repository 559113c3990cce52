"""The plugin module named by the ``vmmkit`` entry point ``devices``.

Device type names are a contract with the architecture plugins, which request these types
with fixed placements (x86: ``serial-16550`` at 0x3f8 IRQ 4, ``rtc-cmos`` at 0x70,
``i8042`` at 0x60, ``debug-port`` at 0x80, ``debug-console`` at 0xe9, ``debug-exit`` at 0xf4,
``acpi-pm`` at 0x600, ``acpi-ged`` at a fixed MMIO byte).

The virtio types (``virtio-blk``, ``virtio-net``, ``virtio-console``, ``virtio-rng``,
``virtio-balloon``, ``virtio-vsock``, ``virtio-pmem``) claim the ``disks``, ``net``, ``console``, ``rng``,
``balloon``, ``vsock`` and ``pmem`` sections of the configuration; the machine puts each device behind the transport its
config asks for.

Loading this module imports only the types' declarations (:mod:`vmmkit_devices.device_types`):
a device's implementation is imported when the machine first creates one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmmkit import hookimpl
from vmmkit.sandbox import EVENT_LOOP, VCPU
from vmmkit_devices.device_types import (
    AcpiGedType,
    AcpiPmType,
    CmosRtcType,
    DebugConsoleType,
    DebugExitType,
    DebugPortType,
    GenericVhostUserType,
    I6300EsbType,
    I8042Type,
    I8254Type,
    Pl011Type,
    Pl031Type,
    PvPanicType,
    Serial16550Type,
    VhostUserBlkType,
    VhostUserFsType,
    VhostUserNetType,
    VirtioBalloonType,
    VirtioBlockType,
    VirtioConsoleType,
    VirtioMemType,
    VirtioNetType,
    VirtioPmemType,
    VirtioRngType,
    VirtioVsockType,
)
from vmmkit_devices.vfio.device_type import SECCOMP_SYSCALLS as VFIO_SYSCALLS
from vmmkit_devices.vfio.device_type import VfioPciType

if TYPE_CHECKING:
    from vmmkit.device import DeviceType
    from vmmkit.registry import Registry
    from vmmkit.transport import Transport

DEVICE_TYPES: tuple[type[DeviceType], ...] = (
    Serial16550Type,
    CmosRtcType,
    I8042Type,
    I8254Type,
    DebugPortType,
    DebugConsoleType,
    DebugExitType,
    PvPanicType,
    I6300EsbType,
    AcpiPmType,
    AcpiGedType,
    Pl011Type,
    Pl031Type,
    VirtioBlockType,
    VirtioNetType,
    VirtioConsoleType,
    VirtioRngType,
    VirtioMemType,
    VirtioBalloonType,
    VirtioVsockType,
    VirtioPmemType,
    VhostUserBlkType,
    VhostUserFsType,
    VhostUserNetType,
    GenericVhostUserType,
    VfioPciType,
)


@hookimpl
def vmmkit_register_devices(registry: Registry[type[DeviceType]]) -> None:
    for device_type in DEVICE_TYPES:
        registry.add(device_type)


@hookimpl
def vmmkit_register_transports(registry: Registry[type[Transport]]) -> None:
    from vmmkit_devices.vfio.transport import VfioPciTransport

    registry.add(VfioPciTransport)


@hookimpl
def vmmkit_seccomp_syscalls() -> dict[str, list[str]]:
    # virtio-vsock's muxer thread (an event loop) opens a host stream when the guest connects:
    # socket + connect on <uds path>_<port>.
    # A vhost-user frontend reconnects to a restarted backend when the driver resets or
    # activates the device, on the vCPU thread that wrote the status register.
    # VFIO's calls: vmmkit_devices.vfio.device_type.SECCOMP_SYSCALLS.
    declared: dict[str, list[str]] = {EVENT_LOOP: ["socket", "connect"], VCPU: ["socket", "connect"]}
    for kind, names in VFIO_SYSCALLS.items():
        declared.setdefault(kind, []).extend(names)
    return declared
