"""Migration URLs and API bodies: refused with what is wrong."""

from __future__ import annotations

import pytest

from vmmkit.config import ConfigError
from vmmkit.migration.api import receive_migration_args, send_migration_args
from vmmkit.migration.transport import Endpoint, parse_url


@pytest.mark.parametrize(("url", "endpoint"), [
    ("unix:/tmp/m.sock", Endpoint("unix", path="/tmp/m.sock")),
    ("unix:///tmp/m.sock", Endpoint("unix", path="/tmp/m.sock")),
    ("tcp:127.0.0.1:6000", Endpoint("tcp", host="127.0.0.1", port=6000)),
    ("tcp:[::1]:6000", Endpoint("tcp", host="::1", port=6000)),
    ("tcp://localhost:1", Endpoint("tcp", host="localhost", port=1)),
])
def test_good_urls(url: str, endpoint: Endpoint) -> None:
    assert parse_url(url, "destination_url") == endpoint
    assert parse_url(str(endpoint), "x") == endpoint


@pytest.mark.parametrize(("url", "reason"), [
    ("", "a URL is required"), (None, "a URL is required"), (5, "a URL is required"),
    ("/tmp/m.sock", "no scheme"), ("file:///tmp/x", "unknown scheme 'file'"),
    ("unix:", "the socket path is empty"), ("unix:/" + "x" * 120, "longer than 107 bytes"),
    ("tcp:6000", "tcp needs a host and a port"), ("tcp:h:0", "'0' is not a port"),
    ("tcp:h:65536", "is not a port"), ("tcp:h:x", "'x' is not a port"),
])
def test_bad_urls_say_why(url: object, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        parse_url(url, "receiver_url")
    assert "receiver_url" in str(caught.value)


def test_send_bodies() -> None:
    assert send_migration_args({"destination_url": "unix:/m"}) == ("unix:/m", False, 300)
    assert send_migration_args({"destination_url": "unix:/m", "local": True, "downtime_ms": 50,
                                "connections": 1, "memory_mode": "Precopy"}) == ("unix:/m", True, 50)
    for body, reason in (({"destination_url": "unix:/m", "connections": 4}, "several connections"),
                         ({"destination_url": "unix:/m", "timeout_s": 10}, "migration timeout"),
                         ({"destination_url": "unix:/m", "downtime_ms": 0}, "positive"),
                         ({"destination_url": "unix:/m", "downtime_ms": True}, "positive"),
                         ({"destination_url": "unix:/m", "x": 1}, "unknown keys"),
                         ({}, "a URL is required")):
        with pytest.raises(ConfigError, match=reason):
            send_migration_args(body)


def test_receive_bodies() -> None:
    assert receive_migration_args({"receiver_url": "tcp:127.0.0.1:7"}) == "tcp:127.0.0.1:7"
    for body, reason in (({"receiver_url": "unix:/m", "tls_dir": "/d"}, "TLS"),
                         ({"receiver_url": "unix:/m", "zone_updates": [{"id": "z"}]}, "memory zones"),
                         ({"receiver_url": "unix:/m", "memory_mode": "Postcopy"}, "post-copy")):
        with pytest.raises(ConfigError, match=reason):
            receive_migration_args(body)
