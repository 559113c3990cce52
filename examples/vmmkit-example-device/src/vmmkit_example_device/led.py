"""The LED panel device and its device type."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from vmmkit.device import Device, DeviceContext, DeviceRequest, DeviceType
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger

log = get_logger()

DEFAULT_PORT = 0x510


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


class LedPanelType(DeviceType):
    name: ClassVar[str] = "example-led"
    description: ClassVar[str] = "example third-party device: an LED panel on one I/O port"
    option: ClassVar[str | None] = "example-led"
    option_help: ClassVar[str] = f"port=<I/O port> (default {DEFAULT_PORT:#x}),label=<name>"

    @classmethod
    def requests(cls, config: Any) -> Sequence[DeviceRequest]:
        out = []
        for request in super().requests(config):
            options = dict(request.config.options)
            port = _parse_port(options.get("port", str(DEFAULT_PORT)))
            out.append(DeviceRequest(cls.name, request.id, request.config, pio=(port, 1)))
        return out

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> LedPanel:
        options = dict(request.config.options)
        unknown = set(options) - {"port", "label"}
        if unknown:
            raise DeviceError(f"--example-led: unknown option(s) {', '.join(sorted(unknown))} (accepted: port, label)")
        return LedPanel(request.id, options.get("label", request.id))


def _parse_port(text: str) -> int:
    try:
        port = int(text, 0)
    except ValueError:
        raise DeviceError(f"--example-led: invalid port {text!r} (expected a number such as 0x510)") from None
    if not 0 <= port <= 0xFFFF:
        raise DeviceError(f"--example-led: port {text} is outside 0-0xffff")
    return port
