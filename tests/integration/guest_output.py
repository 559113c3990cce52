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


def run_qemu_x86(kernel: Path, cmdline: str, cpus: int, *, machine: str = "microvm,rtc=on", accel: str = "kvm",
                 memory: str = "128M", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """QEMU ``-M machine`` booting ``kernel`` (the guest's ACPI power-off ends it)."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    return subprocess.run(
        [qemu, "-M", machine, "-accel", accel, "-m", memory, "-smp", str(cpus), "-nodefaults",
         "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", str(kernel), "-append", cmdline],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def run_qemu_microvm(kernel: Path, cmdline: str, cpus: int, accel: str = "kvm", memory: str = "128M",
                     timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_qemu_x86(kernel, cmdline, cpus, accel=accel, memory=memory, timeout=timeout)


#: The machine to compare ``test=pit`` with. QEMU 7.2's microvm builds a MADT without the
#: interrupt source override for IRQ 0 (so the guest listens on IOAPIC pin 0) while its PIT
#: arrives on pin 2 (QEMU's IOAPIC model and its KVM routing both move IRQ 0 there), and its
#: MP table says pin 2: the guest rightly fails there. q35 (SeaBIOS) says pin 2 in both tables.
PIT_PEER_MACHINE = "q35"
