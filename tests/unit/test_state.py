"""The state contract's helpers (:mod:`vmmkit.state`) and the snapshot URL rule: saved state
is untrusted input, checked whole before anything is set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from vmmkit.snapshot import directory_of
from vmmkit.state import (
    SnapshotError,
    StateError,
    check_version,
    int_field,
    is_snapshottable,
    pack_bytes,
    restore_fields,
    save_named,
    unpack_bytes,
)


class Registers:
    _STATE: ClassVar[dict[str, str]] = {"_ier": "int", "_ram": "bytes", "ready": "bool", "_pending": "int?",
                                        "offset": "float", "queue": "ints"}

    def __init__(self) -> None:
        self._ier = 0
        self._ram = bytearray(4)
        self.ready = False
        self._pending: int | None = None
        self.offset = 0.0
        self.queue: list[int] = []


def test_fields_round_trip_without_underscores() -> None:
    source = Registers()
    source._ier, source._ram[:], source.ready, source._pending, source.offset, source.queue = \
        5, b"\1\2\3\4", True, 7, 1.5, [1, 2]
    state = save_named(source, Registers._STATE)
    assert state == {"ier": 5, "ram": pack_bytes(b"\1\2\3\4"), "ready": True, "pending": 7, "offset": 1.5,
                     "queue": [1, 2]}
    target = Registers()
    ram = target._ram
    restore_fields(target, state, Registers._STATE, "dev")
    assert (target._ier, target._ram, target.ready, target._pending, target.offset, target.queue) == \
        (5, bytearray(b"\1\2\3\4"), True, 7, 1.5, [1, 2])
    assert target._ram is ram  # kept in place (others may hold it)


@pytest.mark.parametrize(("change", "message"), [
    ({"ier": True}, "dev.ier: True is not a valid int"),
    ({"ready": 1}, "dev.ready: 1 is not a valid bool"),
    ({"ram": pack_bytes(b"\0" * 5)}, "dev.ram: 5 bytes, expected 4"),
    ({"ram": "not base64!"}, "dev.ram: not valid base64"),
    ({"queue": [1, "2"]}, "dev.queue: [1, '2'] is not a valid ints"),
    ({"pending": "x"}, "dev.pending: 'x' is not a valid int?"),
])
def test_a_bad_field_sets_nothing(change: dict[str, Any], message: str) -> None:
    state = save_named(Registers(), Registers._STATE) | {"ier": 9} | change
    target = Registers()
    with pytest.raises(StateError, match=message.replace("[", r"\[").replace("?", r"\?")):
        restore_fields(target, state, Registers._STATE, "dev")
    assert target._ier == 0  # checked whole before any attribute was set


def test_missing_field_and_ranges() -> None:
    with pytest.raises(StateError, match="dev: missing 'ier'"):
        restore_fields(Registers(), {}, Registers._STATE, "dev")
    with pytest.raises(StateError, match=r"x.n: 300 is outside \[0, 255\]"):
        int_field({"n": 300}, "n", "x", 0, 255)
    with pytest.raises(StateError, match="missing 'n'"):
        int_field({}, "n", "x")
    assert unpack_bytes(pack_bytes(b"abc"), "w") == b"abc"
    with pytest.raises(StateError, match="expected base64 text, found int"):
        unpack_bytes(3, "w")


def test_versions_and_the_protocol() -> None:
    check_version("piece", 2, 2)
    with pytest.raises(StateError, match="piece: state version 1 in the snapshot, this vmmkit restores version 2"):
        check_version("piece", 1, 2)

    class WithContract:
        state_version = 1

        def save_state(self) -> dict[str, Any]:
            return {}

        def restore_state(self, state: Any) -> None:
            pass

    class WithoutVersion(WithContract):
        state_version = None  # type: ignore[assignment]

    assert is_snapshottable(WithContract())
    assert not is_snapshottable(WithoutVersion())
    assert not is_snapshottable(object())


@pytest.mark.parametrize("url", ["", "/tmp/x", "tcp:127.0.0.1:80", "file://host/tmp/x", "file://", "unix:/x"])
def test_only_file_directory_urls(url: str) -> None:
    with pytest.raises(SnapshotError, match="destination_url"):
        directory_of(url, "destination_url")


def test_file_urls() -> None:
    assert str(directory_of("file:///tmp/a%20b", "x")) == "/tmp/a b"
    assert str(directory_of("file://localhost/tmp/s", "x")) == "/tmp/s"


def test_a_ram_file_holds_only_the_non_zero_pages(tmp_path: Path) -> None:
    """Zero pages stay holes, page by page (a guest's RAM is mostly zeros): two scattered pages
    and one run of three are three writes and five pages on disk."""
    from vmmkit.memory import GuestMemory, MemoryRange
    from vmmkit.snapshot import _write_region

    with GuestMemory.allocate([MemoryRange(0, 4 << 20)]) as memory:
        for page in (1, 300, 301, 302, 1000):
            memory.write(page * 4096 + 17, b"x")
        path = tmp_path / "ram.bin"
        _write_region(memory.regions[0], path)
        data = path.read_bytes()
        assert len(data) == 4 << 20 and data == memory.read(0, 4 << 20)
        if path.stat().st_blocks == 0:
            pytest.skip("this file system reports no blocks")
        assert path.stat().st_blocks * 512 == 5 * 4096
