"""Builds the project's cffi modules for a lab: ``aarch64-linux-gnu-gcc`` (or the host's gcc for
the x86-64 lab) with ``--sysroot`` = Debian's ``libc6-dev``, ``libpython3.11-dev`` and
``linux-libc-dev`` of the lab's architecture, extracted by ``lab.py``.

cffi writes the C of each out-of-line module (``ffibuilder.emit_c_code``); it is compiled here as
setuptools would, only with the cross compiler. A build script with a ``builder_for(arch)``
(the KVM plugin's: its declarations differ per architecture) gives the lab architecture's builder.

Run by ``lab.py`` in a subprocess with a Python that has ``cffi`` (the checkout's ``.venv``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

#: (build script, source root, module name) of the modules a lab gets.
MODULES = (
    ("vmmkit/virtio/_native_build.py", "", "vmmkit.virtio._native"),
    ("vmmkit/sandbox/_native_build.py", "", "vmmkit.sandbox._native"),
    ("plugins/devices/src/vmmkit_devices/virtio/_native_build.py", "plugins/devices/src/",
     "vmmkit_devices.virtio._native"),
    ("plugins/kvm/src/vmmkit_kvm/_native_build.py", "plugins/kvm/src/", "vmmkit_kvm._native"),
)
COMPILERS = {"aarch64": "aarch64-linux-gnu-gcc", "x86_64": "gcc"}


def build_one(root: Path, arch: str, script: str, module: str, sysroot: Path, out: Path) -> tuple[str, Path]:
    triplet = f"{arch}-linux-gnu"
    path = root / script
    spec = importlib.util.spec_from_file_location(f"lab_build_{module.replace('.', '_')}", path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    builder = loaded.builder_for(arch) if hasattr(loaded, "builder_for") else loaded.ffibuilder
    name, _source, _ext, kwds = builder._assigned_source  # what set_source() recorded
    assert name == module, (name, module)
    package_dir = path.parent
    sources = [str((Path.cwd() / s).resolve()) if not Path(s).is_absolute() else s for s in kwds.get("sources", [])]
    c_files = [str(p) for p in sorted((package_dir / "native").glob("*.c"))] if not sources else sources
    digest = hashlib.sha256(path.read_bytes() + arch.encode())
    for c_file in c_files:
        digest.update(Path(c_file).read_bytes())
    for header in sorted({*package_dir.glob("native/*.h"), *package_dir.glob("*.h")}):
        digest.update(header.read_bytes())
    rel = module.replace(".", "/") + f".cpython-311-{triplet}.so"
    target = out / digest.hexdigest()[:16] / rel
    if target.exists():
        return rel, target
    target.parent.mkdir(parents=True, exist_ok=True)
    generated = target.parent / (module.rsplit(".", 1)[-1] + ".c")
    builder.emit_c_code(str(generated))
    include = sysroot / "usr/include"
    argv = [
        COMPILERS[arch], f"--sysroot={sysroot}", "-shared", "-fPIC", "-O2", "-fno-strict-aliasing", "-DNDEBUG",
        *kwds.get("extra_compile_args", []),
        *(f"-I{d}" for d in kwds.get("include_dirs", [])),
        f"-I{include / 'python3.11'}", f"-I{include / triplet / 'python3.11'}",
        f"-isystem{include / triplet}", f"-isystem{include}",
        str(generated), *c_files, "-o", str(target), *kwds.get("extra_link_args", []),
    ]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"cross build of {module} failed:\n{' '.join(argv)}\n{result.stderr[-4000:]}")
    return rel, target


def build_all(root: Path, arch: str, sysroot: Path, out: Path) -> dict[str, bytes]:
    """``{path in the checkout: bytes}`` of every cross-built module (via a subprocess)."""
    python = root / ".venv/bin/python"
    result = subprocess.run(
        [str(python if python.exists() else sys.executable), __file__, str(root), arch, str(sysroot), str(out)],
        capture_output=True, text=True, cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"cross build failed: {result.stderr[-4000:]}")
    built: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    return {rel: Path(path).read_bytes() for rel, path in built.items()}


def _main() -> None:
    root, arch, sysroot, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    built = {}
    for script, package_root, module in MODULES:
        rel, target = build_one(root, arch, script, module, sysroot, out)
        built[package_root + rel] = str(target)
    print(json.dumps(built))


if __name__ == "__main__":
    _main()
