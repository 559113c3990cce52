"""Snapshot and restore benchmark: vmmkit vs QEMU on the same test guest, in the same run.

For each RAM size, the self-test guest (``test=spin``: every vCPU busy, a heartbeat a second)
is booted and paused, then:

(a) snapshot: vmmkit's ``vm.snapshot`` to ``file:///dir`` (the API call's duration: state,
    RAM files, fsync) vs QEMU's ``migrate`` to ``exec:cat > file`` of the stopped VM (from the
    command to ``query-migrate`` saying ``completed``);
(b) the snapshot's size on disk (allocated blocks: both skip zero pages);
(c) restore: from spawning the VMM to the restored guest running again: vmmkit ``--restore``
    then ``vm.resume``; QEMU ``-incoming 'exec:cat file'`` then ``cont`` once the migration
    completed. Each restored guest must print a new heartbeat, or the run fails.

The guest is freshly booted: its RAM is mostly zero pages, so (a) and (c) measure the scan of
RAM and each VMM's fixed costs, not a large dirty-page copy. Medians of interleaved runs.

With ``--migration``, a second table: live migration of the *running* guest over a Unix socket
to a waiting VMM on the same host: vmmkit ``send-migration`` to ``receive-migration`` (total:
the API call; downtime: from the pause to the destination's answer to COMPLETE, as the source
reports it in its ``vm``/``migrated`` event) vs QEMU ``migrate unix:`` to ``-incoming unix:``
(``query-migrate``'s ``total-time`` and ``downtime``). The guest must go on at the destination.

    python bench/snapshot.py [--runs 5] [--memory 256,2048] [--migration]

Each run writes a JSON record (``bench/results/snapshot-<time>.json``, ``bench/record.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from record import write_record

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "tests" / "guests" / "build" / "x86_64" / "selftest.elf"
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def vmmkit_program() -> list[str]:
    script = Path(sys.executable).with_name("vmmkit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vmmkit"]


def wait_for(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


def heartbeats(serial: Path) -> int:
    try:
        return serial.read_bytes().count(b"selftest: heartbeat ")
    except FileNotFoundError:
        return 0


def listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        return probe.connect_ex(str(path)) == 0


def disk_usage(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


class Vmmkit:
    name = "vmmkit"

    def __init__(self, tmp: Path, memory_mib: int) -> None:
        from vmmkit.api.client import ApiClient

        self.tmp, self.memory_mib = tmp, memory_mib
        self.serial = tmp / "vmmkit-serial.log"
        self.sock = tmp / "vmmkit.sock"
        self.proc = self._spawn()
        self.client = ApiClient(str(self.sock), timeout=120)
        self.client.create({"payload": {"kernel": str(GUEST), "cmdline": "test=spin"},
                            "cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": memory_mib << 20},
                            "serial": {"mode": "File", "file": str(self.serial)}, "console": {"mode": "Off"}})
        self.client.boot()
        wait_for(lambda: heartbeats(self.serial) >= 1, "vmmkit's guest to start")
        self.client.pause()

    def _spawn(self, *extra: str) -> subprocess.Popen[bytes]:
        self.sock.unlink(missing_ok=True)
        proc = subprocess.Popen([*vmmkit_program(), "--api-socket", f"path={self.sock}", *extra],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        wait_for(lambda: listening(self.sock), "vmmkit's API socket", 10)
        return proc

    def snapshot(self) -> tuple[float, Path]:
        target = self.tmp / "vmmkit-snap"
        start = time.perf_counter()
        self.client.put("vm.snapshot", {"destination_url": f"file://{target}"})
        return time.perf_counter() - start, target

    def restore(self, target: Path) -> float:
        from vmmkit.api.client import ApiClient

        self.stop()
        before = heartbeats(self.serial)
        start = time.perf_counter()
        self.proc = self._spawn()
        client = ApiClient(str(self.sock), timeout=120)
        client.put("vm.restore", {"source_url": f"file://{target}"})
        client.resume()
        elapsed = time.perf_counter() - start
        wait_for(lambda: heartbeats(self.serial) > before, "vmmkit's restored guest to go on")
        return elapsed

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Qemu:
    name = "qemu"

    def __init__(self, tmp: Path, memory_mib: int) -> None:
        self.tmp, self.memory_mib = tmp, memory_mib
        self.serial = tmp / "qemu-serial.log"
        self.qmp_path = tmp / "qmp.sock"
        self.proc, self.qmp = self._spawn()
        wait_for(lambda: heartbeats(self.serial) >= 1, "QEMU's guest to start")
        self.command("stop")

    def _spawn(self, *extra: str) -> tuple[subprocess.Popen[bytes], Any]:
        self.qmp_path.unlink(missing_ok=True)
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "microvm,rtc=on", "-accel", "kvm", "-m", f"{self.memory_mib}M", "-smp", "1",
             "-nodefaults", "-no-user-config", "-display", "none",
             "-chardev", f"file,id=s,path={self.serial},append=on", "-serial", "chardev:s",
             "-kernel", str(GUEST), "-append", "test=spin",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sock = socket.socket(socket.AF_UNIX)
        wait_for(lambda: sock.connect_ex(str(self.qmp_path)) == 0, "QEMU's QMP socket", 10)
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        qmp = (sock, reader)
        self.qmp = qmp
        self.command("qmp_capabilities")
        return proc, qmp

    def command(self, name: str, **arguments: Any) -> Any:
        sock, reader = self.qmp
        sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode())
        while True:
            reply = json.loads(reader.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")

    def _migration_done(self) -> bool:
        status = self.command("query-migrate").get("status")
        if status == "failed":
            raise RuntimeError("QEMU's migration failed")
        return bool(status == "completed")

    def snapshot(self) -> tuple[float, Path]:
        target = self.tmp / "qemu-snap.bin"
        start = time.perf_counter()
        self.command("migrate", uri=f"exec:cat > {target}")
        wait_for(self._migration_done, "QEMU's migration to a file")
        return time.perf_counter() - start, target

    def restore(self, target: Path) -> float:
        self.stop()
        before = heartbeats(self.serial)
        start = time.perf_counter()
        self.proc, self.qmp = self._spawn("-incoming", f"exec:cat {target}")
        wait_for(lambda: self.command("query-status").get("status") == "paused", "QEMU's incoming migration")
        self.command("cont")
        elapsed = time.perf_counter() - start
        wait_for(lambda: heartbeats(self.serial) > before, "QEMU's restored guest to go on")
        return elapsed

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def migrate_vmmkit(tmp: Path, memory_mib: int) -> tuple[float, float]:
    """(total s, downtime s) of one live migration between two vmmkit processes."""
    import threading

    from vmmkit.api.client import ApiClient
    from vmmkit.events import read_events

    serial, events = tmp / "serial.log", tmp / "events.json"
    procs = []
    try:
        for name, extra in (("src", ["--event-monitor", f"path={events}"]), ("dst", [])):
            sock = tmp / f"{name}.sock"
            procs.append(subprocess.Popen([*vmmkit_program(), "--api-socket", f"path={sock}", *extra],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, env=ENV))
            wait_for(lambda sock=sock: listening(sock), "vmmkit's API socket", 10)
        src, dst = ApiClient(str(tmp / "src.sock"), timeout=300), ApiClient(str(tmp / "dst.sock"), timeout=300)
        src.create({"payload": {"kernel": str(GUEST), "cmdline": "test=spin"},
                    "cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": memory_mib << 20},
                    "serial": {"mode": "File", "file": str(serial)}, "console": {"mode": "Off"}})
        src.boot()
        wait_for(lambda: heartbeats(serial) >= 1, "vmmkit's guest to start")
        url = f"unix:{tmp}/mig.sock"
        receiver = threading.Thread(target=dst.put, args=("vm.receive-migration", {"receiver_url": url}))
        receiver.start()
        wait_for(lambda: (tmp / "mig.sock").exists(), "the receiver to listen", 10)
        start = time.perf_counter()
        src.put("vm.send-migration", {"destination_url": url})
        total = time.perf_counter() - start
        receiver.join(60)
        before = heartbeats(serial)
        wait_for(lambda: heartbeats(serial) > before, "vmmkit's migrated guest to go on")
        migrated = [e for e in read_events(events.read_text()) if e["event"] == "migrated"]
        return total, float(migrated[-1]["properties"]["downtime_ms"]) / 1e3
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def migrate_qemu(tmp: Path, memory_mib: int) -> tuple[float, float]:
    """(total s, downtime s) of one QEMU live migration to ``-incoming unix:``, as it reports them."""
    source = Qemu(tmp, memory_mib)
    source.command("cont")
    target_dir = tmp / "dst"
    target_dir.mkdir()
    url = f"unix:{tmp}/mig.sock"
    target = Qemu.__new__(Qemu)
    target.tmp, target.memory_mib = target_dir, memory_mib
    target.serial, target.qmp_path = source.serial, target_dir / "qmp.sock"
    try:
        target.proc, target.qmp = target._spawn("-incoming", url)
        source.command("migrate", uri=url)
        wait_for(source._migration_done, "QEMU's live migration")
        info = source.command("query-migrate")
        before = heartbeats(source.serial)
        wait_for(lambda: target.command("query-status").get("status") == "running", "QEMU's destination to run")
        wait_for(lambda: heartbeats(source.serial) > before, "QEMU's migrated guest to go on")
        return float(info["total-time"]) / 1e3, float(info["downtime"]) / 1e3
    finally:
        source.stop()
        if getattr(target, "proc", None) is not None:
            target.stop()


def one_run(peer: type[Vmmkit] | type[Qemu], memory_mib: int) -> tuple[float, int, float]:
    with tempfile.TemporaryDirectory(prefix="vmmkit-bench-") as tmp:
        vm = peer(Path(tmp), memory_mib)
        try:
            took, target = vm.snapshot()
            size = disk_usage(target)
            restore = vm.restore(target)
        finally:
            vm.stop()
    return took, size, restore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory", default="256,2048", help="guest RAM sizes in MiB, comma separated")
    parser.add_argument("--migration", action="store_true", help="also measure live migration (running guest)")
    parser.add_argument("--json", default=None, help="the record's path ('-': stdout; default: "
                        "bench/results/snapshot-<time>.json)")
    args = parser.parse_args()
    started = time.monotonic()
    rows: list[dict[str, object]] = []
    if not GUEST.is_file():
        subprocess.run(["make", "-s", "-C", str(GUEST.parents[2])], check=True)
    peers: list[type[Vmmkit] | type[Qemu]] = [Vmmkit]
    if shutil.which("qemu-system-x86_64"):
        peers.append(Qemu)
    else:
        print("qemu-system-x86_64 not found: showing vmmkit alone", file=sys.stderr)
    sizes = [int(size) for size in args.memory.split(",")]
    results: dict[tuple[str, int], list[tuple[float, int, float]]] = {}
    for _ in range(args.runs):  # interleaved, so drift affects all alike
        for memory_mib in sizes:
            for peer in peers:
                results.setdefault((peer.name, memory_mib), []).append(one_run(peer, memory_mib))
    print(f"snapshot and restore of a paused, freshly booted test guest (medians of {args.runs} interleaved runs)")
    print(f"{'RAM':>6} {'':8} {'snapshot ms':>12} {'on disk KiB':>12} {'restore ms':>11}")
    for memory_mib in sizes:
        medians = {}
        for peer in peers:
            runs = results[(peer.name, memory_mib)]
            medians[peer.name] = tuple(statistics.median(run[i] for run in runs) for i in range(3))
            took, size, restore = medians[peer.name]
            rows.append({"peer": peer.name, "memory_mib": memory_mib, "operation": "snapshot",
                         "ms": round(took * 1e3, 2), "kib_on_disk": round(size / 1024)})
            rows.append({"peer": peer.name, "memory_mib": memory_mib, "operation": "restore",
                         "ms": round(restore * 1e3, 2)})
            print(f"{memory_mib:>5}M {peer.name:8} {took * 1e3:>12.1f} {size / 1024:>12.0f} {restore * 1e3:>11.1f}")
        if "qemu" in medians:
            v, q = medians["vmmkit"], medians["qemu"]
            print(f"{'':6} {'ratio':8} {v[0] / q[0]:>11.2f}x {v[1] / q[1]:>11.2f}x {v[2] / q[2]:>10.2f}x"
                  "   (vmmkit / QEMU: below 1 is faster or smaller)")
    if args.migration:
        migrations: dict[tuple[str, int], list[tuple[float, float]]] = {}
        runners = {"vmmkit": migrate_vmmkit, **({"qemu": migrate_qemu} if Qemu in peers else {})}
        for _ in range(args.runs):
            for memory_mib in sizes:
                for name, runner in runners.items():
                    with tempfile.TemporaryDirectory(prefix="vmmkit-bench-", dir="/tmp") as tmp:
                        migrations.setdefault((name, memory_mib), []).append(runner(Path(tmp), memory_mib))
        print(f"\nlive migration of the running test guest over a Unix socket (medians of {args.runs} runs)")
        print(f"{'RAM':>6} {'':8} {'total ms':>12} {'downtime ms':>12}")
        for memory_mib in sizes:
            for name in runners:
                runs = migrations[(name, memory_mib)]
                total, down = (statistics.median(run[i] for run in runs) for i in range(2))
                print(f"{memory_mib:>5}M {name:8} {total * 1e3:>12.1f} {down * 1e3:>12.1f}")
                rows.append({"peer": name, "memory_mib": memory_mib, "operation": "live migration",
                             "ms": round(total * 1e3, 2), "downtime_ms": round(down * 1e3, 2)})
    write_record("snapshot", rows, keys=("peer", "memory_mib", "operation"), args=args, started=started,
                 path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
