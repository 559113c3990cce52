"""The ``vmmkit`` command as a user runs it: exit statuses and messages for bad input."""

from __future__ import annotations

import pytest

from vmmkit.testing import run_vmmkit


def test_plugins_lists_backends_with_availability_architectures_and_devices() -> None:
    result = run_vmmkit("plugins")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "vmmkit-kvm" in out and "vmmkit-mshv" in out and "vmmkit-devices" in out
    assert "/dev/mshv not found" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "x86_64" in lines and "aarch64" in lines
    assert "serial-16550" in out
    transports = out[out.index("transports"):]
    assert "virtio-pci (or pci)" in transports and "virtio-mmio (or mmio)" in transports
    assert "  pci " in transports and "  platform " in transports


@pytest.mark.requires_kvm
def test_plugins_says_kvm_is_usable_here() -> None:
    result = run_vmmkit("plugins")
    (kvm_line,) = [line for line in result.stdout.splitlines() if line.strip().startswith("kvm ")]
    assert " usable" in kvm_line and "not usable" not in kvm_line


def test_unknown_hypervisor_exits_2_listing_the_registered_ones() -> None:
    result = run_vmmkit("--hypervisor", "nosuch", "--kernel", "x")
    assert result.returncode == 2
    assert "nosuch" in result.stderr
    for name in ("auto", "kvm", "mshv"):
        assert f"'{name}'" in result.stderr


@pytest.mark.parametrize(
    "args,option,value",
    [
        (["--memory", "size=12Q"], "--memory", "12Q"),
        (["--cpus", "boot=0"], "--cpus", "0"),
        (["--disk", "pth=a.img"], "--disk", "pth"),
        (["--serial", "sideways"], "--serial", "sideways"),
    ],
)
def test_bad_vm_options_exit_2_naming_the_option_and_value(args: list[str], option: str, value: str) -> None:
    result = run_vmmkit("--kernel", "x", *args)
    assert result.returncode == 2, result.stderr
    assert option in result.stderr and value in result.stderr


@pytest.mark.parametrize("args", [["--memory", "size=12Q"], ["--cpus", "boot=0"]])
def test_bad_options_are_reported_even_without_a_kernel(args: list[str]) -> None:
    result = run_vmmkit(*args)
    assert result.returncode == 2
    assert args[0] in result.stderr


def test_a_missing_kernel_file_is_a_clear_error(tmp_path) -> None:
    missing = tmp_path / "nope.elf"
    result = run_vmmkit("--kernel", str(missing))
    assert result.returncode == 1
    assert str(missing) in result.stderr and "--kernel" in result.stderr and "does not exist" in result.stderr


def test_help_lists_the_cloud_hypervisor_options() -> None:
    result = run_vmmkit("--help")
    assert result.returncode == 0
    for option in ("--kernel", "--cpus", "--memory", "--disk", "--net", "--serial", "--hypervisor", "--log-format"):
        assert option in result.stdout
