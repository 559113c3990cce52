"""Bad input and hostile host set-ups, tried as a user would with the ``vmmkit`` command: each is
a clear error (one ``vmmkit: error:`` line, exit 1 or 2) or keeps working, never a traceback
and never a hang (issue 12, item 7), and the log stream is what ``--log-format`` says (item 9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "x86_64"))
from x86_helpers import build_elf  # noqa: E402

GUEST_ARCH = "x86_64"

#: 32-bit PVH entry: boot-progress codes 0x41, 0x42 to port 0x80, then ACPI S5 (port 0x600).
PROGRESS_GUEST = bytes.fromhex(
    "b041" "e680"  # mov $0x41, %al; out %al, $0x80
    "b042" "e680"  # mov $0x42, %al; out %al, $0x80
    "66ba0006"  # mov $0x600, %dx
    "b034" "ee"  # mov $(5 << 2 | 1 << 5), %al; out %al, (%dx): SLP_TYP=S5 | SLP_EN
    "f4" "ebfd"  # 1: hlt; jmp 1b
)


@pytest.fixture(scope="module")
def progress_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guest") / "progress.elf"
    path.write_bytes(build_elf([(0x200000, PROGRESS_GUEST, 0x1000)], entry=0x200000, pvh_entry=0x200000))
    return path


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO nobody has open."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    yield path


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode in (1, 2), (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vmmkit: error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def run_bounded(*args: str, timeout: float = 20, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``vmmkit`` that must end on its own; SIGTERM, then SIGKILL, if it does not."""
    proc = subprocess.Popen([sys.executable, "-m", "vmmkit", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=5)
            how = "ended only by SIGTERM"
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            how = "survived SIGTERM (killed)"
        raise AssertionError(f"vmmkit {' '.join(args)} hung for {timeout} s and {how}:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# -- guest memory -----------------------------------------------------------------------------


@pytest.mark.requires_kvm
def test_more_memory_than_the_host_can_map_is_one_line(progress_guest: Path) -> None:
    result = run_vmmkit("--kernel", str(progress_guest), "--memory", "size=128T", "--serial", "off")
    assert_one_line_error(result, "guest RAM", "Cannot allocate memory")


def _free_huge_pages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@pytest.mark.requires_kvm
@pytest.mark.skipif(_free_huge_pages() > 0, reason="the host has free huge pages")
def test_hugepages_on_a_host_without_huge_pages_is_one_line(progress_guest: Path) -> None:
    result = run_vmmkit("--kernel", str(progress_guest), "--memory", "size=64M,hugepages=on", "--serial", "off")
    assert_one_line_error(result, "huge pages", "hugepages=off")


# -- the log file -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing/dir/vmm.log", "."], ids=["missing-directory", "a-directory"])
def test_an_unusable_log_file_is_a_usage_error(tmp_path: Path, progress_guest: Path, where: str) -> None:
    target = tmp_path / where
    result = run_bounded("--kernel", str(progress_guest), "--log-file", str(target), "-v")
    assert_one_line_error(result, "--log-file", str(target))
    assert result.returncode == 2


@pytest.mark.requires_kvm
def test_a_log_on_a_full_disk_loses_lines_not_the_vm(tmp_path: Path, guest_elf: Path) -> None:
    """/dev/full fails every write with ENOSPC, as a full disk does. The vCPU threads log too
    (-vv: device activations), and must keep running: the guest finishes its tests."""
    serial = tmp_path / "serial.txt"
    result = run_bounded("--kernel", str(guest_elf), "--cmdline", "test=rng,console", "--serial", f"file={serial}",
                         "--console", "null", "--log-file", "/dev/full", "-vv", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "selftest: exit 0" in serial.read_text()
    warnings = [line for line in result.stderr.splitlines() if "cannot write" in line]
    assert len(warnings) == 1 and "/dev/full: No space left on device" in warnings[0], result.stderr


# -- FIFOs where a file is meant ------------------------------------------------------------------

FIFO_OPTIONS = {
    "serial": ("--serial", "file={}"),
    "console": ("--console", "file={}"),
    "rng": ("--rng", "src={}"),
    "event-monitor": ("--event-monitor", "path={}"),
    "log-file": ("--log-file", "{}"),
    "debug-console": ("--debug-console", "file={}"),
    "disk": ("--disk", "path={},readonly=on"),
    "kernel": ("--kernel", "{}"),
    "initramfs": ("--initramfs", "{}"),
}


@pytest.mark.requires_kvm
@pytest.mark.parametrize("option", FIFO_OPTIONS)
def test_a_fifo_nobody_opens_is_refused_at_once(option: str, fifo: Path, progress_guest: Path) -> None:
    flag, value = FIFO_OPTIONS[option]
    args = ["--serial", "off", flag, value.format(fifo)]
    if flag != "--kernel":
        args = ["--kernel", str(progress_guest), *args]
    started = time.monotonic()
    result = run_bounded(*args, timeout=15)
    assert_one_line_error(result, str(fifo))
    assert "FIFO" in result.stderr or "not a regular file" in result.stderr
    assert time.monotonic() - started < 10


@pytest.mark.requires_kvm
def test_a_fifo_with_a_reader_gets_the_serial_output(fifo: Path, guest_elf: Path) -> None:
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        time.sleep(0.3)  # cat opens the FIFO
        result = run_bounded("--kernel", str(guest_elf), "--cmdline", "hello", "--serial", f"file={fifo}")
        assert result.returncode == 0, result.stderr
        out, _ = reader.communicate(timeout=10)
    finally:
        reader.kill()
    assert b"selftest: cmdline: hello" in out


@pytest.mark.requires_kvm
def test_a_character_device_is_still_an_entropy_source(guest_elf: Path, tmp_path: Path) -> None:
    serial = tmp_path / "serial.txt"
    result = run_bounded("--kernel", str(guest_elf), "--cmdline", "test=rng", "--rng", "src=/dev/urandom",
                         "--serial", f"file={serial}", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "selftest: exit 0" in serial.read_text()


# -- the log stream -------------------------------------------------------------------------------


@pytest.mark.requires_kvm
def test_json_log_is_json_on_every_line_even_the_native_boot_progress(progress_guest: Path) -> None:
    result = run_bounded("--kernel", str(progress_guest), "--serial", "off", "--log-format", "json", "-v")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the log never goes to stdout
    lines = result.stderr.splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}\n--- the log ---\n{result.stderr}") from None
    progress = [r for r in records if r.get("event") == "guest.progress"]
    assert [r["code"] for r in progress] == ["0x41", "0x42"], result.stderr
    for record in progress:
        assert record["level"] == "info" and record["timestamp"].endswith("Z")
        float(record["elapsed"])


@pytest.mark.requires_kvm
def test_console_log_keeps_the_native_text_lines(progress_guest: Path) -> None:
    result = run_bounded("--kernel", str(progress_guest), "--serial", "off", "--log-format", "console", "-v")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert [line.split()[-1] for line in result.stderr.splitlines() if "guest.progress" in line] == ["0x41", "0x42"]


LIBRARY_USE = """
import sys
from vmmkit.config import VmConfig
from vmmkit.machine import Machine
from vmmkit.plugin import collect_registries, make_plugin_manager
{configure}
pm = make_plugin_manager()
config = VmConfig.from_cli(kernel=sys.argv[1], memory="size=64M", serial="off")
exit_ = Machine(config, registries=collect_registries(pm), plugin_manager=pm).run()
sys.exit(exit_.status)
"""


@pytest.mark.requires_kvm
def test_the_library_prints_nothing_unless_the_caller_configures_logging(progress_guest: Path) -> None:
    quiet = subprocess.run([sys.executable, "-c", LIBRARY_USE.format(configure=""), str(progress_guest)],
                           capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0, quiet.stderr
    assert (quiet.stdout, quiet.stderr) == ("", "")

    configure = "import logging\nlogging.basicConfig(level=logging.DEBUG, format='%(name)s %(message)s')"
    verbose = subprocess.run([sys.executable, "-c", LIBRARY_USE.format(configure=configure), str(progress_guest)],
                             capture_output=True, text=True, timeout=60)
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stdout == ""
    assert "vmmkit vm.build" in verbose.stderr  # through the caller's stdlib logging, to stderr


# -- plugins --------------------------------------------------------------------------------------


@pytest.fixture
def broken_plugin_site(tmp_path: Path) -> Path:
    """A site directory with a distribution whose vmmkit entry point fails to import."""
    site = tmp_path / "site"
    dist = site / "broken_vmmkit_plugin-0.3.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-vmmkit-plugin\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[vmmkit]\nbrokenplug = broken_vmmkit_plugin.plugin\n")
    package = site / "broken_vmmkit_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text("import no_such_module_for_vmmkit_tests\n")
    return site


def _with_site(site: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def test_vmmkit_plugins_lists_a_broken_plugin_and_still_runs(broken_plugin_site: Path) -> None:
    result = run_vmmkit("plugins", env=_with_site(broken_plugin_site))
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "broken-vmmkit-plugin" in line]
    assert "BROKEN" in line and "brokenplug" in line and "no_such_module_for_vmmkit_tests" in line
    assert "vmmkit-devices" in result.stdout and "hypervisors" in result.stdout
    assert "VMMKIT_DISABLE_PLUGINS=brokenplug" in result.stderr


def test_a_broken_plugin_is_named_with_the_remedy(broken_plugin_site: Path, progress_guest: Path) -> None:
    result = run_vmmkit("--kernel", str(progress_guest), env=_with_site(broken_plugin_site))
    assert_one_line_error(result, "broken-vmmkit-plugin 0.3", "brokenplug", "broken_vmmkit_plugin.plugin",
                          "VMMKIT_DISABLE_PLUGINS=brokenplug")


@pytest.mark.requires_kvm
def test_the_remedy_works(broken_plugin_site: Path, progress_guest: Path) -> None:
    env = _with_site(broken_plugin_site, VMMKIT_DISABLE_PLUGINS="brokenplug")
    result = run_vmmkit("--kernel", str(progress_guest), "--serial", "off", env=env)
    assert result.returncode == 0, result.stderr
