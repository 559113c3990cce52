"""The GED and power button in the DSDT (Cloud Hypervisor's AcpiGedDevice shape): iasl
recompiles it, acpiexec runs _EVT, and the test guest's scan finds the notification byte."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vmmkit_x86_64 import platform as P
from vmmkit_x86_64.acpi import build_acpi
from vmmkit_x86_64.layout import memory_layout
from x86_helpers import pc_devices, placed, run

from vmmkit.acpi.aml import Field, OpRegion

GED = placed("acpi-ged", mmio=(P.ACPI_GED_ADDRESS, P.ACPI_GED_SIZE), irq=P.ACPI_GED_IRQ)


def dump(tmp_path: Path) -> dict[str, Path]:
    acpi = build_acpi(memory_layout(1 << 30), [*pc_devices(), GED], apic_ids=[0, 1], boot_vcpus=2)
    files = {}
    for table in acpi.tables:
        files[table.signature] = tmp_path / f"{table.signature.lower()}.dat"
        files[table.signature].write_bytes(table.data)
    return files


def test_field_and_region_encodings() -> None:
    assert OpRegion("GDST", 0, 0xC7FFF000, 1).to_aml() == b"\x5b\x80GDST\x00\x0c\x00\xf0\xff\xc7\x01"
    assert Field("GDST", [("GDAT", 8)]).to_aml() == b"\x5b\x81\x0bGDST\x41GDAT\x08"
    assert Field("GDST", [("WIDE", 0x123)]).to_aml().endswith(b"WIDE\x43\x12")
    with pytest.raises(ValueError):
        Field("GDST", [("TOOLONG", 8)]).to_aml()


def test_iasl_sees_the_ged_the_controller_and_the_power_button(iasl: str, tmp_path: Path) -> None:
    dsdt = dump(tmp_path)["DSDT"]
    assert run([iasl, "-d", dsdt.name], cwd=tmp_path).returncode == 0
    text = dsdt.with_suffix(".dsl").read_text()
    assert re.search(r'Device \(GED\)\s*\{\s*Name \(_HID, "ACPI0013"', text)
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )" in text
    assert "0x00000017," in text  # IRQ 23
    assert "OperationRegion (GDST, SystemMemory, 0xC7FFF000, One)" in text
    assert "Notify (\\_SB.PWRB, 0x80)" in text
    assert 'Name (_HID, EisaId ("PNP0C0C")' in text
    result = run([iasl, "-p", "recompiled", dsdt.with_suffix(".dsl").name], cwd=tmp_path)
    assert "0 Errors, 0 Warnings" in result.stdout, result.stdout


def test_acpiexec_runs_evt(acpiexec: str, tmp_path: Path) -> None:
    files = dump(tmp_path)
    result = run([acpiexec, "-b", "evaluate \\_SB.GED._EVT 23; evaluate \\_SB.GEC.ESCN"]
                 + [files[s].name for s in ("FACP", "DSDT", "APIC")], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "No object was returned from evaluation of \\_SB.GED._EVT" in output
    assert "ACPI Error" not in output and "AE_" not in output.replace("AE_OK", ""), output


def test_the_guest_scan_pattern_is_in_the_dsdt(tmp_path: Path) -> None:
    """tests/guests/x86_64/ged.c looks for ExtOp OpRegion "GDST" <space> <integer>."""
    data = dump(tmp_path)["DSDT"].read_bytes()
    at = data.index(b"\x5b\x80GDST")
    assert data[at + 6] == 0 and data[at + 7] == 0x0C
    assert int.from_bytes(data[at + 8 : at + 12], "little") == P.ACPI_GED_ADDRESS
