"""The AML builder's encodings, checked against the ACPI specification's examples and iasl."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmmkit_x86_64.acpi import tables
from x86_helpers import run

from vmmkit.acpi import aml


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0x12345678, b"\x0c\x78\x56\x34\x12"),
        (1 << 32, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
    ],
)
def test_integers(value: int, encoded: bytes) -> None:
    assert aml.encode(value) == encoded


def test_integer_range() -> None:
    with pytest.raises(ValueError):
        aml.integer(-1)
    with pytest.raises(ValueError):
        aml.integer(1 << 64)
    with pytest.raises(TypeError):
        aml.encode(True)


@pytest.mark.parametrize(
    ("path", "encoded"),
    [
        ("_HID", b"_HID"),
        ("COM", b"COM_"),
        ("\\_SB_", b"\\_SB_"),
        ("\\_SB_.PCI0", b"\\\x2e_SB_PCI0"),
        ("^COM1", b"^COM1"),
        ("A.B.C", b"\x2f\x03A___B___C___"),
        ("\\", b"\\\x00"),
    ],
)
def test_name_strings(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("bad", ["1ABC", "ABCDE", "a", "A-B", "A..B"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(ValueError):
        aml.name_string(bad)


@pytest.mark.parametrize(
    ("body", "encoded"),
    [
        (0, b"\x01"),
        (62, b"\x3f"),
        (63, b"\x41\x04"),  # 65 bytes with a 2-byte PkgLength
        (0xFFD, b"\x4f\xff"),  # 4095 total: the largest 2-byte length
        (0xFFE, b"\x81\x00\x01"),  # 4097 total needs 3 bytes
        (0x100000, b"\xc4\x00\x00\x01"),
    ],
)
def test_pkg_length(body: int, encoded: bytes) -> None:
    assert aml.pkg_length(body) == encoded


def test_pkg_length_limit() -> None:
    with pytest.raises(ValueError):
        aml.pkg_length(1 << 28)


@pytest.mark.parametrize(
    ("text", "value"),
    [("PNP0501", 0x0105D041), ("PNP0A08", 0x080AD041), ("PNP0C02", 0x020CD041), ("PNP0303", 0x0303D041)],
)
def test_eisa_ids(text: str, value: int) -> None:
    assert aml.eisa_id(text) == value


def test_eisa_id_syntax() -> None:
    with pytest.raises(ValueError):
        aml.eisa_id("LNRO0005")


def test_resource_descriptors() -> None:
    assert aml.Io(0x3F8, 0x3F8, 1, 8).to_aml() == bytes([0x47, 1, 0xF8, 3, 0xF8, 3, 1, 8])
    assert aml.IrqNoFlags(4).to_aml() == bytes([0x22, 0x10, 0x00])
    assert aml.Memory32Fixed(0xC0000000, 0x1000).to_aml() == bytes(
        [0x86, 9, 0, 1, 0, 0, 0, 0xC0, 0, 0x10, 0, 0]
    )
    assert aml.Interrupt(5).to_aml() == bytes([0x89, 6, 0, 0x03, 1, 5, 0, 0, 0])
    assert aml.Interrupt([5, 6], edge=False, active_low=True, shared=True).to_aml()[3] == 0x0D
    template = aml.ResourceTemplate([aml.IrqNoFlags(1)]).to_aml()
    assert template == bytes([0x11, 0x08, 0x0A, 0x05, 0x22, 0x02, 0x00, 0x79, 0x00])
    with pytest.raises(ValueError):
        aml.IrqNoFlags(16).to_aml()
    with pytest.raises(ValueError):
        aml.word_io(0, 0xFFFF).to_aml()  # a 0x10000 length does not fit a Word descriptor


def test_method_and_package() -> None:
    method = aml.Method("_STA", 0, [aml.Return(0x0F)]).to_aml()
    assert method == bytes([0x14, 0x09]) + b"_STA" + bytes([0x00, 0xA4, 0x0A, 0x0F])
    assert aml.Package([5, 0, 0, 0]).to_aml() == bytes([0x12, 0x07, 0x04, 0x0A, 0x05, 0x00, 0x00, 0x00])
    assert aml.Name("_HID", "LNRO0005").to_aml() == b"\x08_HID\x0dLNRO0005\x00"
    with pytest.raises(ValueError):
        aml.Method("X", 8).to_aml()


def test_a_large_scope_round_trips_through_iasl(iasl: str, tmp_path: Path) -> None:
    """Enough devices that PkgLength needs 2 and 3 bytes; iasl must parse it all."""
    devices = [
        aml.Device(
            f"D{i:03X}",
            [
                aml.Name("_HID", aml.EisaId("PNP0C02")),
                aml.Name("_UID", i),
                aml.Method("_STA", 0, [aml.Return(0x0F)], serialized=True),
                aml.Name("_CRS", aml.ResourceTemplate([aml.Memory32Fixed(0x1000 * i, 0x1000)])),
            ],
        )
        for i in range(80)
    ]
    body = aml.encode_all(
        [
            aml.Scope("\\_SB_", devices),
            aml.Name("BUF0", b"\x01\x02\x03"),
            aml.Name("PKG0", aml.Package([aml.Package([1, "x"]), 1 << 40])),
        ]
    )
    path = tmp_path / "dsdt.dat"
    path.write_bytes(tables.dsdt(body))
    result = run([iasl, "-d", path.name], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    text = path.with_suffix(".dsl").read_text()
    assert "Device (D04F)" in text
    assert "Method (_STA, 0, Serialized)" in text
    assert "0x0000010000000000" in text
