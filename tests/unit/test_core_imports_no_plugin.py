"""The core never imports a plugin: importing every module of vmmkit/ loads nothing from
plugins/ or arch/ (run in a fresh interpreter so nothing else has imported them first)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import importlib, json, pkgutil, sys
import vmmkit
names = [m.name for m in pkgutil.walk_packages(vmmkit.__path__, "vmmkit.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
loaded = {n: getattr(m, "__file__", None) for n, m in sys.modules.items()}
print(json.dumps({"imported": names, "loaded": loaded}))
"""


def test_importing_the_whole_core_loads_no_plugin_module(repo_root: Path) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=repo_root, check=True)
    report = json.loads(result.stdout)
    assert "vmmkit.machine" in report["imported"] and "vmmkit.cli" in report["imported"]
    plugin_dirs = [str(repo_root / "plugins"), str(repo_root / "arch"), str(repo_root / "examples")]
    offenders = {
        name: path
        for name, path in report["loaded"].items()
        if (name.startswith("vmmkit_") or (path and any(path.startswith(d) for d in plugin_dirs)))
    }
    assert offenders == {}
