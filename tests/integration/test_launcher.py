"""The pre-forked launcher (``vmmkit launcher serve``) with real processes, a real socket and
real /dev/kvm: a ``vmmkit`` command served by it behaves as a cold one (output, exit status,
file descriptors, signals), the server outlives its VMs, and without a server the command
starts cold."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vmmkit.events import read_events
from vmmkit.launcher.client import MAGIC

pytestmark = pytest.mark.requires_kvm

TIMEOUT = 120  # a launch takes well under a second alone; the CI host runs tests in parallel


def vmmkit_command() -> list[str]:
    """The ``vmmkit`` console script beside this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("vmmkit")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from vmmkit.launcher.client import main; sys.exit(main())"]


class Server:
    def __init__(self, path: Path, proc: subprocess.Popen[str]) -> None:
        self.path = path
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "VMMKIT_LAUNCHER": str(self.path), **extra}


def start_server(path: Path) -> Server:
    proc = subprocess.Popen([*vmmkit_command(), "launcher", "serve", "--socket", str(path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # printed once warm and listening
    assert "serving at" in line, line + proc.stderr.read()
    return Server(path, proc)


def stop_server(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("launcher") / "run" / "launcher.sock")
    yield running
    stop_server(running)


def launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*vmmkit_command(), *args], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def guest_args(kernel: Path, cmdline: str) -> list[str]:
    return ["--kernel", str(kernel), "--memory", "size=64M", "--cmdline", cmdline]


def comparable(output: str) -> list[str]:
    """The guest's lines, without the one that reads the wall clock."""
    return [line for line in output.splitlines() if not line.startswith("selftest: info rtc:")]


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def served_vmms(server: Server) -> list[int]:
    """The VMM processes the server forked: each is the only child of a per-launch monitor."""
    return [vmm for monitor in children(server.pid) for vmm in children(monitor)]


def thread_names(pid: int) -> set[str]:
    names = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names.add(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
        except OSError:
            pass
    return names


def wait_for(predicate: object, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_until(stream: int, marker: bytes, timeout: float = TIMEOUT) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(stream, False)
    while marker not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} in {seen[-500:]!r}")
        try:
            chunk = os.read(stream, 65536)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        if not chunk:
            raise AssertionError(f"output ended before {marker!r}: {seen[-500:]!r}")
        seen += chunk
    return seen


def spin_through(server: Server, kernel: Path, **popen: object) -> tuple[subprocess.Popen[bytes], int]:
    """A ``test=spin`` guest launched through ``server``: the client and its VMM's pid, once the
    guest prints its first heartbeat."""
    before = set(served_vmms(server))
    client = subprocess.Popen([*vmmkit_command(), *guest_args(kernel, "test=spin")], env=server.env(),
                              stdout=subprocess.PIPE, **popen)  # type: ignore[call-overload]
    assert client.stdout is not None
    read_until(client.stdout.fileno(), b"heartbeat 1")
    new = [pid for pid in served_vmms(server) if pid not in before and "vcpu0" in thread_names(pid)]
    assert len(new) == 1, new
    return client, new[0]


# -- the same as cold --------------------------------------------------------------------------


@pytest.mark.parametrize("cmdline,status", [("hello", 0), ("test=fault", 1)])
def test_a_launch_through_the_server_prints_and_exits_as_a_cold_one(
        server: Server, selftest_elf: Path, cmdline: str, status: int) -> None:
    served = launch(server.env(), *guest_args(selftest_elf, cmdline))
    cold = launch(server.env(VMMKIT_LAUNCHER="off"), *guest_args(selftest_elf, cmdline))
    assert (served.returncode, cold.returncode) == (status, status), served.stderr + cold.stderr
    assert f"selftest: cmdline: {cmdline}" in served.stdout
    assert comparable(served.stdout) == comparable(cold.stdout)
    assert served.stderr == cold.stderr


def test_a_usage_error_through_the_server_is_the_cold_one(server: Server) -> None:
    served = launch(server.env(), "--memory", "size=12Q", "--kernel", "x")
    cold = launch(server.env(VMMKIT_LAUNCHER="off"), "--memory", "size=12Q", "--kernel", "x")
    assert served.returncode == cold.returncode == 2
    assert served.stderr == cold.stderr and "12Q" in served.stderr


def test_the_vm_runs_in_a_forked_vmm_with_the_clients_fds_and_cwd(
        server: Server, selftest_elf: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.json"
    stderr_file = tmp_path / "stderr.txt"
    stdin_read, stdin_write = os.pipe()
    with open(events, "wb") as events_out, open(stderr_file, "wb") as stderr_out:
        extra = os.dup(events_out.fileno())  # handed to the command at this number
        try:
            client = subprocess.Popen(
                [*vmmkit_command(), *guest_args(selftest_elf, "test=spin"), "--event-monitor", f"fd={extra}"],
                env=server.env(), cwd=tmp_path, stdin=stdin_read, stdout=subprocess.PIPE, stderr=stderr_out,
                pass_fds=(extra,))
        finally:
            os.close(extra)
    os.close(stdin_read)
    try:
        assert client.stdout is not None
        read_until(client.stdout.fileno(), b"heartbeat 1")
        (vmm,) = [pid for pid in served_vmms(server) if "vcpu0" in thread_names(pid)]
        assert "vcpu0" not in thread_names(client.pid)  # the client runs no VM
        mine = {fd: os.stat(f"/proc/{client.pid}/fd/{fd}") for fd in (0, 1, 2, extra)}
        theirs = {fd: os.stat(f"/proc/{vmm}/fd/{fd}") for fd in (0, 1, 2, extra)}
        for fd in (0, 1, 2, extra):
            assert (theirs[fd].st_dev, theirs[fd].st_ino) == (mine[fd].st_dev, mine[fd].st_ino), fd
        assert os.readlink(f"/proc/{vmm}/cwd") == str(tmp_path)
        (vcpu,) = [tid for tid in os.listdir(f"/proc/{vmm}/task")
                   if Path(f"/proc/{vmm}/task/{tid}/comm").read_text().strip() == "vcpu0"]
        # The server compiled the default seccomp filters; the VMM's vCPU thread runs under them.
        assert "Seccomp:\t2" in Path(f"/proc/{vmm}/task/{vcpu}/status").read_text()
        client.send_signal(signal.SIGTERM)  # forwarded: the VMM stops the VM and exits 128 + 15
        assert client.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM
    finally:
        os.close(stdin_write)
        if client.poll() is None:
            client.kill()
            client.wait()
    wait_for(lambda: not os.path.exists(f"/proc/{vmm}"), "the VMM process to end")
    kinds = [event["event"] for event in read_events(events.read_text())]
    assert "booted" in kinds and "shutdown" in kinds, kinds


def test_the_vmm_sees_the_clients_environment(server: Server, selftest_elf: Path) -> None:
    """The plugins are loaded again from each launch's environment (the server's are not reused)."""
    args = ["--hypervisor", "kvm", *guest_args(selftest_elf, "hello")]
    served = launch(server.env(VMMKIT_DISABLE_PLUGINS="kvm"), *args)
    cold = launch(server.env(VMMKIT_DISABLE_PLUGINS="kvm", VMMKIT_LAUNCHER="off"), *args)
    assert served.returncode == cold.returncode == 2
    assert served.stderr == cold.stderr and "'kvm'" not in served.stderr.split("choose from")[-1]


# -- crashes and the server's life ---------------------------------------------------------------


@pytest.mark.parametrize("crash", [signal.SIGSEGV, signal.SIGKILL])
def test_the_server_survives_a_vmm_that_crashes(server: Server, selftest_elf: Path, crash: int) -> None:
    client, vmm = spin_through(server, selftest_elf, stderr=subprocess.DEVNULL)
    os.kill(vmm, crash)
    assert client.wait(timeout=TIMEOUT) == -crash  # the command dies of it, as a cold one would
    assert server.proc.poll() is None
    after = launch(server.env(), *guest_args(selftest_elf, "hello"))
    assert after.returncode == 0 and "selftest: cmdline: hello" in after.stdout, after.stderr


def test_a_killed_command_takes_its_vm_with_it(server: Server, selftest_elf: Path) -> None:
    client, vmm = spin_through(server, selftest_elf, stderr=subprocess.DEVNULL)
    client.kill()
    client.wait()
    wait_for(lambda: not os.path.exists(f"/proc/{vmm}"), "the orphaned VMM to be killed")
    assert server.proc.poll() is None


def test_concurrent_launches(server: Server, selftest_elf: Path) -> None:
    cmdlines = [f"hello-{n}" for n in range(4)]
    with ThreadPoolExecutor(len(cmdlines)) as pool:
        results = list(pool.map(lambda c: launch(server.env(), *guest_args(selftest_elf, c)), cmdlines))
    for cmdline, result in zip(cmdlines, results, strict=True):
        assert result.returncode == 0, result.stderr
        assert f"selftest: cmdline: {cmdline}\n" in result.stdout and "selftest: exit 0" in result.stdout


# -- no server: cold --------------------------------------------------------------------------


def test_a_stale_socket_falls_back_to_cold_and_serve_replaces_it(selftest_elf: Path, tmp_path: Path) -> None:
    path = tmp_path / "launcher.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens: as after a server killed with SIGKILL
    env = {**os.environ, "VMMKIT_LAUNCHER": str(path)}
    result = launch(env, *guest_args(selftest_elf, "hello"))
    assert result.returncode == 0 and "selftest: cmdline: hello" in result.stdout, result.stderr
    replacing = start_server(path)
    try:
        assert launch(env, "launcher", "status").returncode == 0
        second = launch(env, "launcher", "serve")
        assert second.returncode == 1 and "already listening" in second.stderr
        assert launch(env, "launcher", "stop").returncode == 0
        assert replacing.proc.wait(timeout=30) == 0
        assert not path.exists()
    finally:
        if replacing.proc.poll() is None:
            stop_server(replacing)
    assert launch(env, "launcher", "status").returncode == 1


def test_a_changed_installation_sends_launches_cold(selftest_elf: Path, tmp_path: Path) -> None:
    """A distribution installed or removed on ``sys.path`` after the server warmed up: its
    modules may be stale, so it refuses launches (they start cold) and says why."""
    site = tmp_path / "site"
    site.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "VMMKIT_LAUNCHER": str(tmp_path / "launcher.sock")}
    proc = subprocess.Popen([*vmmkit_command(), "launcher", "serve"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        assert "serving at" in proc.stderr.readline()
        (site / "newly_installed.dist-info").mkdir()
        result = launch(env, *guest_args(selftest_elf, "hello"))
        assert result.returncode == 0 and "selftest: cmdline: hello" in result.stdout, result.stderr
        warning = proc.stderr.readline()
        assert f"{site} changed since the server started" in warning, warning
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_socket_is_private_and_other_users_are_refused(server: Server) -> None:
    assert (server.path.stat().st_mode & 0o777, server.path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    if os.getuid() != 0:
        pytest.skip("checking SO_PEERCRED needs a process of another uid (run as root)")
    # Reachable by another user only through a link in a public directory and a wrong mode:
    # the credential check must still refuse.
    public = Path(tempfile.mkdtemp(prefix="vmmkit-launcher-test-"))
    try:
        public.chmod(0o755)
        link = public / "launcher.sock"
        os.link(server.path, link)
        os.chmod(link, 0o666)
        other = subprocess.run(
            [sys.executable, "-c", "import os, socket, sys; os.setuid(65534); "
             "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sys.argv[1]); "
             "print(s.recv(4096).decode())", str(link)],  # refused before the request is read
            capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        os.chmod(server.path, 0o600)
        shutil.rmtree(public)
    assert other.returncode == 0, other.stderr
    assert other.stdout.startswith("refused uid 65534")


def test_a_request_from_another_installation_is_refused(server: Server) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(str(server.path))
        conn.sendmsg([b"\0".join([MAGIC, b"/elsewhere/bin/python", b"/", b"1", b"/elsewhere/lib", b"1", b"vmmkit",
                                  b"0", b"0"])])
        assert conn.recv(4096).startswith(b"refused this launcher serves another vmmkit installation")


def test_launcher_usage_errors_exit_2(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("VMMKIT_LAUNCHER", "XDG_RUNTIME_DIR")}
    assert launch(env, "launcher").returncode == 2
    no_path = launch(env, "launcher", "serve")
    assert no_path.returncode == 2 and "--socket" in no_path.stderr
