"""ACPI memory hotplug on x86-64: the hotplug RAM's place in the layout (Cloud Hypervisor's
``MemoryManager::start_addr``), and the MHPC AML (CH's shape) in the DSDT: iasl disassembles and
recompiles it, and acpiexec runs the GED's _EVT with the memory bit's path, MSCN, MSTA, MCRS and a
slot's _EJ0 without an error. The registers' behaviour is tests/unit/test_memory_hotplug.py;
Linux running all of it is tests/linux/test_linux_memory_hotplug.py."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
from vmmkit_x86_64 import platform as P
from vmmkit_x86_64.acpi import build_acpi
from vmmkit_x86_64.acpi.dsdt import dsdt_aml
from vmmkit_x86_64.e820 import e820_map
from vmmkit_x86_64.layout import MEMORY_HOTPLUG_REGISTERS, PCI_HOTPLUG, fixed_regions, layout_for, memory_layout
from x86_helpers import make_config, pc_devices, placed, run

from vmmkit.acpi import aml
from vmmkit.acpi.memory_hotplug import MemoryHotplugController
from vmmkit.errors import VmmError
from vmmkit.memory import MemoryRange

MiB = 1 << 20
GiB = 1 << 30
GED = placed("acpi-ged", mmio=(P.ACPI_GED_ADDRESS, P.ACPI_GED_SIZE), irq=P.ACPI_GED_IRQ)


# -- the layout ----------------------------------------------------------------------------------


def test_hotplug_ram_starts_at_4_gib_when_the_ram_fits_below_the_hole() -> None:
    layout = memory_layout(512 * MiB, hotplug_size=GiB)
    assert layout.memory_hotplug == MemoryRange(4 * GiB, GiB)
    assert layout.memory_hotplug_registers == MEMORY_HOTPLUG_REGISTERS
    assert layout.pci_mmio64 is not None and layout.pci_mmio64.start == 5 * GiB  # after it, 1 GiB aligned
    regions = fixed_regions(layout)
    for name, other in regions.items():
        if name != "memory_hotplug":
            assert not other.overlaps(layout.memory_hotplug), name
    registers = MEMORY_HOTPLUG_REGISTERS
    assert layout.device_mmio.contains(registers.start, registers.size)
    assert not registers.overlaps(PCI_HOTPLUG) and registers.end <= P.ACPI_GED_ADDRESS
    # the e820 map does not have it (Linux learns of it from ACPI), as in CH
    assert all(entry.end <= 4 * GiB for entry in e820_map(layout))


def test_hotplug_ram_follows_ram_above_4_gib_on_a_128_mib_boundary() -> None:
    layout = memory_layout(3 * GiB + 100 * MiB, hotplug_size=256 * MiB)
    assert layout.ram[-1] == MemoryRange(4 * GiB, 100 * MiB)
    assert layout.memory_hotplug == MemoryRange(4 * GiB + 128 * MiB, 256 * MiB)
    assert layout.pci_mmio64 is not None and layout.pci_mmio64.start == 5 * GiB


def test_no_hotplug_size_no_hotplug_ram_and_an_address_space_too_small_is_refused() -> None:
    layout = memory_layout(512 * MiB)
    assert layout.memory_hotplug is None and layout.memory_hotplug_registers is None
    config = make_config(memory="256M")
    config = attrs.evolve(config, memory=attrs.evolve(config.memory, hotplug_size=GiB))
    assert layout_for(config).memory_hotplug == MemoryRange(4 * GiB, GiB)
    with pytest.raises(VmmError, match="36-bit"):
        memory_layout(512 * MiB, max_phys_bits=36, hotplug_size=64 * GiB)


# -- the DSDT ------------------------------------------------------------------------------------


def dump(tmp_path: Path) -> dict[str, Path]:
    controller = MemoryHotplugController("_memory_hotplug")
    controller.plug(0, 4 * GiB, 128 * MiB)
    registers = MEMORY_HOTPLUG_REGISTERS
    devices = [*pc_devices(), GED,
               placed("memory-hotplug", mmio=(registers.start, registers.size), device=controller)]
    acpi = build_acpi(memory_layout(128 * MiB, hotplug_size=512 * MiB), devices, apic_ids=[0], boot_vcpus=1)
    files = {}
    for table in acpi.tables:
        files[table.signature] = tmp_path / f"{table.signature.lower()}.dat"
        files[table.signature].write_bytes(table.data)
    return files


def test_iasl_sees_the_controller_its_fields_methods_and_slots(iasl: str, tmp_path: Path) -> None:
    dsdt = dump(tmp_path)["DSDT"]
    assert run([iasl, "-d", dsdt.name], cwd=tmp_path).returncode == 0
    text = dsdt.with_suffix(".dsl").read_text()
    assert re.search(r'Device \(MHPC\)\s*\{\s*Name \(_HID, EisaId \("PNP0A06"\)', text), text
    assert f"OperationRegion (MHPR, SystemMemory, 0x{MEMORY_HOTPLUG_REGISTERS.start:08X}, 0x18)" in text
    assert re.search(r"Field \(MHPR, DWordAcc, NoLock, Preserve\)\s*\{\s*MHBL,\s*32,\s*MHBH,\s*32,"
                     r"\s*MHLL,\s*32,\s*MHLH,\s*32", text), text
    assert re.search(r"Offset \(0x10\),\s*MHPX,\s*32", text), text
    assert re.search(r"Field \(MHPR, ByteAcc, NoLock, WriteAsZeros\)\s*\{\s*Offset \(0x14\),\s*MEN,\s*1,"
                     r"\s*MINS,\s*1,\s*MRMV,\s*1,\s*MEJ0,\s*1", text), text
    assert re.search(r"MSEL,\s*32,\s*MOEV,\s*32,\s*MOSC,\s*32", text), text
    for method in ("MTFY, 2", "MSCN, 0", "MSTA, 1", "MCRS, 1"):
        assert f"Method ({method}, Serialized)" in text, method
    assert re.search(r"While \(\(Local0 < 0x08\)\)", text), text
    assert "Notify (M007, Arg1)" in text and "Device (M008)" not in text
    assert re.search(r'Device \(M003\)\s*\{\s*Name \(_HID, EisaId \("PNP0C80"\)', text), text
    assert "Return (MSTA (0x03))" in text and "Return (MCRS (0x03))" in text
    assert re.search(r"Method \(_EJ0, 1, Serialized\)[^}]*MSEL = 0x03\s*MEJ0 = One", text), text
    assert "\\_SB.MHPC.MSCN ()" in text  # the GED's ESCN
    result = run([iasl, "-p", "recompiled", dsdt.with_suffix(".dsl").name], cwd=tmp_path)
    assert "0 Errors, 0 Warnings" in result.stdout, result.stdout


def test_acpiexec_runs_the_memory_hotplug_methods(acpiexec: str, tmp_path: Path) -> None:
    files = dump(tmp_path)
    commands = "; ".join([
        "evaluate \\_SB.GED._EVT 23",
        "evaluate \\_SB.MHPC.MSCN",
        "evaluate \\_SB.MHPC.M002._STA",
        "evaluate \\_SB.MHPC.M002._CRS",
        "evaluate \\_SB.MHPC.MTFY 5 3",
        "evaluate \\_SB.MHPC.M005._EJ0 1",
    ])
    result = run([acpiexec, "-b", commands] + [files[s].name for s in ("FACP", "DSDT", "APIC")], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ACPI Error" not in output and "AE_" not in output.replace("AE_OK", ""), output
    # acpiexec's SystemMemory is its own zeroed buffer: MCRS builds a QWordMemory of it
    assert "Evaluation of \\_SB.MHPC.M002._CRS returned object" in output, output
    notified = re.findall(r"Notify \[(M0\d\d)\].*?(0x0\d)", output) or \
        re.findall(r"\[(M0\d\d)\][^\n]*Value (0x0\d)", output)
    assert notified == [("M005", "0x03")], output


def test_the_ged_calls_mscn_only_where_the_layout_has_hotplug_ram() -> None:
    layout = memory_layout(128 * MiB, hotplug_size=512 * MiB)
    assert b"MSCN" in dsdt_aml([GED], layout)
    assert b"MSCN" not in dsdt_aml([GED], memory_layout(128 * MiB))
    assert b"MSCN" not in dsdt_aml([GED], attrs.evolve(layout, memory_hotplug_registers=None))


def test_the_new_aml_terms_encode_as_the_spec_says() -> None:
    assert aml.Add(aml.Local(0), 1, aml.Local(0)).to_aml() == b"\x72\x60\x01\x60"
    assert aml.Subtract(aml.Local(2), 1, aml.Path("MAXQ")).to_aml() == b"\x74\x62\x01MAXQ"
    assert aml.Or(aml.Local(0), aml.Path("MHBL"), aml.Path("MINQ")).to_aml() == b"\x7d\x60MHBLMINQ"
    assert aml.LLess(aml.Local(0), 8).to_aml() == b"\x95\x60\x0a\x08"
    assert aml.While(aml.LLess(aml.Local(0), 8), [aml.Store(1, aml.Local(1))]).to_aml() == \
        b"\xa2\x08\x95\x60\x0a\x08\x70\x01\x61"  # PkgLength counts itself
    assert aml.CreateQWordField(aml.Path("MR64"), 14, "MINQ").to_aml() == b"\x8fMR64\x0a\x0eMINQ"
    assert aml.Field("MHPR", [("", 160), ("MEN_", 1)]).to_aml().endswith(b"\x00\x40\x0aMEN_\x01")
