"""Migration URLs and their sockets: ``unix:<path>`` and ``tcp:<host>:<port>``, as Cloud
Hypervisor's ``vm.send-migration`` / ``vm.receive-migration`` take them.

The stream carries no authentication or encryption (nor does Cloud Hypervisor's): a TCP
receiver should listen on the loopback or a trusted network only.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from attrs import frozen

from vmmkit.config import ConfigError

_EXPECTED = "unix:<socket path> or tcp:<host>:<port>"


@frozen
class Endpoint:
    """Where a migration goes: ``family`` ``"unix"`` (``path``) or ``"tcp"`` (``host``, ``port``)."""

    family: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.family == "unix" else f"tcp:{self.host}:{self.port}"


def parse_url(url: object, option: str) -> Endpoint:
    """A checked migration URL.

    :raises ConfigError: not ``unix:<path>`` or ``tcp:<host>:<port>`` (the message says why)."""
    if not isinstance(url, str) or not url:
        raise ConfigError(option, url, _EXPECTED, reason="a URL is required")
    scheme, sep, rest = url.partition(":")
    if not sep:
        raise ConfigError(option, url, _EXPECTED, reason="no scheme")
    if scheme == "unix":
        path = rest[2:] if rest.startswith("//") else rest  # unix:///tmp/m.sock as well
        if not path or "\0" in path:
            raise ConfigError(option, url, _EXPECTED, reason="the socket path is empty")
        if len(os.fsencode(path)) >= 108:
            raise ConfigError(option, url, _EXPECTED, reason="the socket path is longer than 107 bytes")
        return Endpoint("unix", path=path)
    if scheme == "tcp":
        rest = rest[2:] if rest.startswith("//") else rest
        host, sep, port_text = rest.rpartition(":")
        host = host.strip("[]")
        if not sep or not host:
            raise ConfigError(option, url, _EXPECTED, reason="tcp needs a host and a port")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(option, url, _EXPECTED, reason=f"{port_text!r} is not a port (1-65535)")
        return Endpoint("tcp", host=host, port=int(port_text))
    raise ConfigError(option, url, _EXPECTED, reason=f"unknown scheme {scheme!r}")


def connect(endpoint: Endpoint, timeout: float) -> socket.socket:
    """A connected stream socket. :raises OSError: nobody listens there."""
    if endpoint.family == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target: str | tuple[str, int] = endpoint.path
    else:
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = (endpoint.host, endpoint.port)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def listen(endpoint: Endpoint) -> Iterator[socket.socket]:
    """A listening socket for one sender; a Unix socket's file is removed afterwards (an
    existing socket file is replaced, as Cloud Hypervisor does; any other file is refused).

    :raises OSError: the address cannot be bound."""
    if endpoint.family == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.exists(endpoint.path):
                import stat

                if not stat.S_ISSOCK(os.stat(endpoint.path).st_mode):
                    raise FileExistsError(f"{endpoint.path} exists and is not a socket")
                os.unlink(endpoint.path)
            # Bound and listening under a private name first, then renamed into place: a
            # sender that sees the file can connect (bind creates it before listen).
            staging = f"{endpoint.path}.{os.getpid()}.binding"
            sock.bind(staging)
            try:
                sock.listen(1)
                os.rename(staging, endpoint.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(staging)
                raise
        except BaseException:
            sock.close()
            raise
    else:
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((endpoint.host, endpoint.port))
        except BaseException:
            sock.close()
            raise
    try:
        sock.listen(1)
        yield sock
    finally:
        sock.close()
        if endpoint.family == "unix":
            with contextlib.suppress(OSError):
                os.unlink(endpoint.path)
