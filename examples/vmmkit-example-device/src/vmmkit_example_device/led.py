"""The LED panel device and its device type."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.device import Device, DeviceContext, DeviceRequest, DeviceType, PlacedDevice
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger

if TYPE_CHECKING:
    from vmmkit.firmware import AcpiScope, FdtWriter

log = get_logger()

DEFAULT_PORT = 0x510
#: The panel's ACPI hardware ID (a made-up vendor prefix: a real product registers its own).
ACPI_HID = "VMKE0001"
#: Its device-tree ``compatible``.
FDT_COMPATIBLE = "vmmkit,example-led"


class LedPanel(Device):
    """Eight LEDs: a guest write sets them, a read returns them."""

    kind: ClassVar[str] = "example-led"

    def __init__(self, device_id: str, label: str) -> None:
        super().__init__(device_id)
        self.label = label
        self.state = 0
        self.changes = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.state if offset == 0 else 0xFF]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or not data:
            return
        if data[0] != self.state:
            self.state = data[0]
            self.changes += 1
            log.info("led.changed", panel=self.label, leds=f"{self.state:08b}")

    def reset(self) -> None:
        self.state = 0

    def counters(self) -> Mapping[str, int]:
        return {"changes": self.changes, "state": self.state}

    # The panel describes itself, so the guest's OS can find it and bind a driver: an ACPI
    # device on x86-64, a device-tree node on AArch64. vmmkit writes the tables.

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        from vmmkit.acpi import aml

        index = scope.next_index(self.kind)
        resources = aml.io_ports(placed.pio)
        if placed.mmio is not None:
            resources.append(aml.Memory32Fixed(*placed.mmio))
        scope.add(aml.simple_device(f"LED{index:X}", ACPI_HID, index, resources,
                                    aml.Name("_STR", aml.Buffer(_unicode(self.label)))))

    def describe_fdt(self, placed: PlacedDevice, fdt: FdtWriter) -> None:
        if placed.mmio is None:
            return  # a port-I/O panel: device trees have no port I/O
        base, size = placed.mmio
        fdt.begin_node(f"led@{base:x}")
        fdt.property_strings("compatible", FDT_COMPATIBLE)
        fdt.property_reg(base, size)
        fdt.property_string("label", self.label)
        fdt.end_node()


class LedPanelType(DeviceType):
    name: ClassVar[str] = "example-led"
    description: ClassVar[str] = "example third-party device: an LED panel on one I/O port"
    option: ClassVar[str | None] = "example-led"
    option_help: ClassVar[str] = (f"port=<I/O port> (default {DEFAULT_PORT:#x}) or mmio=<address> "
                                  "(architectures without port I/O),label=<name>")

    @classmethod
    def requests(cls, config: Any) -> Sequence[DeviceRequest]:
        out = []
        for request in super().requests(config):
            options = dict(request.config.options)
            unknown = set(options) - {"port", "mmio", "label"}
            if unknown:
                raise DeviceError(f"--example-led: unknown option(s) {', '.join(sorted(unknown))} "
                                  "(accepted: port, mmio, label)")
            if "mmio" in options:
                if "port" in options:
                    raise DeviceError("--example-led: give port= or mmio=, not both")
                address = _parse_address(options["mmio"])
                out.append(DeviceRequest(cls.name, request.id, request.config, mmio=(address, MMIO_SIZE)))
            else:
                port = _parse_port(options.get("port", str(DEFAULT_PORT)))
                out.append(DeviceRequest(cls.name, request.id, request.config, pio=(port, 1)))
        return out

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> LedPanel:
        options = dict(request.config.options)
        return LedPanel(request.id, options.get("label", request.id))


#: Bytes of MMIO a panel placed with ``mmio=`` takes (one page; the register is at offset 0).
MMIO_SIZE = 0x1000


def _unicode(text: str) -> bytes:
    """An ACPI ``_STR``: a NUL-terminated UTF-16LE buffer."""
    return (text + "\0").encode("utf-16-le")


def _parse_address(text: str) -> int:
    try:
        address = int(text, 0)
    except ValueError:
        raise DeviceError(f"--example-led: invalid mmio address {text!r} (expected a number)") from None
    if address < 0 or address % MMIO_SIZE:
        raise DeviceError(f"--example-led: mmio address {text} must be a multiple of {MMIO_SIZE:#x}")
    return address


def _parse_port(text: str) -> int:
    try:
        port = int(text, 0)
    except ValueError:
        raise DeviceError(f"--example-led: invalid port {text!r} (expected a number such as 0x510)") from None
    if not 0 <= port <= 0xFFFF:
        raise DeviceError(f"--example-led: port {text} is outside 0-0xffff")
    return port
