"""Hostile guests: the test guest's ``test=hostile`` (tests/guests/virtio/hostile.c) sends malformed
requests through the real rings of a virtio-blk device (and of virtio-rng and virtio-console),
one scenario at a time, resetting the device between them, and reports what the device did:
an error status in the used ring, ``DEVICE_NEEDS_RESET``, or nothing. After each scenario the
device must start again and serve a valid request; at the end a valid write, flush and read-back
must work (``ok hostile (<n> scenarios, device still usable)``).

On vmmkit (both transports, ``-v --log-format json``) this checks that the VMM process survives
every scenario and exits 0, that each scenario has the outcome we expect of vmmkit's devices,
that the image file holds exactly what the valid requests wrote (the two hostile writes, past
the capacity and at a sector whose byte offset wraps 2^64, must not reach it), and that the log
has the device's error event, with the right kind, for every scenario the device refused.

The same guest runs under QEMU (microvm + virtio-mmio, q35 + virtio-pci). QEMU's behaviour is
recorded, not judged: where it dies or hangs on a scenario, the run is repeated without it
(``hostile.skip=``), and the outcomes are compared with what QEMU 7.2 was seen to do
(:data:`QEMU_7_2`); a QEMU that behaves differently makes that test skip with the differences.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

from .guest_output import selftest_lines
from .qemu_peer import (
    SECTOR,
    QemuCommand,
    VirtioSetup,
    blk_sector,
    make_disk,
    qemu_available,
    qemu_virtio_command,
)

DISK_SIZE = 4 << 20
SERIAL = "vmmkit-blk0"
#: The valid write at the end (hostile.c: FINAL_SECTOR, HOSTILE_SEED).
FINAL_SECTORS = (16, 17)
FINAL_SEED = 0x5EED0BAD

#: Every scenario, in the guest's order (hostile.c: scenarios[]).
SCENARIOS = (
    "addr-outside-ram", "addr-own-mmio", "addr-beyond-2^48", "addr-wraps-2^64", "header-outside-ram",
    "loop", "self-loop", "zero-len-header", "zero-len-data", "zero-len-status", "huge-len-header",
    "huge-len-data", "writable-header", "readonly-status", "flush-readonly-status", "head-out-of-range",
    "next-out-of-range", "avail-idx-jump", "notify-bad-queue", "indirect-not-negotiated", "indirect-nested",
    "indirect-oversized", "indirect-bad-len", "indirect-with-next", "indirect-loop", "indirect-too-many",
    "past-capacity-read", "past-capacity-write", "sector-overflow-write", "partial-sector", "unknown-type",
    "reset-in-flight", "features-unoffered", "ring-outside-ram", "ring-size-not-pow2", "rng-readonly-buffer",
    "console-tx-writable",
)

#: What vmmkit's devices do: (outcome, kind of the ``needs_reset`` log event's error or None).
#: Outcomes: the first word of the guest's line (hostile.c), "+NEEDS_RESET" when a used chain
#: also came with DEVICE_NEEDS_RESET; "a|b": either.
VMMKIT: dict[str, tuple[str, str | None]] = {
    "addr-outside-ram": ("NEEDS_RESET", "address"),
    "addr-own-mmio": ("NEEDS_RESET", "address"),
    "addr-beyond-2^48": ("NEEDS_RESET", "address"),
    "addr-wraps-2^64": ("NEEDS_RESET", "address"),
    "header-outside-ram": ("NEEDS_RESET", "address"),
    "loop": ("NEEDS_RESET", "loop"),
    "self-loop": ("NEEDS_RESET", "loop"),
    "zero-len-header": ("IOERR", None),  # header shorter than 16 bytes
    "zero-len-data": ("OK", None),  # a read of 0 bytes
    "zero-len-status": ("used", None),  # the last writable byte (data[511]) got IOERR: 511 bytes
    "huge-len-header": ("NEEDS_RESET", "address"),
    "huge-len-data": ("NEEDS_RESET", "too_large"),
    "writable-header": ("IOERR", None),  # no device-readable header
    "readonly-status": ("NEEDS_RESET", "order"),
    "flush-readonly-status": ("NEEDS_RESET", "device"),  # no writable byte: nowhere to answer
    "head-out-of-range": ("NEEDS_RESET", "index"),
    "next-out-of-range": ("NEEDS_RESET", "index"),
    "avail-idx-jump": ("NEEDS_RESET", "avail_index"),
    # a device may look at its rings without being told: "OK" if it happened to
    "notify-bad-queue": ("none|OK", None),
    "indirect-not-negotiated": ("NEEDS_RESET", "indirect"),
    "indirect-nested": ("NEEDS_RESET", "indirect"),
    "indirect-oversized": ("NEEDS_RESET", "indirect"),
    "indirect-bad-len": ("NEEDS_RESET", "indirect"),
    "indirect-with-next": ("NEEDS_RESET", "indirect"),
    "indirect-loop": ("NEEDS_RESET", "loop"),
    "indirect-too-many": ("NEEDS_RESET", "too_many"),  # 1100 segments > the queue's 1024
    "past-capacity-read": ("IOERR", None),
    "past-capacity-write": ("IOERR", None),
    "sector-overflow-write": ("IOERR", None),
    "partial-sector": ("IOERR", None),
    "unknown-type": ("UNSUPP", None),
    "reset-in-flight": ("reset", None),
    "features-unoffered": ("FEATURES_OK-refused", None),
    "ring-outside-ram": ("NEEDS_RESET", "ring"),  # refused at DRIVER_OK
    "ring-size-not-pow2": ("NEEDS_RESET", "ring"),
    "rng-readonly-buffer": ("NEEDS_RESET", "device"),
    "console-tx-writable": ("used", None),  # nothing to send: used with length 0
}
#: Both transports keep a queue size as written and refuse an invalid one at DRIVER_OK.
VMMKIT_PCI = VMMKIT

#: What QEMU 7.2 (Debian 1:7.2+dfsg-7+deb12u18) was seen to do, the same on microvm/virtio-mmio
#: and q35/virtio-pci. "hang" = QEMU stopped answering (the run was repeated without it).
QEMU_7_2 = {
    "addr-outside-ram": "OK",  # DMA to unassigned memory is dropped (a bounce buffer), status OK
    "addr-own-mmio": "hang",  # the read's DMA hits the device's own registers: status 0 resets
    #                           the device from inside its own request, and the reset drains the
    #                           request it is part of (main loop in aio_poll, vCPU waits for the BQL)
    "addr-beyond-2^48": "OK",
    "addr-wraps-2^64": "OK",
    "header-outside-ram": "OK",  # the header reads as zeros (a read of sector 0)
    "loop": "NEEDS_RESET",  # "Looped descriptor"
    "self-loop": "NEEDS_RESET",
    "zero-len-header": "NEEDS_RESET",  # "virtio: zero sized buffers are not allowed"
    "zero-len-data": "NEEDS_RESET",
    "zero-len-status": "NEEDS_RESET",
    "huge-len-header": "NEEDS_RESET",
    "huge-len-data": "NEEDS_RESET",
    "writable-header": "NEEDS_RESET",  # "virtio-blk missing headers"
    "readonly-status": "NEEDS_RESET",
    "flush-readonly-status": "NEEDS_RESET",
    "head-out-of-range": "NEEDS_RESET",
    "next-out-of-range": "NEEDS_RESET",  # "Desc next is 16"
    "avail-idx-jump": "NEEDS_RESET",
    "notify-bad-queue": "none",
    "indirect-not-negotiated": "OK",  # QEMU does not check that INDIRECT_DESC was negotiated
    "indirect-nested": "NEEDS_RESET",
    "indirect-oversized": "OK",  # a 65536-entry table in RAM is accepted
    "indirect-bad-len": "NEEDS_RESET",  # "Invalid size for indirect buffer table"
    "indirect-with-next": "OK",
    "indirect-loop": "NEEDS_RESET",
    "indirect-too-many": "NEEDS_RESET",  # "too many write descriptors in indirect table"
    "past-capacity-read": "IOERR",
    "past-capacity-write": "IOERR",
    "sector-overflow-write": "IOERR",
    "partial-sector": "IOERR",
    "unknown-type": "UNSUPP",
    "reset-in-flight": "reset",
    "features-unoffered": "FEATURES_OK-accepted",  # bits it never offered, FEATURES_OK sticks
    "ring-outside-ram": "NEEDS_RESET",
    "ring-size-not-pow2": "OK",  # split rings of any size are accepted
    "rng-readonly-buffer": "none",  # left in the ring: nothing to fill
    "console-tx-writable": "used",
}

#: QEMU is declared hung when the guest prints nothing for this long (the longest quiet
#: stretch of a healthy run is one "none" scenario: 1-2 s).
QEMU_QUIET_LIMIT = 8.0


def outcome_word(text: str) -> str:
    """``NEEDS_RESET (status 0x4f)`` -> ``NEEDS_RESET``; ``IOERR (...), NEEDS_RESET`` ->
    ``IOERR+NEEDS_RESET``."""
    word = text.split()[0] if text.split() else text
    return word + "+NEEDS_RESET" if text.endswith(", NEEDS_RESET") else word


def outcomes(output: str) -> dict[str, str]:
    """Scenario -> the guest's outcome text, in the order printed."""
    found = {}
    for line in selftest_lines(output):
        if line.startswith("selftest: info hostile ") and ": " in line[len("selftest: info hostile "):]:
            name, text = line[len("selftest: info hostile "):].split(": ", 1)
            found[name] = text
    return found


