"""The resident launcher server: a warmed interpreter that forks one VMM per launch.

Per launch (one connection from :func:`vmmkit.launcher.client.launch`):

    server ──fork──> monitor (setsid: its own session) ──fork──> VMM (runs ``vmmkit.cli.main``)

The server checks the peer (same uid, by ``SO_PEERCRED``), forks the monitor and goes back to
``accept()``: it never builds a VM, so it holds no guest state and a crashing VMM cannot take it
down. The monitor is the VMM's parent: it passes on the client's signals, reaps the VMM and sends
its exit status (or the signal that killed it) back. A client that goes away (killed) takes its
VM with it, as a cold ``vmmkit`` process would: the monitor then kills the VMM with SIGKILL.
The VMM process first becomes what a cold ``vmmkit`` process would have been: the client's
file descriptors at the client's numbers (and no other), its environment, working directory,
argv, default signal dispositions, and ``sys.std*`` rebuilt over the new fds 0-2.
"""

from __future__ import annotations

import gc
import io
import os
import select
import signal
import socket
import stat
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from vmmkit.errors import VmmError
from vmmkit.launcher import prepared
from vmmkit.launcher.client import FORWARDED_SIGNALS, MAGIC, MAX_FDS, MAX_MESSAGE

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_VMM_SIGNALS = {*FORWARDED_SIGNALS, signal.SIGCHLD}


class LaunchRequest:
    """A decoded launch request (see the wire format in :mod:`vmmkit.launcher.client`)."""

    __slots__ = ("executable", "cwd", "path", "argv", "env", "fd_numbers")

    def __init__(self, executable: bytes, cwd: bytes, path: list[bytes], argv: list[bytes],
                 env: list[tuple[bytes, bytes]], fd_numbers: list[int]) -> None:
        self.executable = executable
        self.cwd = cwd
        self.path = path
        self.argv = argv
        self.env = env
        self.fd_numbers = fd_numbers

    @classmethod
    def decode(cls, message: bytes) -> LaunchRequest:
        """Raises ``ValueError`` for anything but a well-formed request."""
        fields = message.split(b"\0")
        if fields[0] != MAGIC or len(fields) < 7:
            raise ValueError("not a vmmkit launch request")
        executable, cwd = fields[1:3]
        at = 3

        def take_counted() -> list[bytes]:
            nonlocal at
            count = int(fields[at])
            if not 0 <= count <= len(fields) - at - 1:
                raise ValueError("a count beyond the message")
            items = fields[at + 1:at + 1 + count]
            at += 1 + count
            return items

        path = take_counted()
        argv = take_counted()
        env = [entry.partition(b"=")[::2] for entry in take_counted()]
        fd_numbers = [int(fd) for fd in take_counted()]
        if at != len(fields) or not argv or any(fd < 0 for fd in fd_numbers):
            raise ValueError("a malformed launch request")
        return cls(executable, cwd, path, argv, env, fd_numbers)


# -- warming ---------------------------------------------------------------------------------


def warm() -> None:
    """Import what a boot runs, so that a forked VMM pays no imports: the CLI, the plugins
    (through the same discovery a cold start uses), every registered device type's and
    transport's implementation, the auto-selected backend and the host architecture's code
    (with their cffi modules), and the API server. Builds no VM and opens nothing it keeps."""
    from vmmkit import _codecache, cli
    from vmmkit.plugin import collect_registries, make_plugin_manager

    _codecache.install()
    pm = make_plugin_manager()
    registries = collect_registries(pm)
    cli.build_parser(pm, registries)
    prepared.prepare(pm, registries)
    import vmmkit.api.server  # noqa: F401
    import vmmkit.machine
    import vmmkit.vmm  # noqa: F401
    from vmmkit.config import VmConfig
    from vmmkit.demo import demo_kernel

    try:
        config = VmConfig.from_cli(kernel=str(demo_kernel()))
    except VmmError:
        config = VmConfig.from_cli()
    vmmkit.machine.preload(config, registries)
    for device_type in registries.devices:
        try:
            device_type.preload()
        except ImportError:  # an optional dependency missing: the boot reports it, not the server
            pass
    for transport in registries.transports:
        transport.preload()
    # What every boot imports besides: the hot-plug controllers, the seccomp filter's compiler.
    import vmmkit.cpu_hotplug
    import vmmkit.pci.hotplug
    import vmmkit.sandbox.seccomp  # noqa: F401
    for name in ("vmmkit.virtio._native", "vmmkit.sandbox._native"):  # loaded, not yet used
        try:
            __import__(name)
        except ImportError:
            pass
    _compile_seccomp_filters(pm)
    _path_mtimes.update(_sys_path_mtimes())
    gc.freeze()  # the collector of each VMM process leaves the server's objects alone


