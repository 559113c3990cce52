#!/usr/bin/env python3
"""virtio-net throughput and round-trip latency: vmmkit vs QEMU on the same test guest, the same
tap set-up and the same peer, in the same run.

Each boot gets a fresh network namespace with a tap (``ip tuntap add ... mode tap``, up) and a
peer on it (``bench/net_peer.c``, compiled here: an AF_PACKET socket bound to the tap, in C so
it adds microseconds, not an interpreter, to each round trip). The VMM runs inside the namespace
(``ip netns exec``) and attaches to the tap by name: vmmkit ``--net tap=tap0``, QEMU ``-netdev
tap,ifname=tap0,script=no`` with ``virtio-net-pci`` / ``virtio-net-device`` (no vhost: there is
no /dev/vhost-net here). The guest's ``test=netbench`` (tests/guests/virtio/netbench.c) then

- ping: ``--pings`` round trips of a 60-byte frame answered by the peer (mean, from the guest's
  cycle counter);
- tx: ``--count`` frames of ``--size`` bytes to the peer, as fast as the ring takes them (the
  peer counts what arrived: the table's ``peer got`` column);
- rx: asks the peer for ``--count`` frames of ``--size`` bytes, sent back to back, and counts
  what arrives (frames the tap's queue could not hold are lost: ``got``).

Guest ring-0 code is emulated on this host (~1 us per instruction, shared/notes/pvm-host.md) and
the guest's driver polls, with one notification per batch: the numbers are dominated by exits,
the device path and the tap, which is the comparison we want, not by what a Linux guest's
network stack would reach. Throughput: above 1 is vmmkit faster; latency: below 1 is.

    python bench/net.py [--count 4000] [--size 1514] [--pings 200] [--transport mmio,pci]
                        [--repeat 2] [--python-queue] [--no-qemu] [--json PATH]

``--python-queue`` also boots vmmkit with its queues in Python (``VMMKIT_NET_NATIVE=0``: the
path before the C queues), in the same run. The VMM CPU per frame outside the vCPU threads
(bench/proc_cpu.py: /proc tick counts, 10 ms each, so a few microseconds per frame is a handful
of ticks: read it as an order of magnitude) is printed too; the Python-queue rows have none (no
device thread marks the start of the phases).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUESTS = REPO / "tests" / "guests"
GUEST = GUESTS / "build" / "x86_64" / "selftest.elf"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from integration.netns import NetNamespace, unavailable_reason  # noqa: E402
from integration.qemu_peer import GUEST_MAC, VirtioSetup, qemu_virtio_command  # noqa: E402
from proc_cpu import device_cpu, run_sampled  # noqa: E402

MEMORY = "128M"
TAP = "tap0"
LINE = re.compile(r"^selftest: info netbench: (ping|tx|rx) ([\d.]+) (us|MiB/s)(?: ([\d.]+) kframes/s \((\d+)/?(\d+)?)?")
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


@dataclass
class Run:
    """One boot: metric -> value ("ping" us, "tx"/"rx" MiB/s, "tx_kfps"/"rx_kfps"), or the error."""

    results: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    rx_got: int | None = None
    peer_sink: int | None = None  #: frames of the tx phase the peer received
    device_cpu: float | None = None  #: CPU seconds outside the vCPU threads during the phases


def parse(stdout: str) -> tuple[dict[str, float], int | None]:
    results: dict[str, float] = {}
    rx_got = None
    for line in stdout.splitlines():
        if m := LINE.match(line.strip()):
            results[m[1]] = float(m[2])
            if m[4]:
                results[f"{m[1]}_kfps"] = float(m[4])
            if m[1] == "rx":
                rx_got = int(m[5])
    return results, rx_got


def build_peer(folder: Path) -> Path:
    binary = folder / "net_peer"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(REPO / "bench" / "net_peer.c")], check=True)
    return binary


def guest_cmdline(args: argparse.Namespace) -> str:
    return f"netbench.count={args.count} netbench.size={args.size} netbench.pings={args.pings}"


def vmmkit_argv(transport: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "vmmkit", "--kernel", str(GUEST), "--memory", f"size={MEMORY}",
            "--cmdline", f"test=netbench {guest_cmdline(args)}", "--platform", f"virtio_transport={transport}",
            "--net", f"tap={TAP},mac={GUEST_MAC}", "--serial", "tty"]


def qemu_argv(transport: str, args: argparse.Namespace) -> list[str]:
    return qemu_virtio_command(GUEST, ["netbench"], VirtioSetup(net_tap=TAP), transport=transport,
                               accel=args.accel, memory=MEMORY, extra_cmdline=guest_cmdline(args)).argv


def run(peer_binary: Path, argv: list[str], peer: str, timeout: float) -> Run:
    """Boot ``argv`` inside a fresh namespace with a tap and the peer on it."""
    start = time.monotonic()
    env = {**ENV, "VMMKIT_NET_NATIVE": "0"} if peer == "vmmkit-pyqueue" else ENV
    with NetNamespace() as ns:
        ns.add_tap(TAP)
        proc = subprocess.Popen([*ns.exec_prefix(), str(peer_binary), TAP], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            if proc.stdout.readline().strip() != "ready":
                return Run(error="the peer did not start")
            # vmmkit's serial output reaches the pipe at exit: its phases start with the device thread.
            marks = ("info netbench:", "ok netbench") if peer == "qemu" else ("thread:_net0_", None)
            try:
                done, threads = run_sampled([*ns.exec_prefix(), *argv], timeout, env, start=marks[0], end=marks[1])
            except subprocess.TimeoutExpired:
                return Run(error=f"timed out after {timeout:.0f} s", seconds=time.monotonic() - start)
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            tail = proc.stdout.read() if proc.stdout is not None else ""
            proc.wait(10)
    results, rx_got = parse(done.stdout)
    sink = re.search(r"sink (\d+) (\d+)", tail)
    out = Run(results, seconds=time.monotonic() - start, rx_got=rx_got, peer_sink=int(sink[1]) if sink else None,
              device_cpu=device_cpu("qemu" if peer == "qemu" else "vmmkit", threads))
    fails = [line.strip() for line in done.stdout.splitlines() if "selftest: FAIL" in line]
    if fails or "selftest: ok netbench" not in done.stdout:
        tail_line = (fails or done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
        out.error = f"exit {done.returncode}: {tail_line[:160]}"
    return out


def median_run(runs: list[Run]) -> Run:
    ok = [r for r in runs if r.error is None]
    if not ok:
        return runs[-1]
    keys = ok[0].results.keys()
    cpus = [r.device_cpu for r in ok if r.device_cpu is not None]
    return Run({k: statistics.median(r.results[k] for r in ok if k in r.results) for k in keys},
               seconds=sum(r.seconds for r in runs), rx_got=min(r.rx_got or 0 for r in ok),
               peer_sink=min(r.peer_sink or 0 for r in ok), device_cpu=statistics.median(cpus) if cpus else None)


def fmt(value: float | None, width: int, digits: int = 1) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


#: (metric, unit): a ratio above 1 is vmmkit faster for throughput, slower for ping.
METRICS = (("ping", "us"), ("tx", "MiB/s"), ("tx_kfps", "kframes/s"), ("rx", "MiB/s"), ("rx_kfps", "kframes/s"))


def print_table(table: list[tuple[str, dict[str, Run]]], peers: list[str]) -> list[float]:
    others = [p for p in peers if p != "vmmkit"]
    header = f"{'virtio':<6} {'metric':<8} {'unit':<10} | {'vmmkit':>9} | " + " ".join(f"{p:>14}" for p in others) \
        + " | " + " ".join(f"{'/' + p:>15}" for p in others)
    print(header)
    print("-" * len(header))
    ratios: list[float] = []
    for transport, result in table:
        ours = result["vmmkit"]
        for key, unit in METRICS:
            a = ours.results.get(key)
            cells, ratio_cells = [], []
            for other in others:
                b = result[other].results.get(key) if other in result else None
                ratio = a / b if a and b else None
                if ratio and other == "qemu" and key in ("tx", "rx"):
                    ratios.append(ratio)
                cells.append(fmt(b, 14))
                ratio_cells.append(fmt(ratio, 14, 2) + "x")
            print(f"{transport:<6} {key:<8} {unit:<10} | {fmt(a, 9)} | " + " ".join(cells) + " | "
                  + " ".join(ratio_cells))
    return ratios


def write_json(table: list[tuple[str, dict[str, Run]]], args: argparse.Namespace, started: float) -> Path:
    """One record of this run for the trend (bench/results/*.json, issue 20 item 6)."""
    import json

    rows = []
    for transport, result in table:
        for peer, r in result.items():
            for key, unit in METRICS:
                if key in r.results:
                    rows.append({"transport": transport, "peer": peer, "metric": key, "unit": unit,
                                 "value": r.results[key]})
            if r.error is None:
                rows.append({"transport": transport, "peer": peer, "rx_got": r.rx_got, "peer_sink": r.peer_sink,
                             "cpu_us_per_frame": r.device_cpu * 1e6 / (2 * args.count) if r.device_cpu else None})
            else:
                rows.append({"transport": transport, "peer": peer, "error": r.error})
    path = Path(args.json) if args.json else REPO / "bench" / "results" / time.strftime("net-%Y%m%dT%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    record = {"bench": "net", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": time.monotonic() - started,
              "args": {k: v for k, v in vars(args).items() if k != "json"}, "qemu": version,
              "load": os.getloadavg(), "rows": rows}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=4000, help="frames each way (default 4000)")
    parser.add_argument("--size", type=int, default=1514, help="frame bytes, 60 to 1514 (default 1514)")
    parser.add_argument("--pings", type=int, default=200, help="round trips (default 200)")
    parser.add_argument("--transport", default="mmio,pci", help="mmio, pci or both (default)")
    parser.add_argument("--accel", default=None, help="QEMU accelerator (default: kvm if usable, else tcg)")
    parser.add_argument("--repeat", type=int, default=2, help="boots per configuration and VMM (default 2; median)")
    parser.add_argument("--python-queue", action="store_true",
                        help="also boot vmmkit with its net queues in Python (VMMKIT_NET_NATIVE=0)")
    parser.add_argument("--no-qemu", action="store_true", help="vmmkit alone")
    parser.add_argument("--json", default=None, help="write the results here (default: bench/results/net-<time>.json)")
    args = parser.parse_args()
    if not 60 <= args.size <= 1514 or args.count < 2 or args.pings < 1:
        parser.error("--size is 60 to 1514, --count at least 2, --pings at least 1")
    transports = [t for t in args.transport.split(",") if t]
    if set(transports) - {"mmio", "pci"}:
        parser.error(f"unknown transport: {', '.join(sorted(set(transports) - {'mmio', 'pci'}))}")
    if reason := unavailable_reason():
        print(f"bench/net.py: {reason}", file=sys.stderr)
        return 2
    args.accel = args.accel or ("kvm" if kvm_usable() else "tcg")
    subprocess.run(["make", "-s", "-C", str(GUESTS)], check=True)
    peers = ["vmmkit"] + (["vmmkit-pyqueue"] if args.python_queue else [])
    if not args.no_qemu:
        if shutil.which("qemu-system-x86_64"):
            peers.append("qemu")
        else:
            print("qemu-system-x86_64 not found: vmmkit alone", file=sys.stderr)

    started = time.monotonic()
    table: list[tuple[str, dict[str, Run]]] = []
    with tempfile.TemporaryDirectory(prefix="netbench-") as tmp:
        peer_binary = build_peer(Path(tmp))
        for transport in transports:
            runs: dict[str, list[Run]] = {peer: [] for peer in peers}
            for repeat in range(args.repeat):  # interleaved, the order alternating, so drift affects both alike
                for peer in peers if repeat % 2 == 0 else peers[::-1]:
                    argv = qemu_argv(transport, args) if peer == "qemu" else vmmkit_argv(transport, args)
                    result = run(peer_binary, argv, peer, timeout=300)
                    runs[peer].append(result)
                    print(f"  {transport:<4} {peer:<14} {result.seconds:5.1f} s  {result.error or 'ok'}  "
                          f"{ {k: v for k, v in result.results.items()} }", file=sys.stderr)
            table.append((transport, {peer: median_run(r) for peer, r in runs.items()}))

    print(f"\nnet: guest {GUEST.name} ({MEMORY}, 1 vCPU), {args.count} frames of {args.size} B each way, "
          f"{args.pings} round trips, {args.repeat} boot(s) each (median); QEMU -accel {args.accel} "
          f"(mmio: microvm, pci: q35), tap in a netns, no vhost; {time.monotonic() - started:.0f} s")
    ratios = print_table(table, peers)
    if ratios:
        geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"geometric mean of the throughput ratios (vmmkit / QEMU): {geomean:.2f}x over {len(ratios)} rows")
    print("\nframes that arrived (guest rx got / peer got of the tx phase), VMM CPU per frame outside the vCPU "
          "threads (us)")
    for transport, result in table:
        for peer, r in result.items():
            cpu = r.device_cpu * 1e6 / (2 * args.count) if r.device_cpu and r.error is None else None
            print(f"{transport:<6} {peer:<14} rx {r.rx_got}/{args.count}  tx {r.peer_sink}/{args.count}  "
                  f"cpu {fmt(cpu, 6)}" + (f"  error: {r.error}" if r.error else ""))
    print(f"results: {write_json(table, args, started)}")
    errors = [r.error for _, result in table for r in result.values() if r.error]
    return 1 if errors and not ratios else 0


if __name__ == "__main__":
    sys.exit(main())
