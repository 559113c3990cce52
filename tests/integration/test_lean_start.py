"""The lean cold path (issue 20 item 4): a boot imports only the plugins its VM needs, through
the plugin index (vmmkit/plugin_index.py), which follows what is installed; and the command
ends without the interpreter's finalization, its output and exit status exact.

Two plugins are installed for these tests as a user installs one (a ``*.dist-info`` with
``entry_points.txt`` on the path): ``lazyhv`` declares itself on demand and registers a
hypervisor tried after every real one; ``eagerhv`` declares the same but implements
``vmmkit_configure``, so it must be loaded at every start anyway. Each writes a line to a file
named by ``$PROBE_LOG`` when imported, so a test sees which ones a boot loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = '''
import os
from vmmkit import hookimpl
from vmmkit.hypervisor import Availability, Hypervisor

with open(os.environ["PROBE_LOG"], "a") as log:
    log.write("{name} imported\\n")

class {cls}(Hypervisor):
    name = "{name}"
    description = "a test backend that is never usable"
    priority = {priority}
    architectures = ("x86_64", "aarch64")

    @classmethod
    def is_available(cls) -> Availability:
        return Availability(False, "{name} is a test plugin")

    def create_vm(self, arch):
        raise AssertionError("never usable")

@hookimpl
def vmmkit_load_on_demand():
    return True

@hookimpl
def vmmkit_register_hypervisors(registry):
    registry.add({cls})
'''

EAGER_EXTRA = '''
@hookimpl
def vmmkit_configure(options):
    pass
'''


def _install(site: Path, name: str, priority: int, extra: str = "") -> None:
    module = site / f"{name}_plugin.py"
    module.write_text(PLUGIN.format(name=name, cls=name.capitalize() + "Hypervisor", priority=priority) + extra)
    dist = site / f"{name}_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 1.0\n\n")
    (dist / "entry_points.txt").write_text(f"[vmmkit]\n{name} = {name}_plugin\n")


@pytest.fixture
def lean_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    _install(site, "lazyhv", 95)
    _install(site, "eagerhv", 96, EAGER_EXTRA)
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONDONTWRITEBYTECODE", "VMMKIT_NO_PLUGIN_INDEX", "VMMKIT_DISABLE_PLUGINS")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
               XDG_CACHE_HOME=str(tmp_path / "cache"), PROBE_LOG=str(tmp_path / "imported.txt"))
    return env


def _vmmkit(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = Path(env["PROBE_LOG"])
    log.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, "-m", "vmmkit", *args], capture_output=True, text=True, timeout=180,
                            stdin=subprocess.DEVNULL, env=env)
    imported = log.read_text().split("\n") if log.exists() else []
    return result, sorted(line.split()[0] for line in imported if line)


@pytest.mark.requires_kvm
def test_a_boot_loads_on_demand_plugins_only_when_its_vm_needs_them(lean_env: dict[str, str],
                                                                    selftest_elf: Path, tmp_path: Path) -> None:
    boot = ("--kernel", str(selftest_elf), "--memory", "size=64M", "--cmdline", "hello")
    first, imported = _vmmkit(lean_env, *boot)  # no index yet: a full discovery, which writes it
    assert first.returncode == 0, first.stderr
    assert imported == ["eagerhv", "lazyhv"]
    assert list((tmp_path / "cache" / "vmmkit").glob("plugin-index-*"))

    second, imported = _vmmkit(lean_env, *boot)
    assert second.returncode == 0, second.stderr
    assert "selftest: exit 0" in second.stdout
    assert imported == ["eagerhv"]  # kvm is usable first; eagerhv configures every start

    # its backend is a valid choice without being loaded, and loaded when named
    named, imported = _vmmkit(lean_env, *boot, "--hypervisor", "lazyhv")
    assert named.returncode == 1 and "lazyhv is a test plugin" in named.stderr, named.stderr
    assert imported == ["eagerhv", "lazyhv"]
    wrong, imported = _vmmkit(lean_env, *boot, "--hypervisor", "nosuch")
    assert wrong.returncode == 2
    assert "(choose from 'auto', 'kvm', 'mshv', 'emu', 'lazyhv', 'eagerhv')" in wrong.stderr

    # auto walks the backends as select_hypervisor does: kvm blocked, the next ones are loaded
    blocked, imported = _vmmkit({**lean_env, "VMMKIT_DISABLE_PLUGINS": "kvm,emu"}, *boot)
    assert blocked.returncode == 1 and "no usable hypervisor" in blocked.stderr, blocked.stderr
    assert "lazyhv: lazyhv is a test plugin" in blocked.stderr
    assert imported == ["eagerhv", "lazyhv"]

    # an edited plugin (an editable install) invalidates the index: a full discovery again
    module = Path(lean_env["PYTHONPATH"].split(os.pathsep)[0]) / "lazyhv_plugin.py"
    module.write_text(module.read_text().replace("never usable\"", "never usable (edited)\""))
    os.utime(module, ns=(module.stat().st_atime_ns, module.stat().st_mtime_ns + 10**9))
    edited, imported = _vmmkit(lean_env, *boot)
    assert edited.returncode == 0 and imported == ["eagerhv", "lazyhv"]
    again, imported = _vmmkit(lean_env, *boot)
    assert again.returncode == 0 and imported == ["eagerhv"]

    # uninstalled: the index no longer matches the entry points, and nothing refers to it
    for path in module.parent.glob("lazyhv_plugin*"):
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()
    gone, imported = _vmmkit(lean_env, *boot, "--hypervisor", "lazyhv")
    assert gone.returncode == 2 and "invalid choice: 'lazyhv'" in gone.stderr
    assert imported == ["eagerhv"]


FINALIZE_PROBE = """
import atexit, os, runpy, sys
marks = sys.argv.pop(1)
class Finalized:
    def __del__(self):
        with open(marks, "a") as out:
            out.write("finalized\\n")
