#!/usr/bin/env python3
"""virtio-blk throughput and latency: vmmkit vs QEMU on the same test guest and the same raw
image, in the same run.

The guest's ``test=blkbench`` (tests/guests/virtio/blkbench.c) writes then reads
``--total`` MiB sequentially in ``--size`` KiB requests, at queue depth 1 and ``--qd``, timing
with the TSC (its rate measured against the CMOS RTC, which neither VMM slows down), and prints
``selftest: info blkbench: <op> <MiB/s> MiB/s <latency> us (qd <n>, ...)``. Guest ring-0 code
is emulated here (~1 us per instruction, shared/notes/pvm-host.md), so the guest does little
per request: the numbers are dominated by exits and the device path, which is the comparison
we want.

Every combination of

- storage: a 64 MiB image on tmpfs (/dev/shm) and on the repository's file system;
- cache: ``cached`` (vmmkit's default buffered I/O; QEMU ``cache=writeback``) and ``direct``
  (vmmkit ``direct=on``; QEMU ``cache=none``, i.e. O_DIRECT);
- transport: virtio-mmio (vmmkit ``--platform virtio_transport=mmio``; QEMU ``-M microvm``) and
  virtio-pci (vmmkit ``virtio_transport=pci``; QEMU ``-M q35``, modern-only device)

boots vmmkit and then QEMU (``-accel kvm`` when /dev/kvm opens, else TCG; ``--accel``) on the
same image, and the table shows MiB/s and mean latency with the ratio vmmkit / QEMU
(throughput: above 1 is vmmkit faster; latency: below 1 is vmmkit faster).

Each configuration has two rows per phase (column ``path``): ``virtio``, each VMM's own
virtio-blk device on the image, and ``vhost``, the vhost-user-blk path with
``qemu-storage-daemon`` serving the same image (``cache.direct=on`` for ``direct``) to vmmkit's
frontend (``--disk vhost_user=on,socket=``) and to QEMU's (``vhost-user-blk-pci``, on microvm
``vhost-user-blk``), both with memfd-backed shared guest RAM. ``--no-vhost`` leaves those out.

``--limit MIB_S`` also boots each VMM with a bandwidth limit of that many MiB/s on the disk:
vmmkit ``bw_size=<MIB_S/4 MiB>,bw_refill_time=250`` (Cloud Hypervisor's token bucket, 250 ms
deep), QEMU ``throttling.bps-total=<bytes/s>``, and a second table shows how close each
comes to the limit.

    python bench/blk.py [--total 32] [--size 64] [--qd 4] [--storage shm,disk]
                        [--cache cached,direct] [--transport mmio,pci] [--repeat 1] [--no-vhost]
                        [--limit 5]

With the defaults one run boots 64 guests (16 configurations x 2 paths x 2 repeats) and takes
about 200 s;
``--repeat 1`` halves that. Expect run-to-run noise of tens of percent on a 2-core machine: the
vCPU (busy polling) and the device threads share the cores.
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

from integration.qemu_peer import VirtioSetup, qemu_virtio_command  # noqa: E402
from proc_cpu import device_cpu, run_sampled  # noqa: E402

IMAGE_SIZE = 64 << 20
MEMORY = "128M"
LINE = re.compile(r"^selftest: info blkbench: (read|write) ([\d.]+) MiB/s ([\d.]+) us \(qd (\d+),")
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}

Key = tuple[str, int]  # (op, qd)


@dataclass
class Run:
    """One boot: (op, qd) -> (MiB/s, latency us), or the error."""

    results: dict[Key, tuple[float, float]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    device_cpu: float | None = None  #: CPU seconds outside the vCPU threads during the phases (proc_cpu.py)
    queue_cpu: float | None = None  #: vmmkit: CPU seconds of the _disk0_q* threads alone


def parse(stdout: str) -> dict[Key, tuple[float, float]]:
    results = {}
    for line in stdout.splitlines():
        if m := LINE.match(line.strip()):
            results[(m[1], int(m[4]))] = (float(m[2]), float(m[3]))
    return results


def run(argv: list[str], timeout: float, peer: str = "vmmkit") -> Run:
    start = time.monotonic()
    env = {**ENV, "VMMKIT_BLK_QUEUE_NATIVE": "0"} if peer == "vmmkit-pyqueue" else ENV
    try:
        # vmmkit's serial output reaches the pipe at exit: its phase starts when the queue thread does.
        marks = ("blkbench: cycle counter", "ok blkbench") if peer == "qemu" else ("thread:_disk0_q", None)
        proc, threads = run_sampled(argv, timeout, env, start=marks[0], end=marks[1])
    except subprocess.TimeoutExpired:
        return Run(error=f"timed out after {timeout:.0f} s", seconds=time.monotonic() - start)
    out = Run(parse(proc.stdout), seconds=time.monotonic() - start, device_cpu=device_cpu(peer, threads),
              queue_cpu=None if peer == "qemu" else device_cpu(peer, threads, queue_threads_only=True))
    fails = [line.strip() for line in proc.stdout.splitlines() if "selftest: FAIL" in line]
    if fails or "selftest: ok blkbench" not in proc.stdout:
        tail = (fails or proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        out.error = f"exit {proc.returncode}: {tail[:160]}"
    return out


def guest_cmdline(args: argparse.Namespace) -> str:
    return f"test=blkbench blkbench.total={args.total}M blkbench.size={args.size}K blkbench.qd={args.qd}"


def vmmkit_argv(image: Path, cache: str, transport: str, args: argparse.Namespace) -> list[str]:
    disk = f"path={image}" + (",direct=on" if cache == "direct" else "")
    return [sys.executable, "-m", "vmmkit", "--kernel", str(GUEST), "--memory", f"size={MEMORY}",
            "--cmdline", guest_cmdline(args), "--platform", f"virtio_transport={transport}", "--disk", disk,
            "--serial", "tty"]


def limit_bytes(args: argparse.Namespace) -> int:
    return round(args.limit * (1 << 20))


def vmmkit_limited_argv(image: Path, cache: str, transport: str, args: argparse.Namespace) -> list[str]:
    """vmmkit with a bandwidth limit of ``--limit`` MiB/s: a bucket of 250 ms worth."""
    argv = vmmkit_argv(image, cache, transport, args)
    at = argv.index("--disk") + 1
    argv[at] += f",bw_size={limit_bytes(args) // 4},bw_refill_time=250"
    return argv


def qemu_limited_argv(image: Path, cache: str, transport: str, args: argparse.Namespace) -> list[str]:
    """QEMU with ``throttling.bps-total`` at ``--limit`` MiB/s on the same drive."""
    return [f"{arg},throttling.bps-total={limit_bytes(args)}" if arg.startswith("file=") else arg
            for arg in qemu_argv(image, cache, transport, args)]


def print_limited(table: list[tuple[str, str, str, dict[str, Run]]], args: argparse.Namespace) -> None:
    """The limited boots: MiB/s each VMM reached against the limit, and the error."""
    print(f"\nbandwidth limit {args.limit} MiB/s: vmmkit bw_size/bw_refill_time (token bucket) vs QEMU "
          "throttling.bps-total, MiB/s and the deviation from the limit")
    print(f"{'storage':<7} {'cache':<6} {'virtio':<6} {'op':<5} {'qd':>2} | {'vmmkit':>8} {'dev':>7} | "
          f"{'QEMU':>8} {'dev':>7}")
    for storage, cache, transport, result in table:
        ours, theirs = result.get("vmmkit-limited"), result.get("qemu-limited")
        keys = sorted(set(ours.results if ours else ()) | set(theirs.results if theirs else ()),
                      key=lambda k: (k[1], k[0] != "write"))
        for key in keys:
            cells = []
            for run_ in (ours, theirs):
                rate = run_.results.get(key, (None, None))[0] if run_ else None
                dev = (rate - args.limit) / args.limit * 100 if rate is not None else None
                cells.append(f"{fmt(rate, 8)} {fmt(dev, 6)}%")
            print(f"{storage:<7} {cache:<6} {transport:<6} {key[0]:<5} {key[1]:>2} | {cells[0]} | {cells[1]}")


def qemu_argv(image: Path, cache: str, transport: str, args: argparse.Namespace) -> list[str]:
    extra = guest_cmdline(args).removeprefix("test=blkbench ")
    command = qemu_virtio_command(GUEST, ["blkbench"], VirtioSetup(blk_image=image), transport=transport,
                                  accel=args.accel, memory=MEMORY, extra_cmdline=extra)
    mode = "cache=none" if cache == "direct" else "cache=writeback"
    return [arg.replace("cache=writeback", mode) if arg.startswith("file=") else arg for arg in command.argv]


QSD = "qemu-storage-daemon"


class StorageDaemon:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on ``socket`` while in a ``with``."""

    def __init__(self, image: Path, cache: str, socket: Path) -> None:
        direct = ",cache.direct=on" if cache == "direct" else ""
        self.socket = socket
        self.argv = [QSD, "--blockdev", f"driver=file,node-name=f,filename={image}{direct}",
                     "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket},"
                     "writable=on"]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StorageDaemon:
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"{QSD} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def vmmkit_vhost_argv(socket: Path, transport: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "vmmkit", "--kernel", str(GUEST), "--memory", f"size={MEMORY},shared=on",
            "--cmdline", guest_cmdline(args), "--platform", f"virtio_transport={transport}",
            "--disk", f"vhost_user=on,socket={socket}", "--serial", "tty"]


