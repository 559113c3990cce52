"""Where a console device's output goes and where its input comes from.

One backend per Cloud Hypervisor console mode (``SerialConfig.mode``): ``Tty`` (the VMM's
stdout, input from stdin), ``File`` (append to a path, no input), ``Pty`` (a new pseudo-terminal
whose path is logged as ``<name>.pty``), ``Socket`` (a Unix-socket server, one client at a time)
and ``Null`` (discard). ``Off`` has no backend: the device is not created, as in CH.

Output is written straight to :attr:`ConsoleBackend.output_fd` with one ``os.write`` and is
never retried: output the far side cannot take right now (``EAGAIN``, no socket client) is
dropped and counted, and a dead output (``EPIPE``, ``EIO``) stops being written to. Nothing
here raises into the vCPU that wrote the byte.

``output_fd`` stays the same file descriptor for the backend's whole life (the socket backend
re-points it with ``dup2`` when a client comes and goes), so a hypervisor backend may write to
it natively (:class:`vmmkit.hypervisor.PortSink`) without being told about clients.

Input is read on the event loop (:meth:`vmmkit.eventloop.EventLoop.add_reader`) only while the
device's :class:`InputSink` has room; when it is full the backend stops reading (the host's
buffers, a pty's or a socket's, hold the rest) until the device calls :meth:`input_ready`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Protocol

from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.paths import PathError, open_output
from vmmkit_devices.console.mode import MODES as MODES  # moved there, re-exported
from vmmkit_devices.console.mode import console_mode as console_mode

if TYPE_CHECKING:
    import socket

    from vmmkit.eventloop import EventLoop
    from vmmkit_devices.console.tty import RawMode

log = get_logger()

#: Largest chunk read from an input fd at once.
READ_CHUNK = 4096


class InputSink(Protocol):
    """The device side of a backend's input."""

    def room(self) -> int:
        """How many bytes the device can take now (0: stop reading until :meth:`input_ready`)."""
        ...

    def receive(self, data: bytes) -> None:
        """Bytes from the host; at most the last :meth:`room` bytes."""
        ...


