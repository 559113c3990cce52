"""The plugin module named by the ``vmmkit`` entry point ``devices``.

Device type names are a contract with the architecture plugins, which request these types
with fixed placements (x86: ``serial-16550`` at 0x3f8 IRQ 4, ``rtc-cmos`` at 0x70,
``i8042`` at 0x60, ``debug-port`` at 0x80, ``debug-console`` at 0xe9, ``debug-exit`` at 0xf4,
``acpi-pm`` at 0x600, ``acpi-ged`` at a fixed MMIO byte).

The virtio types (``virtio-blk``, ``virtio-net``, ``virtio-console``, ``virtio-rng``) claim the
``disks``, ``net``, ``console`` and ``rng`` sections of the configuration; the machine puts each
device behind the transport its config asks for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmmkit import hookimpl
from vmmkit_devices.acpi.ged import AcpiGedType
from vmmkit_devices.acpi.pm import AcpiPmType
from vmmkit_devices.debug.console import DebugConsoleType
from vmmkit_devices.debug.exit import DebugExitType
from vmmkit_devices.debug.port80 import DebugPortType
from vmmkit_devices.debug.pvpanic import PvPanicType
from vmmkit_devices.legacy.i8042 import I8042Type
from vmmkit_devices.legacy.pit import I8254Type
from vmmkit_devices.legacy.pl011 import Pl011Type
from vmmkit_devices.legacy.rtc import CmosRtcType
from vmmkit_devices.legacy.rtc_pl031 import Pl031Type
from vmmkit_devices.legacy.serial import Serial16550Type
from vmmkit_devices.virtio.block import VirtioBlockType
from vmmkit_devices.virtio.console import VirtioConsoleType
from vmmkit_devices.virtio.net import VirtioNetType
from vmmkit_devices.virtio.rng import VirtioRngType

if TYPE_CHECKING:
    from vmmkit.device import DeviceType
    from vmmkit.registry import Registry

DEVICE_TYPES: tuple[type[DeviceType], ...] = (
    Serial16550Type,
    CmosRtcType,
    I8042Type,
    I8254Type,
    DebugPortType,
    DebugConsoleType,
    DebugExitType,
    PvPanicType,
    AcpiPmType,
    AcpiGedType,
    Pl011Type,
    Pl031Type,
    VirtioBlockType,
    VirtioNetType,
    VirtioConsoleType,
    VirtioRngType,
)


@hookimpl
def vmmkit_register_devices(registry: Registry[type[DeviceType]]) -> None:
    for device_type in DEVICE_TYPES:
        registry.add(device_type)
