"""Logging for library and plugin code: structlog, loaded only when something is logged.

Write ``log = get_logger()`` and use it as a structlog logger (``log.info("vcpu.exit",
reason=...)``, ``log.bind(vcpu=0)``). Importing structlog costs about as much as the rest of
a VM's start-up, so it happens on the first call at an enabled level: a run that logs nothing
(the default, warnings only) never loads it. Only the CLI decides levels and output
(:func:`configure`); without it, structlog's own defaults apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The standard library's level numbers (importing ``logging`` itself is not needed here).
DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50

_threshold: int = 0
_configure_hook: Callable[[], None] | None = None
_configured = False


def configure(level: int, apply: Callable[[], None]) -> None:
    """Set the lowest level that is emitted and the function that configures structlog
    (called once, just before the first message is emitted)."""
    global _threshold, _configure_hook, _configured
    _threshold, _configure_hook, _configured = level, apply, False


def is_enabled(level: int) -> bool:
    return level >= _threshold


def _structlog() -> Any:
    global _configured
    import structlog

    if not _configured and _configure_hook is not None:
        _configure_hook()
    _configured = True
    return structlog


class Logger:
    """A structlog-shaped logger that defers importing structlog."""

    __slots__ = ("_context",)

    def __init__(self, context: dict[str, Any] | None = None) -> None:
        self._context = context or {}

    def bind(self, **values: Any) -> Logger:
        return Logger({**self._context, **values})

    def _emit(self, level: int, method: str, event: str, values: dict[str, Any]) -> None:
        if level < _threshold:
            return
        # Not cached: structlog's configuration may change (tests capture logs).
        getattr(_structlog().get_logger(**self._context), method)(event, **values)

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
