"""The VMM's sandbox: per-thread seccomp filters, Landlock, ``no_new_privs``.

The sandbox is the process's, as in Cloud Hypervisor (``--seccomp``, ``--landlock``): the
Machine (or the API's VMM) activates a seccomp policy while it sets up (:func:`activate_seccomp`,
which compiles one filter per thread kind) and, with ``landlock_enable``, a Landlock ruleset at
boot (:func:`activate_landlock`). Each VMM thread calls :func:`enter_thread` with its kind first
thing: it names the OS thread, enters the Landlock domain and installs its kind's filter. Device
plugins do the same in the threads they start (``enter_thread("device")``). Outside an active
policy (unit tests building a device alone) :func:`enter_thread` only names the thread.

See ``docs/seccomp.md``, ``docs/landlock.md`` and ``docs/threat-model.md``.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

from vmmkit.errors import VmmError
from vmmkit.sandbox.syscalls import API, DEVICE, EVENT_LOOP, FORBIDDEN, KINDS, VCPU, VMM, allowed

__all__ = ["API", "DEVICE", "EVENT_LOOP", "KINDS", "SECCOMP_MODES", "VCPU", "VMM", "SeccompMode",
           "activate_landlock", "activate_seccomp", "deactivate", "enter_thread", "no_new_privs",
           "resolve_seccomp_mode", "seccomp_mode_of_thread"]

SeccompMode = Literal["true", "false", "log"]
SECCOMP_MODES: Final = ("true", "false", "log")

_lock = threading.Lock()
_compiled: dict[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], dict[str, Any]] = {}
_programs: dict[str, Any] = {}  # kind -> cffi buffer holding the BPF program
_seccomp_mode: str = "false"
_landlock_fd: int | None = None
_entered = threading.local()


def _native_lib() -> Any:
    return importlib.import_module("vmmkit.sandbox._native").lib


def _ffi() -> Any:
    return importlib.import_module("vmmkit.sandbox._native").ffi


def check_mode(mode: str, *, option: str = "--seccomp") -> SeccompMode:
    if mode not in SECCOMP_MODES:
        raise VmmError(f"{option}: expected one of {', '.join(SECCOMP_MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def resolve_seccomp_mode(mode: str | None) -> SeccompMode:
    """``mode``, or ``$VMMKIT_SECCOMP`` when not given, or ``true`` (Cloud Hypervisor's default)."""
    if mode is None:
        env = os.environ.get("VMMKIT_SECCOMP")
        return check_mode(env, option="VMMKIT_SECCOMP") if env else "true"
    return check_mode(mode)


def activate_seccomp(mode: str, extra: Mapping[str, Iterable[str]] | None = None) -> None:
    """Compile the filters of every thread kind for ``mode`` (``true``: trap, ``log``: log,
    ``false``: none), with the plugins' ``extra`` system calls by kind. Threads that call
    :func:`enter_thread` from now on install them.

    :raises VmmError: a plugin asks for a call of :data:`~vmmkit.sandbox.syscalls.FORBIDDEN`,
        or libseccomp is missing.
    """
    global _seccomp_mode
    check_mode(mode)
    extra = {kind: tuple(names) for kind, names in (extra or {}).items()}
    for kind, names in extra.items():
        if kind not in KINDS:
            raise VmmError(f"a plugin declares system calls for an unknown thread kind {kind!r} "
                           f"(kinds: {', '.join(KINDS)})")
        refused = sorted(set(names) & FORBIDDEN)
        if refused:
            raise VmmError(f"a plugin asks seccomp to allow {', '.join(refused)}, which vmmkit never allows")
    key = (mode, tuple(sorted((kind, tuple(sorted(names))) for kind, names in extra.items())))
    programs = _compiled.get(key)
    if programs is None:
        programs = {}
        if mode != "false":
            from vmmkit.sandbox import seccomp

            ffi = _ffi()
            for kind in KINDS:
                program = seccomp.compile_filter(allowed(kind, extra), log_only=mode == "log")
                programs[kind] = ffi.new("char[]", program)
            _install_sigsys_report()
        _compiled[key] = programs
    with _lock:
        _programs.clear()
        _programs.update(programs)
        _seccomp_mode = mode


def _install_sigsys_report() -> None:
    done = int(_native_lib().vmmkit_sigsys_install())
    if done < 0:
        raise VmmError(f"cannot install the SIGSYS handler: {os.strerror(-done)}")


def activate_landlock(rules: Iterable[Any]) -> None:
    """Create the Landlock domain every VMM thread enters from now on (``rules``:
    :class:`vmmkit.sandbox.landlock.Rule`), and enter it if this thread is a VMM thread.

    :raises LandlockUnavailable: the kernel has no Landlock.
    """
    global _landlock_fd
    from vmmkit.sandbox import landlock

    ruleset = landlock.create_ruleset([*landlock.runtime_rules(), *rules])
    with _lock:
        previous, _landlock_fd = _landlock_fd, ruleset
    if previous is not None:
        os.close(previous)
    if getattr(_entered, "kind", None) is not None:
        no_new_privs()  # landlock_restrict_self(2) wants it from an unprivileged thread
        landlock.restrict_self(ruleset)


def deactivate() -> None:
    """Threads started from now on enter no Landlock domain (those that did keep it)."""
    global _landlock_fd
    with _lock:
        previous, _landlock_fd = _landlock_fd, None
    if previous is not None:
        os.close(previous)


def enter_thread(kind: str, name: str | None = None) -> None:
    """Sandbox the calling thread as a ``kind`` thread (one of :data:`KINDS`), after naming
    it ``name`` (Linux keeps 15 bytes; the SIGSYS report and ``--seccomp log`` show it).

    Call it first thing in a thread's target, before it touches guest data.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown thread kind {kind!r} (kinds: {', '.join(KINDS)})")
    with _lock:
        program = _programs.get(kind)
        if _landlock_fd is None:
            confined = False
        else:  # under the lock: deactivate() closes the fd
            from vmmkit.sandbox import landlock

            no_new_privs()
            landlock.restrict_self(_landlock_fd)
            confined = True
    if program is None and not confined:
        if name:
            from vmmkit.threads import set_native_thread_name

            set_native_thread_name(name)
        return
    lib = _native_lib()
    if name:
        lib.vmmkit_thread_name(name.encode()[:15])
    _entered.kind = kind
    if program is not None:
        done = int(lib.vmmkit_seccomp_install(program, len(program) - 1))
        if done < 0:
            raise VmmError(f"cannot install the {kind} seccomp filter: {os.strerror(-done)}")


def no_new_privs() -> None:
    """``PR_SET_NO_NEW_PRIVS`` on the calling thread (and the threads it starts)."""
    done = int(_native_lib().vmmkit_no_new_privs())
    if done < 0:
        raise VmmError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(-done)}")


def seccomp_mode_of_thread() -> int:
    """The calling thread's seccomp mode (0 none, 2 filter), from ``PR_GET_SECCOMP``."""
    return int(_native_lib().vmmkit_seccomp_mode())


def active_mode() -> str:
    return _seccomp_mode
