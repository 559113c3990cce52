"""ACPI tables: layout, checksums, binary content, and the reference tools' view of them
(``iasl -d`` disassembles each table, the DSDT recompiles, ``acpiexec`` evaluates it)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from vmmkit_x86_64 import layout as L
from vmmkit_x86_64.acpi import AcpiTables, build_acpi, tables
from vmmkit_x86_64.layout import memory_layout
from x86_helpers import pc_devices, placed, run

GiB = 1 << 30


@pytest.fixture
def acpi() -> AcpiTables:
    return build_acpi(memory_layout(6 * GiB), pc_devices(), apic_ids=[0, 1, 2, 4, 5, 6], boot_vcpus=2)


def sum8(data: bytes) -> int:
    return sum(data) & 0xFF


def test_every_table_has_a_valid_checksum_and_length(acpi: AcpiTables) -> None:
    for table in acpi.tables:
        if table.signature == "RSDP":
            assert sum8(table.data[:20]) == 0
            assert sum8(table.data) == 0
            continue
        assert table.data[:4] == table.signature.encode()
        assert struct.unpack_from("<I", table.data, 4)[0] == len(table.data)
        assert sum8(table.data) == 0, table.signature
        assert table.data[10:16] == b"VMMKIT"


def test_tables_live_in_the_bios_area_without_overlap(acpi: AcpiTables) -> None:
    assert acpi.rsdp_address == L.RSDP_START == 0xE0000
    spans = sorted((t.address, t.address + len(t.data)) for t in acpi.tables)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start
    assert spans[0][0] >= 0xE0000 and spans[-1][1] <= 0x100000
    for table in acpi.tables:
        assert table.address % 16 == 0


def test_rsdp_points_at_the_xsdt_which_lists_fadt_madt_mcfg(acpi: AcpiTables) -> None:
    rsdp = acpi.get("RSDP").data
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert struct.unpack_from("<I", rsdp, 16)[0] == 0  # no RSDT
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36
    xsdt = acpi.get("XSDT")
    assert struct.unpack_from("<Q", rsdp, 24)[0] == xsdt.address
    entries = struct.unpack_from("<3Q", xsdt.data, 36)
    assert list(entries) == [acpi.get(s).address for s in ("FACP", "APIC", "MCFG")]


def test_fadt_is_hardware_reduced_with_sleep_and_reset_registers(acpi: AcpiTables) -> None:
    fadt = acpi.get("FACP").data
    assert len(fadt) == 276 and fadt[8] == 6
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & tables.FADT_F_HW_REDUCED_ACPI
    assert flags & tables.FADT_F_RESET_REG_SUP
    assert struct.unpack_from("<Q", fadt, 140)[0] == acpi.get("DSDT").address
    assert struct.unpack_from("<I", fadt, 40)[0] == acpi.get("DSDT").address
    # Reset register: SystemIO byte at 0x604, value 1.
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0x604)
    assert fadt[128] == 0x01
    assert struct.unpack_from("<BBBBQ", fadt, 244) == (1, 8, 0, 1, 0x600)  # sleep control
    assert struct.unpack_from("<BBBBQ", fadt, 256) == (1, 8, 0, 1, 0x601)  # sleep status
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & tables.IAPC_8042
    assert not boot_arch & tables.IAPC_CMOS_RTC_NOT_PRESENT
    assert struct.unpack_from("<H", fadt, 46)[0] == 9  # SCI
    # No PM1 / GPE blocks.
    assert fadt[56:88] == bytes(32)


def test_fadt_says_no_8042_and_no_rtc_when_absent() -> None:
    acpi = build_acpi(
        memory_layout(GiB), [placed("serial-16550", pio=(0x3F8, 8), irq=4)], apic_ids=[0], boot_vcpus=1
    )
    boot_arch = struct.unpack_from("<H", acpi.get("FACP").data, 109)[0]
    assert not boot_arch & tables.IAPC_8042
    assert boot_arch & tables.IAPC_CMOS_RTC_NOT_PRESENT


def madt_entries(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 44
    while pos < len(data):
        kind, length = data[pos], data[pos + 1]
        out.append((kind, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def test_madt_lists_every_possible_vcpu_ioapic_and_overrides(acpi: AcpiTables) -> None:
    madt = acpi.get("APIC").data
    assert madt[8] == 5  # revision: online-capable is defined
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)
    entries = madt_entries(madt)
    lapics = [struct.unpack_from("<BBBBI", e) for k, e in entries if k == 0]
    assert [(uid, apic, flags) for _, _, uid, apic, flags in lapics] == [
        (0, 0, 1),
        (1, 1, 1),
        (2, 2, 2),
        (3, 4, 2),
        (4, 5, 2),
        (5, 6, 2),
    ]
    (ioapic,) = [struct.unpack_from("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapic[2] == 7 and ioapic[4:] == (0xFEC00000, 0)
    overrides = [struct.unpack_from("<BBBBIH", e)[2:] for k, e in entries if k == 2]
    assert overrides == [(0, 0, 2, 0), (0, 9, 9, 0x0D)]
    nmis = [struct.unpack_from("<BBBHB", e)[2:] for k, e in entries if k == 4]
    assert nmis == [(0xFF, 0, 1)]


def test_madt_uses_x2apic_entries_for_large_ids() -> None:
    acpi = build_acpi(memory_layout(GiB), [], apic_ids=[0, 1, 300], boot_vcpus=3)
    entries = madt_entries(acpi.get("APIC").data)
    x2 = [struct.unpack_from("<BBHIII", e) for k, e in entries if k == 9]
    assert x2 == [(9, 16, 0, 300, 1, 2)]
    assert [k for k, _ in entries].count(0x0A) == 1  # x2APIC NMI


def test_mcfg_describes_the_ecam_window(acpi: AcpiTables) -> None:
    mcfg = acpi.get("MCFG").data
    assert struct.unpack_from("<QHBB", mcfg, 44) == (L.PCI_ECAM.start, 0, 0, 255)


def test_no_mcfg_without_ecam() -> None:
    import attrs

    layout = attrs.evolve(memory_layout(GiB), pci_ecam=None)
    acpi = build_acpi(layout, [], apic_ids=[0], boot_vcpus=1)
    assert "MCFG" not in [t.signature for t in acpi.tables]
    assert struct.unpack_from("<I", acpi.get("XSDT").data, 4)[0] == 36 + 16


def test_tables_that_do_not_fit_are_an_error() -> None:
    with pytest.raises(ValueError, match="ACPI tables need"):
        build_acpi(memory_layout(GiB), pc_devices(), apic_ids=[0], boot_vcpus=1, start=0xE0000, end=0xE0100)


# -- the reference tools ------------------------------------------------------------------------


def dump(acpi: AcpiTables, directory: Path) -> dict[str, Path]:
    files = {}
    for table in acpi.tables:
        path = directory / f"{table.signature.lower()}.dat"
        path.write_bytes(table.data)
        files[table.signature] = path
    return files


def disassemble(iasl: str, path: Path) -> str:
    result = run([iasl, "-d", path.name], cwd=path.parent)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Error" not in output and "error" not in output.lower().replace("0 errors", ""), output
    return path.with_suffix(".dsl").read_text()


@pytest.mark.parametrize("signature", ["XSDT", "FACP", "APIC", "MCFG", "DSDT"])
def test_iasl_disassembles_each_table(iasl: str, acpi: AcpiTables, tmp_path: Path, signature: str) -> None:
    text = disassemble(iasl, dump(acpi, tmp_path)[signature])
    assert "Checksum" not in text or "Incorrect checksum" not in text
    expected = {
        "XSDT": ["ACPI Table Address   0 : 00000000000E", "ACPI Table Address   2"],
        "FACP": [
            "Hardware Reduced (V5) : 1",
            "Reset Register Supported (V2) : 1",
            "8042 Present on ports 60/64 (V2) : 1",
            "Address : 0000000000000600",
            "Address : 0000000000000601",
            "Address : 0000000000000604",
            "Value to cause reset : 01",
            "Revision : 06",
        ],
        "APIC": [
            "Processor Local APIC",
            "Local Apic ID : 06",
            "I/O Apic ID : 07",
            "Interrupt Source Override",
            "Trigger Mode : 3",
            "Local APIC NMI",
            "Interrupt Input LINT : 01",
        ],
        "MCFG": ["Base Address : 00000000E8000000", "End Bus Number : FF"],
        "DSDT": [
            'EisaId ("PNP0501")',
            'EisaId ("PNP0B00")',
            'EisaId ("PNP0303")',
            '"LNRO0005"',
            'EisaId ("PNP0A08")',
            'EisaId ("PNP0A03")',
            'EisaId ("PNP0C02")',
            "Name (_S5, Package (0x04)",
            "IRQNoFlags ()\n                    {4}",
            "0x03F8,",
            "0xC0001000,",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
            "WordBusNumber",
            "0x0000, // Range Maximum",
            "Name (_PRT, Package (0x02)",
            "0x0001FFFF, Zero, Zero, 0x0A",
            "0x0002FFFF, Zero, Zero, 0x0B",
            "QWordMemory",
            "DWordMemory",
            "_SEG",
            "_BBN",
        ],
    }[signature]
    flat = " ".join(text.split())
    for fragment in expected:
        assert " ".join(fragment.split()) in flat, fragment
    if signature == "DSDT":
        assert "0x0510" not in text  # the unknown kind is not described


def test_iasl_recompiles_the_disassembled_dsdt(iasl: str, acpi: AcpiTables, tmp_path: Path) -> None:
    dsl = dump(acpi, tmp_path)["DSDT"]
    disassemble(iasl, dsl)
    result = run([iasl, "-p", "recompiled", dsl.with_suffix(".dsl").name], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 Errors, 0 Warnings" in result.stdout, result.stdout


def test_acpiexec_loads_the_tables_and_evaluates_them(
    acpiexec: str, acpi: AcpiTables, tmp_path: Path
) -> None:
    files = dump(acpi, tmp_path)
    commands = "; ".join(
        f"evaluate \\{path}" for path in ("_S5_", "_SB.COM1._CRS", "_SB.V001._CRS", "_SB.PCI0._PRT")
    )
    result = run(
        [acpiexec, "-b", commands] + [files[s].name for s in ("FACP", "DSDT", "APIC", "MCFG")], cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Evaluation of \\_S5_ returned" in output
    s5 = output[output.index("Evaluation of \\_S5_") :]
    assert "[Package] Contains 4 Elements" in s5
    assert "[Integer] = 0000000000000005" in s5
    # COM1: IO 0x3f8/8 and IRQ 4 (mask 0x0010).
    assert "47 01 F8 03 F8 03 01 08 22 10 00 79 00" in output
    # V001: Memory32Fixed 0xc0001000/0x1000, Interrupt 6.
    assert "86 09 00 01 00 10 00 C0 00 10 00 00" in output
    prt = output[output.index("Evaluation of \\_SB.PCI0._PRT") :]
    assert "[Package] Contains 2 Elements" in prt
    assert "ACPI Error" not in output and "AE_" not in output.replace("AE_OK", ""), output