def qemu_vhost_argv(socket: Path, transport: str, args: argparse.Namespace) -> list[str]:
    """QEMU's command for the same test with its virtio-blk swapped for vhost-user-blk on
    ``socket``, and guest RAM a shared memfd (vhost-user needs it)."""
    argv = qemu_argv(socket, "cached", transport, args)
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-drive":
            i += 2
            continue
        if arg.startswith("virtio-blk-"):
            where = arg.split(",")[1:]
            placement = ",".join(w for w in where if w.startswith(("addr=", "bus=", "disable-legacy=")))
            device = "vhost-user-blk-pci" if transport == "pci" else "vhost-user-blk"
            out[-1:] = ["-chardev", f"socket,id=vub0,path={socket}", "-device", f"{device},chardev=vub0,{placement}"]
            i += 1
            continue
        if out and out[-1] == "-M":
            arg += ",memory-backend=mem"
        out.append(arg)
        i += 1
    return out + ["-object", f"memory-backend-memfd,id=mem,size={MEMORY},share=on"]


def make_image(path: Path) -> None:
    """IMAGE_SIZE bytes of non-zero data, allocated and on disk (reads hit real blocks)."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(IMAGE_SIZE >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    m = re.search(r"version (\S+)", out)
    return m[1] if m else "?"


def median_run(runs: list[Run]) -> Run:
    """Per (op, qd), the median over repeats (throughput and latency taken separately)."""
    ok = [r for r in runs if r.error is None]
    if not ok:
        return runs[-1]
    keys = ok[0].results.keys()
    cpus = [r.device_cpu for r in ok if r.device_cpu is not None]
    queue_cpus = [r.queue_cpu for r in ok if r.queue_cpu is not None]
    return Run({k: (statistics.median(r.results[k][0] for r in ok if k in r.results),
                    statistics.median(r.results[k][1] for r in ok if k in r.results)) for k in keys},
               seconds=sum(r.seconds for r in runs), device_cpu=statistics.median(cpus) if cpus else None,
               queue_cpu=statistics.median(queue_cpus) if queue_cpus else None)


def fmt(value: float | None, width: int, digits: int = 1) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def print_seccomp_cost(table: list[tuple[str, str, str, dict[str, Run]]]) -> None:
    """vmmkit with its seccomp filters (the default) against ``--seccomp false``, same boots."""
    print("\nseccomp cost: vmmkit --seccomp true / --seccomp false, MiB/s")
    print(f"{'storage':<7} {'cache':<6} {'virtio':<6} {'op':<5} {'qd':>2} | {'on':>8} {'off':>8} | {'on/off':>6}")
    ratios: list[float] = []
    for storage, cache, transport, result in table:
        on, off = result["vmmkit"], result["vmmkit-noseccomp"]
        for key in sorted(set(on.results) & set(off.results), key=lambda k: (k[1], k[0] != "write")):
            ratio = on.results[key][0] / off.results[key][0] if off.results[key][0] else None
            if ratio:
                ratios.append(ratio)
            print(f"{storage:<7} {cache:<6} {transport:<6} {key[0]:<5} {key[1]:>2} | "
                  f"{fmt(on.results[key][0], 8)} {fmt(off.results[key][0], 8)} | {fmt(ratio, 5, 2)}x")
    if ratios:
        geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"geometric mean on/off: {geomean:.3f}x over {len(ratios)} rows")


def print_rows(storage: str, cache: str, transport: str, path: str, ours: Run, theirs: Run | None,
               ratios: list[float]) -> None:
    """One configuration's rows of the main table: vmmkit against QEMU on one path."""
    keys = sorted(set(ours.results) | set(theirs.results if theirs else ()), key=lambda k: (k[1], k[0] != "write"))
    for key in keys:
        a = ours.results.get(key)
        b = theirs.results.get(key) if theirs else None
        ratio = a[0] / b[0] if a and b and b[0] else None
        lat_ratio = a[1] / b[1] if a and b and b[1] else None
        if ratio:
            ratios.append(ratio)
        print(f"{storage:<7} {cache:<6} {transport:<6} {path:<6} {key[0]:<5} {key[1]:>2} | "
              f"{fmt(a[0] if a else None, 12)} {fmt(a[1] if a else None, 8)} | "
              f"{fmt(b[0] if b else None, 10)} {fmt(b[1] if b else None, 8)} | "
              f"{fmt(ratio, 10, 2)}x {fmt(lat_ratio, 8, 2)}x")
    if not keys:
        print(f"{storage:<7} {cache:<6} {transport:<6} {path:<6} (no results)")


