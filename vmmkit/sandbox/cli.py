"""The command's sandbox options: ``--seccomp`` (Cloud Hypervisor's), and the main thread's
own confinement once the VM is set up."""

from __future__ import annotations

import argparse

from vmmkit.sandbox import SECCOMP_MODES, VMM, enter_thread, no_new_privs


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sandbox")
    group.add_argument("--seccomp", choices=SECCOMP_MODES, default=None,
                       help="per-thread seccomp filters: true (default; a forbidden system call "
                            "stops the VMM, naming it), log (log it and go on), false")
    group.add_argument("--landlock", dest="landlock_enable", action="store_true",
                       help="after set-up, reach only the files the VM names and --landlock-rules")
    group.add_argument("--landlock-rules", dest="landlock_rules", action="append", default=[],
                       metavar="SPEC", help="path=<path>,access=r|w|rw: also reachable under --landlock")


def confine_main_thread() -> None:
    """Set-up is done: no new privileges, and the main thread (which handles signals and
    tears the VM down) takes the ``vmm`` filter and the Landlock domain."""
    no_new_privs()
    enter_thread(VMM)
