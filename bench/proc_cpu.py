"""CPU time of a child process's threads, sampled from ``/proc/<pid>/task/*/stat`` while it runs,
between two lines of its output (so start-up and shut-down do not count).

Used by bench/blk.py for the CPU a VMM spends per request outside its vCPU threads (vmmkit:
everything but ``vcpu<n>``; QEMU: everything but ``CPU <n>/KVM``), and vmmkit's queue threads
(``_disk0_q<i>``) alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

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


def run_sampled(argv: list[str], timeout: float, env: dict[str, str], start: str, end: str | None,
                period: float = 0.02) -> tuple[subprocess.CompletedProcess[str], dict[int, tuple[str, float]]]:
    """Run ``argv`` to the end (stdin closed, output captured) and return, per thread, the CPU
    it used from the first output containing ``start`` (or, with ``thread:<prefix>``, the first
    thread whose name starts so) to the first output containing ``end`` (``None``: the last
    sample before the exit), sampled every ``period``; empty if a mark never came."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, text=True,
                                errors="replace")
        first: dict[int, tuple[str, float]] | None = None
        last: dict[int, tuple[str, float]] | None = None
        deadline = time.monotonic() + timeout
        text = b""  # read with pread: the child's writes move the descriptor's shared offset
        while proc.poll() is None:
            now = thread_times(proc.pid)
            text += os.pread(out.fileno(), 1 << 20, len(text))
            if first is None and (any(name.startswith(start[7:]) for name, _ in now.values())
                                  if start.startswith("thread:") else start.encode() in text):
                first = now
            if first is not None and end is None:
                last = {**(last or {}), **now}  # a thread that ended keeps its last sample
            elif first is not None and last is None and end is not None and end.encode() in text:
                last = now
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(period)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())
    if first is None or last is None:
        return result, {}
    return result, {tid: (name, cpu - first.get(tid, (name, 0.0))[1]) for tid, (name, cpu) in last.items()}


QEMU_VCPU = re.compile(r"^CPU \d+/(KVM|TCG)$")


def device_cpu(peer: str, threads: dict[int, tuple[str, float]], queue_threads_only: bool = False) -> float | None:
    """Seconds of CPU the VMM used outside its vCPU threads (``queue_threads_only``: vmmkit's
    ``_disk0_q*`` threads alone); ``None`` when nothing was measured."""
    if not threads:
        return None
    if queue_threads_only:
        return sum(cpu for name, cpu in threads.values() if name.startswith("_disk0_q"))
    vcpu = QEMU_VCPU if peer == "qemu" else re.compile(r"^vcpu\d+$")
    return sum(cpu for name, cpu in threads.values() if not vcpu.match(name))
