"""Builds the core's native module (the virtio chain walker, cffi) and bundles the demo guest
(tests/guests) into wheels of the core, when make and gcc exist."""

import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithDemoGuest(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # a source checkout builds the guest on first use (vmmkit.demo)
        guests = Path(__file__).parent / "tests" / "guests"
        if (guests / "Makefile").is_file() and shutil.which("make") and shutil.which("gcc"):
            subprocess.run(["make", "-s", "-C", str(guests)], check=True)
            target = Path(self.build_lib) / "vmmkit" / "data"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(guests / "build" / "x86_64" / "selftest.elf", target / "demo-x86_64.elf")


setup(
    cmdclass={"build_py": BuildWithDemoGuest},
    cffi_modules=["vmmkit/virtio/_native_build.py:ffibuilder"],
)