def _compile_seccomp_filters(pm: Any) -> None:
    """The default mode's seccomp filters, compiled once here (``vmmkit.sandbox`` keeps them by
    mode and plugin system calls, and a VMM's boot finds them compiled); the server itself stays
    unconfined (mode ``false``). Without libseccomp the boot reports it, not the server."""
    from vmmkit.machine import activate_sandbox
    from vmmkit.sandbox import activate_seccomp

    try:
        activate_sandbox("true", pm)
    except VmmError:
        return
    finally:
        activate_seccomp("false")


_path_mtimes: dict[str, int] = {}
_warned: list[str] = []  # the installation change the server has warned about (once)


def _sys_path_mtimes() -> dict[str, int]:
    """The modification time of each ``sys.path`` directory: installing or removing a
    distribution there changes it."""
    times = {}
    for entry in sys.path:
        try:
            times[entry] = os.stat(entry or ".").st_mtime_ns
        except OSError:
            times[entry] = -1
    return times


def _installation_changed() -> str | None:
    """The first ``sys.path`` directory changed since :func:`warm`, or ``None``."""
    for entry, mtime in _sys_path_mtimes().items():
        if _path_mtimes.get(entry, mtime) != mtime:
            return entry or "."
    return None


# -- the listening socket --------------------------------------------------------------------