def image_problems(disk: Path, size: int = DISK_SIZE) -> list[str]:
    """What is wrong with the image after test=hostile: it must have kept its size, hold the
    valid write in FINAL_SECTORS and zeros everywhere else (it started zeroed)."""
    data = disk.read_bytes()
    problems = [] if len(data) == size else [f"the image is {len(data)} bytes, not {size}"]
    zero = bytes(SECTOR)
    for n in range(len(data) // SECTOR):
        want = blk_sector(n, FINAL_SEED) if n in FINAL_SECTORS else zero
        if data[n * SECTOR:(n + 1) * SECTOR] != want:
            problems.append(f"sector {n} lacks the valid write" if n in FINAL_SECTORS else f"sector {n} was written")
    return problems


# -- vmmkit ---------------------------------------------------------------------------------------


@dataclass
class VmmkitBoot:
    transport: str
    stdout: str
    stderr: str
    returncode: int
    disk: Path
    console: Path

    @property
    def lines(self) -> list[str]:
        return selftest_lines(self.stdout)

    def log(self) -> list[dict[str, object]]:
        events = []
        for line in self.stderr.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def explain(self) -> str:
        return f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr[-6000:]}"


@pytest.fixture(scope="module", params=["mmio", "pci"])
def vmmkit_boot(request: pytest.FixtureRequest, guest_elf: Path,
                tmp_path_factory: pytest.TempPathFactory) -> VmmkitBoot:
    from vmmkit.plugin import collect_registries, make_plugin_manager
    from vmmkit.testing import kvm_unusable_reason, selected_backend

    if (reason := kvm_unusable_reason()) is not None:
        pytest.skip(f"requires KVM: {reason}")
    name, arch = selected_backend()
    try:
        hypervisor = collect_registries(make_plugin_manager()).select_hypervisor(name, arch).name
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    transport = request.param
    tmp = tmp_path_factory.mktemp(f"vmmkit-hostile-{transport}")
    disk = make_disk(tmp / "disk.img", DISK_SIZE)
    console = tmp / "console.out"
    result = run_vmmkit("--hypervisor", hypervisor, "--kernel", str(guest_elf), "--memory", "size=128M",
                        "--cmdline", "test=hostile", "--platform", f"virtio_transport={transport}",
                        "--disk", f"path={disk},serial={SERIAL}", "--console", f"file={console}",
                        "--rng", "src=/dev/urandom", "-v", "--log-format", "json", timeout=180)
    return VmmkitBoot(transport, result.stdout, result.stderr, result.returncode, disk, console)


