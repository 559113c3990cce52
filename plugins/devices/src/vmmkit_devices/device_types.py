"""The device types this plugin registers: declarations only.

Registering a type must stay cheap (it happens at every start, for every type, whatever the VM
has), so each class here holds only what registration and :meth:`~vmmkit.device.DeviceType.requests`
need. Each names its :attr:`~vmmkit.device.DeviceType.implementation` module (the device, its
console backends, the virtio SDK, native code), whose ``create(ctx, request)`` the core calls
after importing it: a VM pays only for the devices it has. Keep module-level imports here to
vmmkit's core interfaces.

Each implementation module re-exports its type (``from vmmkit_devices.legacy.serial import
Serial16550Type`` works), so a type's documentation lives with its device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.device import DeviceRequest, DeviceType, section_id
from vmmkit_devices.console.mode import console_mode

if TYPE_CHECKING:
    from vmmkit.config import VmConfig

# -- PC platform devices ------------------------------------------------------------------------


class Serial16550Type(DeviceType):
    """``serial-16550``: requested by the architecture with its placement (x86: 0x3f8, IRQ 4)
    and ``config`` = the VM's :class:`vmmkit.config.SerialConfig` (``None``: the VM's
    ``serial``). Mode ``Off`` creates no device (:meth:`create` returns ``None``), as in Cloud
    Hypervisor: the port then reads as all ones and Linux finds no UART there."""

    name: ClassVar[str] = "serial-16550"
    description: ClassVar[str] = "16550A UART with tty, pty, file, socket and null backends"
    sections: ClassVar[tuple[str, ...]] = ("serial",)

    implementation: ClassVar[str] = "vmmkit_devices.legacy.serial"


class CmosRtcType(DeviceType):
    """``rtc-cmos``: requested by the architecture at (0x70, 2), ``irq`` 8 for update-ended and
    alarm interrupts (``None``: none). ``config`` may be a mapping (or object) with
    ``mem_below_4g`` / ``mem_above_4g`` in bytes, stored where firmware looks for the RAM
    size."""

    name: ClassVar[str] = "rtc-cmos"
    description: ClassVar[str] = "MC146818 CMOS RTC and NVRAM (host UTC clock)"

    implementation: ClassVar[str] = "vmmkit_devices.legacy.rtc"


class I8042Type(DeviceType):
    """``i8042``: requested by the architecture at (0x60, 5); ``irq`` (1) is optional."""

    name: ClassVar[str] = "i8042"
    description: ClassVar[str] = "i8042 controller without devices: CPU reset, fast PS/2 probe"

    implementation: ClassVar[str] = "vmmkit_devices.legacy.i8042"


class I8254Type(DeviceType):
    """``i8254``: a userspace PIT, requested with its placement (PC: (0x40, 4), ``irq`` 0) by
    whoever knows the hypervisor provides none (the KVM plugin's host quirks). ``config`` may
    be a mapping (or object) with ``dilation``: how many times slower than wall-clock time the
    counters run (default 1)."""

    name: ClassVar[str] = "i8254"
    description: ClassVar[str] = "8254 PIT in userspace (IRQ 0), optionally slowed down"

    implementation: ClassVar[str] = "vmmkit_devices.legacy.pit"


# -- debug ports --------------------------------------------------------------------------------


class DebugPortType(DeviceType):
    """``debug-port``: requested by the architecture at (0x80, 1)."""

    name: ClassVar[str] = "debug-port"
    description: ClassVar[str] = "boot-progress port 0x80: timestamped codes in the VMM's log"

    implementation: ClassVar[str] = "vmmkit_devices.debug.port80"


class DebugConsoleType(DeviceType):
    """``debug-console``: requested by the architecture at (``DebugConsoleConfig.iobase``, 1),
    ``config`` = the VM's ``DebugConsoleConfig`` (``None``: ``ctx.config.debug_console``)."""

    name: ClassVar[str] = "debug-console"
    description: ClassVar[str] = "Bochs debug console port (0xe9): guest bytes to tty, file, pty or null"
    sections: ClassVar[tuple[str, ...]] = ("debug_console",)

    implementation: ClassVar[str] = "vmmkit_devices.debug.console"


class DebugExitType(DeviceType):
    """``debug-exit``: requested by the architecture at (0xf4, 4)."""

    name: ClassVar[str] = "debug-exit"
    description: ClassVar[str] = "QEMU isa-debug-exit port: sets the VMM's exit status"

    implementation: ClassVar[str] = "vmmkit_devices.debug.exit"


class PvPanicType(DeviceType):
    """``pvpanic``: requested by the architecture (x86: port 0x505) when ``--pvpanic`` is on."""

    name: ClassVar[str] = "pvpanic"
    description: ClassVar[str] = "pvpanic port: guest panics become events (QEMU0001, port 0x505)"
    sections: ClassVar[tuple[str, ...]] = ("pvpanic",)

    implementation: ClassVar[str] = "vmmkit_devices.debug.pvpanic"


class I6300EsbType(DeviceType):
    """``i6300esb``: the Intel 6300ESB watchdog on PCI, one per VM with ``--watchdog``; a guest
    that stops petting it is reset."""

    name: ClassVar[str] = "i6300esb"
    description: ClassVar[str] = "Intel 6300ESB watchdog on PCI (--watchdog): resets a guest that stops petting it"
    sections: ClassVar[tuple[str, ...]] = ("watchdog",)

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        return [DeviceRequest(cls.name, "__watchdog")] if config.watchdog else []

    implementation: ClassVar[str] = "vmmkit_devices.legacy.i6300esb"


# -- ACPI registers -----------------------------------------------------------------------------


class AcpiPmType(DeviceType):
    """``acpi-pm``: requested by the architecture at (0x600, 8)."""

    name: ClassVar[str] = "acpi-pm"
    description: ClassVar[str] = "ACPI hardware-reduced sleep control/status and reset registers"

    implementation: ClassVar[str] = "vmmkit_devices.acpi.pm"


class AcpiGedType(DeviceType):
    """``acpi-ged``: requested by the architecture with a fixed MMIO byte and interrupt."""

    name: ClassVar[str] = "acpi-ged"
    description: ClassVar[str] = "ACPI Generic Event Device (power button notification)"

    implementation: ClassVar[str] = "vmmkit_devices.acpi.ged"


# -- ARM platform devices -----------------------------------------------------------------------


class Pl011Type(DeviceType):
    """``pl011``: requested by the AArch64 architecture at 0x09000000 (SPI 1), ``config`` =
    the VM's :class:`vmmkit.config.SerialConfig`; mode ``Off`` creates no device."""

    name: ClassVar[str] = "pl011"
    description: ClassVar[str] = "ARM PL011 UART (AArch64 console) with tty, pty, file, socket and null backends"
    sections: ClassVar[tuple[str, ...]] = ("serial",)

    implementation: ClassVar[str] = "vmmkit_devices.legacy.pl011"


class Pl031Type(DeviceType):
    """``rtc-pl031``: requested by the AArch64 architecture at 0x09010000 (SPI 2)."""

    name: ClassVar[str] = "rtc-pl031"
    description: ClassVar[str] = "ARM PL031 real-time clock (host UTC clock)"

    implementation: ClassVar[str] = "vmmkit_devices.legacy.rtc_pl031"


# -- virtio devices (vmmkit's virtio SDK is imported with the first one created) ---------------


class VirtioBlockType(DeviceType):
    """``virtio-blk``: a virtio block device per ``--disk`` (raw image files)."""

    name: ClassVar[str] = "virtio-blk"
    description: ClassVar[str] = "virtio block device on a raw image file (--disk path=...)"
    sections: ClassVar[tuple[str, ...]] = ("disks", "disks.rate_limiter_config", "disks.rate_limit_group")

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        return [_virtio_request(cls.name, disk, section_id(disk)) for disk in config.disks if not disk.vhost_user]

    implementation: ClassVar[str] = "vmmkit_devices.virtio.block"


class VirtioNetType(DeviceType):
    """``virtio-net``: a virtio network device per ``--net`` (a tap)."""

    name: ClassVar[str] = "virtio-net"
    description: ClassVar[str] = "virtio network device on a tap interface (--net tap=...|fd=[...])"
    sections: ClassVar[tuple[str, ...]] = ("net", "net.rate_limiter_config")

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        return [_virtio_request(cls.name, net, section_id(net)) for net in config.net if not net.vhost_user]

    implementation: ClassVar[str] = "vmmkit_devices.virtio.net"


class VirtioConsoleType(DeviceType):
    """``virtio-console``: the virtio console of ``--console`` (unless ``off``)."""

    name: ClassVar[str] = "virtio-console"
    description: ClassVar[str] = "virtio console, one port, on the serial port's backends (--console)"
    sections: ClassVar[tuple[str, ...]] = ("console",)

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        console = config.console
        if console_mode(console, default="Off") == "Off":
            return []
        return [_virtio_request(cls.name, console, console.id or "__console")]

    implementation: ClassVar[str] = "vmmkit_devices.virtio.console"


class VirtioRngType(DeviceType):
    """``virtio-rng``: the entropy device of ``--rng`` (always present, as in Cloud Hypervisor)."""

    name: ClassVar[str] = "virtio-rng"
    description: ClassVar[str] = "virtio entropy device reading a host source (--rng src=/dev/urandom)"
    sections: ClassVar[tuple[str, ...]] = ("rng",)

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        rng = config.rng
        return [_virtio_request(cls.name, rng, rng.id or "__rng")]

    implementation: ClassVar[str] = "vmmkit_devices.virtio.rng"


class VirtioMemType(DeviceType):
    """``virtio-mem``: asked for by the core's memory hotplug (``--memory
    hotplug_method=virtio-mem,hotplug_size=``) over the region it mapped, never from a
    configuration section of its own: it claims the memory options that make it."""

    name: ClassVar[str] = "virtio-mem"
    description: ClassVar[str] = "virtio memory device: RAM plugged in 2 MiB blocks (hotplug_method=virtio-mem)"
    sections: ClassVar[tuple[str, ...]] = ("memory.hotplug_method", "memory.hotplugged_size")

    implementation: ClassVar[str] = "vmmkit_devices.virtio.mem"


class VirtioBalloonType(DeviceType):
    """``virtio-balloon``: the memory balloon of ``--balloon`` (none without it), id
    ``__balloon`` unless the section names one, as Cloud Hypervisor's."""

    name: ClassVar[str] = "virtio-balloon"
    description: ClassVar[str] = "virtio memory balloon, free page reporting (--balloon size=...)"
    sections: ClassVar[tuple[str, ...]] = ("balloon",)

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        balloon = config.balloon
        if balloon is None:
            return []
        return [_virtio_request(cls.name, balloon, balloon.id or BALLOON_ID)]

    implementation: ClassVar[str] = "vmmkit_devices.virtio.balloon"


#: The balloon's id when its section names none (Cloud Hypervisor's ``BALLOON_DEVICE_NAME``).
BALLOON_ID = "__balloon"


class VirtioVsockType(DeviceType):
    """``virtio-vsock``: the vsock device of ``--vsock`` (Cloud Hypervisor's hybrid vsock: host
    streams through a Unix socket)."""

    name: ClassVar[str] = "virtio-vsock"
    description: ClassVar[str] = ("virtio vsock, hybrid: guest streams to host Unix sockets (--vsock cid=,socket=); "
                                  "judged by Linux's virtio vsock transport")
    sections: ClassVar[tuple[str, ...]] = ("vsock",)

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        vsock = config.vsock
        if vsock is None:
            return []
        return [_virtio_request(cls.name, vsock, section_id(vsock))]

    implementation: ClassVar[str] = "vmmkit_devices.virtio.vsock.device"


class VirtioPmemType(DeviceType):
    """``virtio-pmem``: a virtio persistent-memory device per ``--pmem`` (a file mapped into the
    guest, outside RAM; flushes are ``fsync``)."""

    name: ClassVar[str] = "virtio-pmem"
    description: ClassVar[str] = ("virtio persistent memory: a file mapped into the guest, flush = fsync "
                                  "(--pmem file=,size=,discard_writes=); Linux's virtio_pmem with DAX")
    sections: ClassVar[tuple[str, ...]] = ("pmem",)

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        return [_virtio_request(cls.name, pmem, section_id(pmem)) for pmem in config.pmem]

    implementation: ClassVar[str] = "vmmkit_devices.virtio.pmem"


# -- vhost-user frontends (the data path is a backend process; guest memory is shared) -------


class VhostUserBlkType(DeviceType):
    """``vhost-user-blk``: a virtio block device per ``--disk vhost_user=on,socket=...``, served by a
    vhost-user backend (qemu-storage-daemon, SPDK, vmmkit-vhost-user)."""

    name: ClassVar[str] = "vhost-user-blk"
    description: ClassVar[str] = "virtio block device served by a vhost-user backend (--disk vhost_user=on,socket=)"
    sections: ClassVar[tuple[str, ...]] = ("disks.vhost_user", "disks.vhost_socket")

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        return [_virtio_request(cls.name, disk, section_id(disk)) for disk in config.disks if disk.vhost_user]

    implementation: ClassVar[str] = "vmmkit_devices.vhost_user.blk"


class VhostUserNetType(DeviceType):
    """``vhost-user-net``: a virtio network device per ``--net vhost_user=on,socket=...``, served by
    a vhost-user backend (client or server mode, ``vhost_mode=``)."""

    name: ClassVar[str] = "vhost-user-net"
    description: ClassVar[str] = "virtio network device served by a vhost-user backend (--net vhost_user=on,socket=)"
    sections: ClassVar[tuple[str, ...]] = ("net.vhost_user", "net.vhost_socket", "net.vhost_mode")

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        return [_virtio_request(cls.name, net, section_id(net)) for net in config.net if net.vhost_user]

    implementation: ClassVar[str] = "vmmkit_devices.vhost_user.net"


class VhostUserFsType(DeviceType):
    """``vhost-user-fs``: a virtio-fs device per ``--fs tag=,socket=``, its FUSE server a vhost-user
    backend (virtiofsd, vmmkit-vhost-user fs)."""

    name: ClassVar[str] = "vhost-user-fs"
    description: ClassVar[str] = "virtio-fs device served by a vhost-user backend such as virtiofsd (--fs tag=,socket=)"
    sections: ClassVar[tuple[str, ...]] = ("fs",)

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        return [_virtio_request(cls.name, fs, section_id(fs)) for fs in config.fs]

    implementation: ClassVar[str] = "vmmkit_devices.vhost_user.fs"


class GenericVhostUserType(DeviceType):
    """``generic-vhost-user``: a virtio device of any type per ``--generic-vhost-user socket=,
    virtio_id=,queue_sizes=[..]``, its configuration space and queues the backend's."""

    name: ClassVar[str] = "generic-vhost-user"
    description: ClassVar[str] = ("virtio device of any type served by a vhost-user backend "
                                  "(--generic-vhost-user socket=,virtio_id=,queue_sizes=[..])")
    sections: ClassVar[tuple[str, ...]] = ("generic_vhost_user",)

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        return [_virtio_request(cls.name, device, section_id(device)) for device in config.generic_vhost_user]

    implementation: ClassVar[str] = "vmmkit_devices.vhost_user.generic"


def _virtio_request(type_name: str, section: Any, device_id: str) -> DeviceRequest:
    """The request for a virtio device of a configuration section with Cloud Hypervisor's
    placement fields (``pci_segment``, ``pci_device_id``) and vmmkit's ``transport``."""
    return DeviceRequest(type_name, device_id, section, transport=section.transport,
                         pci_segment=section.pci_segment, pci_slot=section.pci_device_id)
