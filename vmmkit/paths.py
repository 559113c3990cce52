"""Opening the files a user names (logs, console outputs, entropy sources, kernels) without
ever blocking the VMM.

``open()`` of a FIFO blocks until the other end opens it, in a syscall Python restarts after a
signal, so a FIFO with no reader (or writer) named where a file was meant would hang the VMM
past SIGTERM. Every path here is opened with ``O_NONBLOCK``: a FIFO with no reader is refused
at once (``ENXIO``), and what was opened is then checked against what the option accepts.
Errors are :class:`~vmmkit.errors.VmmError`\\ s whose message names the option and the path.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final

from vmmkit.errors import VmmError

_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class PathError(VmmError):
    """A path given for ``option`` cannot be used; ``str()`` names both and says why
    (``reason`` is a phrase that follows the path: ``"is a FIFO, not a regular file"``)."""

    def __init__(self, option: str, path: object, reason: str) -> None:
        self.option = option
        self.path = path
        self.reason = reason
        super().__init__(f"{option}: {path} {reason}")


def kind_of(mode: int) -> str:
    """``"a FIFO"``, ``"a directory"``... (``"a regular file"``) for an ``st_mode``."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file"


def open_output(path: str, option: str, *, truncate: bool = False, mode: int = 0o644) -> int:
    """``path`` opened for writing (created if missing; appended to unless ``truncate``).

    A regular file or a character device (``/dev/null``, a terminal) is returned blocking, as
    ordinary output is; a FIFO that has a reader stays non-blocking (output its reader does not
    take is the writer's to drop, never a wait); a FIFO without a reader, a directory or a
    socket is refused.

    :raises PathError: the path cannot be opened or is not something output can go to.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_TRUNC if truncate else os.O_APPEND)
    try:
        fd = os.open(_checked(path, option), flags, mode)
    except OSError as exc:
        raise PathError(option, path, _open_reason(exc, writing=True)) from None
    try:
        kind = os.fstat(fd).st_mode
        if stat.S_ISREG(kind) or stat.S_ISCHR(kind):
            os.set_blocking(fd, True)
        elif not stat.S_ISFIFO(kind):
            raise PathError(option, path, f"is {kind_of(kind)}, not a file output can be written to")
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_input(path: str, option: str, *, allow_char_device: bool = False) -> int:
    """``path`` opened for reading: a regular file (or, with ``allow_char_device``, a character
    device such as ``/dev/urandom``), returned blocking. A FIFO, a socket or a directory is
    refused without waiting for a writer.

    :raises PathError: the path cannot be opened or is of the wrong kind.
    """
    try:
        fd = os.open(_checked(path, option), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise PathError(option, path, _open_reason(exc, writing=False)) from None
    try:
        kind = os.fstat(fd).st_mode
        if not (stat.S_ISREG(kind) or (allow_char_device and stat.S_ISCHR(kind))):
            wanted = "a regular file or a character device" if allow_char_device else "a regular file"
            raise PathError(option, path, f"is {kind_of(kind)}, not {wanted}")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def require_regular_file(path: str | os.PathLike[str], option: str) -> None:
    """Refuse, without opening it, a ``path`` that is not a regular file (a FIFO would block
    the reader that opens it).

    :raises PathError: missing, unreadable or not a regular file.
    """
    try:
        mode = os.stat(_checked(os.fspath(path), option)).st_mode
    except OSError as exc:
        raise PathError(option, path, _open_reason(exc, writing=False)) from None
    if not stat.S_ISREG(mode):
        raise PathError(option, path, f"is {kind_of(mode)}, not a regular file")


def _checked(path: str, option: str) -> str:
    if not path:
        raise PathError(option, repr(path), "is empty")
    if "\0" in path:
        raise PathError(option, repr(path), "contains a NUL character")
    return path


def _open_reason(exc: OSError, *, writing: bool) -> str:
    """Why ``open`` failed, as a phrase that follows the path."""
    if exc.errno == errno.ENXIO and writing:
        return "is a FIFO with no reader (start the reader first, or use a regular file)"
    if exc.errno == errno.ENOENT:
        return "is in a directory that does not exist" if writing else "does not exist"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return f"cannot be opened: {exc.strerror or exc}"
