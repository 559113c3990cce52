"""Every distribution builds as a user publishing it would build it (issue #12, item 8):
``python -m build`` (an sdist, then a wheel built from that sdist) in each distribution
directory, in a copy of the checkout under a temporary directory, so nothing is written into the
checkout. The wheels carry honest tags, the license, one version and a compatible ``vmmkit``
range; the core's wheel carries the demo guest that ``vmmkit run`` boots from the installed
package.

The builds use ``--no-isolation`` (the development environment has the build requirements, see
requirements-dev.txt): the same backend and sources, without a download per build."""

from __future__ import annotations

import ast
import email.parser
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import vmmkit

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 300

# distribution directory -> (distribution name, import package)
DISTRIBUTIONS = {
    ".": ("vmmkit", "vmmkit"),
    "plugins/kvm": ("vmmkit-kvm", "vmmkit_kvm"),
    "plugins/mshv": ("vmmkit-mshv", "vmmkit_mshv"),
    "plugins/devices": ("vmmkit-devices", "vmmkit_devices"),
    "plugins/emu": ("vmmkit-emu", "vmmkit_emu"),
    "plugins/vhost-user": ("vmmkit-vhost-user", "vmmkit_vhost_user"),
    "arch/x86_64": ("vmmkit-x86-64", "vmmkit_x86_64"),
    "arch/aarch64": ("vmmkit-aarch64", "vmmkit_aarch64"),
    "examples/vmmkit-example-device": ("vmmkit-example-device", "vmmkit_example_device"),
}
NATIVE = {".", "plugins/kvm", "plugins/devices", "plugins/mshv"}
PLATFORM_TAG = sysconfig.get_platform().replace("-", "_").replace(".", "_")

pytestmark = pytest.mark.slow

# Build output, caches and the environment: not part of a source tree.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".tox", "build", "dist", "*.egg-info", "__pycache__",
                                     "*.so", "*.o", "_native*.c", ".*_cache", ".hypothesis", "data")


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("checkout") / "vmmkit"
    shutil.copytree(REPO, copy, ignore=_NOT_SOURCE, symlinks=True)
    return copy


class Builds:
    """Builds each distribution once per module, on first request."""

    def __init__(self, source: Path, out: Path) -> None:
        self.source = source
        self.out = out
        self.results: dict[str, subprocess.CompletedProcess[str]] = {}

    def __call__(self, directory: str) -> tuple[Path, Path]:
        """The (sdist, wheel) of ``directory``; fails the test with the build's output."""
        outdir = self.out / DISTRIBUTIONS[directory][0]
        if directory not in self.results:
            self.results[directory] = subprocess.run(
                [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir),
                 str(self.source / directory)],
                capture_output=True, text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if k != "VMMKIT_WHEEL_WITHOUT_DEMO"},
            )
        result = self.results[directory]
        output = result.stdout[-4000:] + result.stderr[-4000:]
        assert result.returncode == 0, f"python -m build {directory} failed:\n{output}"
        sdists, wheels = list(outdir.glob("*.tar.gz")), list(outdir.glob("*.whl"))
        assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in outdir.iterdir())
        return sdists[0], wheels[0]


