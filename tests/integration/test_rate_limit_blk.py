"""Disk rate limits measured by the self-test guest's block benchmark (``test=blkbench``, the
one bench/blk.py runs) on real /dev/kvm: the guest times each phase with its TSC. It calibrates
the TSC against the CMOS RTC by watching for two changes of the seconds, which a vCPU descheduled
on a loaded host sees late; so the rates are taken with the TSC frequency KVM gives the guest
(``KVM_GET_TSC_KHZ``) instead of the guest's estimate (``rate * kvm_khz / guest_khz``). With a
bandwidth limit, an ops limit, or a rate-limit group, each phase's rate is within 15 % of the
configured one; without a limit the same (Python) path is many times faster, so the limit, not
the path, sets the rate.

The limit is an upper bound the device enforces: a phase above it fails the test at once. A phase
below it means the host did not run the guest fast enough to use its tokens (a bucket holds
250 ms of them; on a host with a load of 10+ on 2 cores a stall can be longer: a CI run at load
~13 saw a group's read phase at 2.5 MiB/s for 5 twice in a row, alone it passes first time), so
such a run is repeated twice before it counts as a failure.

Each boot takes ~7 s alone (the guest's warm-up and phases run at the limit); four boots.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

pytestmark = [pytest.mark.requires_kvm]

LINE = re.compile(r"^selftest: info blkbench: (read|write) ([\d.]+) MiB/s [\d.]+ us \(qd (\d+),")
CALIBRATION = re.compile(r"^selftest: info blkbench: cycle counter (\d+) kHz")
#: 1.25 MiB every 250 ms: 5 MiB/s. The bucket holds 250 ms of tokens, so a queue thread woken a
#: few ms late on a loaded host loses nothing; the guest's warm-up (8 MiB) drains the first bucket.
BANDWIDTH = "bw_size=1310720,bw_refill_time=250"
BANDWIDTH_MIB_S = 5.0
#: 25 operations every 250 ms: 100 requests/s; of 64 KiB, 6.25 MiB/s.
OPS = "ops_size=25,ops_refill_time=250"
OPS_MIB_S = 100 * 64 / 1024
TOLERANCE = 0.15


def blkbench(selftest_elf: Path, hypervisor: str, *options: str, qd: int = 0,
             env: dict[str, str] | None = None) -> dict[tuple[str, int], float]:
    """Boot the benchmark (8 MiB per phase in 64 KiB requests) and return (op, qd) -> MiB/s."""
    cmdline = f"test=blkbench blkbench.total=8M blkbench.size=64K blkbench.qd={qd}"
    result = run_vmmkit("--hypervisor", hypervisor, "--kernel", str(selftest_elf), "--memory", "size=128M",
                        "--cmdline", cmdline, "--serial", "tty", *options, timeout=300,
                        env={**os.environ, **(env or {})})
    explain = f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
    assert result.returncode == 0 and "selftest: ok blkbench" in result.stdout, explain
    lines = [line.strip() for line in result.stdout.splitlines()]
    guest_khz = next(int(m[1]) for line in lines if (m := CALIBRATION.match(line)))
    true_khz = tsc_khz()
    assert abs(guest_khz - true_khz) < 0.5 * true_khz, explain  # a calibration, not garbage
    rates = {(m[1], int(m[3])): float(m[2]) * true_khz / guest_khz for line in lines if (m := LINE.match(line))}
    assert rates, explain
    return rates


def tsc_khz() -> int:
    from vmmkit_kvm.hypervisor import KvmHypervisor

    hypervisor = KvmHypervisor()
    try:
        khz = hypervisor.tsc_khz()
    finally:
        hypervisor.close()
    if khz is None:
        pytest.skip("KVM does not report the guest TSC frequency (KVM_CAP_GET_TSC_KHZ)")
    return khz


def image(tmp_path: Path, name: str = "disk.img") -> Path:
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(64 << 20)
    return path


def assert_limited(measure: Callable[[], dict[tuple[str, int], float]], expected: float) -> None:
    """Every phase within :data:`TOLERANCE` of ``expected``; never above it, and below it on three
    boots in a row before that counts."""
    for attempt in (1, 2, 3):
        rates = measure()
        for (op, qd), rate in rates.items():
            assert rate <= (1 + TOLERANCE) * expected, f"{op} at qd {qd}: {rate:.2f} MiB/s > limit {expected}: {rates}"
        slow = {key: rate for key, rate in rates.items() if rate < (1 - TOLERANCE) * expected}
        if not slow:
            return
        print(f"attempt {attempt}: below the limit {expected} MiB/s: {rates} (load {os.getloadavg()})")
    raise AssertionError(f"below the limit {expected} MiB/s three times: {slow} of {rates}")


def test_bandwidth_limit_holds_at_depth_1_and_4(selftest_elf: Path, tmp_path: Path, vmmkit_hypervisor: str) -> None:
    def measure() -> dict[tuple[str, int], float]:
        rates = blkbench(selftest_elf, vmmkit_hypervisor, "--disk", f"path={image(tmp_path)},{BANDWIDTH}", qd=4)
        assert set(rates) == {("write", 1), ("read", 1), ("write", 4), ("read", 4)}
        return rates

    assert_limited(measure, BANDWIDTH_MIB_S)


def test_ops_limit_holds(selftest_elf: Path, tmp_path: Path, vmmkit_hypervisor: str) -> None:
    assert_limited(lambda: blkbench(selftest_elf, vmmkit_hypervisor, "--disk", f"path={image(tmp_path)},{OPS}"),
                   OPS_MIB_S)


def test_a_rate_limit_group_limits_its_disk(selftest_elf: Path, tmp_path: Path, vmmkit_hypervisor: str) -> None:
    assert_limited(lambda: blkbench(selftest_elf, vmmkit_hypervisor, "--rate-limit-group", f"id=shared,{BANDWIDTH}",
                                    "--disk", f"path={image(tmp_path)},rate_limit_group=shared",
                                    "--disk", f"path={image(tmp_path, 'idle.img')},rate_limit_group=shared"),
                   BANDWIDTH_MIB_S)


def test_without_a_limit_the_same_path_is_not_throttled(selftest_elf: Path, tmp_path: Path,
                                                        vmmkit_hypervisor: str) -> None:
    # VMMKIT_BLK_QUEUE_NATIVE=0: the Python queue path a limited disk takes, with no limiter
    # (~300 MiB/s on an idle host; a loaded one can starve any boot, so a slow one is repeated once)
    for attempt in (1, 2):
        rates = blkbench(selftest_elf, vmmkit_hypervisor, "--disk", f"path={image(tmp_path)}",
                         env={"VMMKIT_BLK_QUEUE_NATIVE": "0"})
        slow = {key: rate for key, rate in rates.items() if rate < 3 * OPS_MIB_S}
        if not slow:
            return
        print(f"attempt {attempt}: slower than 3x the limits without one: {rates} (load {os.getloadavg()})")
    raise AssertionError(f"without a limit, slower than 3x the limits twice: {slow} of {rates}")
