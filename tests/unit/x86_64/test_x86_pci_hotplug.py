"""The ACPI PCI hotplug AML (Cloud Hypervisor's shape) in the DSDT: iasl disassembles and
recompiles it, and acpiexec runs the GED's _EVT with the PCI bit's path, PCNT, DVNT's notifies,
PCEJ and a slot's _EJ0 without an error. The registers' behaviour is tests/unit/test_pci_hotplug.py;
Linux running all of it is tests/linux/test_linux_hotplug.py."""

from __future__ import annotations

import re
from pathlib import Path

from vmmkit_x86_64 import platform as P
from vmmkit_x86_64.acpi import build_acpi
from vmmkit_x86_64.layout import PCI_HOTPLUG, memory_layout
from x86_helpers import pc_devices, placed, run

from vmmkit.bus import Bus
from vmmkit.memory import MemoryRange
from vmmkit.pci.host import PciRoot
from vmmkit.pci.hotplug import PciHotplugController

GED = placed("acpi-ged", mmio=(P.ACPI_GED_ADDRESS, P.ACPI_GED_SIZE), irq=P.ACPI_GED_IRQ)


def hotplug_root() -> PciRoot:
    root = PciRoot(mmio_bus=Bus("mmio"), pio_bus=Bus("pio"), ecam=MemoryRange(0xE800_0000, 256 << 20),
                   mmio32=MemoryRange(0xC800_0000, 512 << 20), io=MemoryRange(0x1000, 0xF000))
    root.hotplug = True
    lines = iter([(5, None), (6, None), (7, None), (10, None)])
    root.reserve_intx_lines(lambda _irq: next(lines))  # type: ignore[arg-type,return-value]
    return root


def dump(tmp_path: Path) -> dict[str, Path]:
    controller = PciHotplugController("_pci_hotplug", segments=lambda: [0], on_eject=lambda seg, slot: None)
    devices = [
        *[d for d in pc_devices() if d.kind != "pci-host"],
        GED,
        placed("pci-host", pio=(0xCF8, 8), mmio=(0xE800_0000, 256 << 20), device=hotplug_root()),
        placed("pci-hotplug", mmio=(PCI_HOTPLUG.start, PCI_HOTPLUG.size), device=controller),
    ]
    acpi = build_acpi(memory_layout(1 << 30), devices, apic_ids=[0], boot_vcpus=1)
    files = {}
    for table in acpi.tables:
        files[table.signature] = tmp_path / f"{table.signature.lower()}.dat"
        files[table.signature].write_bytes(table.data)
    return files


def test_iasl_sees_the_controller_the_slots_and_the_ged_branch(iasl: str, tmp_path: Path) -> None:
    dsdt = dump(tmp_path)["DSDT"]
    assert run([iasl, "-d", dsdt.name], cwd=tmp_path).returncode == 0
    text = dsdt.with_suffix(".dsl").read_text()
    assert re.search(r'Device \(PHPR\)\s*\{\s*Name \(_HID, EisaId \("PNP0A06"\)', text), text
    assert f"OperationRegion (PCST, SystemMemory, 0x{PCI_HOTPLUG.start:08X}, 0x10)" in text
    assert re.search(r"Field \(PCST, DWordAcc, NoLock, WriteAsZeros\)\s*\{\s*PCIU,\s*32,\s*PCID,\s*32,"
                     r"\s*B0EJ,\s*32,\s*PSEG,\s*32", text), text
    assert "Mutex (BLCK, 0x00)" in text
    assert re.search(r"B0EJ = \(One << Arg0\)|ShiftLeft \(One, Arg0, B0EJ\)", text), text
    assert re.search(r"Device \(S005\)\s*\{\s*Name \(_SUN, 0x05\)[^\n]*\s*Name \(_ADR, 0x00050000\)", text), text
    assert "\\_SB.PHPR.PCEJ (_SUN, _SEG)" in text
    assert "Notify (S031, Arg1)" in text and "Device (S000)" not in text
    assert "DVNT (\\_SB.PHPR.PCIU, One)" in text and "DVNT (\\_SB.PHPR.PCID, 0x03)" in text
    assert "\\_SB.PCI0.PCNT ()" in text  # PSCN
    assert "\\_SB.PHPR.PSCN ()" in text  # the GED's ESCN
    # every slot is routed, empty or not: slot 31 on line (31 - 1) % 4, the third (IRQ 7)
    assert re.search(r"0x001FFFFF,\s*Zero,\s*Zero,\s*0x07\s*\}", text), text
    result = run([iasl, "-p", "recompiled", dsdt.with_suffix(".dsl").name], cwd=tmp_path)
    assert "0 Errors, 0 Warnings" in result.stdout, result.stdout


def test_acpiexec_runs_the_hotplug_methods(acpiexec: str, tmp_path: Path) -> None:
    files = dump(tmp_path)
    commands = "; ".join([
        "evaluate \\_SB.GED._EVT 23",
        "evaluate \\_SB.PHPR.PSCN",
        "evaluate \\_SB.PCI0.PCNT",
        "evaluate \\_SB.PCI0.DVNT 0x80000020 3",
        "evaluate \\_SB.PCI0.S005._EJ0 1",
        "evaluate \\_SB.PHPR.PCEJ 7 0",
    ])
    result = run([acpiexec, "-b", commands] + [files[s].name for s in ("FACP", "DSDT", "APIC")], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ACPI Error" not in output and "AE_" not in output.replace("AE_OK", ""), output
    # DVNT notified exactly the slots whose bits were set, with the value given (3: eject request)
    notified = re.findall(r"Notify \[(S0\d\d)\].*?(0x0\d)", output)
    if not notified:  # acpiexec's wording differs between versions
        notified = re.findall(r"\[(S0\d\d)\][^\n]*Value (0x0\d)", output)
    assert sorted(notified) == [("S005", "0x03"), ("S031", "0x03")], output


def test_the_ged_calls_pscn_only_where_the_layout_has_the_registers() -> None:
    import attrs
    from vmmkit_x86_64.acpi.dsdt import dsdt_aml

    layout = memory_layout(1 << 30)
    assert b"PSCN" in dsdt_aml([GED], layout)
    assert b"PSCN" not in dsdt_aml([GED], attrs.evolve(layout, pci_hotplug=None))


def test_the_new_aml_terms_encode_as_the_spec_says() -> None:
    from vmmkit.acpi import aml

    assert aml.Arg(1).to_aml() == b"\x69"
    assert aml.Call("DVNT", [aml.Arg(0), 3]).to_aml() == b"DVNT\x68\x0a\x03"
    assert aml.ShiftLeft(1, aml.Arg(0), aml.Path("B0EJ")).to_aml() == b"\x79\x01\x68B0EJ"
    assert aml.Mutex("BLCK", 0).to_aml() == b"\x5b\x01BLCK\x00"
    assert aml.Acquire("BLCK").to_aml() == b"\x5b\x23BLCK\xff\xff"
    assert aml.Release("BLCK").to_aml() == b"\x5b\x27BLCK"