@pytest.fixture(scope="module")
def build(source_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Builds:
    return Builds(source_copy, tmp_path_factory.mktemp("dist"))


def source_version(directory: str) -> str:
    package = DISTRIBUTIONS[directory][1]
    root = REPO / directory / ("" if directory == "." else "src")
    tree = ast.parse((root / package / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            assert isinstance(node.value, ast.Constant)
            return str(node.value.value)
    raise AssertionError(f"{package}/__init__.py has no __version__")


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(name).decode())


@pytest.mark.parametrize("directory", list(DISTRIBUTIONS))
def test_the_distribution_builds_an_sdist_and_a_wheel(build: Builds, directory: str) -> None:
    sdist, wheel = build(directory)
    name, package = DISTRIBUTIONS[directory]
    version = source_version(directory)
    assert sdist.name == f"{name.replace('-', '_')}-{version}.tar.gz"
    python_tag = f"cp311-abi3-{PLATFORM_TAG}" if directory in NATIVE else "py3-none-any"
    assert wheel.name == f"{name.replace('-', '_')}-{version}-{python_tag}.whl"
    metadata = wheel_metadata(wheel)
    assert metadata["Version"] == version
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Requires-Python"] == ">=3.11"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        license_file = f"{name.replace('-', '_')}-{version}.dist-info/licenses/LICENSE"
        assert license_file in names, names
        assert archive.read(license_file) == (REPO / "LICENSE").read_bytes()
        assert f"{package}/py.typed" in names
    requires = metadata.get_all("Requires-Dist") or []
    if directory != ".":
        assert "vmmkit<0.2,>=0.1" in requires, requires


def test_every_distribution_directory_has_the_license() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    for directory in DISTRIBUTIONS:
        assert (REPO / directory / "LICENSE").read_text() == text, directory


def test_the_core_version_has_one_source(build: Builds) -> None:
    _sdist, wheel = build(".")
    assert wheel_metadata(wheel)["Version"] == vmmkit.__version__ == source_version(".")
    assert 'version = "' not in (REPO / "pyproject.toml").read_text().split("[project]", 1)[1].split("\n[", 1)[0]


@pytest.mark.parametrize("directory", sorted(NATIVE))
def test_native_wheels_keep_to_the_stable_abi(build: Builds, directory: str) -> None:
    """The abi3 tag is honest: abi3audit finds no symbol outside the stable ABI of 3.11."""
    _sdist, wheel = build(directory)
    with zipfile.ZipFile(wheel) as archive:
        modules = [n for n in archive.namelist() if n.endswith(".so")]
    assert modules and all(n.endswith(".abi3.so") for n in modules), modules
    audit = shutil.which("abi3audit", path=str(Path(sys.executable).parent)) or shutil.which("abi3audit")
    assert audit, "abi3audit is not installed (pip install -r requirements-dev.txt)"
    result = subprocess.run([audit, "--strict", "--summary", str(wheel)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 ABI violations" in " ".join((result.stdout + result.stderr).split()), result.stdout + result.stderr


def test_the_core_sdist_has_what_its_wheel_is_built_from(build: Builds) -> None:
    sdist, _wheel = build(".")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "setup.py", "vmmkit/virtio/native/vq_walk.c", "vmmkit/virtio/native/vq_walk.h",
            "tests/guests/Makefile", "tests/guests/x86_64/build.mk", "vmmkit/sandbox/native/sandbox.c",
            "vmmkit/sandbox/native/sandbox.h"} <= names
    assert not [n for n in names if n.startswith("tests/guests/build/") or n.endswith((".so", ".o"))]


def test_the_core_wheel_carries_the_demo_guest(build: Builds) -> None:
    _sdist, wheel = build(".")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        guest = archive.read("vmmkit/data/demo-x86_64.elf")
    assert guest[:4] == b"\x7fELF" and guest[4] == 2 and int.from_bytes(guest[18:20], "little") == 62  # ELF64, x86-64
    assert "vmmkit/virtio/_native.abi3.so" in names
    assert "vmmkit/sandbox/_native.abi3.so" in names
    assert "vmmkit/api/openapi.yaml" in names
    assert not [n for n in names if n.startswith("tests/")]


def test_a_wheel_without_the_demo_guest_is_refused_loudly(source_copy: Path, tmp_path: Path) -> None:
    """No make (or no guest sources): the wheel build stops and says why and what to do."""
    tree = tmp_path / "tree"
    shutil.copytree(source_copy, tree, ignore=shutil.ignore_patterns("guests"))
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir",
                             str(tmp_path / "dist"), str(tree)], capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "bundles the demo guest" in output and "VMMKIT_WHEEL_WITHOUT_DEMO=1" in output, output
    assert not list((tmp_path / "dist").glob("*.whl"))


@pytest.mark.requires_kvm
def test_vmmkit_run_boots_the_guest_bundled_in_the_installed_wheel(build: Builds, tmp_path: Path) -> None:
    """The wheel installed on its own (the plugins come from the environment): ``vmmkit run``
    finds the demo guest in the installed package, not in a source tree."""
    _sdist, wheel = build(".")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                    "--target", str(site), str(wheel)], check=True, capture_output=True, text=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import vmmkit.demo; print(vmmkit.demo.demo_kernel())"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == site / "vmmkit" / "data" / "demo-x86_64.elf"
    serial = tmp_path / "serial.txt"
    result = subprocess.run([sys.executable, "-m", "vmmkit", "run", "--serial", f"file={serial}"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: exit 0" in serial.read_text()


def test_type_checking_covers_every_distribution() -> None:
    """``mypy --strict`` (``.ci/run``, tox's ``type``) reads its files from pyproject.toml."""
    import tomllib

    files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    scripts = {"lab/lab.py", "lab/cross.py"}  # the nested lab's tooling, not a distribution
    assert set(files) == {"vmmkit", *(f"{d}/src" for d in DISTRIBUTIONS if d != "."), *scripts}
    on_disk = {str(p.parent.relative_to(REPO)) for p in REPO.glob("*/*/pyproject.toml")}
    assert on_disk == set(DISTRIBUTIONS) - {"."}, "a distribution directory is missing from DISTRIBUTIONS"


def test_plugins_pin_the_same_dependency_bounds_as_the_core() -> None:
    import tomllib

    def bounds(directory: str) -> dict[str, str]:
        project = tomllib.loads((REPO / directory / "pyproject.toml").read_text())["project"]
        out = {}
        for requirement in project["dependencies"]:
            name = requirement.split(">")[0].split("<")[0].split("=")[0].strip()
            out[name] = requirement[len(name):]
        return out

    core = bounds(".")
    for directory in DISTRIBUTIONS:
        if directory == ".":
            continue
        deps = bounds(directory)
        assert deps.pop("vmmkit") == ">=0.1,<0.2", directory
        for name, bound in deps.items():
            if name in core:
                assert bound == core[name], f"{directory}: {name}{bound}, the core says {name}{core[name]}"
