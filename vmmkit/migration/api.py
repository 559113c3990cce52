"""The API bodies of the migration endpoints (Cloud Hypervisor's ``SendMigrationData`` and
``ReceiveMigrationData``), checked: what vmmkit does not implement is refused by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from vmmkit.config import ConfigError
from vmmkit.migration.transport import parse_url

#: Keys of Cloud Hypervisor's schemas vmmkit refuses, and why.
_SEND_REFUSED: Final = {
    "timeout_s": "a migration timeout (each send or answer times out after 60 s instead)",
    "timeout_strategy": "a migration timeout strategy",
    "connections": "several connections",
    "tls_dir": "TLS",
    "memory_mode": "post-copy",
}
_RECEIVE_REFUSED: Final = {"tls_dir": "TLS", "memory_mode": "post-copy", "zone_updates": "memory zones"}
_DEFAULTS: Final[Mapping[str, Any]] = {"connections": 1, "memory_mode": "Precopy", "timeout_strategy": "Cancel",
                                       "timeout_s": None}


def _refuse(body: Mapping[str, Any], refused: Mapping[str, str], schema: str, takes: tuple[str, ...]) -> None:
    for key, reason in refused.items():
        if key in body and body[key] not in (None, _DEFAULTS.get(key), [], ""):
            raise ConfigError(key, body[key], "its default", reason=f"not supported ({reason})")
    unknown = sorted(set(body) - set(takes) - set(refused))
    if unknown:
        raise ConfigError(schema, ", ".join(unknown), f"the keys {', '.join(takes)}", reason="unknown keys")


def send_migration_args(body: Mapping[str, Any]) -> tuple[str, bool, int]:
    """``(destination_url, local, downtime_ms)``. :raises ConfigError: a bad body."""
    _refuse(body, _SEND_REFUSED, "SendMigrationData", ("destination_url", "local", "downtime_ms"))
    url = body.get("destination_url")
    parse_url(url, "destination_url")
    local = body.get("local", False)
    if not isinstance(local, bool):
        raise ConfigError("local", local, "true or false")
    downtime_ms = body.get("downtime_ms", 300)
    if not isinstance(downtime_ms, int) or isinstance(downtime_ms, bool) or downtime_ms < 1:
        raise ConfigError("downtime_ms", downtime_ms, "a positive number of milliseconds")
    assert isinstance(url, str)
    return url, local, downtime_ms


def receive_migration_args(body: Mapping[str, Any]) -> str:
    """``receiver_url``. :raises ConfigError: a bad body."""
    _refuse(body, _RECEIVE_REFUSED, "ReceiveMigrationData", ("receiver_url",))
    url = body.get("receiver_url")
    parse_url(url, "receiver_url")
    assert isinstance(url, str)
    return url
