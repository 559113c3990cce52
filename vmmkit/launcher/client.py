"""The ``vmmkit`` command's side of the pre-forked launcher (see :mod:`vmmkit.launcher`).

This runs on the cold path of every ``vmmkit`` command, before anything heavy is imported, so it
uses only the interpreter's built-in modules (``_socket``, ``_signal``, ``os``, ``sys``): with no
server it costs one failed ``connect()``. With a server, it hands over what the cold process
would have had (argv, environment, working directory, every open file descriptor by
``SCM_RIGHTS``), forwards the signals a user sends to it, and returns the VMM's exit status.

The wire format (``SOCK_SEQPACKET``, one message per datagram, fields separated by NUL, which
argv, environment entries and paths cannot contain):

    client -> server   MAGIC, executable, cwd, pathc, sys.path..., argc, argv..., envc, env...,
                       fdc, fd numbers...    (with the fds themselves as SCM_RIGHTS)

A server refuses a client whose interpreter or ``sys.path`` differ from its own (another
installation, ``PYTHONPATH``): the client then starts cold.
    server -> client   b"started <pid>" | b"refused <reason>"
    client -> monitor  b"kill <signum>"      (a signal the client received, for the VMM)
    monitor -> client  b"exit <status>" | b"signal <signum>"   (how the VMM process ended)
"""

from __future__ import annotations

import _signal
import _socket
import os
import sys

MAGIC = b"vmmkit-launch-1"
ENV_SOCKET = "VMMKIT_LAUNCHER"
#: ``VMMKIT_LAUNCHER=off``: never use a server (the ordinary cold path).
OFF = "off"
#: At most this many fds travel in one SCM_RIGHTS message (the kernel's SCM_MAX_FD).
MAX_FDS = 253
MAX_MESSAGE = 1 << 20
#: Signals a user sends to ``vmmkit`` that the VMM process must receive instead.
FORWARDED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT,
                     _signal.SIGUSR1, _signal.SIGUSR2)
#: How long a server may take to accept a launch before the command starts cold instead.
START_TIMEOUT = 10.0


def socket_path() -> str | None:
    """``$VMMKIT_LAUNCHER``, else ``$XDG_RUNTIME_DIR/vmmkit/launcher.sock``; ``None`` when
    ``VMMKIT_LAUNCHER=off`` (or empty) or there is no runtime directory."""
    given = os.environ.get(ENV_SOCKET)
    if given is not None:
        return None if given in ("", OFF) else given
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "vmmkit", "launcher.sock") if runtime else None


def open_fds() -> list[int]:
    """Every file descriptor open in this process (what a cold VMM would inherit)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)  # the directory listing's own fd is closed by now
        except OSError:
            continue
        fds.append(fd)
    return sorted(fds)


def encode_request(argv: list[str], fds: list[int]) -> bytes:
    env = [b"%s=%s" % item for item in os.environb.items()]
    fields = [MAGIC, os.fsencode(sys.executable), os.fsencode(os.getcwd()),
              b"%d" % len(sys.path), *map(os.fsencode, sys.path),
              b"%d" % len(argv), *map(os.fsencode, argv), b"%d" % len(env), *env,
              b"%d" % len(fds), *(b"%d" % fd for fd in fds)]
    return b"\0".join(fields)


def launch(argv: list[str]) -> int | None:
    """Run ``argv`` (``sys.argv``) in a VMM forked by the launcher server; its exit status, or
    ``None`` when there is no server to use (the caller then starts cold)."""
    path = socket_path()
    if path is None or argv[1:2] == ["launcher"]:
        return None
    try:
        fds = open_fds()
        if len(fds) > MAX_FDS:
            return None
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            sock.settimeout(START_TIMEOUT)
            sock.connect(path)
            fd_bytes = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
            sock.sendmsg([encode_request(argv, fds)], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd_bytes)])
            reply = sock.recv(MAX_MESSAGE)
        except OSError:  # no server, a stale socket, a server that does not answer
            return None
        if not reply.startswith(b"started "):
            return None  # refused (another installation, a malformed request): start cold
        sock.settimeout(None)
        return _follow(sock)
    finally:
        sock.close()


def _follow(sock: _socket.socket) -> int:
    """Forward signals to the VMM until the monitor reports how it ended."""

    def forward(signum: int, _frame: object) -> None:
        try:
            sock.send(b"kill %d" % signum)
        except OSError:
            pass

    previous = {signum: _signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        reply = sock.recv(MAX_MESSAGE)  # PEP 475: retried after each forwarded signal
    except OSError:
        reply = b""
    finally:
        for signum, handler in previous.items():
            _signal.signal(signum, handler)
    kind, _, value = reply.partition(b" ")
    if kind == b"exit":
        return int(value)
    if kind == b"signal":
        return _die_of(int(value))
    os.write(2, b"vmmkit: error: the launcher's VMM process vanished without an exit status\n")
    return 1


def _die_of(signum: int) -> int:
    """End as the VMM process did (killed by ``signum``), so a shell sees the same status."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        _signal.signal(signum, _signal.SIG_DFL)  # SIGKILL and SIGSTOP have no handler to reset
    except (OSError, ValueError):
        pass
    try:
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
    except (OSError, ValueError):
        pass
    return 128 + signum  # a signal that does not end a process by default


def main() -> int:
    """The ``vmmkit`` console script: through a running launcher server, else the cold path."""
    try:
        status = launch(sys.argv)
    except KeyboardInterrupt:
        return 130
    if status is not None:
        return status
    from vmmkit.cli import main as cold_main

    return cold_main()
