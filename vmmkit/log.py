"""Logging for library and plugin code: structlog, loaded only when something is logged.

Write ``log = get_logger()`` and use it as a structlog logger (``log.info("vcpu.exit",
reason=...)``, ``log.bind(vcpu=0)``). Importing structlog costs about as much as the rest of
a VM's start-up, so it happens on the first call at an enabled level: a run that logs nothing
(the default, warnings only) never loads it.

Where the lines go:

- The ``vmmkit`` command calls :func:`setup` (level, ``console``/``json``, a log file or
  stderr): structlog renders each line to that stream. Nothing is ever written to stdout,
  which belongs to the guest's console (``--serial tty``).
- A program that uses vmmkit as a library and configures nothing sees nothing. If it
  configured structlog (``structlog.configure``), the events go through its configuration; if
  not, they go to the standard library's logger ``"vmmkit"``, which has a ``NullHandler``, so
  ``logging.basicConfig()`` (or any handler) shows them and an unconfigured program stays quiet.

A log line that cannot be written (a full disk, ``/dev/full``, a closed pipe) is dropped and
counted (:func:`dropped`), and reported once on stderr: logging never raises into the thread
that logged, so a failing log never kills a vCPU or device thread.

Native code (a backend's boot-progress port sink) writes its own lines to :func:`native_fd`
in :func:`native_format`: JSON objects when the log is JSON, so every line of the log stream
parses as JSON.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

# The standard library's level numbers (importing ``logging`` itself is not needed here).
DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
_METHOD_LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR, "critical": CRITICAL}

#: The lowest level emitted; ``None`` until :func:`configure` (library use: see the docstring).
_threshold: int | None = None
_configure_hook: Callable[[], None] | None = None
_configured = False
_format = "console"
_stream: TextIO | None = None
_dropped = 0
_reported = False
_log_path: str | None = None  #: the --log-file, for the message when it cannot be written


def configure(level: int, apply: Callable[[], None], *, fmt: str = "console",
              stream: TextIO | None = None) -> None:
    """Set the lowest level that is emitted and the function that configures structlog
    (called once, just before the first message is emitted); ``fmt`` and ``stream`` say what
    native writers should write and where (:func:`native_format`, :func:`native_fd`)."""
    global _threshold, _configure_hook, _configured, _format, _stream
    _threshold, _configure_hook, _configured = level, apply, False
    _format, _stream = fmt, stream


def setup(verbosity: int, fmt: str | None, stream: TextIO) -> None:
    """The ``vmmkit`` command's logging: warnings (``verbosity`` 0), info (1) or debug (2+),
    rendered as ``fmt`` (``console`` or ``json``; ``None``: console on a terminal, else JSON)
    to ``stream``. structlog itself is configured (and imported) on the first line emitted."""
    level = (WARNING, INFO, DEBUG)[min(max(verbosity, 0), 2)]
    if fmt is None:
        fmt = "console" if _isatty(stream) else "json"
    resolved = fmt
    configure(level, lambda: _configure_structlog(level, resolved, stream), fmt=fmt, stream=stream)


def open_log_file(path: str) -> TextIO:
    """``--log-file``: ``path`` opened for appending, line-buffered, without ever blocking
    (a FIFO with no reader is refused, not waited for).

    :raises vmmkit.errors.VmmError: the file cannot be opened; the message says why.
    """
    from vmmkit.paths import open_output

    global _log_path
    fd = open_output(path, "--log-file")
    _log_path = path
    stream: TextIO = os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    return stream


def native_format() -> str:
    """``"json"`` or ``"console"``: the format natively written log lines must use."""
    return _format


def native_fd(level: int = INFO) -> int | None:
    """The fd natively written lines at ``level`` go to (the CLI's log stream), or ``None``
    when such lines are not emitted (the level is filtered, or no CLI configured logging)."""
    if _threshold is None or level < _threshold:
        return None
    stream = _stream if _stream is not None else sys.stderr
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


def is_enabled(level: int) -> bool:
    return _threshold is None or level >= _threshold


def dropped() -> int:
    """How many log lines could not be written."""
    return _dropped


def _structlog() -> Any:
    global _configured
    import structlog

    if not _configured and _configure_hook is not None:
        _configure_hook()
    _configured = True
    return structlog


def _library_emit(context: dict[str, Any], method: str, event: str, values: dict[str, Any]) -> None:
    """No CLI configuration: the caller's structlog if it configured one, else stdlib logging."""
    structlog = sys.modules.get("structlog")
    if structlog is not None and structlog.is_configured():
        getattr(structlog.get_logger(**context), method)(event, **values)
        return
    logger = _stdlib_logger()
    level = _METHOD_LEVELS[method]
    if not logger.isEnabledFor(level):
        return
    exc_info = values.pop("exc_info", None)
    pairs = " ".join(f"{key}={value!r}" for key, value in {**context, **values}.items())
    logger.log(level, "%s%s%s", event, " " if pairs else "", pairs, exc_info=exc_info)


_stdlib: Any = None


def _stdlib_logger() -> Any:
    global _stdlib
    if _stdlib is None:
        import logging

        logger = logging.getLogger("vmmkit")
        logger.addHandler(logging.NullHandler())  # the library convention: quiet until configured
        _stdlib = logger
    return _stdlib


def _write_failed(exc: BaseException) -> None:
    global _dropped, _reported
    _dropped += 1
    if _reported:
        return
    _reported = True
    name = getattr(_stream, "name", None)
    where = name if isinstance(name, str) else _log_path or "the log"
    message = (f"vmmkit: warning: cannot write to {where}: {_reason(exc)}; "
               "log lines are dropped from now on\n")
    try:
        os.write(2, message.encode(errors="replace"))
    except OSError:  # stderr is gone too: nothing left to tell
        pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Logger:
    """A structlog-shaped logger that defers importing structlog."""

    __slots__ = ("_context",)

    def __init__(self, context: dict[str, Any] | None = None) -> None:
        self._context = context or {}

    def bind(self, **values: Any) -> Logger:
        return Logger({**self._context, **values})

    def _emit(self, level: int, method: str, event: str, values: dict[str, Any]) -> None:
        if _threshold is not None and level < _threshold:
            return
        try:
            if _threshold is None:
                _library_emit(self._context, method, event, values)
                return
            # Not cached: structlog's configuration may change (tests capture logs).
            getattr(_structlog().get_logger(**self._context), method)(event, **values)
        except Exception as exc:  # never into the vCPU or device thread that logged
            _write_failed(exc)

    def debug(self, event: str, **values: Any) -> None:
        self._emit(DEBUG, "debug", event, values)

    def info(self, event: str, **values: Any) -> None:
        self._emit(INFO, "info", event, values)

    def warning(self, event: str, **values: Any) -> None:
        self._emit(WARNING, "warning", event, values)

    warn = warning

    def error(self, event: str, **values: Any) -> None:
        self._emit(ERROR, "error", event, values)

    def exception(self, event: str, **values: Any) -> None:
        values.setdefault("exc_info", True)
        self._emit(ERROR, "error", event, values)

    def critical(self, event: str, **values: Any) -> None:
        self._emit(CRITICAL, "critical", event, values)


def get_logger(**context: Any) -> Logger:
    return Logger(context)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


def _configure_structlog(level: int, fmt: str, stream: TextIO) -> None:
    import structlog

    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        extra: list[Any] = [structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(stream))
        extra = []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *extra,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