def bind(path: str) -> socket.socket:
    """A listening socket at ``path``, mode 0600 in a directory created 0700 when missing.
    Replaces a stale socket (nothing listening); refuses a live one or a non-socket file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise VmmError(f"launcher socket {path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: left by a server that did not exit cleanly
        except OSError as exc:
            raise VmmError(f"launcher socket {path}: {exc.strerror}") from None
        else:
            raise VmmError(f"launcher socket {path}: a launcher server is already listening there")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o177)  # created 0600: no window in which another user may connect
    try:
        listener.bind(path)
    except OSError as exc:
        listener.close()
        raise VmmError(f"launcher socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


# -- serving ---------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def serve(path: str, *, on_ready: Callable[[], None] | None = None) -> int:
    """Warm up, listen at ``path`` and fork a VMM per launch until SIGTERM or SIGINT; then
    remove the socket (running VMs carry on) and return 0."""
    warm()
    listener = bind(path)
    identity = listener.getsockname(), os.stat(path).st_ino

    def stop(_signum: int, _frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the monitors
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        if on_ready is not None:
            on_ready()
        while True:
            conn, _ = listener.accept()
            try:
                _handle(conn, listener)
            finally:
                conn.close()
    except _Stop:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.close()
        try:
            if (path, os.stat(path).st_ino) == identity:
                os.unlink(path)
        except OSError:
            pass


def _handle(conn: socket.socket, listener: socket.socket) -> None:
    """One launch: check, decode, fork the monitor. Never raises for what a client sends."""
    fds: list[int] = []
    try:
        conn.settimeout(5)
        _pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid != os.getuid():
            _refuse(conn, f"uid {uid} may not use this launcher")
            return
        message, ancillary, flags, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(int.from_bytes(data[i:i + 4], sys.byteorder) for i in range(0, len(data) - 3, 4))
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            _refuse(conn, "the request or its file descriptors were truncated")
            return
        try:
            request = LaunchRequest.decode(message)
        except ValueError as exc:
            _refuse(conn, str(exc))
            return
        if len(request.fd_numbers) != len(fds):
            _refuse(conn, "the file descriptors do not match the request")
            return
        if (request.executable, request.path) != (os.fsencode(sys.executable), [os.fsencode(p) for p in sys.path]):
            _refuse(conn, "this launcher serves another vmmkit installation (interpreter or sys.path)")
            return
        if (changed := _installation_changed()) is not None:
            if not _warned:
                print(f"vmmkit launcher: warning: {changed} changed since the server started: launches start "
                      "cold until the server is restarted", file=sys.stderr, flush=True)
                _warned.append(changed)
            _refuse(conn, f"{changed} changed since the server started")
            return
        conn.settimeout(None)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if os.fork() == 0:
            _child_entry(lambda: _monitor(conn, listener, request, fds))
    except OSError:
        return
    finally:
        for fd in fds:
            os.close(fd)


def _refuse(conn: socket.socket, reason: str) -> None:
    try:
        conn.send(b"refused " + reason.encode())
    except OSError:
        pass


def _child_entry(body: Callable[[], int]) -> NoReturn:
    """Run ``body`` in a forked process and leave with its status: a child never returns into
    the code that forked it (an exception is printed and exits 1)."""
    status = 1
    try:
        status = body()
    except SystemExit as exc:
        status = _exit_code(exc.code)
    except BaseException:  # noqa: BLE001 - whatever it is, this process must end here
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(status)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


# -- the monitor: the VMM's parent -----------------------------------------------------------


def _monitor(conn: socket.socket, listener: socket.socket, request: LaunchRequest, fds: list[int]) -> int:
    listener.close()
    os.setsid()  # not in the server's session or process group: the server's signals are not the VM's
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Blocked across the fork: a signal for the VMM that comes before it has its handlers waits.
    signal.pthread_sigmask(signal.SIG_BLOCK, _VMM_SIGNALS)
    pid = os.fork()
    if pid == 0:
        _child_entry(lambda: _run_vmm(conn, request, fds))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the monitor ends when the VMM does
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _VMM_SIGNALS)
    for fd in fds:
        os.close(fd)
    fds.clear()
    pidfd = os.pidfd_open(pid)
    conn.send(b"started %d" % pid)
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        for fd, _events in poller.poll():
            if fd == pidfd:
                return _report(conn, pid)
            try:
                message = conn.recv(64)
            except OSError:
                message = b""
            if not message:  # the client is gone: so is its VM, as with a cold vmmkit process
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.waitpid(pid, 0)
                return 0
            kind, _, value = message.partition(b" ")
            if kind == b"kill" and value.isdigit():
                try:
                    signal.pidfd_send_signal(pidfd, int(value))
                except (OSError, ValueError):
                    pass


def _report(conn: socket.socket, pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        reply = b"signal %d" % os.WTERMSIG(status)
    else:
        reply = b"exit %d" % os.waitstatus_to_exitcode(status)
    try:
        conn.send(reply)
    except OSError:
        pass
    return 0


# -- the VMM process -------------------------------------------------------------------------


def _run_vmm(conn: socket.socket, request: LaunchRequest, fds: list[int]) -> int:
    prepared.enter_vmm()
    conn.detach()  # closed with every other fd below
    _adopt_fds(fds, request.fd_numbers)
    _rebuild_stdio()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _VMM_SIGNALS)
    os.environb.clear()
    os.environb.update(dict(request.env))
    argv = [os.fsdecode(arg) for arg in request.argv]
    sys.argv = argv
    try:
        os.chdir(request.cwd)
    except OSError as exc:
        print(f"vmmkit: error: the working directory {os.fsdecode(request.cwd)}: {exc.strerror}", file=sys.stderr)
        return 1
    from vmmkit.cli import main

    status = main(argv[1:])
    import atexit

    atexit._run_exitfuncs()  # what the interpreter's exit would run (the attrs code cache's writer)
    return status


def _adopt_fds(received: list[int], numbers: list[int]) -> None:
    """Make the client's fds open at the client's numbers, and close every other fd."""
    floor = max([*received, *numbers, 2]) + 1
    import fcntl

    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in received]
    keep = set(high)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own fd
    for source, number in zip(high, numbers, strict=True):
        os.dup2(source, number, inheritable=True)
    for fd in high:
        os.close(fd)


def _rebuild_stdio() -> None:
    """``sys.stdin``/``stdout``/``stderr`` over the new fds 0-2, buffered as Python's start-up
    would have chosen for them (line-buffered on a terminal; stderr always)."""

    def text(fd: int, mode: str, errors: str, line_buffering: bool) -> io.TextIOWrapper | None:
        try:
            os.fstat(fd)
        except OSError:
            return None
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding="utf-8", errors=errors,
                                line_buffering=line_buffering)

    tty = {fd: _isatty(fd) for fd in (0, 1, 2)}
    sys.stdin = text(0, "r", "strict", False)
    sys.stdout = text(1, "w", "strict", tty[1])
    sys.stderr = text(2, "w", "backslashreplace", True)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
