"""Bad requests and hostile clients against a real ``vmmkit --api-socket`` process: each gets a
clear 4xx answer and the VMM keeps answering (issue 12, item 7)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vmmkit.api.client import ApiClient, ApiResponse

from .conftest import VmmProcess, remote_command, wait_for

GUEST_ARCH = "x86_64"

pytestmark = pytest.mark.requires_kvm


def call(vmm: VmmProcess, method: str, endpoint: str, body: Any = None) -> ApiResponse:
    return ApiClient(str(vmm.socket), timeout=20).request(method, endpoint, body, check=False)


def messages(response: ApiResponse) -> str:
    return " ".join(json.loads(response.body)) if response.body else ""


def test_counters_after_shutdown_is_a_4xx_with_a_message(vmm: VmmProcess, selftest_elf: Path) -> None:
    vmm.create(vmm.guest_config(selftest_elf))
    vmm.remote("boot")
    assert call(vmm, "GET", "vm.counters").status == 200
    vmm.remote("shutdown")
    response = call(vmm, "GET", "vm.counters")
    assert response.status == 405, response.body
    assert "Shutdown" in messages(response)
    assert call(vmm, "GET", "vmm.ping").status == 200


def _free_huge_pages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize(
    "memory,words",
    [
        ({"size": 128 << 40}, ("memory.size", "Cannot allocate memory")),
        pytest.param({"size": 64 << 20, "hugepages": True}, ("memory.hugepages", "huge pages"),
                     marks=pytest.mark.skipif(_free_huge_pages() > 0, reason="the host has free huge pages")),
    ],
    ids=["128T", "hugepages"],
)
def test_memory_the_host_cannot_provide_is_refused_at_create(
    vmm: VmmProcess, selftest_elf: Path, memory: dict[str, Any], words: tuple[str, ...]
) -> None:
    response = call(vmm, "PUT", "vm.create", vmm.guest_config(selftest_elf, memory=memory))
    assert response.status == 400, response.body
    for word in words:
        assert word in messages(response)
    assert call(vmm, "GET", "vm.info").status == 404  # nothing was created


@pytest.mark.parametrize(
    "where",
    ["serial", "console", "rng", "kernel", "initramfs", "kernel-nul", "serial-nul", "disk-nul"],
)
def test_a_fifo_or_a_bad_path_in_a_config_never_blocks_the_vmm(
    vmm: VmmProcess, selftest_elf: Path, where: str
) -> None:
    fifo = vmm.dir / "fifo"
    os.mkfifo(fifo)
    config = vmm.guest_config(selftest_elf)
    if where == "serial":
        config["serial"] = {"mode": "File", "file": str(fifo)}
    elif where == "console":
        config["console"] = {"mode": "File", "file": str(fifo)}
    elif where == "rng":
        config["rng"] = {"src": str(fifo)}
    elif where == "kernel":
        config["payload"]["kernel"] = str(fifo)
    elif where == "initramfs":
        config["payload"]["initramfs"] = str(fifo)
    elif where == "kernel-nul":
        config["payload"]["kernel"] = str(selftest_elf) + "\0x"
    elif where == "serial-nul":
        config["serial"] = {"mode": "File", "file": str(vmm.dir / "serial\0x")}
    else:
        config["disks"] = [{"path": str(vmm.dir / "disk\0x")}]
    created = call(vmm, "PUT", "vm.create", config)
    started = time.monotonic()
    response = call(vmm, "PUT", "vm.boot") if created.status == 204 else created
    assert 400 <= response.status < 500, (response.status, response.body)
    assert time.monotonic() - started < 10
    assert ("NUL" if where.endswith("-nul") else "FIFO") in messages(response), messages(response)
    assert call(vmm, "GET", "vmm.ping").status == 200
    vmm.proc.send_signal(signal.SIGTERM)
    assert vmm.proc.wait(5) == 128 + signal.SIGTERM


SLOW_CLIENT = """
import socket, sys, time
path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
    except OSError:
        pass
    return s
request = b"PUT /api/v1/vm.create HTTP/1.1\\r\\nContent-Length: 100000\\r\\n" + b"X-Slow: " + b"a" * 100000
socks = [connect() for _ in range(count)]
sent = [0] * count
end = time.monotonic() + seconds
while time.monotonic() < end:
    for i, s in enumerate(socks):
        try:
            s.send(request[sent[i] % len(request):][:1])
            sent[i] += 1
        except OSError:
            s.close()
            socks[i], sent[i] = connect(), 0
    time.sleep(1.0)
"""


def test_slow_clients_cannot_lock_the_api_out(vmm: VmmProcess) -> None:
    """200 connections from 8 processes, each sending a byte a second: ``vmm.ping`` from
    another process still answers, every time, within a couple of seconds."""
    duration = 12.0
    clients = [subprocess.Popen([sys.executable, "-c", SLOW_CLIENT, str(vmm.socket), "25", str(duration)])
               for _ in range(8)]
    try:
        time.sleep(2.0)  # every slow connection is open and trickling
        end = time.monotonic() + duration - 3
        pings = 0
        while time.monotonic() < end:
            started = time.monotonic()
            result = subprocess.run([*remote_command(), "--api-socket", str(vmm.socket), "ping"],
                                    capture_output=True, text=True, timeout=30)
            took = time.monotonic() - started
            assert result.returncode == 0, f"ping {pings + 1} failed: {result.stderr}"
            assert took < 3.0, f"ping {pings + 1} took {took:.1f} s"
            pings += 1
            time.sleep(0.5)
        assert pings >= 4
    finally:
        for client in clients:
            client.kill()
            client.wait()
    wait_for(lambda: call(vmm, "GET", "vmm.ping").status == 200, 10, "ping after the slow clients left")
