"""The test guest's virtio drivers (tests/guests/virtio) against QEMU's real virtio devices:
virtio-mmio on ``-M microvm`` and modern virtio-pci on ``-M q35``. One boot per transport runs
``test=virtio,blk,net,console,rng``; the host side checks what the devices' backends saw: the
block pattern in the image file, the ping frames on a tap (inside a network namespace this
test creates, answered by :class:`netns.PingResponder`), the console's output file.

The same checks apply to any VMM given the same devices (see qemu_peer.py / netns.py).
QEMU runs with KVM when /dev/kvm opens, else TCG (``VMMKIT_QEMU_ACCEL`` overrides). Without
root (namespaces, taps) the net device is left out and its test skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from .guest_output import selftest_lines, stable_lines
from .netns import NetNamespace, PingResponder, unavailable_reason
from .qemu_peer import (
    CONSOLE_LINE,
    CONSOLE_OK_LINE,
    GUEST_MAC,
    MICROVM_MMIO_BASE,
    NET_OK_LINE,
    PCI_SLOTS,
    RNG_OK_LINE,
    SECTOR,
    QemuCommand,
    QemuRun,
    VirtioSetup,
    blk_ok_line,
    check_blk_image,
    make_disk,
    qemu_virtio_command,
    run_qemu,
)

pytestmark = pytest.mark.requires_qemu

DISK_SIZE = 4 << 20
SERIAL = "vmmkit-blk0"


@dataclass
class Boot:
    transport: str
    run: QemuRun
    disk: Path
    console: Path
    responder: PingResponder | None
    no_net: str | None  #: why the guest had no net device

    @property
    def lines(self) -> list[str]:
        return selftest_lines(self.run.stdout)

    def explain(self) -> str:
        return (f"$ {' '.join(self.run.command.argv)}\n--- stdout ---\n{self.run.stdout}"
                f"--- stderr ---\n{self.run.stderr}")


@pytest.fixture(scope="module", params=["mmio", "pci"])
def boot(request: pytest.FixtureRequest, guest_elf: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Boot:
    """One QEMU boot per transport with all four devices (net only where a network namespace
    with a tap can be made) running every virtio test."""
    transport = request.param
    tmp = tmp_path_factory.mktemp(f"virtio-{transport}")
    disk = make_disk(tmp / "disk.img", DISK_SIZE)
    console = tmp / "console.out"

    def command(net: bool) -> QemuCommand:
        tests = ["virtio", "blk", *(["net"] if net else []), "console", "rng"]
        setup = VirtioSetup(blk_image=disk, blk_serial=SERIAL, console_file=console, rng=True,
                            net_tap="tap0" if net else None)
        return qemu_virtio_command(guest_elf, tests, setup, transport=transport)

    no_net = unavailable_reason()
    if no_net is None:
        try:
            with NetNamespace() as ns, ns.responder(ns.add_tap("tap0")) as responder:
                run = run_qemu(command(True), prefix=ns.exec_prefix())
            return Boot(transport, run, disk, console, responder, None)
        except (OSError, RuntimeError) as exc:
            no_net = f"cannot set up a network namespace with a tap: {exc}"
    return Boot(transport, run_qemu(command(False)), disk, console, None, no_net)


def test_the_guest_runs_every_test_and_exits_0(boot: Boot) -> None:
    assert [line for line in boot.lines if "FAIL" in line] == [], boot.explain()
    assert boot.lines[-1:] == ["selftest: exit 0"], boot.explain()
    assert boot.run.status == 0, boot.explain()


def test_the_devices_are_found_where_qemu_put_them(boot: Boot) -> None:
    expected = "selftest: ok virtio (4 devices: net blk console rng)" if boot.responder else \
        "selftest: ok virtio (3 devices: blk console rng)"
    assert expected in boot.lines, boot.explain()
    kinds = ["blk", "console", "rng", *(["net"] if boot.responder else [])]
    for kind in kinds:
        if boot.transport == "pci":
            where = f"pci 00:{PCI_SLOTS[kind]:02x}.0"
        else:
            base, irq = boot.run.command.mmio[kind]
            assert MICROVM_MMIO_BASE <= base
            where = f"mmio {base:#x} irq {irq}"
        assert f"selftest: info virtio: {where} {kind}" in boot.lines, boot.explain()


def test_blk_writes_the_pattern_flushes_and_reads_it_back(boot: Boot) -> None:
    assert blk_ok_line(DISK_SIZE // SECTOR, SERIAL) in boot.lines, boot.explain()
    assert check_blk_image(boot.disk) == []


def test_net_pings_are_answered(boot: Boot) -> None:
    if boot.responder is None:
        pytest.skip(f"no net device: {boot.no_net}")
    assert NET_OK_LINE in boot.lines, boot.explain()
    assert sorted(set(boot.responder.pings)) == [1, 2, 3]
    assert boot.responder.macs == {bytes.fromhex(GUEST_MAC.replace(":", ""))}
    assert boot.responder.destinations == {b"\xff" * 6}
    assert boot.responder.errors == []


def test_console_line_reaches_the_backend(boot: Boot) -> None:
    assert CONSOLE_OK_LINE in boot.lines, boot.explain()
    assert boot.console.read_text() == CONSOLE_LINE


def test_rng_gives_bytes(boot: Boot) -> None:
    assert RNG_OK_LINE in boot.lines, boot.explain()


def test_both_transports_print_the_same_stable_lines(guest_elf: Path, tmp_path: Path) -> None:
    """Apart from info lines (addresses) the output does not depend on the transport."""
    outputs = []
    for transport in ("mmio", "pci"):
        setup = VirtioSetup(blk_image=make_disk(tmp_path / f"{transport}.img", 1 << 20), rng=True,
                            console_file=tmp_path / f"{transport}.out")
        run = run_qemu(qemu_virtio_command(guest_elf, ["virtio", "blk", "console", "rng"], setup,
                                           transport=transport))
        assert run.status == 0, run.stdout + run.stderr
        outputs.append([line for line in stable_lines(run.stdout)
                        if line.startswith(("selftest: ok virtio", "selftest: ok blk",
                                            "selftest: ok console", "selftest: ok rng"))])
    assert len(outputs[0]) == 4
    assert outputs[0] == outputs[1]


def test_the_guest_assigns_pci_bars_itself_when_asked(guest_elf: Path, tmp_path: Path) -> None:
    """The firmware-less path: BARs (re)assigned by the guest, here from a window above 4 GiB
    (which also needs the guest to map MMIO beyond its boot-time 4 GiB identity map)."""
    disk = make_disk(tmp_path / "disk.img", 1 << 20)
    setup = VirtioSetup(blk_image=disk, rng=True)
    command = qemu_virtio_command(
        guest_elf, ["blk", "rng"], setup, transport="pci",
        extra_cmdline="virtio_pci.assign=all virtio_pci.window=1G@0x800000000")
    run = run_qemu(command)
    lines = selftest_lines(run.stdout)
    assert run.status == 0, run.stdout + run.stderr
    assert "selftest: info virtio: pci 00:03.0: bar 4 assigned 0x800000000 (16 KiB)" in lines
    assert blk_ok_line((1 << 20) // SECTOR, SERIAL) in lines
    assert check_blk_image(disk) == []


def test_a_missing_device_is_a_failure(guest_elf: Path) -> None:
    run = run_qemu(qemu_virtio_command(guest_elf, ["blk", "net", "console", "rng"], VirtioSetup()))
    lines = selftest_lines(run.stdout)
    assert "selftest: FAIL blk: no virtio-blk device" in lines
    assert "selftest: FAIL net: no virtio-net device" in lines
    assert "selftest: FAIL console: no virtio-console device" in lines
    assert "selftest: FAIL rng: no virtio-rng device" in lines
    assert run.status == 4


def test_legacy_virtio_mmio_devices_are_not_used(guest_elf: Path, tmp_path: Path) -> None:
    command = qemu_virtio_command(guest_elf, ["virtio"], VirtioSetup(rng=True))
    argv = [arg for arg in command.argv if arg != "virtio-mmio.force-legacy=false"]
    argv.remove("-global")
    run = run_qemu(type(command)(argv, command.cmdline, command.machine, command.mmio))
    base, irq = command.mmio["rng"]
    assert f"selftest: info virtio: mmio {base:#x} irq {irq} rng: version 1 (legacy), not supported" \
        in selftest_lines(run.stdout), run.stdout
    assert "selftest: ok virtio (0 devices)" in selftest_lines(run.stdout)