@pytest.mark.requires_kvm
def test_vmmkit_survives_every_scenario_and_exits_0(vmmkit_boot: VmmkitBoot) -> None:
    lines = vmmkit_boot.lines
    assert [line for line in lines if "FAIL" in line] == [], vmmkit_boot.explain()
    assert f"selftest: ok hostile ({len(SCENARIOS)} scenarios, device still usable)" in lines, vmmkit_boot.explain()
    assert lines[-1:] == ["selftest: exit 0"], vmmkit_boot.explain()
    assert vmmkit_boot.returncode == 0, vmmkit_boot.explain()


@pytest.mark.requires_kvm
def test_vmmkit_outcome_of_each_scenario(vmmkit_boot: VmmkitBoot) -> None:
    expected = VMMKIT_PCI if vmmkit_boot.transport == "pci" else VMMKIT
    seen = outcomes(vmmkit_boot.stdout)
    assert list(seen) == list(SCENARIOS), vmmkit_boot.explain()
    wrong = {name: outcome_word(text) for name, text in seen.items()
             if outcome_word(text) not in expected[name][0].split("|")}
    assert wrong == {}, vmmkit_boot.explain()


@pytest.mark.requires_kvm
def test_vmmkit_image_holds_only_what_valid_requests_wrote(vmmkit_boot: VmmkitBoot) -> None:
    assert image_problems(vmmkit_boot.disk) == [], vmmkit_boot.explain()
    # console-tx-writable's buffer is device-writable: nothing may reach the console
    assert vmmkit_boot.console.read_bytes() == b""


