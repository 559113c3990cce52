"""Launch benchmark: vmmkit vs QEMU microvm on the same test guest, in the same run.

(a) cold start: wall time from spawning the VMM process to the guest's first serial byte, and
    to the VMM's exit after the guest powered off (a full run: the guest's whole output read,
    exit status 0 checked);
(b) the VMM's own resident memory: RSS outside guest RAM (from /proc/<pid>/smaps), measured
    while the guest spins;
(c) warm start: a VMM already running with its API socket (and a VM created through
    ``vm.create``): time from the ``vm.boot`` request to the guest's first serial byte. QEMU's
    nearest equivalent is ``-S`` (start paused) then QMP ``cont``, measured the same way.

(d) the pre-forked launcher (``vmmkit launcher serve``, started by this run on a private socket):
    spawn of the ``vmmkit`` command to the first guest byte, and the full run of a guest that
    powers off, to the command's exit, against cold vmmkit and QEMU microvm, interleaved
    (``--no-launcher`` skips it). Its rows go to ``bench/results/launch-<time>.json``.

Two reference rows that are not VMMs put the cold numbers in proportion: the same interpreter
printing one byte, and printing one byte after importing vmmkit's required libraries (pluggy,
attrs, cffi's backend). They are the floor any vmmkit start-up pays on this host.

    python bench/launch.py [--runs 10] [--memory 128] [--cold-only] [--json PATH]

Each run writes a JSON record (``bench/results/launch-<time>.json``, :mod:`record`) for
``bench/plot.py``.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from record import write_record

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "tests" / "guests" / "build" / "x86_64" / "selftest.elf"


def vmmkit_program() -> list[str]:
    """The ``vmmkit`` console script installed beside this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("vmmkit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vmmkit"]


def vmmkit_cmd(memory_mib: int, cmdline: str) -> list[str]:
    return [*vmmkit_program(), "--kernel", str(GUEST), "--memory", f"size={memory_mib}M", "--cmdline", cmdline]


def python_floor_cmd(_memory_mib: int, _cmdline: str) -> list[str]:
    return [sys.executable, "-c", "import os; os.write(1, b'x')"]


def python_libs_floor_cmd(_memory_mib: int, _cmdline: str) -> list[str]:
    return [sys.executable, "-c", "import attrs, pluggy, _cffi_backend, os; os.write(1, b'x')"]


FLOORS = {"python: 1 byte": python_floor_cmd, "python+libs: 1 byte": python_libs_floor_cmd}


def qemu_cmd(memory_mib: int, cmdline: str) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,rtc=on", "-accel", "kvm", "-m", f"{memory_mib}M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", str(GUEST),
            "-append", cmdline]


# Measure vmmkit as an installed program runs: with Python's bytecode cache (and vmmkit's cache
# of attrs-generated code) written by a warm-up run, as they are after installation.
# The cold rows never go through a launcher server the user may be running.
ENV = {**{key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"},
       "VMMKIT_LAUNCHER": "off"}


def time_to_first_byte(cmd: list[str], env: dict[str, str] = ENV) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        if not ready or not os.read(proc.stdout.fileno(), 1):
            raise RuntimeError(f"no guest output from {cmd[0]}")
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()


def time_to_exit(cmd: list[str], env: dict[str, str] = ENV) -> float:
    """Spawn to exit of a run whose guest powers off, reading all its output; the run must exit
    with 0 and a VMM's guest must have finished its self-test."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    output = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            output += chunk
        status = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        took = time.perf_counter() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if status != 0 or (cmd[0] != sys.executable and b"selftest: exit 0" not in output):
        raise RuntimeError(f"{cmd[0]}: exit status {status}, output ends {output[-200:]!r}")
    return took


def vmmkit_warm(memory_mib: int, tmp: Path) -> float:
    from vmmkit.api.client import ApiClient

    sock = tmp / "api.sock"
    proc = subprocess.Popen([*vmmkit_program(), "--api-socket", f"path={sock}"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=ENV)
    assert proc.stdout is not None
    try:
        _wait_for_path(sock)
        client = ApiClient(str(sock))
        _wait_for_listener(client)
        client.create({"payload": {"kernel": str(GUEST), "cmdline": "hello"}, "memory": {"size": memory_mib << 20},
                       "serial": {"mode": "Tty"}})
        start = time.perf_counter()
        client.boot()
        return _first_byte(proc, start)
    finally:
        proc.kill()
        proc.wait()


def qemu_warm(memory_mib: int, tmp: Path) -> float:
    import json
    import socket

    qmp_path = tmp / "qmp.sock"
    proc = subprocess.Popen([*qemu_cmd(memory_mib, "hello"), "-S", "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        _wait_for_path(qmp_path)
        qmp = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 10
        while True:  # the path exists from bind(); QEMU listens a moment later
            try:
                qmp.connect(str(qmp_path))
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        reader = qmp.makefile("rb")
        reader.readline()  # greeting
        qmp.sendall(json.dumps({"execute": "qmp_capabilities"}).encode())
        reader.readline()
        start = time.perf_counter()
        qmp.sendall(json.dumps({"execute": "cont"}).encode())
        return _first_byte(proc, start)
    finally:
        proc.kill()
        proc.wait()


def _wait_for_path(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.005)


def _wait_for_listener(client: Any, timeout: float = 10) -> None:
    """The socket's path exists from bind() on; the server listens a moment later (a connection
    in between is refused)."""
    from vmmkit.api.client import ApiError

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except ApiError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _first_byte(proc: subprocess.Popen[bytes], start: float) -> float:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready or not os.read(proc.stdout.fileno(), 1):
        raise RuntimeError("no guest output")
    return time.perf_counter() - start


def rss_outside_guest_ram(cmd: list[str], memory_mib: int) -> int:
    """KiB resident in mappings other than the guest-RAM mapping(s) of exactly the RAM size."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=ENV)
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 30
        seen = b""
        while b"heartbeat" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                seen += os.read(proc.stdout.fileno(), 4096)
        if b"heartbeat" not in seen:
            raise RuntimeError(f"{cmd[0]}: the guest never reached its heartbeat")
        return _rss_excluding(proc.pid, memory_mib * 1024)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _rss_excluding(pid: int, ram_kib: int) -> int:
    total = 0
    size = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields[0] == "Size:":
            size = int(fields[1])
        elif fields[0] == "Rss:" and size != ram_kib:
            total += int(fields[1])
    return total


