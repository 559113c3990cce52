"""vmmkit.paths: user-named files are opened without ever blocking (issue 12, item 7)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmkit.paths import PathError, open_input, open_output, require_regular_file


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_a_fifo_without_a_reader_is_refused_at_once(fifo: Path) -> None:
    with pytest.raises(PathError, match="--log-file: .*fifo is a FIFO with no reader"):
        open_output(str(fifo), "--log-file")


def test_a_fifo_with_a_reader_is_opened_non_blocking(fifo: Path) -> None:
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fd = open_output(str(fifo), "--serial")
        try:
            assert not os.get_blocking(fd)
        finally:
            os.close(fd)
    finally:
        os.close(reader)


def test_regular_files_and_character_devices_are_blocking_outputs(tmp_path: Path) -> None:
    for path in (str(tmp_path / "out.log"), os.devnull):
        fd = open_output(path, "--serial")
        assert os.get_blocking(fd)
        os.close(fd)


@pytest.mark.parametrize("name,reason", [("missing/x.log", "directory that does not exist"), (".", "is a directory")])
def test_unusable_outputs_say_why(tmp_path: Path, name: str, reason: str) -> None:
    with pytest.raises(PathError, match=reason):
        open_output(str(tmp_path / name), "--log-file")


def test_inputs_refuse_a_fifo_and_take_a_character_device_only_when_asked(fifo: Path) -> None:
    with pytest.raises(PathError, match="is a FIFO, not a regular file or a character device"):
        open_input(str(fifo), "--rng", allow_char_device=True)
    with pytest.raises(PathError, match="is a character device, not a regular file"):
        open_input("/dev/urandom", "--kernel")
    fd = open_input("/dev/urandom", "--rng", allow_char_device=True)
    assert os.get_blocking(fd) and len(os.read(fd, 8)) == 8
    os.close(fd)


def test_require_regular_file(fifo: Path, tmp_path: Path) -> None:
    with pytest.raises(PathError, match="--kernel: .* is a FIFO, not a regular file"):
        require_regular_file(fifo, "--kernel")
    with pytest.raises(PathError, match="contains a NUL"):
        require_regular_file("a\0b", "--kernel")
    (tmp_path / "k").write_bytes(b"x")
    require_regular_file(tmp_path / "k", "--kernel")