@pytest.mark.requires_kvm
def test_vmmkit_log_has_the_device_error_events(vmmkit_boot: VmmkitBoot) -> None:
    """One ``needs_reset`` warning per scenario the device refused, in order, whose reason ends
    with the kind of protocol error (:class:`vmmkit.virtio.chain.ErrorKind`)."""
    expected = VMMKIT_PCI if vmmkit_boot.transport == "pci" else VMMKIT
    event = "virtio_pci.needs_reset" if vmmkit_boot.transport == "pci" else "virtio.needs_reset"
    events = [e for e in vmmkit_boot.log() if e.get("event") == event]
    assert all(e.get("level") == "warning" for e in events)
    kinds = [str(e.get("reason", "")).rsplit("(", 1)[-1].rstrip(")") for e in events]
    want = [kind for name, (_, kind) in expected.items() if kind is not None]
    assert kinds == want, "\n".join(str(e.get("reason")) for e in events)
    broken = [e for e in vmmkit_boot.log() if e.get("event") == "virtio.device_broken"]
    # every refusal while serving a chain also marks the device broken (not those at DRIVER_OK)
    assert len(broken) == len([k for name, (_, k) in expected.items() if k and not name.startswith("ring-")])


# -- QEMU -----------------------------------------------------------------------------------------


@dataclass
class QemuHostile:
    transport: str
    version: str
    outcomes: dict[str, str] = field(default_factory=dict)  #: scenario -> text, or "QEMU hung ..."
    died_on: dict[str, str] = field(default_factory=dict)  #: scenario -> how QEMU ended
    runs: list[str] = field(default_factory=list)  #: each run's output, for the failure message
    final: str = ""  #: the last run's ok/FAIL line
    image: list[str] = field(default_factory=list)  #: image_problems()


