"""A third-party plugin, installed the way a user installs one, is discovered, listed and
configurable with no edit to vmmkit (the example under examples/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vmmkit-example-device"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment in which the example plugin is pip-installed (into its own folder). pip
    builds in the source tree (``build/``, ``*.egg-info``), so it builds a copy in tmp."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("source") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return env


def test_the_plugin_is_listed_with_its_device(plugin_env: dict[str, str]) -> None:
    result = run_vmmkit("plugins", env=plugin_env)
    assert result.returncode == 0, result.stderr
    assert "vmmkit-example-device 0.1.0: device type example-led" in result.stdout
    assert "(--example-led)" in result.stdout


def test_its_option_appears_in_help(plugin_env: dict[str, str]) -> None:
    result = run_vmmkit("--help", env=plugin_env)
    assert "--example-led SPEC" in result.stdout


def test_without_the_plugin_the_option_does_not_exist() -> None:
    result = run_vmmkit("--kernel", "x", "--example-led", "port=0x510")
    assert result.returncode == 2
    assert "unrecognized arguments: --example-led" in result.stderr


def test_its_own_tests_pass(plugin_env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                            env=plugin_env, capture_output=True, text=True, cwd=EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout


@pytest.mark.requires_kvm
def test_a_vm_boots_with_the_device_configured(plugin_env: dict[str, str], selftest_elf: Path) -> None:
    result = run_vmmkit("--kernel", str(selftest_elf), "--example-led", "port=0x510,label=front", "-v",
                        "--log-format", "json", env=plugin_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: exit 0" in result.stdout


@pytest.mark.requires_kvm
def test_a_bad_device_option_is_a_clear_error(plugin_env: dict[str, str], selftest_elf: Path) -> None:
    result = run_vmmkit("--kernel", str(selftest_elf), "--example-led", "port=lots", env=plugin_env)
    assert result.returncode != 0
    assert "--example-led: invalid port 'lots'" in result.stderr
    assert "Traceback" not in result.stderr
