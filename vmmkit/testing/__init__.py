"""vmmkit's pytest plugin (entry point ``pytest11``): fixtures that build machines from an
explicit plugin list and boot guests, for vmmkit's own tests and for device-plugin authors.

Override ``vmmkit_plugins`` in your ``conftest.py`` to add your plugin::

    @pytest.fixture
    def vmmkit_plugins(vmmkit_builtin_plugins):
        import my_device.plugin
        return [*vmmkit_builtin_plugins, my_device.plugin]
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

#: Entry-point names (group ``vmmkit``) of the plugins that ship with vmmkit.
BUILTIN_PLUGINS = ("kvm", "mshv", "emu", "x86_64", "aarch64", "devices")

MARKERS = {
    "requires_kvm": "needs a usable /dev/kvm (skipped with the reason otherwise)",
    "requires_qemu": "needs qemu-system-x86_64, the reference peer (skipped otherwise)",
    "slow": "boots a real Linux kernel or takes longer than a few seconds",
    "requires_interrupts": "the guest needs interrupts or exceptions delivered (skipped on a backend that has none)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def kvm_unusable_reason() -> str | None:
    """Why /dev/kvm cannot be used here, or ``None`` if it can."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return "/dev/kvm not found"
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return None


HYPERVISOR_ENV = "VMMKIT_TEST_HYPERVISOR"
ARCH_ENV = "VMMKIT_TEST_ARCH"
REPORT_ENV = "VMMKIT_TEST_REPORT"

_backend_runs: dict[str, int] = {}


def selected_backend() -> tuple[str, str]:
    """The (hypervisor, architecture) this test session targets (tox factors set them)."""
    from vmmkit.machine import host_architecture

    return os.environ.get(HYPERVISOR_ENV, "auto"), os.environ.get(ARCH_ENV, host_architecture())


_BACKEND_PROPERTY = "vmmkit_backend"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and "vmmkit_hypervisor" in getattr(item, "fixturenames", ()):
        report.user_properties.append((_BACKEND_PROPERTY, getattr(item, "_vmmkit_backend", "?")))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count here, from the report: under pytest-xdist the controller sees the workers'
    reports (with their properties), not their items."""
    for name, value in report.user_properties:
        if name == _BACKEND_PROPERTY:
            key = str(value)
            _backend_runs[key] = _backend_runs.get(key, 0) + 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _backend_runs:
        return
    runs = ", ".join(f"{count} on {key}" for key, count in sorted(_backend_runs.items()))
    terminalreporter.write_line(f"vmmkit: tests that ran a guest: {runs}")
    report = os.environ.get(REPORT_ENV)
    if report:
        import json

        Path(report).write_text(json.dumps(_backend_runs))


@pytest.fixture
def vmmkit_hypervisor(request: pytest.FixtureRequest, vmmkit_registries: Any) -> str:
    """The hypervisor backend tests boot guests on (``$VMMKIT_TEST_HYPERVISOR``, default
    ``auto``), resolved to a usable backend's name; skips saying why when there is none. A test
    module that boots guests of one architecture says so with ``GUEST_ARCH = "x86_64"``: a
    session targeting another architecture (``$VMMKIT_TEST_ARCH``) skips it."""
    from vmmkit.errors import RegistryError

    name, session_arch = selected_backend()
    arch = str(getattr(request.module, "GUEST_ARCH", session_arch))
    if os.environ.get(ARCH_ENV) and arch != session_arch:
        pytest.skip(f"the session targets {session_arch} guests; this test boots {arch} guests")
    try:
        backend = vmmkit_registries.select_hypervisor(name, arch)
    except RegistryError as exc:
        pytest.skip(str(exc))
    availability = backend.is_available()
    if not availability:
        pytest.skip(f"hypervisor {backend.name} is not usable: {availability.reason}")
    if arch not in backend.architectures:
        pytest.skip(f"hypervisor {backend.name} cannot run {arch} guests")
    if request.node.get_closest_marker("requires_interrupts") and not backend.delivers_interrupts_to(arch):
        pytest.skip(f"hypervisor {backend.name} delivers no interrupts or exceptions to {arch} guests")
    request.node._vmmkit_backend = f"{backend.name}/{arch}"
    return str(backend.name)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_kvm"):
        reason = kvm_unusable_reason()
        if reason:
            pytest.skip(f"requires KVM: {reason}")
    if item.get_closest_marker("requires_qemu"):
        import shutil

        if shutil.which("qemu-system-x86_64") is None:
            pytest.skip("requires qemu-system-x86_64 (apt-get install qemu-system-x86)")


def load_builtin_plugins(names: tuple[str, ...] = BUILTIN_PLUGINS) -> list[Any]:
    """The named plugins' modules, looked up by entry-point name (not autoloaded)."""
    entry_points = {ep.name: ep for ep in metadata.entry_points(group="vmmkit")}
    return [entry_points[name].load() for name in names if name in entry_points]


@pytest.fixture(scope="session")
def vmmkit_builtin_plugins() -> list[Any]:
    return load_builtin_plugins()


@pytest.fixture
def vmmkit_plugins(vmmkit_builtin_plugins: list[Any]) -> list[Any]:
    """The plugins a test's machines are built with. Override to add yours."""
    return vmmkit_builtin_plugins


@pytest.fixture
def vmmkit_pm(vmmkit_plugins: list[Any]) -> Any:
    from vmmkit.plugin import make_plugin_manager

    return make_plugin_manager(autoload=False, plugins=vmmkit_plugins)


@pytest.fixture
def vmmkit_registries(vmmkit_pm: Any) -> Any:
    from vmmkit.plugin import collect_registries

    return collect_registries(vmmkit_pm)


@pytest.fixture
def make_machine(vmmkit_pm: Any, vmmkit_registries: Any) -> Iterator[Callable[..., Any]]:
    """``make_machine(config, hypervisor="auto")`` → an unbuilt Machine, closed afterwards."""
    from vmmkit.machine import Machine

    machines: list[Any] = []

    def factory(config: Any, hypervisor: str = "auto", arch: str | None = None) -> Any:
        machine = Machine(config, registries=vmmkit_registries, plugin_manager=vmmkit_pm,
                          hypervisor=hypervisor, arch=arch)
        machines.append(machine)
        return machine

    yield factory
    for machine in machines:
        if machine.memory is not None:
            machine.close()


@pytest.fixture(scope="session")
def selftest_elf() -> Path:
    """The x86-64 test guest (built with make on first use), or a skip saying why not."""
    from vmmkit.demo import demo_kernel
    from vmmkit.errors import VmmError

    try:
        return demo_kernel()
    except VmmError as exc:
        pytest.skip(f"the x86-64 test guest is unavailable: {exc}")


def run_vmmkit(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the ``vmmkit`` CLI in a child process (as a user would) and capture its output."""
    return subprocess.run([sys.executable, "-m", "vmmkit", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
