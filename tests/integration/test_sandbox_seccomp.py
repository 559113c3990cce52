"""Seccomp on a real VM (issue 18): a device thread that makes a system call its filter lacks
stops the VMM with a message naming the thread and the call; ``--seccomp log`` logs it and
goes on; a plugin that declares the call (``vmmkit_seccomp_syscalls``) may make it.

The device is ``tests/integration/sandbox/forbidden_device.py``, a test-only plugin run as a
script, since the VMM it runs in is meant to die."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

GUEST_ARCH = "x86_64"
pytestmark = pytest.mark.requires_kvm

SCRIPT = Path(__file__).resolve().parent / "sandbox" / "forbidden_device.py"


def run_device(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "VMMKIT_SECCOMP"}
    # A loaded host boots slowly; the VMM itself stops within a second of the call.
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=240,
                          env=env, stdin=subprocess.DEVNULL)


def test_a_forbidden_call_in_a_device_thread_stops_the_vmm_naming_thread_and_call() -> None:
    result = run_device("true")
    assert result.returncode == -signal.SIGSYS, (result.returncode, result.stderr)
    assert re.search(r"vmmkit: seccomp: thread 'forbidden-dev' made a forbidden system call: socket \(\d+\)",
                     result.stderr), result.stderr
    assert "socket ok" not in result.stdout


def test_log_mode_lets_the_call_through_and_the_kernel_logs_it() -> None:
    result = run_device("log")
    assert result.returncode == 0, result.stderr
    assert "socket ok" in result.stdout
    try:
        kernel_log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return  # no dmesg here: the call going through is what log mode promises
    if "type=1326" in kernel_log:  # seccomp's audit records are visible on this host
        assert re.search(r'comm="forbidden-dev".* syscall=\d+ ', kernel_log)


def test_a_call_the_plugin_declares_is_allowed() -> None:
    result = run_device("true", "declare")
    assert result.returncode == 0, result.stderr
    assert "socket ok" in result.stdout


def test_seccomp_false_filters_nothing() -> None:
    result = run_device("false")
    assert result.returncode == 0, result.stderr
    assert "socket ok" in result.stdout


def test_a_bad_seccomp_value_is_a_usage_error() -> None:
    vmmkit = [sys.executable, "-m", "vmmkit"]
    bad_option = subprocess.run([*vmmkit, "run", "--seccomp", "maybe"], capture_output=True, text=True, timeout=60)
    assert bad_option.returncode == 2 and "--seccomp" in bad_option.stderr and "Traceback" not in bad_option.stderr
    env = {**os.environ, "VMMKIT_SECCOMP": "maybe"}
    bad_env = subprocess.run([*vmmkit, "run"], capture_output=True, text=True, timeout=60, env=env)
    assert bad_env.returncode == 2 and "VMMKIT_SECCOMP" in bad_env.stderr and "Traceback" not in bad_env.stderr
