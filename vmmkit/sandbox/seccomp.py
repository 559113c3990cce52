"""Seccomp filters built with libseccomp (``libseccomp.so.2``, loaded at run time by the C of
``native/sandbox.c``: no headers or link-time dependency, and no cffi parsing at start-up).

A filter is compiled once per thread kind into classic BPF (``seccomp_export_bpf``) while the
VM is set up, and each thread installs its kind's program on itself when it starts
(:func:`vmmkit.sandbox.enter_thread`): seccomp filters apply to the calling thread and the
threads it starts later, never to running ones (``seccomp(2)``, without ``TSYNC``).

Actions as Cloud Hypervisor's ``--seccomp`` (``vmm/src/seccomp_filters.rs``): ``true`` traps a
system call the list lacks (``SCMP_ACT_TRAP``; the SIGSYS handler of ``native/sandbox.c``
names the thread and the call, then the process dies of SIGSYS), ``log`` lets it through and
the kernel logs it (``SCMP_ACT_LOG``: an audit record ``type=1326`` with the thread's ``comm``
and ``syscall=``, in ``dmesg``), ``false`` installs nothing.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
from collections.abc import Iterable
from typing import Any, Final

from vmmkit.errors import VmmError

ACT_TRAP: Final = 0x0003_0000
ACT_LOG: Final = 0x7FFC_0000
ACT_ALLOW: Final = 0x7FFF_0000
_ACT_ERRNO: Final = 0x0005_0000
_CMP_EQ: Final = 4
_CMP_MASKED_EQ: Final = 7
_CLONE_THREAD: Final = 0x0001_0000
#: prctl options any thread may use: naming itself, reading its seccomp mode, no_new_privs
#: (set before a filter is installed), and the SIGSYS report's PR_SET_DUMPABLE.
_PRCTL_OPTIONS: Final = (15, 16, 21, 38, 39, 3, 4)  # SET/GET_NAME, GET_SECCOMP, SET/GET_NNP, GET/SET_DUMPABLE
class SeccompUnavailable(VmmError):
    """libseccomp cannot be loaded, or the kernel refuses filters."""


@functools.cache
def library() -> Any:
    """The native module's ``lib``, with libseccomp loaded."""
    native = importlib.import_module("vmmkit.sandbox._native")
    lib = native.lib
    error = lib.vmmkit_scmp_load()
    if error != native.ffi.NULL:
        raise SeccompUnavailable(
            f"seccomp filters need libseccomp (apt-get install libseccomp2): "
            f"{native.ffi.string(error).decode(errors='replace')}; or run with --seccomp false")
    return lib


@functools.cache
def syscall_number(name: str) -> int | None:
    """The running architecture's number for ``name``; ``None`` if it has no such call."""
    number = int(library().vmmkit_scmp_resolve_name(name.encode()))
    return number if number >= 0 else None


def syscall_name(number: int) -> str:
    """The name of system call ``number`` on the running architecture (``"?"`` if unknown)."""
    lib = library()
    lib.vmmkit_sigsys_install()  # builds the table of names once
    name = lib.vmmkit_syscall_name(number)
    native = importlib.import_module("vmmkit.sandbox._native")
    return "?" if name == native.ffi.NULL else str(native.ffi.string(name).decode())


def compile_filter(allowed: Iterable[str], *, log_only: bool) -> bytes:
    """The BPF program of a filter that allows ``allowed`` (plus ``clone`` of threads, the
    ``prctl`` options above) and traps (or logs, ``log_only``) everything else.

    ``clone3`` fails with ENOSYS so that glibc falls back to ``clone``, whose flags a filter
    can read (Cloud Hypervisor does the same): new threads yes, new processes no.
    """
    lib = library()
    ctx = lib.vmmkit_scmp_init(ACT_LOG if log_only else ACT_TRAP)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        for name in sorted(set(allowed)):
            number = syscall_number(name)
            if number is not None:
                _check(lib.vmmkit_scmp_rule(ctx, ACT_ALLOW, number, 0, 0, 0, 0, 0), f"allow {name}")
        if (clone := syscall_number("clone")) is not None:
            # x86-64 passes the flags first; so does AArch64 (CLONE_BACKWARDS).
            _check(lib.vmmkit_scmp_rule(ctx, ACT_ALLOW, clone, 1, 0, _CMP_MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD),
                   "allow clone of threads")
        if (clone3 := syscall_number("clone3")) is not None:
            _check(lib.vmmkit_scmp_rule(ctx, _ACT_ERRNO | errno.ENOSYS, clone3, 0, 0, 0, 0, 0), "clone3")
        if (prctl := syscall_number("prctl")) is not None:
            for option in _PRCTL_OPTIONS:
                _check(lib.vmmkit_scmp_rule(ctx, ACT_ALLOW, prctl, 1, 0, _CMP_EQ, option, 0), f"allow prctl {option}")
        for hot in ("ioctl", "futex", "read", "write"):  # KVM_RUN and the queues come first
            if (number := syscall_number(hot)) is not None:
                lib.vmmkit_scmp_priority(ctx, number, 255)
        return _export(lib, ctx)
    finally:
        lib.vmmkit_scmp_release(ctx)


def _export(lib: Any, ctx: Any) -> bytes:
    read_end, write_end = os.pipe()
    try:
        _check(lib.vmmkit_scmp_export(ctx, write_end), "export the filter")
        os.close(write_end)
        write_end = -1
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def _check(result: int, what: str) -> None:
    if result < 0:
        raise SeccompUnavailable(f"libseccomp: {what}: {os.strerror(-result)}")