keep = Finalized()  # freed at interpreter finalization, which the command skips
atexit.register(lambda: open(marks, "a").write("atexit\\n"))
sys.argv[0] = "vmmkit"
runpy.run_module("vmmkit", run_name="__main__", alter_sys=True)
"""


@pytest.mark.requires_kvm
@pytest.mark.parametrize(("cmdline", "status"), [("hello", 0), ("test=fault", 1)])
def test_the_command_exits_without_finalizing_with_its_output_and_status(
        selftest_elf: Path, tmp_path: Path, cmdline: str, status: int) -> None:
    marks, log = tmp_path / "marks.txt", tmp_path / "vmm.log"
    result = subprocess.run(
        [sys.executable, "-c", FINALIZE_PROBE, str(marks), "--kernel", str(selftest_elf), "--memory", "size=64M",
         "--cmdline", cmdline, "-vv", "--log-file", str(log)],
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == status, result.stderr
    assert result.stdout.endswith(f"selftest: exit {status}\n".encode())  # the guest's output, all of it
    assert marks.read_text() == "atexit\n"  # exit functions ran; finalization did not
    assert log.read_text().endswith("\n") and "vm" in log.read_text()


def test_a_thread_still_running_gets_the_usual_exit(tmp_path: Path) -> None:
    """The command leaves it to the interpreter, which waits for the thread, when one runs."""
    marks = tmp_path / "marks.txt"
    probe = f"""
import sys, threading, time
from vmmkit import cli
def late():
    time.sleep(2)  # longer than the command takes
    open({str(marks)!r}, "w").write("thread done")
threading.Thread(target=late).start()
sys.argv = ["vmmkit", "plugins"]
sys.exit(cli.main())
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "hypervisors (in --hypervisor auto order):" in result.stdout, result.stderr
    assert marks.read_text() == "thread done"
