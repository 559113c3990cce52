"""The error every rejected configuration value raises, and how its location is named."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from vmmkit.errors import VmmError


class ConfigError(VmmError, ValueError):
    """A configuration value was rejected.

    ``option`` says where: a CLI option (``"--memory"``, with the key inside it in ``key``) or a
    JSON path (``"memory.size"``, ``"disks[1].id"``). ``value`` is the offending value and
    ``expected`` describes what is accepted. ``str()`` reads like
    ``--memory: invalid value '12Q' for size (expected a size such as 512M, 1G or a byte count)``.
    """

    def __init__(
        self,
        option: str,
        value: object,
        expected: str,
        *,
        key: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(option, value, expected)
        self.option = option
        self.value = value
        self.expected = expected
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        reason = self.reason
        if reason is None:
            reason = f"invalid value {self.value!r}"
            if self.key:
                reason += f" for {self.key}"
        return f"{self.option}: {reason} (expected {self.expected})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (self.option, self.value, self.expected, self.key, self.reason))


def _rebuild_error(
    option: str, value: object, expected: str, key: str | None, reason: str | None
) -> ConfigError:
    return ConfigError(option, value, expected, key=key, reason=reason)


def _relabel(err: ConfigError, option: str, key: str | None) -> ConfigError:
    return ConfigError(option, err.value, err.expected, key=key, reason=err.reason)


def _within(err: ConfigError, path: str) -> ConfigError:
    """``"size"`` raised by a class becomes ``"memory.size"`` when that class sits at ``path``."""
    if not path or err.option.startswith("-"):
        return err
    return _relabel(err, f"{path}.{err.option}" if err.option else path, err.key)


def _field_head(path: str) -> str:
    return path.split(".", 1)[0].split("[", 1)[0]


def _for_cli(err: ConfigError, option: str, cli_keys: Mapping[str, str]) -> ConfigError:
    """A class-level error (``"boot_vcpus"``) becomes a CLI one (``"--cpus"``, key ``"boot"``)."""
    if err.option.startswith("-"):
        return err
    head = _field_head(err.option)
    return _relabel(err, option, cli_keys.get(head, head) or err.key)


@contextmanager
def _cli_errors(option: str, cli_keys: Mapping[str, str] | None = None) -> Iterator[None]:
    try:
        yield
    except ConfigError as err:
        raise _for_cli(err, option, cli_keys or {}) from None

