"""CPU time of a child process's threads, sampled from ``/proc/<pid>/task/*/stat`` while it runs
(a thread's counters vanish when the process exits, so the last sample of each thread counts).

Used by bench/blk.py for the CPU its device path spends per request: vmmkit's queue threads
(``<disk>_q<i>``), QEMU's threads other than its vCPUs (the main loop and its I/O workers).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable

TICK = os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (name, user + system seconds) of every thread of ``pid`` now."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / TICK)  # utime, stime
    return out


def run_sampled(argv: list[str], timeout: float, env: dict[str, str],
                period: float = 0.02) -> tuple[subprocess.CompletedProcess[str], dict[int, tuple[str, float]]]:
    """Run ``argv`` to the end (stdin closed, output captured), sampling its threads' CPU time."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, text=True,
                                errors="replace")
        seen: dict[int, tuple[str, float]] = {}
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            seen.update(thread_times(proc.pid))
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(period)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read()), seen


QEMU_VCPU = re.compile(r"^CPU \d+/(KVM|TCG)$")


def device_cpu(peer: str, threads: dict[int, tuple[str, float]]) -> float:
    """Seconds of CPU in the threads that serve the disk: vmmkit's ``_disk0_q*`` threads;
    QEMU's every thread but its vCPUs."""
    pick: Callable[[str], bool]
    if peer == "qemu":
        def pick(name: str) -> bool:
            return not QEMU_VCPU.match(name)
    else:
        def pick(name: str) -> bool:
            return name.startswith("_disk0_q")
    return sum(cpu for name, cpu in threads.values() if pick(name))
