"""Builds the core's native module (the virtio chain walker, cffi) and bundles the demo guest
(tests/guests/build/x86_64/selftest.elf, which ``vmmkit run`` boots) into wheels of the core.

A wheel without the demo guest is refused, loudly, unless ``VMMKIT_WHEEL_WITHOUT_DEMO=1`` asks
for one (``vmmkit run`` then says that no demo guest is bundled). An editable install needs
none: a source checkout builds the guest on first use (:mod:`vmmkit.demo`).

The wheel is tagged ``cp311-abi3``: cffi compiles the module against the stable ABI
(``Py_LIMITED_API``, hence ``_native.abi3.so``), and ``abi3audit`` checks it
(``tests/integration/test_packaging.py``).
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

GUESTS = Path(__file__).resolve().parent / "tests" / "guests"
DEMO_TARGET = "build/x86_64/selftest.elf"
WITHOUT_DEMO_ENV = "VMMKIT_WHEEL_WITHOUT_DEMO"


class MissingDemoGuest(RuntimeError):
    pass


def build_demo_guest() -> Path:
    """Build the x86-64 self-test kernel with make; raise saying why it cannot be done."""
    if not (GUESTS / "Makefile").is_file():
        raise MissingDemoGuest(f"{GUESTS} has no Makefile (an incomplete sdist?)")
    missing = [tool for tool in ("make", "gcc", "ld", "objcopy") if shutil.which(tool) is None]
    if missing:
        raise MissingDemoGuest(f"building it needs {', '.join(missing)} (apt-get install make gcc binutils)")
    result = subprocess.run(["make", "-s", "-C", str(GUESTS), "ARCH=x86_64", DEMO_TARGET],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise MissingDemoGuest(f"make failed:\n{result.stdout}{result.stderr}")
    return GUESTS / DEMO_TARGET


class BuildWithDemoGuest(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        if os.environ.get(WITHOUT_DEMO_ENV) == "1":
            print(f"vmmkit: {WITHOUT_DEMO_ENV}=1: building a wheel without the demo guest")
            return
        try:
            guest = build_demo_guest()
        except MissingDemoGuest as exc:
            raise SystemExit(
                f"error: vmmkit's wheel bundles the demo guest ({GUESTS / DEMO_TARGET}) and it cannot be "
                f"built: {exc}\nSet {WITHOUT_DEMO_ENV}=1 to build a wheel without it."
            ) from None
        target = Path(self.build_lib) / "vmmkit" / "data"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(guest, target / "demo-x86_64.elf")


setup(
    cmdclass={"build_py": BuildWithDemoGuest},
    cffi_modules=["vmmkit/virtio/_native_build.py:ffibuilder", "vmmkit/sandbox/_native_build.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