def launcher_rows(memory_mib: int, runs: int, tmp: Path) -> list[dict[str, Any]]:
    """(d): the launcher against cold vmmkit and QEMU microvm, interleaved; prints the table
    and returns its rows."""
    sock = tmp / "launcher.sock"
    server = subprocess.Popen([*vmmkit_program(), "launcher", "serve", "--socket", str(sock)], env=ENV,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    try:
        line = server.stderr.readline()
        if "serving at" not in line:
            raise RuntimeError(f"the launcher server did not start: {line}{server.stderr.read()}")
        rows = {"vmmkit launcher": (vmmkit_cmd, {**ENV, "VMMKIT_LAUNCHER": str(sock)}),
                "vmmkit cold": (vmmkit_cmd, ENV)}
        if shutil.which("qemu-system-x86_64"):
            rows["qemu microvm"] = (qemu_cmd, ENV)
        first: dict[str, list[float]] = {name: [] for name in rows}
        full: dict[str, list[float]] = {name: [] for name in rows}
        for cmd, env in rows.values():  # warm-up
            time_to_exit(cmd(memory_mib, "hello"), env)
        for _ in range(runs):
            for name, (cmd, env) in rows.items():
                first[name].append(time_to_first_byte(cmd(memory_mib, "hello"), env))
                full[name].append(time_to_exit(cmd(memory_mib, "hello"), env))
    finally:
        server.terminate()
        server.wait()
    base = "qemu microvm" if "qemu microvm" in rows else "vmmkit cold"
    first_base, full_base = statistics.median(first[base]), statistics.median(full[base])
    print(f"\nlauncher: spawn -> first guest byte, and spawn -> exit of a guest that powers off ({runs} runs, "
          "median, min)")
    print(f"{'VMM':<16} {'first byte ms':>14} {'min ms':>8} {'vs qemu':>8} {'run to exit ms':>15} {'min ms':>8}"
          f" {'vs qemu':>8}")
    records: list[dict[str, Any]] = []
    for name in rows:
        f_med, x_med = statistics.median(first[name]), statistics.median(full[name])
        print(f"{name:<16} {f_med * 1000:>14.1f} {min(first[name]) * 1000:>8.1f} {f_med / first_base:>7.2f}x"
              f" {x_med * 1000:>15.1f} {min(full[name]) * 1000:>8.1f} {x_med / full_base:>7.2f}x")
        for measure, times, median, base_median in (("launcher: first byte", first[name], f_med, first_base),
                                                     ("launcher: full run", full[name], x_med, full_base)):
            records.append({"peer": name, "measure": measure, "median_ms": round(median * 1000, 2),
                            "min_ms": round(min(times) * 1000, 2),
                            "vs_qemu": round(median / base_median, 3) if base == "qemu microvm" else None})
    return records


def _pth_files() -> list[str]:
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()] if site.ENABLE_USER_SITE else site.getsitepackages()
    return [name for d in dirs if os.path.isdir(d) for name in os.listdir(d) if name.endswith(".pth")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--memory", type=int, default=128, help="guest RAM in MiB")
    parser.add_argument("--no-launcher", action="store_true", help="skip (d), the pre-forked launcher's table")
    parser.add_argument("--only-launcher", action="store_true", help="only (d), the pre-forked launcher's table")
    parser.add_argument("--cold-only", action="store_true", help="only the cold rows (no warm start, no RSS)")
    parser.add_argument("--json", default=None, help="the record's path ('-': stdout; default: "
                        "bench/results/launch-<time>.json)")
    args = parser.parse_args()
    started = time.monotonic()
    if not GUEST.is_file():
        subprocess.run(["make", "-s", "-C", str(GUEST.parents[2])], check=True)
    if args.only_launcher:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            launcher_only = launcher_rows(args.memory, args.runs, Path(tmp))
        write_record("launch", launcher_only, keys=("peer", "measure"), args=args, started=started, path=args.json,
                     qemu=_qemu_version(), guest=GUEST.name)
        return 0
    peers = {"vmmkit": vmmkit_cmd}
    if shutil.which("qemu-system-x86_64"):
        peers["qemu microvm"] = qemu_cmd
    else:
        print("qemu-system-x86_64 not found: showing vmmkit alone", file=sys.stderr)
    timed = {**peers, **FLOORS}
    for cmd in timed.values():  # warm-up: writes the bytecode caches, loads the host's file cache
        time_to_exit(cmd(args.memory, "hello"))
    cold: dict[str, list[float]] = {name: [] for name in timed}
    full: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.runs):  # interleaved, so drift affects all alike
        for name, cmd in timed.items():
            cold[name].append(time_to_first_byte(cmd(args.memory, "hello")))
            full[name].append(time_to_exit(cmd(args.memory, "hello")))
    rss: dict[str, int] = {}
    warm: dict[str, list[float]] = {name: [] for name in peers}
    if not args.cold_only:
        rss = {name: rss_outside_guest_ram(cmd(args.memory, "test=spin"), args.memory) for name, cmd in peers.items()}
        warm_runs = {"vmmkit": vmmkit_warm, "qemu microvm": qemu_warm}
        import tempfile

        for _ in range(max(3, args.runs // 2)):
            for name in peers:
                with tempfile.TemporaryDirectory() as tmp:
                    warm[name].append(warm_runs[name](args.memory, Path(tmp)))
    reference = "qemu microvm" if "qemu microvm" in peers else "vmmkit"
    measures = {"cold: first byte": cold, "cold: full run": full}
    if not args.cold_only:
        measures["warm: boot->byte"] = warm
    print(f"launch: test guest {GUEST.name}, {args.memory} MiB, 1 vCPU, {args.runs} runs each (median ms, min ms, "
          f"ratio of medians to {reference})")
    header = f"{'':<20}" + "".join(f" | {measure:>24}" for measure in measures)
    print(header + (f" | {'RSS outside RAM':>15}" if rss else ""))
    rows: list[dict[str, Any]] = []
    for name in timed:
        cells = []
        for measure, times in measures.items():
            if not times.get(name):
                cells.append(f"{'-':>24}")
                continue
            median, best = statistics.median(times[name]) * 1000, min(times[name]) * 1000
            ratio = median / (statistics.median(times[reference]) * 1000)
            cells.append(f"{median:>8.1f} {best:>7.1f} {ratio:>6.2f}x")
            rows.append({"peer": name, "measure": measure, "median_ms": round(median, 2), "min_ms": round(best, 2),
                         "vs_qemu": round(ratio, 3) if reference == "qemu microvm" else None})
        line = f"{name:<20}" + "".join(f" | {cell}" for cell in cells)
        if name in rss:
            line += f" | {rss[name] / 1024:>11.1f} MiB"
            rows.append({"peer": name, "measure": "RSS outside guest RAM", "mib": round(rss[name] / 1024, 2)})
        print(line + ("   (not a VMM: start-up floor)" if name in FLOORS else ""))
    print("full run: spawn to exit after the guest's self-test powered off (output read, status 0)")
    if not args.cold_only:
        print("warm: vmmkit from the vm.boot API request; QEMU from QMP 'cont' of a VM started with -S")
    print(f"python: {sys.executable} (site runs {len(_pth_files())} .pth file(s) at every start)")
    if not args.no_launcher and not args.cold_only:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rows += launcher_rows(args.memory, args.runs, Path(tmp))
    write_record("launch", rows, keys=("peer", "measure"), args=args, started=started, path=args.json,
                 qemu=_qemu_version(), guest=GUEST.name)
    return 0


def _qemu_version() -> str | None:
    if not shutil.which("qemu-system-x86_64"):
        return None
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split()
    return out[3] if len(out) > 3 else None


if __name__ == "__main__":
    sys.exit(main())
