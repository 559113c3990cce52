"""The PC platform every x86-64 VM has: fixed devices, their ports and interrupts.

The device type names are the contract with the devices plugin::

    id              type           ports        IRQ  what
    _serial         serial-16550   0x3f8-0x3ff  4    COM1 (config = VmConfig.serial; left out if Off)
    _rtc            rtc-cmos       0x70-0x71    8    CMOS RTC
    _i8042          i8042          0x60-0x64    1    keyboard controller; 0xfe to port 0x64 resets
    _debug_port     debug-port     0x80         -    POST codes: a boot-progress log
    _debug_console  debug-console  0xe9         -    (config = VmConfig.debug_console; port = its
                                                     iobase; left out if Off)
    _debug_exit     debug-exit     0xf4-0xf7    -    QEMU isa-debug-exit: sets the exit status
    _acpi_pm        acpi-pm        0x600-0x607  9    hardware-reduced ACPI registers: +0 sleep
                                                     control ((5 << 2) | (1 << 5) powers off),
                                                     +1 sleep status, +4 reset (0x01 resets);
                                                     IRQ 9 is the SCI, named in the request so
                                                     that no other device is given it
    _acpi_ged       acpi-ged       MMIO byte at 23   the ACPI GED's notification register (the
                    0xc7fff000                       power button; DSDT: \\_SB_.GED_, .GEC_, .PWRB),
                                                     the last page of the device MMIO window;
                                                     IRQ 23 is its edge-triggered interrupt
    (_pci_hotplug)  -              MMIO 16 bytes     the ACPI PCI hotplug registers, placed by the
                                   at 0xc7ffe000     device manager from ``layout.pci_hotplug``
                                                     (vmmkit.pci.hotplug; DSDT: \\_SB_.PHPR)

Interrupt routing: ISA IRQ n is IOAPIC pin n, except IRQ 0 (pin 2, as KVM wires its PIT) and
IRQ 9 (the SCI: level-triggered, active high). Both tables (MADT, MP table) say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from vmmkit.device import DeviceRequest, PlacedDevice
from vmmkit_x86_64 import layout as L
from vmmkit_x86_64.interrupts import SCI_IRQ

if TYPE_CHECKING:
    from vmmkit.config import VmConfig

SERIAL_PORT: Final = 0x3F8
SERIAL_IRQ: Final = 4
RTC_PORT: Final = 0x70
RTC_IRQ: Final = 8
I8042_PORT: Final = 0x60
I8042_IRQ: Final = 1
DEBUG_PORT: Final = 0x80
DEBUG_CONSOLE_PORT: Final = 0xE9
DEBUG_EXIT_PORT: Final = 0xF4
ACPI_PM_PORT: Final = 0x600
ACPI_PM_SLEEP_CONTROL: Final = 0
ACPI_PM_SLEEP_STATUS: Final = 1
ACPI_PM_RESET: Final = 4
ACPI_PM_RESET_VALUE: Final = 0x01
ACPI_GED_ADDRESS: Final = L.DEVICE_MMIO.start + L.DEVICE_MMIO.size - 0x1000
PVPANIC_PORT: Final = 0x505
ACPI_GED_SIZE: Final = 1
ACPI_GED_IRQ: Final = 23


def platform_devices(config: VmConfig) -> list[DeviceRequest]:
    requests = []
    if _mode(config.serial) != "Off":
        requests.append(
            DeviceRequest("serial-16550", "_serial", config.serial, pio=(SERIAL_PORT, 8), irq=SERIAL_IRQ)
        )
    requests += [
        DeviceRequest("rtc-cmos", "_rtc", pio=(RTC_PORT, 2), irq=RTC_IRQ),
        DeviceRequest("i8042", "_i8042", pio=(I8042_PORT, 5), irq=I8042_IRQ),
        DeviceRequest("debug-port", "_debug_port", pio=(DEBUG_PORT, 1)),
    ]
    debug_console = getattr(config, "debug_console", None)
    if debug_console is not None and _mode(debug_console) != "Off":
        port = getattr(debug_console, "iobase", None)
        requests.append(
            DeviceRequest(
                "debug-console",
                "_debug_console",
                debug_console,
                pio=(DEBUG_CONSOLE_PORT if port is None else port, 1),
            )
        )
    requests += [
        DeviceRequest("debug-exit", "_debug_exit", pio=(DEBUG_EXIT_PORT, 4)),
        DeviceRequest("acpi-pm", "_acpi_pm", pio=(ACPI_PM_PORT, 8), irq=SCI_IRQ),
        DeviceRequest("acpi-ged", "_acpi_ged", mmio=(ACPI_GED_ADDRESS, ACPI_GED_SIZE), irq=ACPI_GED_IRQ),
    ]
    if getattr(config, "pvpanic", False):
        requests.append(DeviceRequest("pvpanic", "_pvpanic", pio=(PVPANIC_PORT, 1)))
    return requests


def _mode(console: Any) -> str:
    return str(getattr(console, "mode", "Tty"))


def virtio_mmio_args(devices: Sequence[PlacedDevice]) -> list[str]:
    """``virtio_mmio.device=<size>@<base>:<irq>`` for each placed virtio-mmio device."""
    args = []
    for placed in devices:
        if placed.kind != "virtio-mmio" or placed.mmio is None or placed.irq is None:
            continue
        base, size = placed.mmio
        size_text = f"{size // 1024}K" if size % 1024 == 0 else str(size)
        args.append(f"virtio_mmio.device={size_text}@{base:#x}:{placed.irq}")
    return args


def _split_init_args(text: str) -> tuple[str, str]:
    """``text`` cut before its first ``--`` word (with the whitespace before it): what follows
    is for init. ``(text, "")`` when there is none."""
    at = text.find("--")
    while at >= 0:
        end = at + 2
        if (at == 0 or text[at - 1].isspace()) and (end == len(text) or text[end].isspace()):
            cut = max(at - 1, 0)
            return text[:cut], text[cut:]
        at = text.find("--", at + 1)
    return text, ""


def kernel_cmdline(cmdline: str | None, devices: Sequence[PlacedDevice]) -> str:
    """``cmdline`` plus the virtio-mmio arguments it does not already carry (so applying it
    twice changes nothing), inserted before a ``--`` (what follows it is for init)."""
    text = cmdline or ""
    words = text.split()
    extra = [arg for arg in virtio_mmio_args(devices) if arg not in words]
    if not extra:
        return text
    head, tail = _split_init_args(text)
    if tail and not tail[0].isspace():
        tail = f" {tail}"  # the command line started with "--"
    return " ".join(part for part in [head.strip(), *extra] if part) + tail


def kernel_cmdline_for_acpi_linux(cmdline: str, devices: Sequence[PlacedDevice]) -> str:
    """``cmdline`` without the virtio-mmio arguments :func:`kernel_cmdline` adds, for a Linux
    kernel that reads the DSDT: it finds the devices there (with the right interrupts), and
    would register each a second time from the command line, whose probe then fails ("can't
    request region", error -16). Unless ``acpi=off`` is given: then the command line is all
    it has."""
    head, tail = _split_init_args(cmdline)
    words = head.split()
    if "acpi=off" in words:
        return kernel_cmdline(cmdline, devices)
    ours = set(virtio_mmio_args(devices))
    if not ours.intersection(words):
        return cmdline
    return " ".join(word for word in words if word not in ours) + tail
