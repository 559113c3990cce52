#!/usr/bin/env python3
"""Measure what each kind of vmmkit thread calls, to derive and check the seccomp allow lists
(``vmmkit/sandbox/syscalls.py``; see ``docs/seccomp.md``).

Two ways, both run a command (by default a pytest subset) and print, per thread kind, the
system calls seen and those its allow list lacks:

``strace``
    ``strace -f -o <trace>`` the command with ``VMMKIT_SECCOMP=log`` (so every VMM thread names
    itself with ``prctl(PR_SET_NAME)`` as it enters its sandbox); each traced thread is
    attributed to a kind by that name, and ``strace -c``-style counts are printed.
``audit``
    run the command with ``VMMKIT_SECCOMP=log`` and read the kernel's seccomp audit records
    (``type=1326``, ``dmesg``) it caused: exactly the calls the filters lack, by thread name.
    This is cheap enough for the Linux tier.

    .venv/bin/python scripts/seccomp-measure.py strace -- -q tests/integration/api/test_api_hotplug.py
    .venv/bin/python scripts/seccomp-measure.py audit -- -q tests/linux
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmmkit.sandbox import seccomp, syscalls  # noqa: E402

#: Thread names (as vmmkit's threads call themselves) -> kind.
KIND_OF_NAME = [
    (re.compile(r"^vcpu\d+$"), syscalls.VCPU),
    (re.compile(r"^api-(server|conn)$"), syscalls.API),
    (re.compile(r"^vmm-events$"), syscalls.EVENT_LOOP),
    (re.compile(r"^(vmm-control|vmm-exit|vm-watch|event-monitor|kvm-quirks)$"), syscalls.VMM),
]
_NAME = re.compile(r'^(\d+)\s+prctl\(PR_SET_NAME, "([^"]*)"')
_CALL = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)\(")
_AUDIT = re.compile(r'type=1326 .*?pid=(\d+) comm="([^"]*)".*? syscall=(\d+) ')


def kind_of(name: str) -> str:
    for pattern, kind in KIND_OF_NAME:
        if pattern.match(name):
            return kind
    return syscalls.DEVICE  # queue workers (<id>_q<n>), device timers (<id>-pit, <id>-rtc)


def pytest_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", *args]


def measure_strace(command: list[str]) -> dict[str, collections.Counter[str]]:
    with tempfile.TemporaryDirectory(prefix="vmmkit-strace-") as tmp:
        trace = Path(tmp) / "trace"
        env = {**os.environ, "VMMKIT_SECCOMP": "log"}
        subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "--", *command], env=env, check=False)
        kinds: dict[str, str] = {}
        seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        with trace.open(errors="replace") as lines:
            for line in lines:
                if named := _NAME.match(line):
                    kinds[named[1]] = kind_of(named[2])
                    continue
                call = _CALL.match(line)
                if call and call[1] in kinds:
                    seen[kinds[call[1]]][call[2]] += 1
        return seen


def measure_audit(command: list[str]) -> dict[str, collections.Counter[str]]:
    def records() -> list[str]:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
        return [line for line in out.splitlines() if "type=1326" in line]

    before = len(records())
    subprocess.run(command, env={**os.environ, "VMMKIT_SECCOMP": "log"}, check=False)
    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in records()[before:]:
        if match := _AUDIT.search(line):
            number = int(match[3])
            name = seccomp.syscall_name(number)
            seen[f"{kind_of(match[2])} ({match[2]})"][name] += 1
    return seen


def report(seen: dict[str, collections.Counter[str]], *, audit: bool) -> int:
    missing_any = 0
    for kind in sorted(seen):
        counts = seen[kind]
        base_kind = kind.split(" ")[0]
        missing = sorted(counts) if audit else sorted(set(counts) - syscalls.allowed(base_kind) - {"clone", "prctl",
                                                                                                    "clone3"})
        missing_any += len(missing)
        print(f"{kind}: {len(counts)} distinct calls, {sum(counts.values())} in all")
        if not audit:
            print("  " + " ".join(f"{name}:{count}" for name, count in counts.most_common()))
        print(f"  not in the allow list: {' '.join(missing) or '-'}")
    if not seen:
        print("no vmmkit thread seen" if not audit else "no seccomp audit record: the allow lists covered it")
    return 1 if missing_any else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("how", choices=("strace", "audit"))
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments")
    args = parser.parse_args()
    command = pytest_command(args.pytest_args or ["-q", "tests/integration/api"])
    seen = measure_strace(command) if args.how == "strace" else measure_audit(command)
    return report(seen, audit=args.how == "audit")


if __name__ == "__main__":
    sys.exit(main())
