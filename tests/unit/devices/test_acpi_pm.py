"""ACPI hardware-reduced sleep and reset registers."""

from __future__ import annotations

from devices_support import FakeContext
from vmmkit_devices.acpi.pm import AcpiPm, AcpiPmType

from vmmkit.device import DeviceRequest

SLEEP_CONTROL, SLEEP_STATUS, RESET = 0, 1, 4
SLP_EN, WAK_STS = 0x20, 0x80


def pm(ctx: FakeContext) -> AcpiPm:
    device = AcpiPmType.create(ctx, DeviceRequest("acpi-pm", "_acpi_pm", pio=(0x600, 8)))
    assert device.kind == "acpi-pm"
    return device


def test_s5_powers_off(ctx: FakeContext) -> None:
    dev = pm(ctx)
    dev.write(SLEEP_STATUS, bytes((WAK_STS,)))  # Linux clears WAK_STS first
    dev.write(SLEEP_CONTROL, bytes((5 << 2,)))  # SLP_TYP without SLP_EN: nothing yet
    assert ctx.shutdowns == []
    dev.write(SLEEP_CONTROL, bytes((5 << 2 | SLP_EN,)))
    assert ctx.shutdowns == ["guest-poweroff"]
    assert ctx.resets == []
    assert dev.counters()["poweroffs"] == 1


def test_other_sleep_states_wake_at_once(ctx: FakeContext) -> None:
    dev = pm(ctx)
    assert dev.read(SLEEP_STATUS, 1) == b"\x00"
    dev.write(SLEEP_CONTROL, bytes((3 << 2 | SLP_EN,)))  # S3
    assert ctx.shutdowns == []
    assert dev.read(SLEEP_STATUS, 1)[0] & WAK_STS
    dev.write(SLEEP_STATUS, b"\x00")  # writing 0 leaves it
    assert dev.read(SLEEP_STATUS, 1)[0] & WAK_STS
    dev.write(SLEEP_STATUS, bytes((WAK_STS,)))  # write 1 to clear
    assert dev.read(SLEEP_STATUS, 1) == b"\x00"
    assert dev.read(SLEEP_CONTROL, 1)[0] == 3 << 2  # SLP_EN reads as 0


def test_reset_register(ctx: FakeContext) -> None:
    dev = pm(ctx)
    dev.write(RESET, b"\x02")
    assert ctx.resets == []
    dev.write(RESET, b"\x01")
    assert ctx.resets == ["acpi-reset"]
    assert dev.read(RESET, 1) == b"\x00"


def test_wide_write_reaches_each_register(ctx: FakeContext) -> None:
    dev = pm(ctx)
    dev.write(0, bytes((0, 0, 0, 0, 1, 0, 0, 0)))  # a qword write covering RESET_REG
    assert ctx.resets == ["acpi-reset"]
    dev.reset()
    assert dev.read(0, 8) == bytes(8)
