"""vmmkit.log: a log that cannot be written never raises into the thread that logged, and the
library writes nothing anywhere unless the program configured logging (issue 12, items 7, 9)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from vmmkit import log


@pytest.fixture
def restore_log() -> Iterator[None]:
    saved = (log._threshold, log._configure_hook, log._configured, log._format, log._stream,
             log._dropped, log._reported)
    yield
    (log._threshold, log._configure_hook, log._configured, log._format, log._stream,
     log._dropped, log._reported) = saved
    import structlog

    structlog.reset_defaults()


def test_a_full_log_never_raises_into_a_thread(restore_log: None, capfd: pytest.CaptureFixture[str]) -> None:
    stream = open("/dev/full", "w", buffering=1)  # noqa: SIM115 (closed below)
    try:
        log.setup(1, "json", stream)
        errors: list[BaseException] = []

        def vcpu() -> None:
            try:
                for i in range(3):
                    log.get_logger(vcpu=0).info("test.line", n=i)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=vcpu)
        thread.start()
        thread.join()
    finally:
        try:
            stream.close()
        except OSError:
            pass
    assert errors == []
    assert log.dropped() == 3
    err = capfd.readouterr().err
    assert err.count("cannot write") == 1 and "No space left on device" in err


def test_native_lines_follow_the_configured_format(restore_log: None) -> None:
    log.setup(1, "json", sys.stderr)
    assert log.native_format() == "json" and log.native_fd(log.INFO) == sys.stderr.fileno()
    assert log.native_fd(log.DEBUG) is None  # -v: debug is filtered
    log.setup(0, "console", sys.stderr)
    assert log.native_fd(log.INFO) is None


LIBRARY = """
from vmmkit.log import get_logger
get_logger(vcpu=1).warning("library.warning", detail="x")
get_logger().error("library.error")
"""


def test_an_unconfigured_library_prints_nothing() -> None:
    result = subprocess.run([sys.executable, "-c", LIBRARY], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")


def test_the_callers_stdlib_logging_gets_the_events() -> None:
    script = "import logging\nlogging.basicConfig(format='%(levelname)s %(name)s %(message)s')\n"
    script += LIBRARY
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.stdout == ""
    assert "WARNING vmmkit library.warning vcpu=1 detail='x'" in result.stderr
    assert "ERROR vmmkit library.error" in result.stderr


def test_the_callers_structlog_gets_the_events() -> None:
    script = ("import structlog, sys\nstructlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))\n"
              + LIBRARY)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.stdout == ""
    assert "library.warning" in result.stderr and "library.error" in result.stderr
