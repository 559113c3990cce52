"""A UART on the VM's serial console: what the 16550's and the PL011's ``create()`` share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from vmmkit_devices.console.backends import console_mode, open_backend

if TYPE_CHECKING:
    from vmmkit.device import DeviceContext, DeviceRequest
    from vmmkit.eventloop import EventLoop


class Uart(Protocol):
    def attach_input(self, loop: EventLoop) -> None: ...


_U = TypeVar("_U", bound=Uart)


def create_uart(ctx: DeviceContext, request: DeviceRequest, uart: Callable[..., _U]) -> _U | None:
    """``uart(request.id, backend, line, irq=irq)`` with the console backend ``request.config``
    (else ``ctx.config.serial``) asks for and an interrupt line, its input read on
    ``ctx.event_loop``; ``None`` when the console mode is ``Off``. The backend is closed if the
    UART cannot be built."""
    config = request.config if request.config is not None else getattr(ctx.config, "serial", None)
    mode = console_mode(config)
    if mode == "Off":
        return None
    backend = open_backend(mode, name="serial", file=getattr(config, "file", None),
                           socket_path=getattr(config, "socket", None))
    try:
        irq, line = ctx.interrupt_line(request.irq)
        device = uart(request.id, backend, line, irq=irq)
        device.attach_input(ctx.event_loop)
    except BaseException:
        backend.close()
        raise
    return device
