"""vmmkit as an unprivileged user (issue 18): the demo guest boots for ``nobody`` given only
read-write access to ``/dev/kvm``, under the default seccomp filters, and every thread has
``no_new_privs``. Needs root to hand the access over (``/dev/kvm``'s group and mode are changed
for the test and restored); skipped otherwise, with the reason."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

GUEST_ARCH = "x86_64"
pytestmark = pytest.mark.requires_kvm

NOBODY = 65534

BOOTSTRAP = (
    "import site, sys; site.addsitedir(sys.argv.pop(1)); "
    "from vmmkit.cli import main; sys.exit(main(sys.argv[1:]))"
)


def reachable_by_others(path: Path) -> bool:
    """Whether a user that is not the owner can execute ``path`` (every directory above it
    searchable by others)."""
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        if part != path and not mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IXOTH)


def interpreter() -> Path | None:
    """This interpreter, or the system's of the same version (abi3 and pure Python modules
    load in either), whichever another user may run."""
    candidates = [Path(os.path.realpath(sys.executable)),
                  Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")]
    return next((c for c in candidates if c.exists() and reachable_by_others(c)), None)


@pytest.fixture
def kvm_for_nobody() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root to give an unprivileged user access to /dev/kvm")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    before = os.stat("/dev/kvm")
    os.chown("/dev/kvm", -1, NOBODY)
    os.chmod("/dev/kvm", 0o660)
    try:
        yield
    finally:
        os.chown("/dev/kvm", -1, before.st_gid)
        os.chmod("/dev/kvm", stat.S_IMODE(before.st_mode))


@pytest.mark.parametrize("sandbox", [(), ("--landlock",)], ids=["seccomp", "seccomp+landlock"])
def test_the_demo_guest_boots_as_an_unprivileged_user(kvm_for_nobody: None, tmp_path: Path,
                                                      sandbox: tuple[str, ...]) -> None:
    python = interpreter()
    if python is None:
        pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} another user may run "
                    f"(this one is under {os.path.realpath(sys.executable)})")
    from vmmkit.demo import demo_kernel

    kernel = demo_kernel()
    if not reachable_by_others(kernel.parent) or not kernel.stat().st_mode & stat.S_IROTH:
        pytest.skip(f"the demo guest {kernel} is not readable by another user")
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "VMMKIT_SECCOMP": "true"}
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
         "--bounding-set=-all", str(python), "-I", "-S", "-c", BOOTSTRAP, sysconfig.get_paths()["purelib"],
         "--kernel", str(kernel), "--cmdline", "hello", "--serial", "tty", "--hypervisor", "kvm", *sandbox],
        capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL, cwd=home,
    )
    assert result.returncode == 0, result.stderr
    assert "selftest: exit 0" in result.stdout, result.stdout[-2000:]


def test_without_access_to_dev_kvm_the_error_says_so(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as another user")
    python = interpreter()
    if python is None or os.stat("/dev/kvm").st_mode & stat.S_IROTH:
        pytest.skip("no interpreter another user may run, or /dev/kvm is open to everyone")
    from vmmkit.demo import demo_kernel

    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(python), "-I", "-S", "-c",
         BOOTSTRAP, sysconfig.get_paths()["purelib"], "--kernel", str(demo_kernel()), "--hypervisor", "kvm"],
        capture_output=True, text=True, timeout=240, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "kvm" in result.stderr, result.stderr