def _dup(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class ConsoleBackend:
    """Output to one fd, optional input from another. Subclasses set :attr:`output_fd` and, for
    input, call :meth:`_watch` from :meth:`_start_input`."""

    mode: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        #: Who owns this backend, for log events (``serial``, ``debug_console``).
        self.name = name
        #: Where output is written; stable until :meth:`close` (-1: none).
        self.output_fd = -1
        self.tx_bytes = 0
        self.tx_dropped = 0
        self.rx_bytes = 0
        self._broken = False
        self._loop: EventLoop | None = None
        self._sink: InputSink | None = None
        self._input_fd: int | None = None
        self._watching = False
        self._paused = False
        self._closed = False

    # -- output --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write ``data`` now, or drop it; never blocks on a non-blocking fd, never raises."""
        fd = self.output_fd
        if fd < 0 or self._broken:
            self.tx_dropped += len(data)
            return
        try:
            try:
                written = os.write(fd, data)
            except InterruptedError:
                written = os.write(fd, data)
        except BlockingIOError:
            self.tx_dropped += len(data)
            return
        except OSError as exc:
            self.tx_dropped += len(data)
            self._write_failed(exc)
            return
        self.tx_bytes += written
        self.tx_dropped += len(data) - written

    def _write_failed(self, exc: OSError) -> None:
        self._broken = True
        reason = exc.strerror or str(exc)
        log.warning("console.output_failed", console=self.name, mode=self.mode, error=reason)

    # -- input ---------------------------------------------------------------------------

    @property
    def has_input(self) -> bool:
        """Whether bytes may arrive from the host."""
        return self._input_fd is not None

    def attach(self, loop: EventLoop, sink: InputSink) -> None:
        """Start delivering host input to ``sink`` from ``loop``'s thread."""
        self._loop = loop
        self._sink = sink
        self._start_input()

    def _start_input(self) -> None:
        """Subclasses with input call :meth:`_watch` here."""

    def input_ready(self) -> None:
        """The sink has room again (any thread)."""
        if self._paused and self._loop is not None and not self._closed:
            self._loop.call_soon(self._resume)

    def _watch(self, fd: int) -> None:
        """Read input from ``fd`` (on the loop thread, or before the loop runs)."""
        assert self._loop is not None
        self._unwatch()
        self._input_fd = fd
        self._paused = False
        self._loop.add_reader(fd, self._on_readable)
        self._watching = True

    def _unwatch(self) -> None:
        if self._watching and self._loop is not None and self._input_fd is not None:
            try:
                self._loop.remove_reader(self._input_fd)
            except (OSError, ValueError):  # the loop may be closed already
                pass
        self._watching = False

    def _resume(self) -> None:
        if self._paused and not self._watching and self._input_fd is not None and not self._closed:
            self._paused = False
            assert self._loop is not None
            self._loop.add_reader(self._input_fd, self._on_readable)
            self._watching = True

    def _on_readable(self) -> None:
        fd, sink = self._input_fd, self._sink
        if fd is None or sink is None:
            return
        room = sink.room()
        if room <= 0:
            self._unwatch()
            self._paused = True
            if sink.room() > 0:  # the guest drained it while we were pausing
                self._resume()
            return
        try:
            data = os.read(fd, min(room, READ_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._input_closed()
            return
        self.rx_bytes += len(data)
        sink.receive(data)

    def _input_closed(self) -> None:
        """End of input (stdin at EOF, pty hung up); the socket backend drops its client."""
        self._unwatch()
        self._input_fd = None

    # -- life ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop reading and release every fd (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        self._release()
        _close(self.output_fd)
        self.output_fd = -1

    def _release(self) -> None:
        """Subclasses close their own fds here."""

    def counters(self) -> Mapping[str, int]:
        return {"tx_bytes": self.tx_bytes, "tx_dropped": self.tx_dropped, "rx_bytes": self.rx_bytes}


class NullBackend(ConsoleBackend):
    """Discard output; no input. ``output_fd`` is ``/dev/null`` for native sinks."""

    mode = "Null"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.output_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def write(self, data: bytes) -> None:
        self.tx_bytes += len(data)


class FileBackend(ConsoleBackend):
    """Append output to ``path`` (created if missing); no input."""

    mode = "File"

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        try:  # never blocks: a FIFO without a reader is refused, one with a reader stays non-blocking
            self.output_fd = open_output(path, name)
        except PathError as exc:
            raise DeviceError(f"{name}: cannot open file output: {path} {exc.reason}") from None


class TtyBackend(ConsoleBackend):
    """Output to the VMM's stdout; input from its stdin when ``input`` is set.

    A terminal on stdin is put in raw mode (:class:`~vmmkit_devices.console.tty.RawMode`) and
    restored on :meth:`close` and at exit. A pipe or socket on stdin is read as is; a regular
    file or ``/dev/null`` (which epoll refuses) gives no input. stdout is written through a
    duplicate, blocking as the VMM's stdout is (the terminal is shared with the shell, whose
    file status flags are left alone).
    """

    mode = "Tty"

    def __init__(self, name: str, *, input: bool = True, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        super().__init__(name)
        self._want_input = input
        self._stdin_fd = stdin_fd
        self._stdin_dup: int | None = None
        self.raw_mode: RawMode | None = None
        self.output_fd = _dup(stdout_fd)

    def _start_input(self) -> None:
        if not self._want_input:
            return
        try:
            fd = _dup(self._stdin_fd)
        except OSError:
            return
        try:
            self._watch(fd)
        except OSError as exc:  # EPERM: a regular file or /dev/null cannot be polled
            _close(fd)
            self._input_fd = None
            log.debug("console.no_input", console=self.name, reason=exc.strerror)
            return
        self._stdin_dup = fd
        if os.isatty(self._stdin_fd):
            from vmmkit_devices.console.tty import RawMode  # termios: only for a terminal

            try:
                self.raw_mode = RawMode(self._stdin_fd)
            except OSError as exc:
                log.debug("console.raw_mode_failed", console=self.name, reason=exc.strerror)

    def _input_closed(self) -> None:
        super()._input_closed()
        _close(self._stdin_dup)
        self._stdin_dup = None

    def _release(self) -> None:
        if self.raw_mode is not None:
            self.raw_mode.restore()
        _close(self._stdin_dup)
        self._stdin_dup = None


class PtyBackend(ConsoleBackend):
    """A new pseudo-terminal: the guest's side is the master, a user opens :attr:`path`.

    The slave side is kept open by the VMM, so the master never reports a hang-up when users
    come and go; output nobody reads fills the pty's buffer and is then dropped.
    """

    mode = "Pty"

    def __init__(self, name: str, *, input: bool = True) -> None:
        super().__init__(name)
        self._want_input = input
        import tty

        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            os.set_blocking(master, False)
            self.path = os.ttyname(slave)
        except OSError:
            _close(master)
            _close(slave)
            raise
        self._slave: int | None = slave
        self.output_fd = master
        log.info(f"{name}.pty", path=self.path)

    def _start_input(self) -> None:
        if self._want_input:
            self._watch(self.output_fd)

    def _release(self) -> None:
        _close(self._slave)
        self._slave = None


class SocketBackend(ConsoleBackend):
    """A Unix stream socket server at ``path``: one client at a time gets the output and is
    the input; a second client is turned away while one is connected; output while nobody is
    connected is dropped. A stale socket at ``path`` is replaced; the socket file is removed
    on :meth:`close`."""

    mode = "Socket"

    def __init__(self, name: str, path: str, *, input: bool = True) -> None:
        super().__init__(name)
        self.path = path
        self._want_input = input
        self.rejected = 0
        self.clients = 0
        self._client: socket.socket | None = None
        self._lock = threading.Lock()
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
            os.unlink(path)
        import socket  # only this backend needs it: not imported by every boot's serial port

        self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        kind = socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        listener = socket.socket(socket.AF_UNIX, kind)
        try:
            listener.bind(path)
            listener.listen(1)
            self._inode = os.stat(path).st_ino
            self.output_fd = _dup(self._devnull)
        except OSError:
            listener.close()
            _close(self._devnull)
            raise
        self._listener: socket.socket | None = listener

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _start_input(self) -> None:
        assert self._loop is not None and self._listener is not None
        self._loop.add_reader(self._listener.fileno(), self._accept)

    def _accept(self) -> None:
        if self._listener is None:
            return
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("console.accept_failed", console=self.name, error=exc.strerror)
            return
        if self._client is not None:
            self.rejected += 1
            conn.close()
            return
        conn.setblocking(False)
        with self._lock:
            self._client = conn
            os.dup2(conn.fileno(), self.output_fd, inheritable=False)
        self.clients += 1
        self._broken = False
        log.debug("console.client_connected", console=self.name, path=self.path)
        self._watch(conn.fileno())  # without input too: a hang-up must free the slot

    def write(self, data: bytes) -> None:
        if self._client is None:
            self.tx_dropped += len(data)  # nobody connected
            return
        super().write(data)

    def _write_failed(self, exc: OSError) -> None:
        # The client went away (EPIPE, ECONNRESET): the loop sees the hang-up and drops it.
        pass

    def _input_closed(self) -> None:
        self._drop_client()

    def _drop_client(self) -> None:
        self._unwatch()
        self._input_fd = None
        self._paused = False
        with self._lock:
            conn, self._client = self._client, None
            if conn is None:
                return
            if self.output_fd >= 0:
                os.dup2(self._devnull, self.output_fd, inheritable=False)
        conn.close()
        log.debug("console.client_disconnected", console=self.name, path=self.path)

    def _on_readable(self) -> None:
        if self._want_input:
            super()._on_readable()
            return
        fd = self._input_fd
        if fd is None:
            return
        try:
            data = os.read(fd, READ_CHUNK)  # output-only: discard what the client types
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()

    def _release(self) -> None:
        if self._loop is not None and self._listener is not None:
            try:
                self._loop.remove_reader(self._listener.fileno())
            except (OSError, ValueError):
                pass
        with self._lock:
            conn, self._client = self._client, None
        if conn is not None:
            conn.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
        _close(self._devnull)

    def counters(self) -> Mapping[str, int]:
        return {**super().counters(), "clients": self.clients, "rejected": self.rejected}


def open_backend(
    mode: str,
    *,
    name: str,
    file: str | None = None,
    socket_path: str | None = None,
    input: bool = True,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
) -> ConsoleBackend:
    """The backend for console ``mode`` (not ``Off``).

    :raises DeviceError: the mode needs a path that is missing, or the host refused (file not
        writable, socket path taken).
    """
    try:
        if mode == "Null":
            return NullBackend(name)
        if mode == "Tty":
            return TtyBackend(name, input=input, stdin_fd=stdin_fd, stdout_fd=stdout_fd)
        if mode == "Pty":
            return PtyBackend(name, input=input)
        if mode == "File":
            if not file:
                raise DeviceError(f"{name}: mode File needs a file path")
            return FileBackend(name, file)
        if mode == "Socket":
            if not socket_path:
                raise DeviceError(f"{name}: mode Socket needs a socket path")
            return SocketBackend(name, socket_path, input=input)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        reason = exc.strerror or exc
        raise DeviceError(f"{name}: cannot open {mode.lower()} output{where}: {reason}") from None
    raise DeviceError(f"{name}: console mode {mode!r} has no backend (expected Pty, Tty, File, Socket, Null)")
