"""The short library API (``vmmkit.Vm``, ``vmmkit.run``): the README's example runs as written,
and the API's lifecycle works on a real guest (issue #12, item 9)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vmmkit
from vmmkit.config import ConfigError, VmConfig

README = Path(__file__).resolve().parents[2] / "README.md"
GUEST_ARCH = "x86_64"


def readme_library_example() -> str:
    """The first ``python`` code block of the README's "As a library" section."""
    text = README.read_text()
    section = text.split("\n## As a library\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert blocks, "the README's 'As a library' section has no python block"
    return str(blocks[0])


@pytest.mark.requires_kvm
def test_the_readme_example_runs_as_written(selftest_elf: Path, tmp_path: Path) -> None:
    example = tmp_path / "example.py"
    example.write_text(readme_library_example())
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "0 guest-poweroff" in lines, result.stdout
    assert "selftest: exit 0" in lines, result.stdout


def test_unknown_keywords_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="unknown VM option.*: kernal"):
        vmmkit.Vm(kernal="vmlinux")


def test_a_bad_option_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--memory"):
        vmmkit.Vm(kernel="vmlinux", memory="lots")


def test_a_kernel_is_required() -> None:
    with pytest.raises(ConfigError, match="no kernel given"):
        vmmkit.Vm(memory="128M")


def test_a_config_and_keywords_together_are_refused() -> None:
    with pytest.raises(TypeError, match="either a VmConfig or keyword options"):
        vmmkit.Vm(VmConfig.from_cli(kernel="vmlinux"), cmdline="x")


def test_keywords_build_the_config_the_command_would() -> None:
    vm = vmmkit.Vm(kernel=Path("/boot/vmlinux"), cmdline="quiet", cpus=2, memory="256M",
                   disks="path=/tmp/a.img,readonly=on", serial="off")
    expected = VmConfig.from_cli(kernel="/boot/vmlinux", cmdline="quiet", cpus="boot=2", memory="size=256M",
                                 disks=["path=/tmp/a.img,readonly=on"], serial="off")
    assert vm.config == expected
    vm.close()


def test_memory_in_bytes_and_full_specs() -> None:
    vm = vmmkit.Vm(kernel="k", memory=128 << 20, cpus="boot=1,max=2", serial=None)
    assert vm.config.memory.size == 128 << 20
    assert vm.config.cpus.max_vcpus == 2
    vm.close()


@pytest.mark.requires_kvm
def test_run_returns_the_guest_status_and_its_serial_output(selftest_elf: Path, vmmkit_hypervisor: str) -> None:
    result = vmmkit.run(kernel=selftest_elf, cmdline="test=fault", hypervisor=vmmkit_hypervisor, timeout=60)
    assert result.reason == "guest-poweroff"
    assert result.status != 0 and not result.ok
    assert "selftest: cmdline: test=fault" in result.serial


@pytest.mark.requires_kvm
def test_wait_times_out_and_the_power_button_stops_the_guest(selftest_elf: Path, vmmkit_hypervisor: str) -> None:
    with vmmkit.Vm(kernel=selftest_elf, cmdline="test=spin", hypervisor=vmmkit_hypervisor) as vm:
        vm.start()
        assert vm.state == "Running"
        with pytest.raises(TimeoutError):
            vm.wait(timeout=0.2)
        deadline = time.monotonic() + 60
        while "selftest: heartbeat 1" not in vm.serial:
            assert time.monotonic() < deadline, vm.serial
            time.sleep(0.05)
        vm.power_button()
        result = vm.wait(timeout=60)
    assert result.ok, result
    assert "power button pressed" in result.serial
    assert vm.serial == result.serial  # kept after the with block released the VM


@pytest.mark.requires_kvm
def test_stop_ends_a_running_guest(selftest_elf: Path, vmmkit_hypervisor: str) -> None:
    with vmmkit.Vm(kernel=selftest_elf, cmdline="test=spin", hypervisor=vmmkit_hypervisor) as vm:
        with pytest.raises(vmmkit.VmmError, match="not started"):
            vm.wait(timeout=1)
        vm.start()
        with pytest.raises(vmmkit.VmmError, match="started already"):
            vm.start()
        result = vm.stop()
        assert vm.state == "Shutdown"
    assert (result.reason, result.status) == ("requested", 0)
    with pytest.raises(vmmkit.VmmError, match="closed"):
        vm.start()


@pytest.mark.requires_kvm
def test_run_stops_the_guest_when_the_timeout_passes(selftest_elf: Path, vmmkit_hypervisor: str) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        vmmkit.run(kernel=selftest_elf, cmdline="test=spin", hypervisor=vmmkit_hypervisor, timeout=0.5)
    assert time.monotonic() - started < 30


def test_values_of_the_wrong_type_are_refused_not_converted() -> None:
    with pytest.raises(TypeError, match="watchdog: expected True or False"):
        vmmkit.Vm(kernel="k", watchdog="no")
    with pytest.raises(TypeError, match="cmdline: expected an option string"):
        vmmkit.Vm(kernel="k", cmdline=["quiet"])
    with pytest.raises(TypeError, match="disks: expected an option string or a list"):
        vmmkit.Vm(kernel="k", disks=[Path("a.img")])
    with pytest.raises(TypeError, match="expected an int or a boot=... option string"):
        vmmkit.Vm(kernel="k", cpus=2.5)


def test_plugin_devices_take_type_and_spec_pairs() -> None:
    vm = vmmkit.Vm(kernel="k", plugin_devices=("example-led", "port=0x510"), serial=None)
    assert [(d.type, d.options) for d in vm.config.plugin_devices] == [("example-led", (("port", "0x510"),))]
    vm.close()


def test_the_capture_directory_goes_with_the_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() removes the serial capture's directory; so does dropping a Vm never closed."""
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    closed = vmmkit.Vm(kernel="k")
    dropped = vmmkit.Vm(kernel="k")
    assert len(list(tmp_path.iterdir())) == 2
    closed.close()
    assert len(list(tmp_path.iterdir())) == 1
    del dropped
    gc.collect()
    assert list(tmp_path.iterdir()) == []
