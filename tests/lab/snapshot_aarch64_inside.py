"""Run inside the AArch64 lab (``python3 tests/lab/snapshot_aarch64_inside.py``) by
``tests/lab/test_lab_snapshot_aarch64.py``: the self-test guest's ``test=spin`` on vmmkit's
KVM-arm64 backend, snapshotted by one vmmkit process and restored by another, as a user does it::

    vmmkit --hypervisor kvm --api-socket ... --kernel selftest.Image --cmdline test=spin --cpus boot=2
    vmmkit-remote pause; vmmkit-remote snapshot file:///tmp/snap; vmmkit-remote shutdown-vmm
    vmmkit --hypervisor kvm --api-socket ... --restore source_url=file:///tmp/snap
    vmmkit-remote snapshot file:///tmp/snap2      (the restored VM, before it runs: a round trip)
    vmmkit-remote resume

First it runs ``tests/lab/test_kvm_arm64_gic_state.py`` (a GIC and ITS in use, from one VM into
another) and asks KVM about its dirty ring. It prints one ``VMMKIT-SNAP: {json}`` line
(heartbeats before and after, timings, the two snapshots' states side by side) and the first
snapshot directory as a base64 ``.tar.gz`` between ``VMMKIT-SNAP-TAR-BEGIN``/``END`` lines, for
the host to restore on emu. Exits 0 if it got that far; the checks are the host test's.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

IMAGE = "tests/guests/build/aarch64/selftest.Image"
WORK = Path("/tmp/vmmkit-snap")
TIMEOUT = float(os.environ.get("SNAP_TIMEOUT", "180"))


def wait_for(predicate: Any, what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def heartbeats(path: Path) -> list[int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [int(line.split()[-1]) for line in text.splitlines()
            if line.startswith("selftest: heartbeat ") and line.split()[-1].isdigit()]


def remote(socket: Path, *args: str) -> str:
    result = subprocess.run(["vmmkit-remote", "--api-socket", str(socket), *args], capture_output=True,
                            text=True, timeout=TIMEOUT)
    if result.returncode != 0:
        logs = "".join(f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}"
                       for log in sorted(WORK.glob("*.log")) if not log.name.startswith("serial"))
        raise SystemExit(f"vmmkit-remote {' '.join(args)}: {result.stderr}\n{logs}")
    return result.stdout


def vmm(name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    socket = WORK / f"{name}.sock"
    log = (WORK / f"{name}.log").open("wb")
    proc = subprocess.Popen(["vmmkit", "--hypervisor", "kvm", "--api-socket", f"path={socket}", *args],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: socket.exists() or proc.poll() is not None, "the API socket")
    if proc.poll() is not None:
        raise SystemExit(f"vmmkit {name} exited: {(WORK / f'{name}.log').read_text()}")
    return proc, socket


def dirty_log_capabilities() -> dict[str, int]:
    """KVM_CHECK_EXTENSION on /dev/kvm and on a VM: the dirty ring (issue 16's pre-copy)."""
    import fcntl

    caps = {"KVM_CAP_DIRTY_LOG_RING": 192, "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
            "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": 225, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": 168}
    fd = os.open("/dev/kvm", os.O_RDWR)
    try:
        vm = fcntl.ioctl(fd, 0xAE01, 0)  # KVM_CREATE_VM
        try:
            return {name: fcntl.ioctl(vm, 0xAE03, cap) for name, cap in caps.items()}  # KVM_CHECK_EXTENSION
        finally:
            os.close(vm)
    finally:
        os.close(fd)


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dirty_log": dirty_log_capabilities()}
    gic = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/lab/test_kvm_arm64_gic_state.py"], capture_output=True, text=True, timeout=TIMEOUT)
    report["gic_test"] = {"status": gic.returncode, "output": (gic.stdout + gic.stderr)[-4000:]}
    serial1, serial2 = WORK / "serial1.log", WORK / "serial2.log"
    first, socket = vmm("first", "--kernel", IMAGE, "--cmdline", "test=spin", "--cpus", "boot=2",
                        "--memory", "size=64M", "--serial", f"file={serial1}",
                        # virtio-mmio, as emu has it: KVM's default is PCI now, and the emu
                        # restore below needs the same devices (no PCI root)
                        "--platform", "virtio_transport=mmio")
    wait_for(lambda: len(heartbeats(serial1)) >= 2, "two heartbeats on KVM")
    remote(socket, "pause")
    start = time.monotonic()
    remote(socket, "snapshot", f"file://{WORK}/snap")
    report["snapshot_s"] = round(time.monotonic() - start, 3)
    report["serial_before"] = serial1.read_text(errors="replace")
    remote(socket, "shutdown-vmm")
    first.wait(TIMEOUT)

    config = json.loads((WORK / "snap" / "config.json").read_text())  # editable, as Kata does
    config["serial"] = {**config["serial"], "file": str(serial2)}
    (WORK / "snap" / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    second, socket = vmm("second", "--restore", f"source_url=file://{WORK}/snap")
    report["restore_s"] = round(time.monotonic() - start, 3)
    report["info_state"] = json.loads(remote(socket, "info"))["state"]
    remote(socket, "snapshot", f"file://{WORK}/snap2")  # the restored state, read back before it runs
    remote(socket, "resume")
    wait_for(lambda: len(heartbeats(serial2)) >= 2, "two heartbeats after the restore")
    report["serial_after"] = serial2.read_text(errors="replace")
    remote(socket, "shutdown-vmm")
    second.wait(TIMEOUT)
    report["states"] = [json.loads((WORK / name / "state.json").read_text()) for name in ("snap", "snap2")]
    print("VMMKIT-SNAP: " + json.dumps(report), flush=True)

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        tar.add(WORK / "snap", arcname="snap")
    print("VMMKIT-SNAP-TAR-BEGIN")
    text = base64.b64encode(buffer.getvalue()).decode()
    for offset in range(0, len(text), 120):
        print(text[offset : offset + 120])
    print("VMMKIT-SNAP-TAR-END", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