def print_python_queue(table: list[tuple[str, str, str, dict[str, Run]]]) -> None:
    """vmmkit's C queue against its Python queue (VMMKIT_BLK_QUEUE_NATIVE=0), and QEMU, same boots."""
    print("\nC queue vs Python queue: MiB/s (vmmkit, vmmkit-pyqueue, QEMU) and the ratios")
    print(f"{'storage':<7} {'cache':<6} {'virtio':<6} {'op':<5} {'qd':>2} | {'C':>8} {'Python':>8} {'QEMU':>8} | "
          f"{'C/Py':>6} {'Py/QEMU':>7}")
    for storage, cache, transport, result in table:
        c, py, qemu = result["vmmkit"], result.get("vmmkit-pyqueue"), result.get("qemu")
        if py is None:
            continue
        for key in sorted(set(c.results) & set(py.results), key=lambda k: (k[1], k[0] != "write")):
            q = qemu.results.get(key) if qemu else None
            c_py = c.results[key][0] / py.results[key][0] if py.results[key][0] else None
            py_q = py.results[key][0] / q[0] if q and q[0] else None
            print(f"{storage:<7} {cache:<6} {transport:<6} {key[0]:<5} {key[1]:>2} | {fmt(c.results[key][0], 8)} "
                  f"{fmt(py.results[key][0], 8)} {fmt(q[0] if q else None, 8)} | {fmt(c_py, 5, 2)}x {fmt(py_q, 6, 2)}x")


