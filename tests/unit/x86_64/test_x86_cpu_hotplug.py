"""The ACPI vCPU hotplug AML (Cloud Hypervisor's shape) in the DSDT: iasl disassembles and
recompiles it, and acpiexec runs the GED's _EVT with the CPU bit's path, CSCN, CSTA, CTFY, CEJ0
and each processor's _STA / _EJ0 without an error. The registers' behaviour is
tests/unit/test_cpu_hotplug.py; Linux running all of it is tests/linux/test_linux_cpu_hotplug.py."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
from vmmkit_x86_64 import platform as P
from vmmkit_x86_64.acpi import build_acpi
from vmmkit_x86_64.acpi.dsdt import dsdt_aml
from vmmkit_x86_64.acpi.tables import LAPIC_ENABLED, processor_entry
from vmmkit_x86_64.arch import X86_64
from vmmkit_x86_64.layout import CPU_HOTPLUG, memory_layout
from x86_helpers import make_config, pc_devices, placed, run

from vmmkit.cpu_hotplug import CpuHotplugController

GED = placed("acpi-ged", mmio=(P.ACPI_GED_ADDRESS, P.ACPI_GED_SIZE), irq=P.ACPI_GED_IRQ)
#: APIC IDs of 1 package x 2 cores x 2 threads... and one x2APIC ID, to see both _MAT kinds.
APIC_IDS = [0, 1, 2, 0x100]


def dump(tmp_path: Path) -> dict[str, Path]:
    entries = [processor_entry(uid, apic_id) for uid, apic_id in enumerate(APIC_IDS)]
    controller = CpuHotplugController("_cpu_hotplug", present=2, processor_entries=entries, on_eject=lambda n: True)
    devices = [*pc_devices(), GED,
               placed("cpu-hotplug", mmio=(CPU_HOTPLUG.start, CPU_HOTPLUG.size), device=controller)]
    acpi = build_acpi(memory_layout(1 << 30), devices, apic_ids=APIC_IDS, boot_vcpus=2)
    files = {}
    for table in acpi.tables:
        files[table.signature] = tmp_path / f"{table.signature.lower()}.dat"
        files[table.signature].write_bytes(table.data)
    return files


def test_iasl_sees_the_controller_the_processors_and_the_ged_branch(iasl: str, tmp_path: Path) -> None:
    dsdt = dump(tmp_path)["DSDT"]
    assert run([iasl, "-d", dsdt.name], cwd=tmp_path).returncode == 0
    text = dsdt.with_suffix(".dsl").read_text()
    assert re.search(r'Device \(PRES\)\s*\{\s*Name \(_HID, EisaId \("PNP0A06"\)', text), text
    assert f"OperationRegion (PRST, SystemMemory, 0x{CPU_HOTPLUG.start:08X}, 0x0C)" in text
    assert re.search(r"Field \(PRST, ByteAcc, NoLock, WriteAsZeros\)\s*\{\s*Offset \(0x04\),\s*CPEN,\s*1,"
                     r"\s*CINS,\s*1,\s*CRMV,\s*1,\s*CEJ0,\s*1,\s*Offset \(0x05\),\s*CCMD,\s*8", text), text
    assert re.search(r"Field \(PRST, DWordAcc, NoLock, Preserve\)\s*\{\s*CSEL,\s*32,\s*Offset \(0x08\),"
                     r"\s*CDAT,\s*32", text), text
    assert re.search(r'Device \(CPUS\)\s*\{\s*Name \(_HID, "ACPI0010"', text), text
    for index in range(4):
        assert re.search(rf'Device \(C00{index}\)\s*\{{\s*Name \(_HID, "ACPI0007"', text), text
        assert f"Return (CSTA ({'Zero' if index == 0 else 'One' if index == 1 else f'0x{index:02X}'}))" in text
    assert "Notify (C003, Arg1)" in text
    assert "While ((Local0 < 0x04))" in text or "While (LLess (Local0, 0x04))" in text, text
    assert "CTFY (Local0, 0x03)" in text and "CTFY (Local0, One)" in text
    assert "\\_SB.CPUS.CSCN ()" in text  # the GED's ESCN
    result = run([iasl, "-p", "recompiled", dsdt.with_suffix(".dsl").name], cwd=tmp_path)
    assert "0 Errors, 0 Warnings" in result.stdout, result.stdout


def test_acpiexec_runs_the_hotplug_methods(acpiexec: str, tmp_path: Path) -> None:
    files = dump(tmp_path)
    commands = "; ".join([
        "evaluate \\_SB.GED._EVT 23",
        "evaluate \\_SB.CPUS.CSCN",
        "evaluate \\_SB.CPUS.CSTA 2",
        "evaluate \\_SB.CPUS.C003._STA",
        "evaluate \\_SB.CPUS.C003._MAT",
        "evaluate \\_SB.CPUS.CTFY 3 1",
        "evaluate \\_SB.CPUS.C002._EJ0 1",
    ])
    result = run([acpiexec, "-b", commands] + [files[s].name for s in ("FACP", "DSDT", "APIC")], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ACPI Error" not in output and "AE_" not in output.replace("AE_OK", ""), output
    notified = re.findall(r"Notify \[(C00\d)\].*?(0x0\d)", output) or \
        re.findall(r"\[(C00\d)\][^\n]*Value (0x0\d)", output)
    assert notified == [("C003", "0x01")], output


def test_each_mat_is_the_processors_madt_entry_enabled() -> None:
    assert processor_entry(1, 2) == bytes([0, 8, 1, 2, LAPIC_ENABLED, 0, 0, 0])
    x2apic = processor_entry(3, 0x100)
    assert x2apic[:2] == bytes([9, 16]) and int.from_bytes(x2apic[4:8], "little") == 0x100
    assert int.from_bytes(x2apic[12:16], "little") == 3
    config = make_config(boot_vcpus=2, max_vcpus=4, topology=None)
    assert X86_64().processor_entry(config, 3) == processor_entry(3, X86_64.apic_id(config, 3))


def test_the_ged_calls_cscn_only_where_the_layout_has_the_registers() -> None:
    layout = memory_layout(1 << 30)
    assert layout.cpu_hotplug == CPU_HOTPLUG
    assert b"CSCN" in dsdt_aml([GED], layout)
    assert b"CSCN" not in dsdt_aml([GED], attrs.evolve(layout, cpu_hotplug=None))
