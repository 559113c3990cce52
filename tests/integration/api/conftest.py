"""A real ``vmmkit --api-socket`` process, driven by ``vmmkit-remote`` (as an orchestrator
would), with the test guest's serial output in a file and an event-monitor stream."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "api"))

pytestmark = pytest.mark.requires_kvm

BANNER = "selftest: vmmkit x86_64 selftest v1"


def remote_command() -> list[str]:
    """The ``vmmkit-remote`` console script installed beside this interpreter (the one the tests
    run: ``.venv/bin/python -m pytest`` need not have ``.venv/bin`` on the ``PATH``), else the module."""
    script = Path(sys.executable).with_name("vmmkit-remote")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vmmkit.remote"]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


class VmmProcess:
    """``vmmkit --api-socket path=<dir>/api.sock --event-monitor path=<dir>/events.json``."""

    def __init__(self, directory: Path, hypervisor: str, *extra: str) -> None:
        self.dir = directory
        self.socket = directory / "api.sock"
        self.events_path = directory / "events.json"
        self.serial = directory / "serial.log"
        self.log = directory / "vmm.log"
        self.hypervisor = hypervisor
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmmkit", "--hypervisor", hypervisor, "--api-socket", f"path={self.socket}",
             "--event-monitor", f"path={self.events_path}", *extra],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, 20, "the API socket")
        assert self.proc.poll() is None, self.log.read_text()

    def remote(self, *args: str, check: bool = True, input: str | None = None,
               pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*remote_command(), "--api-socket", str(self.socket), *args],
                                capture_output=True, text=True, timeout=30, input=input, pass_fds=pass_fds)
        if check:
            assert result.returncode == 0, f"vmmkit-remote {' '.join(args)}: {result.stderr}"
        return result

    def info(self) -> dict[str, Any]:
        return dict(json.loads(self.remote("info").stdout))

    def output(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def heartbeats(self) -> int:
        return self.output().count("selftest: heartbeat")

    def events(self) -> list[tuple[str, str]]:
        from vmmkit.events import read_events

        return [(e["source"], e["event"]) for e in read_events(self.events_path.read_text())]

    def guest_config(self, kernel: Path, *, cmdline: str = "test=spin", **extra: Any) -> dict[str, Any]:
        return {
            "payload": {"kernel": str(kernel), "cmdline": cmdline},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "memory": {"size": 64 << 20},
            "serial": {"mode": "File", "file": str(self.serial)},
            "console": {"mode": "Off"},
            **extra,
        }

    def create(self, config: dict[str, Any]) -> None:
        path = self.dir / "vm.json"
        path.write_text(json.dumps(config))
        self.remote("create", str(path))

    def wait_exit(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the VMM did not exit; log:\n{self.log.read_text()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_vmm(short_dir: Path, vmmkit_hypervisor: str) -> Iterator[Callable[..., VmmProcess]]:
    started: list[VmmProcess] = []

    def start(*extra: str) -> VmmProcess:
        vmm = VmmProcess(short_dir, vmmkit_hypervisor, *extra)
        started.append(vmm)
        return vmm

    yield start
    for vmm in started:
        vmm.stop()


@pytest.fixture
def vmm(start_vmm: Callable[..., VmmProcess]) -> VmmProcess:
    return start_vmm()


def fd_target(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")
