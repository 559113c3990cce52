"""Landlock: after set-up, the VMM's threads reach only the files the VM names, and the rules.

Linux's ``Documentation/userspace-api/landlock.rst``; Cloud Hypervisor's ``docs/landlock.md``
and ``vmm/src/landlock.rs``. A ruleset handles every filesystem right the kernel's ABI knows
and allows, beneath each path, the rights its access (``r``, ``w``, ``rw``) maps to. Landlock,
like seccomp, restricts the calling thread and the threads it starts later
(``landlock_restrict_self(2)``), so each VMM thread enters the domain when it starts
(:func:`vmmkit.sandbox.enter_thread`), and a domain can only ever shrink: a disk hot-added
through ``vm.add-disk`` must lie beneath a path of ``--landlock-rules`` (as in Cloud
Hypervisor); any other path is refused by the kernel when the API thread opens it.
"""

from __future__ import annotations

import importlib
import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import attrs

from vmmkit.errors import VmmError

EXECUTE: Final = 1 << 0
WRITE_FILE: Final = 1 << 1
READ_FILE: Final = 1 << 2
READ_DIR: Final = 1 << 3
TRUNCATE: Final = 1 << 14  # ABI 3
IOCTL_DEV: Final = 1 << 15  # ABI 5
#: Rights a rule on a file (not a directory) may carry.
FILE_RIGHTS: Final = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
#: Every filesystem right, by the ABI version that introduced it (the ABI 1 rights are bits 0-12).
_HANDLED_BY_ABI: Final = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
_ALL_KNOWN: Final = (1 << 16) - 1
_WRITE_DIR: Final = ((1 << 13) - 1) & ~(EXECUTE | READ_FILE | READ_DIR)

ACCESS: Final = {"r": READ_FILE | READ_DIR, "w": WRITE_FILE | TRUNCATE | _WRITE_DIR | (1 << 13),
                 "rw": READ_FILE | READ_DIR | WRITE_FILE | TRUNCATE | _WRITE_DIR | (1 << 13) | IOCTL_DEV}


class LandlockUnavailable(VmmError):
    """The kernel offers no Landlock (too old, or not in the ``lsm=`` list)."""


@attrs.frozen
class Rule:
    """``path`` and what may be done beneath it: ``r``, ``w`` or ``rw`` (CH's ``LandlockConfig``)."""

    path: str
    access: str


def _native() -> Any:
    return importlib.import_module("vmmkit.sandbox._native").lib


def abi_version() -> int:
    """The Landlock ABI the kernel offers; raises :class:`LandlockUnavailable` if none."""
    abi = int(_native().vmmkit_landlock_abi())
    if abi < 0:
        reason = {-38: "the kernel has no Landlock (ENOSYS: too old, or built without it)",
                  -95: "Landlock is built in but disabled (EOPNOTSUPP: add landlock to the lsm= "
                       "boot parameter)"}.get(abi, os.strerror(-abi))
        raise LandlockUnavailable(f"--landlock: {reason}")
    return abi


def handled_rights(abi: int) -> int:
    return _HANDLED_BY_ABI.get(abi, _ALL_KNOWN)


def runtime_rules() -> list[Rule]:
    """What the interpreter must still read after set-up: its own and the installed packages'
    code (modules are imported lazily), and the shared libraries under /usr and /lib."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr/lib", "/usr/lib64", "/lib", "/lib64",
             "/usr/local/lib"}
    paths.update(entry for entry in sys.path if entry)
    return [Rule(path, "r") for path in sorted(paths) if os.path.exists(path)]


def create_ruleset(rules: Iterable[Rule]) -> int:
    """A ruleset fd allowing ``rules``; paths that do not exist are refused by name."""
    lib = _native()
    handled = handled_rights(abi_version())
    ruleset = int(lib.vmmkit_landlock_create(handled))
    if ruleset < 0:
        raise VmmError(f"landlock_create_ruleset: {os.strerror(-ruleset)}")
    try:
        for rule in rules:
            _add(lib, ruleset, rule, handled)
    except BaseException:
        os.close(ruleset)
        raise
    return ruleset


def _add(lib: Any, ruleset: int, rule: Rule, handled: int) -> None:
    try:
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise VmmError(f"landlock rule {rule.path}: {exc.strerror}") from None
    try:
        rights = ACCESS[rule.access] & handled
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        if rights:
            done = int(lib.vmmkit_landlock_add_path(ruleset, fd, rights))
            if done < 0:
                raise VmmError(f"landlock rule {rule.path}: {os.strerror(-done)}")
    finally:
        os.close(fd)


def restrict_self(ruleset: int) -> None:
    """Enter the ruleset's domain (the calling thread, and the threads it starts)."""
    done = int(_native().vmmkit_landlock_restrict(ruleset))
    if done < 0:
        raise VmmError(f"landlock_restrict_self: {os.strerror(-done)}")


def vm_rules(config: Any) -> list[Rule]:
    """The paths a ``VmConfig`` names, with the access the VM needs: the payload (read again
    at each reboot), the disks, the pmem files, the files and sockets of its consoles, the entropy source, the
    devices it opens, and ``landlock_rules``."""
    rules: list[Rule] = []
    payload = config.payload
    for name in (payload.kernel, payload.initramfs, payload.firmware):
        if name:
            rules.append(Rule(name, "r"))
    for disk in config.disks:
        if disk.path:
            rules.append(Rule(disk.path, "r" if disk.readonly else "rw"))
    for pmem in config.pmem:  # mapped at boot; a flush only fsyncs the open file
        rules.append(Rule(pmem.file, "r" if pmem.discard_writes else "rw"))
    for name in (config.serial.file, config.serial.socket, config.console.file, config.console.socket):
        if name and os.path.exists(name):
            rules.append(Rule(name, "rw"))
    for device in ("/dev/kvm", "/dev/mshv", "/dev/net/tun", "/dev/null", "/dev/urandom"):
        if os.path.exists(device):
            rules.append(Rule(device, "rw"))
    rules.extend(Rule(rule.path, rule.access) for rule in config.landlock_rules)
    return [Rule(str(Path(rule.path)), rule.access) for rule in rules]