def requests_per_boot(args: argparse.Namespace) -> int:
    """The guest writes then reads ``total`` MiB at queue depth 1 and at ``qd``: four phases."""
    return 4 * (args.total << 10) // args.size


def print_device_cpu(table: list[tuple[str, str, str, dict[str, Run]]], args: argparse.Namespace) -> None:
    """CPU per request outside the vCPU threads during the guest's I/O phases (median boot)."""
    peers = sorted({peer for _, _, _, result in table for peer in result}, key=lambda p: (p != "vmmkit", p))
    print(f"\nVMM CPU per {args.size} KiB request outside the vCPU threads while the guest does I/O, us "
          "(in brackets: vmmkit's _disk0_q* threads alone)")
    print(f"{'storage':<7} {'cache':<6} {'virtio':<6} | " + " ".join(f"{p:>22}" for p in peers))

    def per_request(seconds: float | None) -> float | None:
        return seconds * 1e6 / requests_per_boot(args) if seconds is not None else None

    for storage, cache, transport, result in table:
        cells = []
        for peer in peers:
            r = result.get(peer)
            ok = r is not None and r.error is None
            total = per_request(r.device_cpu) if ok and r else None
            queue = per_request(r.queue_cpu) if ok and r else None
            cells.append(fmt(total, 12) + (f" ({fmt(queue, 7)})" if queue is not None else " " * 10))
        print(f"{storage:<7} {cache:<6} {transport:<6} | " + " ".join(cells))


