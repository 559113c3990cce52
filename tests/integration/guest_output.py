"""Reading the test guest's serial output (format: tests/guests/README.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

PREFIX = "selftest: "


def selftest_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith(PREFIX)]


def stable_lines(output: str) -> list[str]:
    """The lines every correct VMM must produce identically: informational lines dropped, and
    the APs' report-in lines (whose order is a race) sorted."""
    lines = [line for line in selftest_lines(output) if not line.startswith(PREFIX + "info")]
    online = sorted(line for line in lines if line.endswith(" online") and line.startswith(PREFIX + "cpu "))
    rest = [line for line in lines if line not in online]
    return rest + online


def run_qemu_microvm(kernel: Path, cmdline: str, cpus: int, accel: str = "kvm", memory: str = "128M",
                     timeout: float = 60) -> subprocess.CompletedProcess[str]:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    return subprocess.run(
        [qemu, "-M", "microvm,rtc=on", "-accel", accel, "-m", memory, "-smp", str(cpus), "-nodefaults",
         "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", str(kernel), "-append", cmdline],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
