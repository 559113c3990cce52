"""The plugin module named by the ``vmmkit`` entry point."""

from __future__ import annotations

from typing import Any

from vmmkit import hookimpl
from vmmkit_example_device.led import LedPanelType


@hookimpl
def vmmkit_register_devices(registry: Any) -> None:
    registry.add(LedPanelType)