def _run_watched(command: QemuCommand, quiet_limit: float, total_limit: float) -> tuple[str, str, int | None]:
    """Run QEMU; kill it when the guest stays silent for ``quiet_limit`` seconds. Returns
    stdout, stderr and the return code (None: killed)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command.argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        out = bytearray()
        start = last = time.monotonic()
        killed = False
        fd = proc.stdout.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], 0.25)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
                last = time.monotonic()
            now = time.monotonic()
            if now - last > quiet_limit or now - start > total_limit:
                proc.kill()
                killed = True
                break
        proc.wait()
        out += proc.stdout.read() or b""
        proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return out.decode(errors="replace"), stderr, None if killed else proc.returncode


def run_qemu_hostile(kernel: Path, tmp: Path, transport: str) -> QemuHostile:
    version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    result = QemuHostile(transport, version.splitlines()[0] if version else "?")
    disk = make_disk(tmp / "disk.img", DISK_SIZE)
    skip: list[str] = []
    for _ in range(len(SCENARIOS) + 1):
        setup = VirtioSetup(blk_image=disk, blk_serial=SERIAL, rng=True, console_file=tmp / "console.out")
        extra = f"hostile.skip={','.join(skip)}" if skip else ""
        command = qemu_virtio_command(kernel, ["hostile"], setup, transport=transport, extra_cmdline=extra)
        stdout, stderr, code = _run_watched(command, QEMU_QUIET_LIMIT, 120)
        result.runs.append(f"$ {' '.join(command.argv)}\n{stdout}--- stderr ---\n{stderr}")
        result.outcomes.update(outcomes(stdout))
        lines = selftest_lines(stdout)
        result.final = next((line for line in lines if line.startswith(("selftest: ok hostile",
                                                                          "selftest: FAIL hostile"))), "")
        pending = [name for name in SCENARIOS if name not in skip and name not in result.outcomes]
        if not pending or any(line.startswith("selftest: exit") for line in lines):
            break
        culprit = pending[0]
        how = "hang" if code is None else f"exit {code}"
        tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
        result.died_on[culprit] = f"{how}{': ' + tail[0] if tail else ''}"
        result.outcomes[culprit] = f"QEMU {how}"
        skip.append(culprit)
    result.image = image_problems(disk)
    return result


@pytest.fixture(scope="module", params=["mmio", "pci"])
def qemu_hostile(request: pytest.FixtureRequest, guest_elf: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> QemuHostile:
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed")
    return run_qemu_hostile(guest_elf, tmp_path_factory.mktemp(f"qemu-hostile-{request.param}"), request.param)


def _qemu_word(text: str) -> str:
    return "hang" if text == "QEMU hang" else "died" if text.startswith("QEMU exit") else outcome_word(text)


@pytest.mark.requires_qemu
def test_qemu_runs_the_guest_to_an_outcome_for_every_scenario(qemu_hostile: QemuHostile) -> None:
    """The harness side, which does not depend on QEMU's choices: every scenario ends with an
    outcome line or is the one QEMU stopped on, and the guest reaches its end."""
    explain = "\n".join(qemu_hostile.runs)
    assert set(qemu_hostile.outcomes) == set(SCENARIOS), explain
    assert qemu_hostile.final, explain


@pytest.mark.requires_qemu
def test_qemu_behaves_as_documented(qemu_hostile: QemuHostile, record_property: pytest.RecordProperty) -> None:
    """QEMU's outcomes next to vmmkit's (see :data:`QEMU_7_2`); a QEMU that differs from the
    documented 7.2 behaviour is reported as a skip listing what changed, never as a failure."""
    vmmkit = VMMKIT_PCI if qemu_hostile.transport == "pci" else VMMKIT
    table = {name: (_qemu_word(qemu_hostile.outcomes[name]), vmmkit[name][0]) for name in SCENARIOS
             if name in qemu_hostile.outcomes}
    record_property("qemu_version", qemu_hostile.version)
    record_property("qemu_vs_vmmkit", json.dumps(table))
    record_property("qemu_died_on", json.dumps(qemu_hostile.died_on))
    record_property("qemu_image", json.dumps(qemu_hostile.image))
    changed = {name: word for name, (word, _) in table.items() if QEMU_7_2.get(name) != word}
    notes = []
    if changed:
        notes.append("outcomes differ from QEMU 7.2's: " + ", ".join(
            f"{name}: {word} (was {QEMU_7_2.get(name)})" for name, word in changed.items()))
    if qemu_hostile.image:
        notes.append(f"image: {'; '.join(qemu_hostile.image[:4])}")
    if qemu_hostile.final != f"selftest: ok hostile ({len(SCENARIOS) - len(qemu_hostile.died_on)} scenarios, "\
                             "device still usable)":
        notes.append(f"final line: {qemu_hostile.final!r}")
    if notes:
        pytest.skip(f"{qemu_hostile.version} ({qemu_hostile.transport}): " + "; ".join(notes))
