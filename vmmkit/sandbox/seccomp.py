"""Seccomp filters built with libseccomp (``libseccomp.so.2`` through cffi's ABI mode).

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
import os
import threading
from collections.abc import Iterable
from typing import Any, Final

from vmmkit.errors import VmmError

CDEF: Final = r"""
typedef void *scmp_filter_ctx;
struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a; uint64_t datum_b; };
scmp_filter_ctx seccomp_init(uint32_t def_action);
void seccomp_release(scmp_filter_ctx ctx);
int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall,
                           unsigned int arg_cnt, const struct scmp_arg_cmp *arg_array);
int seccomp_syscall_priority(scmp_filter_ctx ctx, int syscall, uint8_t priority);
int seccomp_syscall_resolve_name(const char *name);
char *seccomp_syscall_resolve_num_arch(uint32_t arch_token, int num);
int seccomp_export_bpf(const scmp_filter_ctx ctx, int fd);
void free(void *ptr);
"""

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
_MAX_SYSCALL: Final = 1024

_lock = threading.Lock()
_ffi: Any = None
_lib: Any = None


class SeccompUnavailable(VmmError):
    """libseccomp cannot be loaded, or the kernel refuses filters."""


def library() -> tuple[Any, Any]:
    """``(ffi, lib)`` for libseccomp, loaded on first use."""
    global _ffi, _lib
    with _lock:
        if _lib is None:
            from cffi import FFI

            ffi = FFI()
            ffi.cdef(CDEF)
            try:
                lib = ffi.dlopen("libseccomp.so.2")
            except OSError as exc:
                raise SeccompUnavailable(
                    f"seccomp filters need libseccomp (apt-get install libseccomp2): {exc}; "
                    "or run with --seccomp false") from None
            _ffi, _lib = ffi, lib
    return _ffi, _lib


def syscall_number(name: str) -> int | None:
    """The running architecture's number for ``name``; ``None`` if it has no such call."""
    ffi, lib = library()
    number = int(lib.seccomp_syscall_resolve_name(name.encode()))
    return number if number >= 0 else None


def syscall_names() -> list[str | None]:
    """Names by number on the running architecture (for the SIGSYS report)."""
    ffi, lib = library()
    names: list[str | None] = []
    for number in range(_MAX_SYSCALL):
        pointer = lib.seccomp_syscall_resolve_num_arch(0, number)
        if pointer == ffi.NULL:
            names.append(None)
            continue
        names.append(ffi.string(pointer).decode())
        lib.free(pointer)
    while names and names[-1] is None:
        names.pop()
    return names


def compile_filter(allowed: Iterable[str], *, log_only: bool) -> bytes:
    """The BPF program of a filter that allows ``allowed`` (plus ``clone`` of threads, the
    ``prctl`` options above) and traps (or logs, ``log_only``) everything else.

    ``clone3`` fails with ENOSYS so that glibc falls back to ``clone``, whose flags a filter
    can read (Cloud Hypervisor does the same): new threads yes, new processes no.
    """
    ffi, lib = library()
    ctx = lib.seccomp_init(ACT_LOG if log_only else ACT_TRAP)
    if ctx == ffi.NULL:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        for name in sorted(set(allowed)):
            number = syscall_number(name)
            if number is not None:
                _check(lib.seccomp_rule_add_array(ctx, ACT_ALLOW, number, 0, ffi.NULL), f"allow {name}")
        if (clone := syscall_number("clone")) is not None:
            # x86-64 passes the flags first; so does AArch64 (CLONE_BACKWARDS).
            arg = ffi.new("struct scmp_arg_cmp[1]", [(0, _CMP_MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD)])
            _check(lib.seccomp_rule_add_array(ctx, ACT_ALLOW, clone, 1, arg), "allow clone of threads")
        if (clone3 := syscall_number("clone3")) is not None:
            _check(lib.seccomp_rule_add_array(ctx, _ACT_ERRNO | errno.ENOSYS, clone3, 0, ffi.NULL), "clone3")
        if (prctl := syscall_number("prctl")) is not None:
            for option in _PRCTL_OPTIONS:
                arg = ffi.new("struct scmp_arg_cmp[1]", [(0, _CMP_EQ, option, 0)])
                _check(lib.seccomp_rule_add_array(ctx, ACT_ALLOW, prctl, 1, arg), f"allow prctl {option}")
        for hot in ("ioctl", "futex", "read", "write"):  # KVM_RUN and the queues come first
            if (number := syscall_number(hot)) is not None:
                lib.seccomp_syscall_priority(ctx, number, 255)
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _export(lib: Any, ctx: Any) -> bytes:
    read_end, write_end = os.pipe()
    try:
        _check(lib.seccomp_export_bpf(ctx, write_end), "export the filter")
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
