"""``--generic-vhost-user`` (Cloud Hypervisor's generic vhost-user frontend) against real
backends: qemu-storage-daemon's ``vhost-user-blk`` export and vmmkit's own ``vmmkit-vhost-user
blk``, each served as ``virtio_id=2,queue_sizes=[128]``: the frontend knows nothing of block
devices, the x86-64 test guest's blk test reads the capacity, serial and features through the
forwarded configuration space and passes; the host then finds the guest's pattern in the image.
Also through the API (``vm.create`` body, ``vm.add-generic-vhost-user`` before boot and hot-plugged),
and bad inputs: an unknown virtio ID, empty ``queue_sizes``, no shared memory, a socket that is
not a vhost-user backend."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

from .qemu_peer import SECTOR, blk_ok_line, check_blk_image, make_disk
from .test_vhost_user_blk import QSD_SERIAL, StorageDaemon, _finish, _start_vmm_without_disk, _wait_for
from .test_vhost_user_blk import daemon as daemon  # the qemu-storage-daemon fixture
from .test_vhost_user_blk_backend import SERIAL, BlkDaemon

GUEST_ARCH = "x86_64"
pytestmark = pytest.mark.requires_kvm

DISK_SIZE = 4 << 20


def _lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.startswith("selftest:")]


def _run_blk(selftest_elf: Path, hypervisor: str, spec: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_vmmkit("--hypervisor", hypervisor, "--kernel", str(selftest_elf),
                      "--memory", "size=128M,shared=on", "--cmdline", "test=blk",
                      "--generic-vhost-user", spec, *extra, timeout=240)


def test_the_guest_blk_test_passes_through_qemu_storage_daemon(
    daemon: StorageDaemon, selftest_elf: Path, vmmkit_hypervisor: str
) -> None:
    result = _run_blk(selftest_elf, vmmkit_hypervisor, f"socket={daemon.socket},virtio_id=2,queue_sizes=[128]")
    explain = f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, explain
    assert blk_ok_line(DISK_SIZE // SECTOR, QSD_SERIAL) in _lines(result.stdout), explain
    daemon.stop()
    assert check_blk_image(daemon.image) == []


@pytest.fixture
def own_backend(tmp_path: Path) -> Iterator[BlkDaemon]:
    # The socket path must fit sockaddr_un (108 bytes): pytest's tmp_path can be longer.
    directory = Path("/tmp") / f"vmmkit-gvhu-{os.getpid()}-{tmp_path.name[-20:]}"
    directory.mkdir()
    backend = BlkDaemon(make_disk(directory / "disk.img", DISK_SIZE), directory / "blk.sock").start()
    try:
        yield backend
    finally:
        backend.stop()
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


def test_the_guest_blk_test_passes_through_vmmkits_own_backend_on_virtio_mmio(
    own_backend: BlkDaemon, selftest_elf: Path, vmmkit_hypervisor: str
) -> None:
    result = _run_blk(selftest_elf, vmmkit_hypervisor,
                      f"socket={own_backend.socket},device_type=2,queue_sizes=[128],transport=mmio")
    explain = f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}\n--- backend ---\n{own_backend.stop()}"
    assert result.returncode == 0, explain
    assert blk_ok_line(DISK_SIZE // SECTOR, SERIAL) in _lines(result.stdout), explain
    assert any("virtio: blk: mmio" in line for line in _lines(result.stdout)), explain
    assert check_blk_image(own_backend.image) == []


@pytest.mark.parametrize("spec, message", [
    ("virtio_id=99,queue_sizes=[128]", "99 is not a virtio device ID"),
    ("virtio_id=0,queue_sizes=[128]", "0 is not a virtio device ID"),
    ("virtio_id=2,queue_sizes=[]", "at least one queue"),
    ("virtio_id=2,queue_sizes=[100]", "a power of two"),
    ("virtio_id=2", "missing queue_sizes"),
    ("queue_sizes=[128]", "missing virtio_id"),
])
def test_bad_options_are_usage_errors(selftest_elf: Path, vmmkit_hypervisor: str, tmp_path: Path,
                                      spec: str, message: str) -> None:
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf),
                        "--memory", "size=128M,shared=on",
                        "--generic-vhost-user", f"socket={tmp_path / 'x.sock'},{spec}")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "--generic-vhost-user" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_shared_memory_it_is_refused_naming_the_option(
    daemon: StorageDaemon, selftest_elf: Path, vmmkit_hypervisor: str
) -> None:
    result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf), "--memory", "size=128M",
                        "--generic-vhost-user", f"socket={daemon.socket},virtio_id=2,queue_sizes=[128]")
    assert result.returncode == 2, result.stderr
    assert "--memory shared=on" in result.stderr
    assert "Traceback" not in result.stderr


class NotABackend:
    """A Unix socket server that answers whatever it is sent with an HTTP error, as a socket of
    the wrong kind (an API socket) would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def test_a_socket_that_is_not_a_vhost_user_backend_is_a_clear_error(
    selftest_elf: Path, vmmkit_hypervisor: str, tmp_path: Path
) -> None:
    wrong = NotABackend(tmp_path / "http.sock")
    try:
        result = run_vmmkit("--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf),
                            "--memory", "size=128M,shared=on",
                            "--generic-vhost-user", f"socket={wrong.path},virtio_id=2,queue_sizes=[128]", timeout=60)
    finally:
        wrong.close()
    assert result.returncode != 0
    assert "vhost-user" in result.stderr and str(wrong.path) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_through_the_api_create_body_errors_and_hot_plug(
    daemon: StorageDaemon, selftest_elf: Path, vmmkit_hypervisor: str, tmp_path: Path
) -> None:
    from vmmkit.api.client import ApiClient, ApiError

    proc, api, out, err = _start_vmm_without_disk(selftest_elf, vmmkit_hypervisor, tmp_path)
    try:
        _wait_for(out, "idle, halting", proc, 180)
        client = ApiClient(str(api))
        for body, message in (
            ({"socket": str(daemon.socket), "device_type": 99, "queue_sizes": [128]}, "not a virtio device ID"),
            ({"socket": str(daemon.socket), "device_type": 2, "queue_sizes": []}, "at least one queue"),
            ({"socket": str(tmp_path / "nobody.sock"), "device_type": 2, "queue_sizes": [128]}, "does not exist"),
        ):
            with pytest.raises(ApiError) as refused:
                client.put("vm.add-generic-vhost-user", body)
            assert refused.value.status == 400 and message in str(refused.value), str(refused.value)
        added = client.put("vm.add-generic-vhost-user",
                           {"socket": str(daemon.socket), "device_type": 2, "queue_sizes": [128], "id": "gvu0"})
        assert added is not None and added["id"] == "gvu0" and added["bdf"].startswith("0000:00:")
        devices = client.info()["config"]["generic_vhost_user"]
        assert [(d["id"], d["device_type"], d["queue_sizes"]) for d in devices] == [("gvu0", 2, [128])]
        assert "gvu0" in client.counters()
        # vmmkit-remote (ch-remote's add-generic-vhost-user): a bad spec is a usage error, a good
        # one prints the new device's PCI address.
        remote = [sys.executable, "-m", "vmmkit.remote", "--api-socket", str(api), "add-generic-vhost-user"]
        bad = subprocess.run([*remote, f"socket={daemon.socket},virtio_id=99,queue_sizes=[128]"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "not a virtio device ID" in bad.stderr, bad.stderr
        # qemu-storage-daemon serves one frontend at a time: a second export for the second device.
        second = StorageDaemon(make_disk(tmp_path / "disk2.img", DISK_SIZE), tmp_path / "blk2.sock").start()
        try:
            good = subprocess.run([*remote, f"socket={second.socket},virtio_id=2,queue_sizes=[128],id=gvu1"],
                                  capture_output=True, text=True, timeout=60)
        finally:
            second.stop()
        assert good.returncode == 0, good.stderr
        assert json.loads(good.stdout)["id"] == "gvu1"
        assert [d["id"] for d in client.info()["config"]["generic_vhost_user"]] == ["gvu0", "gvu1"]
        assert client.info()["state"] == "Running"
    finally:
        _finish(proc, api, err)


def test_a_vm_create_body_with_a_generic_vhost_user_device_boots_and_the_blk_test_passes(
    daemon: StorageDaemon, selftest_elf: Path, vmmkit_hypervisor: str, tmp_path: Path
) -> None:
    from vmmkit.api.client import ApiClient, ApiError

    api = tmp_path / "api.sock"
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "vmmkit", "-v", "--hypervisor", vmmkit_hypervisor,
                                 "--api-socket", f"path={api}"],
                                stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, text=True)
    try:
        client = ApiClient(str(api))
        _wait_for_socket(api, proc)
        body = {"payload": {"kernel": str(selftest_elf), "cmdline": "test=blk"},
                "memory": {"size": 128 << 20, "shared": True},
                "generic_vhost_user": [{"socket": str(daemon.socket), "device_type": 2, "queue_sizes": [128]}]}
        with pytest.raises(ApiError) as refused:
            client.create({**body, "memory": {"size": 128 << 20}})
        assert refused.value.status == 400 and "shared" in str(refused.value)
        client.create(body)
        client.boot()
        _wait_for(out, "selftest: ok blk", proc, 240)
        assert blk_ok_line(DISK_SIZE // SECTOR, QSD_SERIAL) in _lines(out.read_text())
    finally:
        _finish(proc, api, err)


def _wait_for_socket(path: Path, proc: subprocess.Popen[str]) -> None:
    import time

    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the VMM did not open its API socket"
        time.sleep(0.05)
