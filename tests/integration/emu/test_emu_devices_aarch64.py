"""vmmkit's virtio devices on AArch64 over virtio-mmio (issue 17 item 8), on the emu backend,
judged by the AArch64 test guest's drivers, and the same drivers against QEMU's devices on
``-M virt`` (TCG) as the cross-check: one boot each running ``test=virtio,blk,net,console,rng``
with the devices found through the device tree's ``virtio,mmio`` nodes. The host side checks
what really happened, as the x86 tests do (test_virtio_vmmkit.py): the block pattern in the
image file, the ping frames answered on a tap inside a network namespace, the console's file.
Both VMMs must print the same stable lines.

(The emu backend delivers no interrupts: the guest's drivers poll the used rings. Interrupts
through the in-kernel GICv3 are the lab's part, tests/lab.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..guest_output import selftest_lines, stable_lines
from ..netns import NetNamespace, PingResponder, unavailable_reason
from ..qemu_peer import (
    CONSOLE_LINE,
    CONSOLE_OK_LINE,
    GUEST_MAC,
    NET_OK_LINE,
    RNG_OK_LINE,
    SECTOR,
    blk_ok_line,
    check_blk_image,
    make_disk,
)

GUEST_ARCH = "aarch64"

DISK_SIZE = 4 << 20
SERIAL = "vmmkit-blk0"
TAP = "tap0"
TESTS = ("virtio", "blk", "net", "console", "rng")


@dataclass
class Boot:
    who: str
    stdout: str
    stderr: str
    returncode: int
    disk: Path
    console: Path
    responder: PingResponder | None
    no_net: str | None  #: why the guest had no net device

    @property
    def lines(self) -> list[str]:
        return selftest_lines(self.stdout)

    def explain(self) -> str:
        return f"--- {self.who} stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"


def vmmkit_argv(kernel: Path, disk: Path, console: Path, hypervisor: str, net: bool) -> list[str]:
    tests = [t for t in TESTS if net or t != "net"]
    argv = [sys.executable, "-m", "vmmkit", "--hypervisor", hypervisor, "--kernel", str(kernel),
            "--memory", "size=128M", "--cmdline", f"test={','.join(tests)}",
            "--platform", "virtio_transport=mmio", "--disk", f"path={disk},serial={SERIAL}",
            "--console", f"file={console}", "--rng", "src=/dev/urandom"]
    return argv + (["--net", f"tap={TAP},mac={GUEST_MAC}"] if net else [])


def qemu_virt_argv(kernel: Path, disk: Path, console: Path, net: bool) -> list[str]:
    """QEMU's ``virt`` machine creates its virtio-mmio transports itself (in its device tree);
    ``-device virtio-*-device`` plugs into them, modern (not legacy) mmio."""
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        pytest.skip("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    tests = [t for t in TESTS if net or t != "net"]
    argv = [qemu, "-M", "virt", "-cpu", "cortex-a72", "-m", "128M", "-nodefaults", "-no-user-config",
            "-nographic", "-serial", "stdio", "-global", "virtio-mmio.force-legacy=false",
            "-drive", f"file={disk},format=raw,if=none,id=blk0,cache=writeback",
            "-device", f"virtio-blk-device,drive=blk0,serial={SERIAL}",
            "-chardev", f"file,id=con0,path={console}", "-device", "virtio-serial-device",
            "-device", "virtconsole,chardev=con0",
            "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0",
            "-kernel", str(kernel), "-append", f"test={','.join(tests)}"]
    if net:
        argv += ["-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no",
                 "-device", f"virtio-net-device,netdev=net0,mac={GUEST_MAC}"]
    return argv


def boot_in_netns(who: str, tmp: Path, argv_for: Callable[[Path, Path, bool], list[str]]) -> Boot:
    """Run the VMM that ``argv_for(disk, console, net)`` names, inside a network namespace with
    a tap and a ping responder where one can be made, else without the net device."""
    disk = make_disk(tmp / "disk.img", DISK_SIZE)
    console = tmp / "console.out"
    no_net = unavailable_reason()
    if no_net is None:
        with NetNamespace() as ns, ns.responder(ns.add_tap(TAP)) as responder:
            result = ns.run(argv_for(disk, console, True), timeout=300)
        return Boot(who, result.stdout, result.stderr, result.returncode, disk, console, responder, None)
    result = subprocess.run(argv_for(disk, console, False), capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    return Boot(who, result.stdout, result.stderr, result.returncode, disk, console, None, no_net)


@pytest.fixture(scope="module")
def vmmkit_boot(selftest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    return boot_in_netns("vmmkit", tmp_path_factory.mktemp("emu-a64-devices"),
                         lambda disk, console, net: vmmkit_argv(selftest_image, disk, console, "emu", net))


@pytest.fixture(scope="module")
def qemu_boot(selftest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    return boot_in_netns("qemu", tmp_path_factory.mktemp("qemu-a64-devices"),
                         lambda disk, console, net: qemu_virt_argv(selftest_image, disk, console, net))


@pytest.fixture(params=["vmmkit", "qemu"])
def boot(request: pytest.FixtureRequest, vmmkit_hypervisor: str) -> Boot:
    """Each VMM's boot (``vmmkit_hypervisor``: emu, or a skip naming what the environment targets)."""
    result: Boot = request.getfixturevalue(f"{request.param}_boot")
    return result


def test_every_virtio_test_passes(boot: Boot) -> None:
    assert [line for line in boot.lines if "FAIL" in line] == [], boot.explain()
    assert boot.lines[-1:] == ["selftest: exit 0"], boot.explain()
    assert boot.returncode == 0, boot.explain()
    devices = "4 devices: net blk console rng" if boot.responder else "3 devices: blk console rng"
    assert f"selftest: ok virtio ({devices})" in boot.lines, boot.explain()
    assert all(" mmio 0x" in line for line in boot.lines if line.startswith("selftest: info virtio: ")), \
        boot.explain()


def test_blk_pattern_is_in_the_image_file_on_the_host(boot: Boot) -> None:
    assert blk_ok_line(DISK_SIZE // SECTOR, SERIAL) in boot.lines, boot.explain()
    assert check_blk_image(boot.disk) == []


def test_net_frames_cross_the_tap(boot: Boot) -> None:
    if boot.responder is None:
        pytest.skip(f"no net device: {boot.no_net}")
    assert NET_OK_LINE in boot.lines, boot.explain()
    assert sorted(set(boot.responder.pings)) == [1, 2, 3]
    assert boot.responder.macs == {bytes.fromhex(GUEST_MAC.replace(":", ""))}
    assert boot.responder.errors == []


def test_console_and_rng(boot: Boot) -> None:
    assert CONSOLE_OK_LINE in boot.lines and RNG_OK_LINE in boot.lines, boot.explain()
    assert boot.console.read_text() == CONSOLE_LINE


def test_vmmkit_and_qemu_print_the_same_stable_lines(vmmkit_hypervisor: str, vmmkit_boot: Boot,
                                                     qemu_boot: Boot) -> None:
    assert stable_lines(qemu_boot.stdout), qemu_boot.explain()
    assert stable_lines(vmmkit_boot.stdout) == stable_lines(qemu_boot.stdout), \
        vmmkit_boot.explain() + qemu_boot.explain()
