"""Disk rate limits measured by the self-test guest's block benchmark (``test=blkbench``, the
one bench/blk.py runs) on real /dev/kvm: the guest times each phase with its TSC (calibrated
against the CMOS RTC, which vmmkit does not slow down), so the rate it reports is the rate the
guest saw. With a bandwidth limit, an ops limit, or a rate-limit group, each phase's rate is
within 15 % of the configured one; without a limit the same (Python) path is many times faster,
so the limit, not the path, sets the rate.

Each boot takes ~7 s alone (the guest's warm-up and phases run at the limit); four boots.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

pytestmark = [pytest.mark.requires_kvm]

LINE = re.compile(r"^selftest: info blkbench: (read|write) ([\d.]+) MiB/s [\d.]+ us \(qd (\d+),")
#: 128 KiB every 25 ms: 5 MiB/s, the bucket two 64 KiB requests deep.
BANDWIDTH = "bw_size=131072,bw_refill_time=25"
BANDWIDTH_MIB_S = 5.0
#: 2 operations every 20 ms: 100 requests/s; of 64 KiB, 6.25 MiB/s.
OPS = "ops_size=2,ops_refill_time=20"
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
    rates = {(m[1], int(m[3])): float(m[2]) for line in result.stdout.splitlines()
             if (m := LINE.match(line.strip()))}
    assert rates, explain
    return rates


def image(tmp_path: Path, name: str = "disk.img") -> Path:
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(64 << 20)
    return path


def assert_near(rates: dict[tuple[str, int], float], expected: float) -> None:
    for (op, qd), rate in rates.items():
        assert abs(rate - expected) <= TOLERANCE * expected, f"{op} at qd {qd}: {rate} MiB/s, limit {expected}: {rates}"


def test_bandwidth_limit_holds_at_depth_1_and_4(selftest_elf: Path, tmp_path: Path, vmmkit_hypervisor: str) -> None:
    rates = blkbench(selftest_elf, vmmkit_hypervisor, "--disk", f"path={image(tmp_path)},{BANDWIDTH}", qd=4)
    assert set(rates) == {("write", 1), ("read", 1), ("write", 4), ("read", 4)}
    assert_near(rates, BANDWIDTH_MIB_S)


def test_ops_limit_holds(selftest_elf: Path, tmp_path: Path, vmmkit_hypervisor: str) -> None:
    rates = blkbench(selftest_elf, vmmkit_hypervisor, "--disk", f"path={image(tmp_path)},{OPS}")
    assert_near(rates, OPS_MIB_S)


def test_a_rate_limit_group_limits_its_disk(selftest_elf: Path, tmp_path: Path, vmmkit_hypervisor: str) -> None:
    rates = blkbench(selftest_elf, vmmkit_hypervisor, "--rate-limit-group", f"id=shared,{BANDWIDTH}",
                     "--disk", f"path={image(tmp_path)},rate_limit_group=shared",
                     "--disk", f"path={image(tmp_path, 'idle.img')},rate_limit_group=shared")
    assert_near(rates, BANDWIDTH_MIB_S)


def test_without_a_limit_the_same_path_is_not_throttled(selftest_elf: Path, tmp_path: Path,
                                                        vmmkit_hypervisor: str) -> None:
    # VMMKIT_BLK_QUEUE_NATIVE=0: the Python queue path a limited disk takes, with no limiter
    rates = blkbench(selftest_elf, vmmkit_hypervisor, "--disk", f"path={image(tmp_path)}",
                     env={"VMMKIT_BLK_QUEUE_NATIVE": "0"})
    for (op, qd), rate in rates.items():
        assert rate >= 3 * OPS_MIB_S, f"{op} at qd {qd}: only {rate} MiB/s without a limit"
