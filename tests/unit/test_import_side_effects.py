"""``import vmmkit`` has no side effects (issue #12, item 4): importing the library, or any of
its public modules, or loading its pytest plugin patches nothing in attrs and loads no native
module; the ``vmmkit`` command alone installs the attrs code cache (vmmkit/_codecache.py).
Each check runs in a fresh interpreter, so nothing else has imported or patched first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vmmkit

PROBE = r"""
import importlib, importlib.machinery, json, pkgutil, sys, sysconfig
import vmmkit
after_package = sorted(sys.modules)
public = [m.name for m in pkgutil.walk_packages(vmmkit.__path__, "vmmkit.")
          if not any(part.startswith("_") for part in m.name.split(".")[1:])]
for name in public:
    importlib.import_module(name)
import attr._make
compile_and_eval = attr._make._compile_and_eval
stdlib = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib")})
native = sorted(name for name, module in sys.modules.items()
                if (getattr(module, "__file__", None) or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
                and not module.__file__.startswith(stdlib))
print(json.dumps({
    "public": public,
    "after_package": after_package,
    "compile_and_eval_module": compile_and_eval.__module__,
    "patched": bool(getattr(compile_and_eval, "_vmmkit_cached", False)),
    "native": native,
}))
"""


def probe(tmp_path: Path) -> dict[str, object]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("VMMKIT_NO_CODE_CACHE", None)
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60, check=True)
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_importing_the_library_patches_nothing_and_loads_no_native_module(tmp_path: Path) -> None:
    report = probe(tmp_path)
    public = report["public"]
    assert isinstance(public, list)
    assert {"vmmkit.machine", "vmmkit.cli", "vmmkit.testing", "vmmkit.scripting", "vmmkit.virtio.chain",
            "vmmkit.virtio.queue", "vmmkit.memory"} <= set(public)
    assert report["compile_and_eval_module"] == "attr._make" and report["patched"] is False
    assert report["native"] == [], f"importing vmmkit loaded native modules: {report['native']}"
    assert not (tmp_path / "cache" / "vmmkit").exists(), "importing vmmkit wrote the code cache"


def test_the_package_alone_does_not_load_the_scripting_api(tmp_path: Path) -> None:
    after_package = probe(tmp_path)["after_package"]
    assert isinstance(after_package, list)
    assert [name for name in after_package if name.startswith("vmmkit.")] == []
    assert "attr" not in after_package


def test_the_lazy_names_are_the_public_ones() -> None:
    from vmmkit import _LAZY  # type: ignore[attr-defined]

    assert set(_LAZY) <= set(vmmkit.__all__)
    for name in _LAZY:
        assert getattr(vmmkit, name) is getattr(sys.modules[_LAZY[name]], name)
    assert set(_LAZY) <= set(dir(vmmkit))


def test_an_unknown_attribute_is_an_attribute_error() -> None:
    try:
        vmmkit.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("vmmkit.no_such_name did not raise AttributeError")


def test_the_pytest_plugin_patches_nothing(tmp_path: Path) -> None:
    """pytest loads ``vmmkit.testing`` through its ``pytest11`` entry point; a test in that
    session still sees attrs as it was."""
    (tmp_path / "test_probe.py").write_text(
        "import attr._make, sys\n"
        "def test_attrs_is_untouched():\n"
        "    assert 'vmmkit.testing' in sys.modules\n"
        "    assert not getattr(attr._make._compile_and_eval, '_vmmkit_cached', False)\n"
    )
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_probe.py"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_command_installs_the_code_cache(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("VMMKIT_NO_CODE_CACHE", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    result = subprocess.run([sys.executable, "-m", "vmmkit", "plugins"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "cache" / "vmmkit").glob("attrs-code-*.marshal")), "the command wrote no code cache"


FIRST_USE = r"""
import sys, threading
from vmmkit.virtio import chain
assert "vmmkit.virtio._native" not in sys.modules
barrier = threading.Barrier(8)
answers = []
def first_use():
    barrier.wait()
    answers.append(chain.native_available())
threads = [threading.Thread(target=first_use) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(answers.count(True), "vmmkit.virtio._native" in sys.modules)
"""


def test_the_native_walker_loads_on_first_use_and_racing_threads_all_get_it(tmp_path: Path) -> None:
    from vmmkit.virtio import chain

    if not chain.native_available():
        pytest.skip(f"native walker: {chain.NATIVE_UNAVAILABLE_REASON}")
    env = {k: v for k, v in os.environ.items() if k != "VMMKIT_VIRTIO_NATIVE"}
    result = subprocess.run([sys.executable, "-c", FIRST_USE], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60, check=True)
    assert result.stdout.split() == ["8", "True"]
