"""Cross-builds the project's cffi modules for the AArch64 lab (``aarch64-linux-gnu-gcc`` against
the arm64 Python and kernel headers from Debian's ``libpython3.11-dev:arm64`` and
``linux-libc-dev:arm64``, extracted into the lab's sysroot).

cffi writes the C of each out-of-line module (``ffibuilder.emit_c_code``); it is compiled here as
setuptools would, only with the cross compiler. The KVM plugin's module is x86-only
(``struct kvm_regs`` of x86): the arm64 backend uses ``ctypes`` instead, so it is not built.

Run by ``lab.py`` in a subprocess with a Python that has ``cffi`` (the checkout's ``.venv``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

#: (build script, module name) of the modules the lab builds.
MODULES = (
    ("vmmkit/virtio/_native_build.py", "vmmkit.virtio._native"),
    ("plugins/devices/src/vmmkit_devices/virtio/_native_build.py", "vmmkit_devices.virtio._native"),
)
SUFFIX = ".cpython-311-aarch64-linux-gnu.so"
CC = "aarch64-linux-gnu-gcc"


def build_one(root: Path, script: str, module: str, sysroot: Path, out: Path) -> tuple[str, Path]:
    path = root / script
    spec = importlib.util.spec_from_file_location(f"lab_build_{module.replace('.', '_')}", path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    builder = loaded.ffibuilder
    name, _source, _ext, kwds = builder._assigned_source  # what set_source() recorded
    assert name == module, (name, module)
    package_dir = path.parent
    sources = [str((Path.cwd() / s).resolve()) if not Path(s).is_absolute() else s for s in kwds.get("sources", [])]
    c_files = [str(p) for p in sorted((package_dir / "native").glob("*.c"))] if not sources else sources
    digest = hashlib.sha256(path.read_bytes())
    for c_file in c_files:
        digest.update(Path(c_file).read_bytes())
    for header in sorted(package_dir.glob("native/*.h")):
        digest.update(header.read_bytes())
    rel = module.replace(".", "/") + SUFFIX
    target = out / digest.hexdigest()[:16] / rel
    if target.exists():
        return rel, target
    target.parent.mkdir(parents=True, exist_ok=True)
    generated = target.parent / (module.rsplit(".", 1)[-1] + ".c")
    builder.emit_c_code(str(generated))
    include = sysroot / "usr/include"
    argv = [
        CC, f"--sysroot={sysroot}", "-shared", "-fPIC", "-O2", "-fno-strict-aliasing", "-DNDEBUG",
        *kwds.get("extra_compile_args", []),
        *(f"-I{d}" for d in kwds.get("include_dirs", [])),
        f"-I{include / 'python3.11'}", f"-I{include / 'aarch64-linux-gnu/python3.11'}",
        f"-isystem{include / 'aarch64-linux-gnu'}", f"-isystem{include}",
        str(generated), *c_files, "-o", str(target), *kwds.get("extra_link_args", []),
    ]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"cross build of {module} failed:\n{' '.join(argv)}\n{result.stderr[-4000:]}")
    return rel, target


def build_all(root: Path, sysroot: Path, out: Path) -> dict[str, bytes]:
    """``{path in the checkout: bytes}`` of every cross-built module (via a subprocess)."""
    python = root / ".venv/bin/python"
    result = subprocess.run(
        [str(python if python.exists() else sys.executable), __file__, str(root), str(sysroot), str(out)],
        capture_output=True, text=True, cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"cross build failed: {result.stderr[-4000:]}")
    built: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    return {rel: Path(path).read_bytes() for rel, path in built.items()}


def _main() -> None:
    root, sysroot, out = (Path(a) for a in sys.argv[1:4])
    built = {}
    for script, module in MODULES:
        rel, target = build_one(root, script, module, sysroot, out)
        package_root = "" if module.startswith("vmmkit.") else "plugins/devices/src/"
        built[package_root + rel] = str(target)
    print(json.dumps(built))


if __name__ == "__main__":
    _main()
