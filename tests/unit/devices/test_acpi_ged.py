"""The ACPI GED notification register: power-button bit, read-to-clear, edge interrupt."""

from __future__ import annotations

import threading

from devices_support import RecordingLine
from vmmkit_devices.acpi.ged import POWER_BUTTON_CHANGED, AcpiGed


def test_the_power_button_sets_its_bit_and_raises_an_edge() -> None:
    line = RecordingLine()
    ged = AcpiGed("_acpi_ged", line)
    assert ged.read(0, 1) == b"\x00"
    ged.press_power_button()
    assert line.triggers == 1
    assert ged.read(0, 1) == bytes([POWER_BUTTON_CHANGED])
    assert ged.read(0, 1) == b"\x00"  # reading clears
    assert ged.counters()["power_button_presses"] == 1


def test_writes_and_stray_accesses_are_harmless() -> None:
    ged = AcpiGed("_acpi_ged", None)
    ged.press_power_button()  # no interrupt line: polled only
    ged.write(0, b"\xff")
    assert ged.read(4, 1) == b"\xff"  # outside the register
    assert ged.read(0, 4) == bytes([POWER_BUTTON_CHANGED]) + b"\xff" * 3
    ged.reset()
    assert ged.read(0, 1) == b"\x00"


def test_notifications_from_many_threads_are_not_lost() -> None:
    ged = AcpiGed("_acpi_ged", RecordingLine())
    threads = [threading.Thread(target=ged.notify, args=(1 << (i % 4),)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ged.read(0, 1) == b"\x0f" and ged.notifications == 40
