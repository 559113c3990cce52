"""``vmmkit launcher serve|stop|status``: run, stop or look at the pre-forked launcher server."""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

from vmmkit.launcher.client import ENV_SOCKET, socket_path

EXIT_USAGE = 2


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vmmkit launcher",
        description="The pre-forked launcher: a resident server that starts each 'vmmkit' VM by fork "
                    "from a warmed interpreter. 'vmmkit' uses it when it is running.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,stop,status}")
    for name, help_text in (("serve", "run the server in the foreground until SIGTERM or SIGINT"),
                            ("stop", "stop the server listening at the socket (running VMs carry on)"),
                            ("status", "say whether a server listens at the socket (exit 1 if not)")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--socket", default=None, metavar="PATH",
                             help=f"the server's socket (default: ${ENV_SOCKET}, else "
                                  "$XDG_RUNTIME_DIR/vmmkit/launcher.sock)")
    options = parser.parse_args(args)
    path = options.socket or socket_path()
    if path is None:
        print(f"vmmkit launcher: error: no socket path: give --socket, set {ENV_SOCKET}, or set XDG_RUNTIME_DIR",
              file=sys.stderr)
        return EXIT_USAGE
    if options.command == "serve":
        return _serve(path)
    if options.command == "stop":
        return _stop(path)
    return _status(path)


def _serve(path: str) -> int:
    from vmmkit.errors import VmmError
    from vmmkit.launcher.server import serve

    def ready() -> None:
        print(f"vmmkit launcher: serving at {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
        _notify_systemd()

    try:
        return serve(path, on_ready=ready)
    except VmmError as exc:
        print(f"vmmkit launcher: error: {exc}", file=sys.stderr)
        return 1


def _notify_systemd() -> None:
    """``READY=1`` to systemd (a ``Type=notify`` unit) once the interpreter is warm and listening."""
    address = os.environ.pop("NOTIFY_SOCKET", None)
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        try:
            notify.sendto(b"READY=1", address)
        except OSError as exc:
            print(f"vmmkit launcher: warning: cannot notify systemd at {address!r}: {exc.strerror}", file=sys.stderr)


def server_pid(path: str) -> int | None:
    """The pid of the server listening at ``path`` (its peer credentials), or ``None``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(path)
            credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return None
    pid: int = struct.unpack("3i", credentials)[0]
    return pid


def _status(path: str) -> int:
    pid = server_pid(path)
    if pid is None:
        print(f"vmmkit launcher: no server at {path}")
        return 1
    print(f"vmmkit launcher: serving at {path} (pid {pid})")
    return 0


def _stop(path: str, timeout: float = 10.0) -> int:
    pid = server_pid(path)
    if pid is None:
        print(f"vmmkit launcher: error: no server at {path}", file=sys.stderr)
        return 1
    os.kill(pid, 15)  # SIGTERM: the server removes its socket and exits; its VMs carry on
    deadline = time.monotonic() + timeout
    while server_pid(path) is not None:
        if time.monotonic() > deadline:
            print(f"vmmkit launcher: error: the server (pid {pid}) did not stop within {timeout:.0f} s",
                  file=sys.stderr)
            return 1
        time.sleep(0.02)
    return 0
