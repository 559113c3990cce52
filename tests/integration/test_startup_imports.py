"""Start-up loads what a run needs (issue: cold start). A boot of the test guest from the CLI, in
a child process, must not import what only other runs use or what a lighter module replaces.
Timing lives in ``bench/launch.py``; this keeps the imports from creeping back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each was once on the boot path and cost milliseconds here (a nested VM pays ~0.1 ms per module).
NOT_ON_THE_BOOT_PATH = {
    "importlib.metadata": "entry points are read by vmmkit.entrypoints",
    "elftools": "the ELF loader reads program headers with struct (pyelftools is the tests' reference)",
    "structlog": "loaded on the first log line at an enabled level (warnings only by default)",
    "asyncio": "comes with structlog",
    "logging": "comes with structlog",
    "ctypes": "guest memory and thread names go through cffi and /proc",
    "email": "comes with importlib.metadata",
    "zipfile": "comes with importlib.metadata",
    "hashlib": "only virtio-net's MAC derivation uses it",
    "libfdt": "only AArch64 guests have a device tree",
    "unicorn": "only the emu backend",
    "subprocess": "ctypes.util.find_library ran ldconfig",
    "datetime": "only an RTC the guest sets",
    "vmmkit_devices.virtio.block": "no disk in this VM",
    "vmmkit_devices.virtio.net": "no net in this VM",
    "vmmkit_aarch64.fdt": "an x86-64 guest",
    "vmmkit_mshv": "on demand (vmmkit.plugin_index): kvm is the backend",
    "vmmkit_emu": "on demand (vmmkit.plugin_index): kvm is the backend",
    "socket": "only the socket console backend and the API",
    "shutil": "argparse asked it for the terminal width once per option (the CLI finds it once)",
    "base64": "only snapshot and migration state",
}

PROBE = """
import atexit, runpy, sys
listing = sys.argv.pop(1)
def report():
    with open(listing, "w") as out:
        out.write("\\n".join(sorted(sys.modules)))
atexit.register(report)
sys.argv[0] = "vmmkit"
runpy.run_module("vmmkit", run_name="__main__", alter_sys=True)
"""


@pytest.mark.requires_kvm
def test_a_cli_boot_imports_only_what_it_needs(selftest_elf: Path, tmp_path: Path) -> None:
    listing = tmp_path / "modules.txt"
    # as an installed command runs: its caches (the plugin index among them) written by a first run
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONDONTWRITEBYTECODE", "VMMKIT_NO_PLUGIN_INDEX", "VMMKIT_DISABLE_PLUGINS")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    for _run in range(2):
        result = subprocess.run(
            [sys.executable, "-c", PROBE, str(listing), "--kernel", str(selftest_elf), "--memory", "size=128M",
             "--cmdline", "hello", "--serial", "file=" + str(tmp_path / "serial.txt")],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
        )
        assert result.returncode == 0, result.stderr
    assert "selftest: cmdline: hello" in (tmp_path / "serial.txt").read_text()
    modules = set(listing.read_text().split())
    assert {"vmmkit_kvm.hypervisor", "vmmkit_x86_64.arch", "vmmkit_devices.legacy.serial"} <= modules
    loaded = {name: why for name, why in NOT_ON_THE_BOOT_PATH.items()
              if name in modules or any(m.startswith(name + ".") for m in modules)}
    assert not loaded, f"a plain boot imported {sorted(loaded)}: {loaded}"


PRELOAD_PROBE = """
import sys
from vmmkit.config import VmConfig
from vmmkit.machine import preload
from vmmkit.plugin import collect_registries, make_plugin_manager

registries = collect_registries(make_plugin_manager())
config = VmConfig.from_cli(kernel=sys.argv[1], disks=[f"path={sys.argv[2]}"])
before = set(sys.modules)
preload(config, registries)
print("\\n".join(sorted(set(sys.modules) - before)))
"""


def test_preload_imports_the_code_of_the_devices_a_config_has(selftest_elf: Path, tmp_path: Path) -> None:
    """What ``vm.create`` does so that ``vm.boot`` pays no imports: the implementations of the
    configured devices, and only those."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    result = subprocess.run([sys.executable, "-c", PRELOAD_PROBE, str(selftest_elf), str(disk)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert {"vmmkit_devices.virtio.block", "vmmkit_devices.legacy.serial", "vmmkit_devices.virtio.rng"} <= loaded
    assert "vmmkit_devices.virtio.net" not in loaded and "vmmkit_devices.virtio.console" not in loaded
