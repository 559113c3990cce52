"""The watchdog judged by Linux's ``i6300esb`` driver: ``--watchdog`` gives the guest a 6300ESB
on PCI; ``watchdog_init.sh`` arms it (2 s), pets it for 4 s and stops, as a hung guest
would. The VMM must reset the VM (the event monitor says why); Linux boots again and its driver
reads the device's timed-out flag (``WDIOC_GETBOOTSTATUS`` answers ``WDIOF_CARDRESET``). The
same initramfs under QEMU's 6300ESB model (``-device i6300esb``, TCG) is the reference, so the
guest program and the expectations are checked against a peer's device, not only ours.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from initramfs import Entry, initramfs_entries, missing_busybox_reason, newc_archive
from linuxboot import BASE_CMDLINE, LINUX_DIR, QEMU, Boot, BootResult, linux_missing_reason, scaled_timeout

from vmmkit.events import read_events
from vmmkit.testing import kvm_unusable_reason

pytestmark = [pytest.mark.slow]

HERE = Path(__file__).resolve().parent
PREFIX = "VMMKIT-WDT: "
#: Two Linux boots (each ~40-90 s on a kvm_pvm host) and the unpetted watchdog: 2 s of guest
#: time (a kvm_pvm guest's clock runs 10x slower, and the device counts in guest time);
#: ``VMMKIT_LINUX_TIMEOUT_FACTOR`` stretches it on a host shared with other work.
TIMEOUT = scaled_timeout(420.0)
CMDLINE = BASE_CMDLINE


def wdt_lines(result: BootResult) -> list[str]:
    return [line.split(PREFIX, 1)[1] for _, line in result.lines if PREFIX in line]


def build_initramfs(directory: Path) -> Path:
    """busybox, ``watchdog_init.sh`` as ``/init`` and ``/bin/wdt`` (``guest_src/wdt.c``, static)."""
    for reason in (linux_missing_reason(LINUX_DIR), missing_busybox_reason()):
        if reason:
            pytest.skip(reason)
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the guest's wdt program cannot be built")
    program = directory / "wdt"
    built = subprocess.run(["gcc", "-static", "-Os", "-Wall", "-o", str(program), str(HERE / "guest_src" / "wdt.c")],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build the static guest program (glibc's static library missing?): {built.stderr[-500:]}")
    entries = initramfs_entries(init=HERE / "watchdog_init.sh")
    entries.append(Entry("bin/wdt", stat.S_IFREG | 0o755, program.read_bytes()))
    path = directory / "watchdog.cpio"
    path.write_bytes(newc_archive(entries))
    return path


FIRST_BOOT = ["bootstatus 0 identity i6300ESB timer", "armed 2", "stopped"]


def assert_reset_by_the_watchdog(result: BootResult) -> None:
    """The whole story: petted for 4 s of a 2 s timeout, then reset, and the next boot's driver
    reads that the watchdog did it."""
    lines = wdt_lines(result)
    assert lines[:3] == FIRST_BOOT, result.describe()
    assert lines[3:] == ["bootstatus 32 identity i6300ESB timer", "done"], result.describe()
    assert result.output.count("Linux version") == 2, result.describe()
    assert result.returncode == 0, result.describe()


@pytest.mark.requires_kvm
def test_a_guest_that_stops_petting_the_watchdog_is_reset(tmp_path: Path) -> None:
    """Linux pets the device for twice its timeout (so the pings reach it), stops, and the VMM
    resets the VM; Linux boots again, its driver reads that the watchdog did it and powers off.
    The event monitor tells the same story."""
    if reason := kvm_unusable_reason():
        pytest.skip(reason)
    initramfs = build_initramfs(tmp_path)
    events = tmp_path / "events.json"
    boot = Boot("watchdog", [
        sys.executable, "-m", "vmmkit", "--hypervisor", "kvm", "--kernel", str(LINUX_DIR / "vmlinux"),
        "--initramfs", str(initramfs), "--cpus", "boot=1", "--memory", "size=128M", "--serial", "tty",
        "--console", "off", "--watchdog", "--cmdline", CMDLINE, "--event-monitor", f"path={events}",
    ], timeout=TIMEOUT)
    assert_reset_by_the_watchdog(boot.wait())
    names = [(e["source"], e["event"]) for e in read_events(events.read_text())]
    assert ("guest", "watchdog-expired") in names, names
    expired = names.index(("guest", "watchdog-expired"))
    vm_after = [name for name in names[expired + 1:] if name[0] == "vm"]  # devices reset in between
    assert vm_after[:2] == [("vm", "rebooting"), ("vm", "rebooted")], names
    assert names.count(("guest", "watchdog-expired")) == 1, names  # the second boot stopped it in time


def test_the_same_guest_under_qemus_i6300esb(tmp_path: Path) -> None:
    """The reference: QEMU's model (its default watchdog action is a reset) with TCG."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    initramfs = build_initramfs(tmp_path)
    boot = Boot("watchdog-qemu", [
        QEMU, "-accel", "tcg", "-M", "pc", "-cpu", "max", "-m", "128M", "-nodefaults", "-no-user-config",
        "-nographic", "-serial", "stdio", "-device", "i6300esb", "-kernel", str(LINUX_DIR / "bzImage"),
        "-initrd", str(initramfs), "-append", CMDLINE,
    ], timeout=TIMEOUT)
    assert_reset_by_the_watchdog(boot.wait())
