"""The bundled demo guest that ``vmmkit run`` boots when no kernel is given.

It is the project's x86-64 self-test kernel (tests/guests): installed wheels carry it as
package data; a source checkout builds it with ``make`` on first use.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

from vmmkit.errors import VmmError

_PACKAGED = "demo-x86_64.elf"
_SOURCE_TREE_GUESTS = Path(__file__).resolve().parent.parent / "tests" / "guests"


def demo_kernel() -> Path:
    packaged = resources.files("vmmkit") / "data" / _PACKAGED
    if packaged.is_file():
        return Path(str(packaged))
    built = _SOURCE_TREE_GUESTS / "build" / "x86_64" / "selftest.elf"
    if not built.is_file() and (_SOURCE_TREE_GUESTS / "Makefile").is_file():
        if shutil.which("make") is None or shutil.which("gcc") is None:
            raise VmmError("the demo guest is not built and make/gcc are missing (apt-get install make gcc)")
        result = subprocess.run(["make", "-s", "-C", str(_SOURCE_TREE_GUESTS)], capture_output=True, text=True)
        if result.returncode != 0:
            raise VmmError(f"building the demo guest failed:\n{result.stderr.strip()}")
    if built.is_file():
        return built
    raise VmmError("no demo guest is bundled with this installation; pass --kernel")
