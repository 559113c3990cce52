"""VFIO under ``--seccomp true``: the calls the plugin declares (``vmmkit_seccomp_syscalls``) are
allowed to the thread kinds that run VFIO code, and a real filtered thread makes them (the
simulated ``/dev/vfio`` behind a real pread/pwrite/eventfd/ioctl/mmap on real files)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from vmmkit_devices import plugin
from vmmkit_devices.vfio.device_type import SECCOMP_SYSCALLS

from vmmkit.sandbox.syscalls import API, VCPU, VMM, allowed


def test_declared_calls_reach_the_filters() -> None:
    declared = plugin.vmmkit_seccomp_syscalls()
    for kind in (VCPU, API, VMM):
        assert set(SECCOMP_SYSCALLS[kind]) <= allowed(kind, declared), kind
        assert set(declared[kind]) >= set(SECCOMP_SYSCALLS[kind])
    assert "socket" in declared["event-loop"]  # vsock's declaration is kept


CHILD = textwrap.dedent("""
    import fcntl, mmap, os, tempfile, threading
    from vmmkit import sandbox
    from vmmkit_devices import plugin
    sandbox.activate_seccomp("true", plugin.vmmkit_seccomp_syscalls())
    fd, path = tempfile.mkstemp()
    os.pwrite(fd, bytes(8192), 0)
    def vcpu():  # a trapped BAR access and an interrupt eventfd, as a vCPU thread makes them
        sandbox.enter_thread("vcpu", "vcpu0")
        os.pwrite(fd, b"abcd", 4096)
        assert os.pread(fd, 4, 4096) == b"abcd"
        efd = os.eventfd(0)
        os.eventfd_write(efd, 1)
        os.close(efd)
        with open("/proc/thread-self/status") as status:
            assert "Seccomp:\t2" in status.read()  # filtered
    def api():  # placing a device: open, ioctl, mmap of a BAR
        sandbox.enter_thread("api", "api-conn")
        other = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        area = mmap.mmap(other, 4096, flags=mmap.MAP_SHARED, offset=4096)
        assert area[:4] == b"abcd"
        area.close()
        try:
            fcntl.ioctl(other, 0x3B64, 0)  # VFIO_GET_API_VERSION on a file: ENOTTY, not SIGSYS
        except OSError:
            pass
        os.close(other)
    errors = []
    def run(target):
        try:
            target()
        except BaseException as exc:
            errors.append(repr(exc))
    for target in (vcpu, api):
        thread = threading.Thread(target=run, args=(target,))
        thread.start()
        thread.join()
    os.unlink(path)
    print("ok" if not errors else errors)
""")


def test_a_filtered_thread_makes_the_vfio_calls() -> None:
    try:
        from vmmkit.sandbox.seccomp import library

        library()
    except Exception as exc:
        pytest.skip(f"no libseccomp: {exc}")
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