def write_json(table: list[tuple[str, str, str, dict[str, Run]]], args: argparse.Namespace, started: float) -> None:
    """One record of this run for the trend (bench/results/*.json, issue 20 item 6)."""
    import json

    rows = []
    for storage, cache, transport, result in table:
        for peer, r in result.items():
            for (op, qd), (mib_s, latency) in sorted(r.results.items()):
                rows.append({"storage": storage, "cache": cache, "transport": transport, "peer": peer, "op": op,
                             "qd": qd, "mib_s": mib_s, "latency_us": latency})
            if r.device_cpu is not None and r.error is None:
                rows.append({"storage": storage, "cache": cache, "transport": transport, "peer": peer,
                             "cpu_us_per_request": r.device_cpu * 1e6 / requests_per_boot(args),
                             "queue_thread_cpu_us_per_request":
                                 r.queue_cpu * 1e6 / requests_per_boot(args) if r.queue_cpu is not None else None})
    path = Path(args.json) if args.json else REPO / "bench" / "results" / time.strftime("blk-%Y%m%dT%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"bench": "blk", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": time.monotonic() - started,
              "args": {k: v for k, v in vars(args).items() if k != "json"}, "qemu": qemu_version(),
              "load": os.getloadavg(), "rows": rows}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=int, default=32, help="MiB per phase (default 32)")
    parser.add_argument("--size", type=int, default=64, help="KiB per request (default 64)")
    parser.add_argument("--qd", type=int, default=4, help="the deeper queue depth (default 4, at most 5)")
    parser.add_argument("--storage", default="shm,disk", help="shm, disk or both (default)")
    parser.add_argument("--cache", default="cached,direct", help="cached, direct or both (default)")
    parser.add_argument("--transport", default="mmio,pci", help="mmio, pci or both (default)")
    parser.add_argument("--accel", default=None, help="QEMU accelerator (default: kvm if usable, else tcg)")
    parser.add_argument("--repeat", type=int, default=2, help="boots per configuration and VMM (default 2; median)")
    parser.add_argument("--no-qemu", action="store_true", help="vmmkit alone")
    parser.add_argument("--no-vhost", action="store_true", help="leave out the vhost-user-blk rows")
    parser.add_argument("--seccomp-cost", action="store_true",
                        help="also boot vmmkit with --seccomp false, and report the filters' cost")
    parser.add_argument("--python-queue", action="store_true",
                        help="also boot vmmkit with its virtio-blk queues served in Python "
                             "(VMMKIT_BLK_QUEUE_NATIVE=0: the path before the C queue), in the same run")
    parser.add_argument("--limit", type=float, default=None, metavar="MIB_S",
                        help="also boot each VMM with a bandwidth limit of MIB_S MiB/s on the disk")
    parser.add_argument("--json", default=None, help="write the results here (default: bench/results/blk-<time>.json)")
    args = parser.parse_args()
    args.accel = args.accel or ("kvm" if kvm_usable() else "tcg")
    subprocess.run(["make", "-s", "-C", str(GUESTS)], check=True)
    peers = (["vmmkit"] + (["vmmkit-noseccomp"] if args.seccomp_cost else [])
             + (["vmmkit-pyqueue"] if args.python_queue else []))
    if not args.no_qemu:
        if shutil.which("qemu-system-x86_64"):
            peers.append("qemu")
        else:
            print("qemu-system-x86_64 not found: vmmkit alone", file=sys.stderr)
    if args.limit is not None:
        if args.limit <= 0:
            parser.error("--limit: a positive number of MiB/s")
        peers += [f"{peer}-limited" for peer in ("vmmkit", "qemu") if peer in peers]
    if not args.no_vhost:
        if shutil.which(QSD):
            peers += [f"{peer}-vhost" for peer in ("vmmkit", "qemu") if peer in peers]
        else:
            print(f"{QSD} not found: no vhost-user rows", file=sys.stderr)
    dirs = {"shm": Path("/dev/shm"), "disk": REPO}
    storages = [s for s in args.storage.split(",") if s]
    caches = [c for c in args.cache.split(",") if c]
    transports = [t for t in args.transport.split(",") if t]
    unknown = (set(storages) - set(dirs)) | (set(caches) - {"cached", "direct"}) | (set(transports) - {"mmio", "pci"})
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")

    started = time.monotonic()
    table: list[tuple[str, str, str, dict[str, Run]]] = []
    for storage in storages:
        with tempfile.TemporaryDirectory(prefix=".blkbench-", dir=dirs[storage]) as tmp:
            image = Path(tmp) / "disk.img"
            make_image(image)
            for cache in caches:
                for transport in transports:
                    runs: dict[str, list[Run]] = {peer: [] for peer in peers}
                    for repeat in range(args.repeat):  # interleaved, the order alternating, so drift
                        for peer in peers if repeat % 2 == 0 else peers[::-1]:  # affects both alike
                            # The previous boot's dirty pages written back first: a write to a page
                            # under writeback waits for it (stable pages), which would slow the next VMM.
                            os.sync()
                            if peer.endswith("-vhost"):
                                socket = Path(tmp) / "vhost.sock"
                                vhost_argv = qemu_vhost_argv if peer == "qemu-vhost" else vmmkit_vhost_argv
                                with StorageDaemon(image, cache, socket):
                                    result = run(vhost_argv(socket, transport, args), timeout=120, peer=peer)
                            elif peer.endswith("-limited"):
                                limited = qemu_limited_argv if peer == "qemu-limited" else vmmkit_limited_argv
                                result = run(limited(image, cache, transport, args), timeout=300,
                                             peer=peer.removesuffix("-limited"))
                            else:
                                argv = (qemu_argv if peer == "qemu" else vmmkit_argv)(image, cache, transport, args)
                                if peer == "vmmkit-noseccomp":
                                    argv.extend(["--seccomp", "false"])
                                result = run(argv, timeout=120, peer=peer)
                            runs[peer].append(result)
                            print(f"  {storage:<4} {cache:<6} {transport:<4} {peer:<12} {result.seconds:5.1f} s  "
                                  f"{result.error or 'ok'}", file=sys.stderr)
                    table.append((storage, cache, transport, {peer: median_run(r) for peer, r in runs.items()}))

    qemu_machines = "mmio: microvm, pci: q35"
    print(f"\nblk: sequential {args.size} KiB requests, {args.total} MiB per phase, guest {GUEST.name} "
          f"({MEMORY}, 1 vCPU), {args.repeat} boot(s) each; QEMU {qemu_version()} -accel {args.accel} "
          f"({qemu_machines}); {time.monotonic() - started:.0f} s")
    print("shm: /dev/shm (tmpfs); disk: the repository's file system; cached: vmmkit buffered / QEMU "
          "cache=writeback; direct: vmmkit direct=on / QEMU cache=none")
    print("path virtio: each VMM's own virtio-blk device; path vhost: each VMM's vhost-user-blk frontend with "
          "qemu-storage-daemon's vhost-user-blk export as the backend")
    header = (f"{'storage':<7} {'cache':<6} {'virtio':<6} {'path':<6} {'op':<5} {'qd':>2} | "
              f"{'vmmkit MiB/s':>12} {'lat us':>8} | "
              f"{'QEMU MiB/s':>10} {'lat us':>8} | {'MiB/s ratio':>11} {'lat ratio':>9}")
    print(header)
    print("-" * len(header))
    ratios: list[float] = []
    errors: list[str] = []
    for storage, cache, transport, result in table:
        for who, r in result.items():
            if r.error:
                errors.append(f"{storage} {cache} {transport} {who}: {r.error}")
        for path, suffix in (("virtio", ""), ("vhost", "-vhost")):
            if f"vmmkit{suffix}" in result:
                print_rows(storage, cache, transport, path, result[f"vmmkit{suffix}"], result.get(f"qemu{suffix}"),
                           ratios)
    if ratios:
        geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"geometric mean of the MiB/s ratios (vmmkit / QEMU): {geomean:.2f}x over {len(ratios)} rows")
    if args.seccomp_cost:
        print_seccomp_cost(table)
    if args.python_queue:
        print_python_queue(table)
    if args.limit is not None:
        print_limited(table, args)
    print_device_cpu(table, args)
    write_json(table, args, started)
    for error in errors:
        print(f"error: {error}")
    return 1 if errors and not ratios else 0


if __name__ == "__main__":
    sys.exit(main())
