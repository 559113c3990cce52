"""System calls Python's ``os`` module lacks, through libc (ctypes): ``renameat2``,
``syncfs``, and the per-thread ``setfsuid``/``setfsgid`` that let a root daemon create files
with the guest caller's ownership (as virtiofsd does)."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def renameat2(olddirfd: int, old: str, newdirfd: int, new: str, flags: int) -> None:
    _check(_lib().renameat2(olddirfd, os.fsencode(old), newdirfd, os.fsencode(new), ctypes.c_uint(flags)))


def syncfs(fd: int) -> None:
    _check(_lib().syncfs(fd))


@contextlib.contextmanager
def as_caller(uid: int, gid: int) -> Iterator[None]:
    """Run the body with this thread's file-system uid and gid set to the guest caller's, so
    what it creates belongs to the caller and the host checks the caller's permissions. Only
    a root daemon can (and needs to); otherwise files belong to the daemon's user.

    ``setfsuid``/``setfsgid`` act on the calling thread only (glibc does not broadcast them),
    so requests on other threads keep their own."""
    if os.geteuid() != 0 or (uid, gid) == (0, 0):
        yield
        return
    lib = _lib()
    lib.setfsgid(ctypes.c_uint(gid))
    lib.setfsuid(ctypes.c_uint(uid))
    try:
        yield
    finally:
        lib.setfsuid(ctypes.c_uint(0))
        lib.setfsgid(ctypes.c_uint(0))
