"""vmmkit's own virtio devices (blk, net, console, rng) on both transports, driven by the test
guest's drivers — the same drivers that pass against QEMU's devices in
test_guest_virtio_qemu.py — with the host side checking what really happened: the block
pattern in the image file, ping frames answered on the tap inside a network namespace, the
console's output file. Both peers must print the same stable lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

from .guest_output import selftest_lines
from .netns import NetNamespace, PingResponder, unavailable_reason
from .qemu_peer import (
    CONSOLE_LINE,
    CONSOLE_OK_LINE,
    GUEST_MAC,
    NET_OK_LINE,
    RNG_OK_LINE,
    SECTOR,
    VirtioSetup,
    blk_ok_line,
    check_blk_image,
    make_disk,
    qemu_available,
    qemu_virtio_command,
    run_qemu,
)

GUEST_ARCH = "x86_64"  # what vmmkit_hypervisor resolves for (see vmmkit.testing)

pytestmark = pytest.mark.requires_kvm

DISK_SIZE = 4 << 20
SERIAL = "vmmkit-blk0"
TESTS = ("virtio", "blk", "net", "console", "rng")


@dataclass
class Boot:
    transport: str
    stdout: str
    stderr: str
    returncode: int
    disk: Path
    console: Path
    responder: PingResponder | None
    no_net: str | None

    @property
    def lines(self) -> list[str]:
        return selftest_lines(self.stdout)

    def explain(self) -> str:
        return f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"


def vmmkit_args(kernel: Path, disk: Path, console: Path, transport: str, hypervisor: str, net: bool) -> list[str]:
    tests = [t for t in TESTS if net or t != "net"]
    args = ["--hypervisor", hypervisor, "--kernel", str(kernel), "--memory", "size=128M",
            "--cmdline", f"test={','.join(tests)}", "--platform", f"virtio_transport={transport}",
            "--disk", f"path={disk},serial={SERIAL}", "--console", f"file={console}", "--rng", "src=/dev/urandom"]
    if net:
        args += ["--net", f"tap=tap0,mac={GUEST_MAC}"]
    return args


@pytest.fixture(scope="module", params=["mmio", "pci"])
def boot(request: pytest.FixtureRequest, selftest_elf: Path, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    import sys

    from vmmkit.plugin import collect_registries, make_plugin_manager
    from vmmkit.testing import selected_backend

    name, arch = selected_backend()
    try:
        hypervisor = collect_registries(make_plugin_manager()).select_hypervisor(name, arch).name
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    transport = request.param
    tmp = tmp_path_factory.mktemp(f"vmmkit-virtio-{transport}")
    disk = make_disk(tmp / "disk.img", DISK_SIZE)
    console = tmp / "console.out"
    no_net = unavailable_reason()
    if no_net is None:
        with NetNamespace() as ns, ns.responder(ns.add_tap("tap0")) as responder:
            result = ns.run([sys.executable, "-m", "vmmkit",
                             *vmmkit_args(selftest_elf, disk, console, transport, hypervisor, True)], timeout=120)
        return Boot(transport, result.stdout, result.stderr, result.returncode, disk, console, responder, None)
    result = run_vmmkit(*vmmkit_args(selftest_elf, disk, console, transport, hypervisor, False), timeout=120)
    return Boot(transport, result.stdout, result.stderr, result.returncode, disk, console, None, no_net)


def test_every_virtio_test_passes_and_the_vmm_exits_0(boot: Boot) -> None:
    assert [line for line in boot.lines if "FAIL" in line] == [], boot.explain()
    assert boot.returncode == 0, boot.explain()
    assert boot.lines[-1:] == ["selftest: exit 0"], boot.explain()


def test_blk_pattern_is_in_the_image_file_on_the_host(boot: Boot) -> None:
    assert blk_ok_line(DISK_SIZE // SECTOR, SERIAL) in boot.lines, boot.explain()
    assert check_blk_image(boot.disk) == []


def test_net_frames_cross_the_tap(boot: Boot) -> None:
    if boot.responder is None:
        pytest.skip(f"no net device: {boot.no_net}")
    assert NET_OK_LINE in boot.lines, boot.explain()
    assert sorted(set(boot.responder.pings)) == [1, 2, 3]
    assert boot.responder.macs == {bytes.fromhex(GUEST_MAC.replace(":", ""))}


def test_console_and_rng(boot: Boot) -> None:
    assert CONSOLE_OK_LINE in boot.lines and RNG_OK_LINE in boot.lines, boot.explain()
    assert boot.console.read_text() == CONSOLE_LINE


@pytest.mark.requires_qemu
@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_qemu_and_vmmkit_devices_give_the_guest_the_same_results(
    transport: str, selftest_elf: Path, tmp_path: Path, vmmkit_hypervisor: str
) -> None:
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed")
    tests = ["blk", "console", "rng"]
    ours = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf), "--cmdline",
                      f"test={','.join(tests)}", "--platform", f"virtio_transport={transport}",
                      "--disk", f"path={make_disk(tmp_path / 'a.img', 1 << 20)},serial={SERIAL}",
                      "--console", f"file={tmp_path / 'a.out'}", timeout=120)
    setup = VirtioSetup(blk_image=make_disk(tmp_path / "b.img", 1 << 20), blk_serial=SERIAL, rng=True,
                        console_file=tmp_path / "b.out")
    theirs = run_qemu(qemu_virtio_command(selftest_elf, tests, setup, transport=transport))

    def results(output: str) -> list[str]:
        return [line for line in selftest_lines(output) if line.startswith(("selftest: ok", "selftest: FAIL"))
                and not line.startswith(("selftest: ok smp", "selftest: ok rtc", "selftest: ok memmap",
                                         "selftest: ok acpi"))]

    assert results(ours.stdout) == results(theirs.stdout), ours.stdout + theirs.stdout
    assert len(results(ours.stdout)) == 3


def test_the_event_monitor_reports_device_activation(selftest_elf: Path, tmp_path: Path,
                                                     vmmkit_hypervisor: str) -> None:
    from vmmkit.events import read_events

    events_file = tmp_path / "events.json"
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf), "--cmdline", "test=blk",
                        "--disk", f"path={make_disk(tmp_path / 'd.img', 1 << 20)},id=disk0",
                        "--event-monitor", f"path={events_file}", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    events = [(e["source"], e["event"], (e.get("properties") or {}).get("id"))
              for e in read_events(events_file.read_text())]
    assert ("virtio-device", "activated", "disk0") in events
    assert events.index(("vm", "booted", None)) < events.index(("virtio-device", "activated", "disk0"))
