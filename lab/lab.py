#!/usr/bin/env python3
"""The vmmkit lab: an emulated host (QEMU TCG with the virtualization extensions) running Debian
12's own kernel, so that vmmkit's KVM backend runs on a real ``/dev/kvm``: arm64 (the default) or
x86-64 (AMD SVM with nested paging: a KVM without the PVM quirks of vmmkit's CI host).

    python3 lab/lab.py run -- vmmkit plugins          # build (first time), boot, run, exit status
    python3 lab/lab.py run --arch x86_64 -- python3 -m pytest tests/integration/kvm -q
    python3 lab/lab.py build                          # only build the cache
    python3 lab/lab.py lock                           # re-pin the Debian packages (lab/*.lock)

Everything it builds lives under ``$VMMKIT_LAB_CACHE`` (default ``~/.cache/vmmkit-lab``). Debian
packages come from the Debian archive through ``apt-get download`` with a private APT state
(``-o Dir::State=...``): the host's package configuration is not touched. See ``lab/README.md``.

Standard library only (it runs before any virtual environment exists).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LAB = Path(__file__).resolve().parent
ROOT = LAB.parent
#: Bump when what :meth:`System.build` produces changes: the cache key is this, the lock file,
#: the module list and ``lab/init`` (not this file, so that other edits keep the cache).
SYSTEM_FORMAT = 5
EXIT_MARKER = "VMMKIT-LAB-EXIT"
BEGIN_MARKER = "VMMKIT-LAB-BEGIN"

#: Where the host's APT sources are (deb822 ``.sources`` files and one-line ``.list`` files).
HOST_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def debian_sources(arch: str, locations: Sequence[Path] = HOST_SOURCES) -> str:
    """The host's own Debian sources (the archive and mirror this machine is set up with),
    as one-line entries for ``arch``: the lab fetches with the ordinary client, as configured
    here, and changes nothing of the host's configuration."""
    entries: list[tuple[str, str, str, str]] = []  # uri, suite, components, signed-by
    files: list[Path] = []
    for location in locations:
        if location.is_dir():
            files.extend(sorted(location.glob("*.sources")) + sorted(location.glob("*.list")))
        elif location.is_file():
            files.append(location)
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, flags=re.M))
                if "deb" not in fields.get("Types", "").split() or fields.get("Enabled", "yes") == "no":
                    continue
                for uri in fields.get("URIs", "").split():
                    for suite in fields.get("Suites", "").split():
                        entries.append((uri, suite, fields.get("Components", "main"), fields.get("Signed-By", "")))
        else:
            for line in text.splitlines():
                match = re.match(r"^deb\s+(?:\[([^]]*)\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line.strip())
                if match:
                    signed = re.search(r"signed-by=(\S+)", match.group(1) or "")
                    entries.append((match.group(2), match.group(3), match.group(4), signed.group(1) if signed else ""))
    wanted = [e for e in entries if e[1].split("-")[0] == "bookworm"]
    if not wanted:
        raise LabError("the host's APT sources name no Debian 12 (bookworm) archive: the lab fetches "
                       "Debian's arm64/amd64 packages from the archive the host uses")
    lines = []
    for uri, suite, components, signed_by in wanted:
        options = f"arch={arch}" + (f" signed-by={signed_by}" if signed_by else "")
        lines.append(f"deb [{options}] {uri} {suite} {components}\n")
    return "".join(dict.fromkeys(lines))

#: Debian packages of a lab (the same names on arm64 and amd64). ``linux-image`` stands for the
#: kernel the metapackage ``linux-image-<arch>`` depends on; ``lab.py lock`` pins every one.
PACKAGES = (
    "linux-image",
    "busybox-static",
    "libc6", "libgcc-s1", "libexpat1", "zlib1g", "libffi8", "libbz2-1.0", "liblzma5",
    "libssl3", "libsqlite3-0", "libuuid1", "libcrypt1", "libncursesw6", "libtinfo6", "libreadline8",
    "libpython3.11-minimal", "python3.11-minimal", "libpython3.11-stdlib",
    "python3-cffi-backend", "python3-libfdt", "python3-yaml", "libyaml-0-2",
    # cffi's ABI mode at run time (the VFIO device plugin maps BARs through it), arch: all
    "python3-cffi", "python3-pycparser", "python3-ply",
)
#: Set before each command: the lab's rootfs carries no libseccomp (PACKAGES), so vmmkit runs
#: without its seccomp filters there (the filters are tested on the development host).
LAB_ENVIRONMENT = "export VMMKIT_SECCOMP=false\n"
#: Packages only for building on the host (headers for the cross-built cffi modules).
BUILD_PACKAGES = ("libpython3.11-dev", "linux-libc-dev", "libc6-dev", "libcrypt-dev")
#: Pure-Python wheels from PyPI (pinned in the lock file too); checked to hold no compiled code.
WHEELS = ("pluggy", "attrs", "structlog", "pytest", "iniconfig", "packaging", "hypothesis",
          "sortedcontainers", "pygments")


#: VFIO (lab/vfio/, with --iommu) and NVMe, in both labs.
VFIO_MODULES = ("vfio_pci", "vfio_iommu_type1", "nvme")


@dataclass(frozen=True)
class Arch:
    """What differs between the labs."""

    name: str
    deb: str  #: Debian's architecture name
    triplet: str  #: the multiarch directory, and the compiler's prefix
    qemu: str
    machine: tuple[str, ...]  #: QEMU's machine, CPU and accelerator options
    console: str
    #: Kernel modules loaded by /init (after what they depend on, from their .modinfo).
    modules: tuple[str, ...]
    cc: str
    #: Debian packages only this lab has.
    extra_packages: tuple[str, ...] = ()


ARCHES = {
    "aarch64": Arch(
        "aarch64", "arm64", "aarch64-linux-gnu", "qemu-system-aarch64",
        ("-M", "virt,virtualization=on,gic-version=3", "-cpu", "max,pauth-impdef=on",
         "-accel", "tcg,thread=multi"),
        # virtio_mmio, _blk, _net: for the nested arm64 Linux (lab/linux/), copied into its initramfs;
        # vfio_pci, vfio_iommu_type1: VFIO behind the emulated SMMUv3 (--iommu, lab/vfio/; the
        # SMMUv3 driver is built in); nvme: the lab's (and a nested Linux's) NVMe driver
        "ttyAMA0", ("virtio_pci", "virtio_rng", "tun", "veth", "virtio_mmio", "virtio_blk", "virtio_net",
                    *VFIO_MODULES),
        "aarch64-linux-gnu-gcc"),
    "x86_64": Arch(
        "x86_64", "amd64", "x86_64-linux-gnu", "qemu-system-x86_64",
        ("-M", "q35", "-cpu", "max", "-accel", "tcg,thread=multi"),
        "ttyS0", ("virtio_pci", "virtio_rng", "tun", "veth", "kvm_amd", *VFIO_MODULES), "gcc",
        # GNU as/ld/objcopy/nm: the KVM integration tests assemble tiny x86 guests
        ("binutils", "binutils-x86-64-linux-gnu", "binutils-common", "libbinutils", "libctf0",
         "libctf-nobfd0", "libgprofng0", "libjansson4", "libstdc++6", "libzstd1",
         # iproute2's ip (network namespaces: the Linux tier's tap lives in one)
         "iproute2", "libbpf1", "libelf1", "libmnl0", "libbsd0", "libmd0", "libcap2", "libselinux1",
         "libpcre2-8-0")),
}


#: Gaps of an older QEMU's emulated SVM that would break the x86-64 lab's nested guests, and the
#: ``-cpu`` flag that steers around each: ``(first fixed QEMU version, flag, why)``.
SVM_EMULATION_GAPS: tuple[tuple[tuple[int, int], str, str], ...] = (
    ((8, 2), "-xsave",
     "a nested guest's XSETBV is not checked against the SVM intercept (fixed by QEMU's 'target/i386: "
     "check intercept for XSETBV', Oct 2023): KVM never sees the guest's XCR0, reports CPUID 0xD.0 EBX "
     "for XCR0=1 (Linux: 'XSAVE consistency problem: size 2696 != kernel_size 576') and puts XCR0=1 "
     "back at every VM entry"),
)


def qemu_version(binary: str) -> tuple[int, int, int]:
    """``qemu-system-* --version`` as (major, minor, micro)."""
    text = run([binary, "--version"]).stdout
    found = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if found is None:
        raise LabError(f"{binary} --version: no version in {text[:200]!r}")
    return int(found.group(1)), int(found.group(2)), int(found.group(3) or 0)


def cpu_model(arch: str, version: tuple[int, int, int]) -> list[str]:
    """The lab's machine options with ``-cpu`` adjusted for the emulator's known gaps."""
    options = list(ARCHES[arch].machine)
    if arch == "x86_64":
        at = options.index("-cpu") + 1
        options[at] += "".join(f",{flag}" for fixed, flag, _ in SVM_EMULATION_GAPS if version[:2] < fixed)
    return options


class LabError(Exception):
    """A failure with a message for the user (exit status 2 for usage, 3 for build)."""


def log(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("VMMKIT_LAB_CACHE", Path.home() / ".cache" / "vmmkit-lab"))


def run(argv: Sequence[str | os.PathLike[str]], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise LabError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result  # type: ignore[no-any-return]


# -- Debian packages through a private APT state ------------------------------------------------

class Apt:
    """``apt-get``/``apt-cache`` for a foreign architecture with their own state, lists and
    archive directory under the cache: nothing of the host's APT configuration changes."""

    def __init__(self, arch: str, where: Path) -> None:
        self.arch = arch
        self.where = where
        self.sources = where / "sources.list"

    def options(self) -> list[str]:
        w = self.where
        return [
            "-o", f"APT::Architecture={self.arch}", "-o", f"APT::Architectures::={self.arch}",
            "-o", f"Dir::State={w / 'state'}", "-o", f"Dir::State::status={w / 'state' / 'status'}",
            "-o", f"Dir::Cache={w / 'cache'}", "-o", f"Dir::Etc::SourceList={self.sources}",
            "-o", "Dir::Etc::SourceParts=/nonexistent", "-o", "Dir::Etc::Preferences=/nonexistent",
            "-o", "Dir::Etc::PreferencesParts=/nonexistent", "-o", "Debug::NoLocking=1",
            "-o", "APT::Get::AllowUnauthenticated=false",
        ]

    def update(self, force: bool = False) -> None:
        stamp = self.where / "state" / "updated"
        if stamp.exists() and not force:
            return
        for sub in ("state/lists/partial", "cache/archives/partial"):
            (self.where / sub).mkdir(parents=True, exist_ok=True)
        (self.where / "state" / "status").touch()
        self.sources.write_text(debian_sources(self.arch))
        log(f"apt-get update ({self.arch}, private state in {self.where})")
        run(["apt-get", *self.options(), "update"])
        stamp.touch()

    def candidate(self, package: str) -> str:
        out = run(["apt-cache", *self.options(), "policy", package]).stdout
        match = re.search(r"Candidate:\s*(\S+)", out)
        if not match or match.group(1) == "(none)":
            raise LabError(f"no {self.arch} candidate for {package}")
        return match.group(1)

    def depends_on(self, package: str, prefix: str) -> str:
        out = run(["apt-cache", *self.options(), "depends", package]).stdout
        match = re.search(rf"Depends:\s*({re.escape(prefix)}\S+)", out)
        if not match:
            raise LabError(f"{package} depends on no {prefix}*")
        return match.group(1)

    def download(self, pins: dict[str, str], into: Path) -> dict[str, Path]:
        into.mkdir(parents=True, exist_ok=True)
        missing = {p: v for p, v in pins.items() if not self._deb(into, p, v)}
        if missing:
            self.update()
            log("apt-get download " + " ".join(f"{p}={v}" for p, v in missing.items()))
            try:
                run(["apt-get", *self.options(), "download", *(f"{p}:{self.arch}={v}" for p, v in missing.items())],
                    cwd=into)
            except LabError:
                self.update(force=True)  # stale lists; try once more
                run(["apt-get", *self.options(), "download",
                     *(f"{p}:{self.arch}={v}" for p, v in missing.items())], cwd=into)
        found = {}
        for package, version in pins.items():
            deb = self._deb(into, package, version)
            if deb is None:
                raise LabError(f"{package}={version} was not downloaded: the pin may be gone from the "
                               f"archive; run `lab.py lock` to re-pin")
            found[package] = deb
        return found

    def _deb(self, into: Path, package: str, version: str) -> Path | None:
        quoted = version.split(":", 1)[-1]
        for arch in (self.arch, "all"):  # "Architecture: all" packages are named so
            for candidate in into.glob(f"{package}_*_{arch}.deb"):
                field = candidate.name[len(package) + 1: -len(f"_{arch}.deb")]
                if field.replace("%3a", ":").split(":", 1)[-1] == quoted:
                    return candidate
        return None


# -- pinning ------------------------------------------------------------------------------------

def lock_path(arch: str) -> Path:
    return LAB / f"packages-{arch}.lock"


def read_lock(arch: str) -> tuple[dict[str, str], dict[str, str]]:
    """``(debian, wheels)``: package -> version, from ``lab/packages-<arch>.lock``."""
    path = lock_path(arch)
    if not path.exists():
        raise LabError(f"{path} is missing: run `lab.py lock --arch {arch}`")
    debian: dict[str, str] = {}
    wheels: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, pin = line.partition(" ")
        name, _, version = pin.strip().partition("=")
        (debian if kind == "deb" else wheels)[name] = version
    return debian, wheels


def lock(arch: str) -> None:
    apt = Apt(deb_arch(arch), cache_root() / arch / "apt")
    apt.update(force=True)
    lines = [f"# Pinned by `lab.py lock --arch {arch}` on {time.strftime('%Y-%m-%d')}: Debian 12 "
             f"({deb_arch(arch)}) packages and pure-Python wheels."]
    for package in PACKAGES + ARCHES[arch].extra_packages + BUILD_PACKAGES:
        name = apt.depends_on(f"linux-image-{deb_arch(arch)}", "linux-image-") if package == "linux-image" else package
        lines.append(f"deb {name}={apt.candidate(name)}")
    wheel_dir = cache_root() / "wheels"
    for name, version in resolve_wheels(wheel_dir).items():
        lines.append(f"wheel {name}={version}")
    lock_path(arch).write_text("\n".join(lines) + "\n")
    log(f"wrote {lock_path(arch)}")


def deb_arch(arch: str) -> str:
    return {"aarch64": "arm64", "x86_64": "amd64"}[arch]


# -- wheels --------------------------------------------------------------------------------------

def pip(*args: str) -> None:
    run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


def resolve_wheels(into: Path) -> dict[str, str]:
    """Download the newest pure-Python wheels of :data:`WHEELS` (for ``lock``)."""
    into.mkdir(parents=True, exist_ok=True)
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
        "--implementation", "py", "--abi", "none", "--platform", "any", "-d", str(into), *WHEELS)
    versions = {}
    for name in WHEELS:
        found = sorted(into.glob(f"{name.replace('-', '_')}-*-none-any.whl"))
        if not found:
            raise LabError(f"no pure-Python wheel of {name}")
        versions[name] = found[-1].name.split("-")[1]
    return versions


def fetch_wheels(pins: dict[str, str], into: Path) -> list[Path]:
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, version in pins.items():
        pattern = f"{name.replace('-', '_')}-{version}-*none-any.whl"
        found = list(into.glob(pattern))
        if not found:
            log(f"pip download {name}=={version}")
            pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
                "--implementation", "py", "--abi", "none", "--platform", "any", "-d", str(into),
                f"{name}=={version}")
            found = list(into.glob(pattern))
        if not found:
            raise LabError(f"no pure-Python wheel {pattern}")
        with zipfile.ZipFile(found[0]) as wheel:
            compiled = [n for n in wheel.namelist() if n.endswith((".so", ".pyd", ".dylib"))]
        if compiled:
            raise LabError(f"{found[0].name} holds compiled code ({compiled[0]}): take it from Debian")
        paths.append(found[0])
    return paths


# -- the initramfs (cpio "newc") ------------------------------------------------------------------

class Cpio:
    """A writer of the ``newc`` format the kernel unpacks (Documentation/driver-api/early-userspace
    /buffer-format.rst). Several archives concatenated are one initramfs."""

    def __init__(self, out: io.BufferedIOBase) -> None:
        self.out = out
        self.ino = 1000
        self.written: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", mtime: int = 0) -> None:
        name = name.lstrip("/")
        self.ino += 1
        header = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(name) + 1, 0))
        self.out.write(header.encode() + name.encode() + b"\0")
        self.out.write(b"\0" * (-(110 + len(name) + 1) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))
        self.written.add(name)

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path and path not in self.written:
                self._entry(path, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.directory(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def tree(self, source: Path, prefix: str, skip: Iterable[str] = ()) -> None:
        """Everything under ``source`` as ``prefix/...`` (symlinks kept as links)."""
        skipped = tuple(skip)
        for dirpath, dirnames, filenames in os.walk(source):
            rel = os.path.relpath(dirpath, source)
            base = prefix if rel == "." else f"{prefix}/{rel}"
            self.directory(base)
            for name in sorted(dirnames + filenames):
                path = Path(dirpath, name)
                target = f"{base}/{name}"
                if any(target.startswith(s) for s in skipped):
                    continue
                if path.is_symlink():
                    self.symlink(target, os.readlink(path))
                elif path.is_file():
                    self.file(target, path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
            dirnames[:] = [d for d in dirnames if not Path(dirpath, d).is_symlink()
                           and not any(f"{base}/{d}".startswith(s) for s in skipped)]

    def trailer(self) -> None:
        self._entry("TRAILER!!!", 0)


# -- building the system -------------------------------------------------------------------------

def host_python311() -> str:
    """A CPython 3.11 on the host, for ``.pyc`` files the guest's 3.11 accepts unchecked."""
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    found = shutil.which("python3.11")
    if not found:
        raise LabError("the lab precompiles .pyc for the guest's Python 3.11: no python3.11 on the host")
    return found


def compile_tree(path: Path) -> None:
    """``.pyc`` next to every ``.py`` (unchecked hashes: no mtime check, valid in the cpio)."""
    run([host_python311(), "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
         "-x", r"(lib2to3/tests|test/bad|badsyntax|site-packages/.*/_vendor/.*py2)", str(path)], check=False)


def system_key(arch: str) -> str:
    digest = hashlib.sha256()
    digest.update(lock_path(arch).read_bytes())
    digest.update(f"{SYSTEM_FORMAT} {ARCHES[arch]}".encode())
    digest.update((LAB / "init").read_bytes())
    return digest.hexdigest()[:16]


class System:
    """The cached, project-independent part of a lab: the kernel and ``system.cpio``."""

    def __init__(self, arch: str) -> None:
        self.arch = arch
        self.root = cache_root() / arch
        self.key = system_key(arch)
        self.dir = self.root / f"system-{self.key}"
        self.kernel = self.dir / "Image"
        self.cpio = self.dir / "system.cpio"
        self.sysroot = self.dir / "sysroot"  # headers and libraries for cross builds

    def ready(self) -> bool:
        return self.kernel.exists() and self.cpio.exists() and (self.dir / "done").exists()

    def build(self) -> None:
        if self.ready():
            return
        started = time.monotonic()
        debian, wheel_pins = read_lock(self.arch)
        apt = Apt(deb_arch(self.arch), self.root / "apt")
        debs = apt.download(debian, self.root / "debs")
        wheels = fetch_wheels(wheel_pins, cache_root() / "wheels")
        staging = self.dir.with_name(self.dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        rootfs = staging / "rootfs"
        sysroot = staging / "sysroot"
        build_only = {p for p in debian if p in BUILD_PACKAGES}
        rootfs.mkdir(parents=True)
        sysroot.mkdir()
        for package, deb in debs.items():
            run(["dpkg-deb", "-x", deb, sysroot if package in build_only else rootfs])
        for package, deb in debs.items():  # runtime libraries link against the sysroot too
            if package not in build_only and package.startswith(("lib", "python3.11")):
                run(["dpkg-deb", "-x", deb, sysroot])
        kernel_pkg = next(p for p in debian if p.startswith("linux-image-"))
        release = kernel_pkg.removeprefix("linux-image-")
        self._kernel(rootfs, release, staging / "Image")
        self._slim(rootfs, release)
        dist = rootfs / "usr/lib/python3/dist-packages"
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as unpacked:
                unpacked.extractall(dist)
        compile_tree(rootfs / "usr/lib/python3.11")
        compile_tree(dist)
        with open(staging / "system.cpio", "wb") as out:
            archive = Cpio(out)
            archive.tree(rootfs, "")
            archive.file("init", (LAB / "init").read_bytes(), 0o755)
            archive.trailer()
        # what a nested Linux's initramfs needs on the host too (lab/linux/nested_initramfs.py)
        (staging / "nested").mkdir()
        shutil.copy(rootfs / "bin/busybox", staging / "nested/busybox")
        shutil.copytree(rootfs / "lab-modules", staging / "nested/modules")
        shutil.rmtree(rootfs)
        (staging / "done").write_text(f"{time.time()}\n")
        for old in self.root.glob("system-*"):
            if old != staging:
                shutil.rmtree(old, ignore_errors=True)
        staging.rename(self.dir)
        log(f"system {self.key} built in {time.monotonic() - started:.0f} s "
            f"({self.cpio.stat().st_size >> 20} MiB initramfs)")

    def _kernel(self, rootfs: Path, release: str, image: Path) -> None:
        vmlinuz = rootfs / "boot" / f"vmlinuz-{release}"
        shutil.copy(vmlinuz, image)  # an arm64 Image or an x86 bzImage: QEMU's -kernel takes both

    def _slim(self, rootfs: Path, release: str) -> None:
        """Keep the modules :attr:`Arch.modules` need, drop docs, locales and /boot."""
        moddir = rootfs / "lib/modules" / release
        found = {p.name.split(".ko")[0].replace("-", "_"): p for p in moddir.rglob("*.ko*")}
        order: list[Path] = []

        def want(name: str) -> None:
            path = found.get(name.replace("-", "_"))
            if path is None or path in order:
                return  # built in, or already there
            for need in module_depends(path):
                want(need)
            order.append(path)

        for module in ARCHES[self.arch].modules:
            want(module)
        keep = rootfs / "lab-modules"
        keep.mkdir()
        lines = []
        for source in order:
            data = source.read_bytes()
            name = source.name
            if name.endswith(".xz"):
                data = run_bytes(["xz", "-dc", str(source)])
                name = name.removesuffix(".xz")
            (keep / name).write_bytes(data)
            lines.append(name)
        (keep / "order").write_text("\n".join(lines) + "\n")
        for drop in ("boot", "lib/modules", "usr/share/doc", "usr/share/man", "usr/share/locale",
                     "usr/share/lintian", "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib",
                     "usr/lib/python3.11/tkinter", "usr/lib/python3.11/ensurepip",
                     "usr/lib/python3.11/lib2to3", "usr/share/bug", f"usr/lib/linux-image-{release}",
                     f"usr/lib/{ARCHES[self.arch].triplet}/gconv"):
            shutil.rmtree(rootfs / drop, ignore_errors=True)
        # the link Debian's python3 package would make
        (rootfs / "usr/bin/python3").symlink_to("python3.11")


def module_depends(path: Path) -> list[str]:
    """The ``depends=`` of a kernel module's ``.modinfo`` (what depmod would put in modules.dep)."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", path.read_bytes())
    return [d for d in match.group(1).decode().split(",") if d] if match else []


def run_bytes(argv: Sequence[str]) -> bytes:
    return subprocess.run(argv, check=True, capture_output=True).stdout


# -- the project ------------------------------------------------------------------------------------

#: (distribution folder, source root inside it) of every in-tree distribution.
def distributions() -> Iterator[tuple[Path, Path]]:
    yield ROOT, ROOT
    for folder in sorted([*ROOT.glob("plugins/*"), *ROOT.glob("arch/*")]):
        if (folder / "pyproject.toml").exists():
            yield folder, folder / "src"


def dist_info(folder: Path) -> tuple[str, dict[str, bytes]]:
    """The ``.dist-info`` of a distribution, from its ``pyproject.toml``: enough for
    ``importlib.metadata`` to find its version and entry points (vmmkit's plugin discovery)."""
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    name = project["name"]
    version = project.get("version", "0")
    if "version" in project.get("dynamic", []):
        version = "0"
    lines = []
    for group, entries in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in entries.items()]
    if project.get("scripts"):
        lines.append("[console_scripts]")
        lines += [f"{k} = {v}" for k, v in project["scripts"].items()]
    base = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {
        f"{base}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{base}/entry_points.txt": ("\n".join(lines) + "\n").encode(),
        f"{base}/INSTALLER": b"vmmkit-lab\n",
    }
    return name, files


def project_files() -> list[str]:
    out = run(["git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z"]).stdout
    wanted = ("vmmkit/", "plugins/", "arch/", "tests/", "bench/", "examples/", "lab/", "scripts/")
    files = [f for f in out.split("\0") if f and (f.startswith(wanted) or "/" not in f)]
    return [f for f in files if (ROOT / f).is_file() and not f.startswith("lab/.cache")]


class Project:
    """The per-run archive: the checkout (with ``.pyc``), its cffi modules cross-built for the
    lab's architecture, the test guests, the dist-infos and the command."""

    def __init__(self, system: System) -> None:
        self.system = system
        # One per checkout: the .pyc mirror copies sources by mtime, so two checkouts (git
        # worktrees) sharing it at once could each archive the other's code.
        self.dir = system.root / f"project-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"

    def native_modules(self) -> dict[str, bytes]:
        from importlib import util

        spec = util.spec_from_file_location("lab_cross", LAB / "cross.py")
        assert spec is not None and spec.loader is not None
        cross = util.module_from_spec(spec)
        spec.loader.exec_module(cross)
        try:
            return cross.build_all(ROOT, self.system.arch, self.system.sysroot,  # type: ignore[no-any-return]
                                   self.dir / "native")
        except RuntimeError as exc:
            raise LabError(str(exc)) from None

    def guests(self) -> None:
        """Build the test guests if make is there (the host's ``make -C tests/guests``)."""
        if shutil.which("make"):
            subprocess.run(["make", "-s", "-C", str(ROOT / "tests/guests")], check=False,
                           stdout=subprocess.DEVNULL)

    def archive(self, command: str, out_path: Path, extra: Sequence[tuple[Path, str]] = ()) -> None:
        self.guests()
        natives = self.native_modules()
        pyc = self.dir / "pyc"
        files = project_files()
        guest_builds = [str(p.relative_to(ROOT)) for p in (ROOT / "tests/guests/build").rglob("*") if p.is_file()]
        with open(out_path, "wb") as out:
            archive = Cpio(out)
            for rel in sorted(set(files) | set(guest_builds)):
                source = ROOT / rel
                archive.file(f"src/{rel}", source.read_bytes(), stat.S_IMODE(source.stat().st_mode))
            for rel, data in natives.items():
                archive.file(f"src/{rel}", data, 0o755)
            for rel, data in self._pyc(files, pyc).items():
                archive.file(f"src/{rel}", data)
            roots = []
            for folder, source_root in distributions():
                name, info = dist_info(folder)
                for rel, data in info.items():
                    archive.file(f"usr/lib/python3/dist-packages/{rel}", data)
                roots.append("/src" if source_root == ROOT else f"/src/{source_root.relative_to(ROOT)}")
                for script, target in _scripts(folder):
                    module, _, func = target.partition(":")
                    archive.file(f"usr/local/bin/{script}", (
                        f"#!/usr/bin/python3\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n").encode(),
                        0o755)
            archive.file("usr/lib/python3/dist-packages/vmmkit-lab.pth", ("\n".join(roots) + "\n").encode())
            archive.file("lab/command", (LAB_ENVIRONMENT + command).encode(), 0o755)
            for source, target in extra:
                archive.file(target, source.read_bytes(), stat.S_IMODE(source.stat().st_mode))
            archive.trailer()

    def _pyc(self, files: list[str], cache: Path) -> dict[str, bytes]:
        """``__pycache__/*.cpython-311.pyc`` of the project's modules, compiled on the host into a
        mirror directory that persists between runs (only changed files recompile)."""
        mirror = cache / "tree"
        for rel in files:
            if not rel.endswith(".py"):
                continue
            source, copy = ROOT / rel, mirror / rel
            if copy.exists() and copy.stat().st_mtime_ns == source.stat().st_mtime_ns:
                continue
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy)
        compile_tree(mirror)
        result = {}
        for path in mirror.rglob("*.cpython-311.pyc"):
            rel = str(path.relative_to(mirror))
            source_rel = str(path.parent.parent / path.name.split(".")[0]) + ".py"
            if str(Path(source_rel).relative_to(mirror)) in files:
                result[rel] = path.read_bytes()
        return result


def _scripts(folder: Path) -> list[tuple[str, str]]:
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    return list(project.get("scripts", {}).items())


# -- booting ---------------------------------------------------------------------------------------

#: QEMU's edu device for the lab (``--edu``): its DMA addresses are masked to 28 bits by default,
#: and a nested guest's RAM (the IOVAs VFIO maps) lies above that (AArch64: from 1 GiB).
EDU_DEVICE = "edu,dma_mask=0xffffffffffff"
NVME_SERIAL = "vmmkit-nvme0"


@dataclass(frozen=True)
class PciExtras:
    """Emulated hardware for VFIO in the lab (``--iommu``, ``--edu``, ``--nvme IMAGE``)."""

    iommu: bool = False
    edu: bool = False
    nvme: Path | None = None

    def machine(self, arch: str, options: list[str]) -> list[str]:
        """The machine options with the IOMMU: AArch64 ``-M virt,iommu=smmuv3``; x86-64 an
        ``intel-iommu`` with interrupt remapping (which needs a split irqchip)."""
        if not self.iommu:
            return options
        at = options.index("-M") + 1
        options = list(options)
        options[at] += ",iommu=smmuv3" if arch == "aarch64" else ",kernel-irqchip=split"
        return options

    def devices(self, arch: str) -> list[str]:
        argv = []
        if self.iommu and arch == "x86_64":
            argv += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
        if self.edu:
            argv += ["-device", EDU_DEVICE]
        if self.nvme is not None:
            argv += ["-drive", f"file={self.nvme},format=raw,if=none,id=nvme0,cache=writeback",
                     "-device", f"nvme,serial={NVME_SERIAL},drive=nvme0"]
        return argv

    def cmdline(self, arch: str) -> str:
        return " intel_iommu=on" if self.iommu and arch == "x86_64" else ""

    def describe(self, arch: str) -> str:
        parts = [("SMMUv3" if arch == "aarch64" else "intel-iommu") if self.iommu else "no IOMMU"]
        parts += ["edu"] if self.edu else []
        parts += [f"nvme on {self.nvme}"] if self.nvme is not None else []
        return ", ".join(parts)


def qemu_argv(system: System, initrd: Path, smp: int, memory: int, version: tuple[int, int, int],
              pci: PciExtras = PciExtras()) -> list[str]:
    arch = ARCHES[system.arch]
    return [
        arch.qemu, *pci.machine(system.arch, cpu_model(system.arch, version)), "-smp", str(smp),
        "-m", str(memory),
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-no-reboot",
        "-chardev", "stdio,id=console,signal=on", "-serial", "chardev:console",
        "-device", "virtio-rng-pci", *pci.devices(system.arch),
        "-kernel", str(system.kernel), "-initrd", str(initrd),
        "-append", f"console={arch.console} quiet loglevel=2 panic=-1 rdinit=/init transparent_hugepage=always"
                   + pci.cmdline(system.arch),
    ]


def boot(system: System, command: str, *, smp: int, memory: int, timeout: float, verbose: bool,
         extra: Sequence[tuple[Path, str]] = (), pci: PciExtras = PciExtras()) -> int:
    project = Project(system)
    project.dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Per run: concurrent runs (of one checkout) must not overwrite each other's archives.
    project_cpio = project.dir / f"project-{os.getpid()}.cpio"
    version = qemu_version(ARCHES[system.arch].qemu)
    # Tests read which emulator their KVM runs under (a skip naming a gap of that QEMU).
    project.archive(f"export VMMKIT_LAB_QEMU={'.'.join(map(str, version))}\n{command}", project_cpio, extra)
    initrd = project.dir / f"initrd-{os.getpid()}.cpio"
    with open(initrd, "wb") as out:
        for part in (system.cpio, project_cpio):
            with open(part, "rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)
    project_cpio.unlink()
    log(f"initramfs ready in {time.monotonic() - started:.1f} s; booting "
        f"{ARCHES[system.arch].qemu} (TCG, {smp} vCPUs, {memory} MiB)")
    argv = qemu_argv(system, initrd, smp, memory, version, pci)
    if pci != PciExtras():
        log(f"emulated PCI hardware: {pci.describe(system.arch)}")
    for fixed, flag, why in SVM_EMULATION_GAPS if system.arch == "x86_64" else ():
        if version[:2] < fixed:
            log(f"-cpu max,{flag} (QEMU {'.'.join(map(str, version))} < {'.'.join(map(str, fixed))}): "
                f"{why.split(' (')[0]}")
    process = subprocess.Popen(["nice", "-n", "10", *argv], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    assert process.stdout is not None
    status: int | None = None
    began = False
    boot_started = time.monotonic()
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    pending = b""
    try:
        while True:
            remaining = timeout - (time.monotonic() - boot_started)
            if remaining <= 0:
                log(f"timed out after {timeout:.0f} s")
                break
            if not selector.select(min(remaining, 1.0)):
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.rstrip(b"\r").decode(errors="replace")
                if line.startswith(BEGIN_MARKER):
                    began = True
                    log(f"guest userspace up after {time.monotonic() - boot_started:.1f} s")
                    continue
                if line.startswith(EXIT_MARKER):
                    status = int(line.split()[1])
                    continue
                if (began and status is None) or verbose:
                    print(line, flush=True)
    finally:
        if process.poll() is None:
            try:
                process.wait(10 if status is not None else 0.1)
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        initrd.unlink(missing_ok=True)
    if pending and ((began and status is None) or verbose):
        print(pending.decode(errors="replace"), flush=True)
    if status is None:
        log("the guest did not report an exit status (see the console above; --verbose shows the boot)")
        return 125
    log(f"command exited with status {status} ({time.monotonic() - started:.1f} s in all)")
    return status


def _added(spec: str, system: System) -> tuple[Path, str]:
    """``--add HOST[:GUEST]`` as (host path, path in the lab)."""
    if spec == "kernel":
        return system.kernel, "lab/files/Image"
    host, _, guest = spec.partition(":")
    path = Path(host)
    if not path.is_file():
        raise LabError(f"--add {spec}: {host} is not a file")
    return path, (guest or f"/lab/files/{path.name}").lstrip("/")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="action", required=True)
    for name in ("run", "build", "lock"):
        p = sub.add_parser(name)
        p.add_argument("--arch", choices=tuple(ARCHES), default="aarch64")
        if name == "run":
            p.add_argument("--smp", type=int, default=2)
            p.add_argument("--memory", type=int, default=1024, help="MiB")
            p.add_argument("--timeout", type=float, default=900, help="seconds for the whole boot")
            p.add_argument("--verbose", action="store_true", help="show the kernel's console too")
            p.add_argument("--add", action="append", default=[], metavar="HOST[:GUEST]",
                           help="carry a host file in (default GUEST: /lab/files/<name>); "
                                "'kernel' is the lab's own kernel, as /lab/files/Image")
            p.add_argument("--iommu", action="store_true",
                           help="an emulated IOMMU (aarch64: SMMUv3; x86_64: intel-iommu) for VFIO (lab/vfio/)")
            p.add_argument("--edu", action="store_true", help=f"QEMU's edu PCI device ({EDU_DEVICE})")
            p.add_argument("--nvme", type=Path, metavar="IMAGE",
                           help=f"an NVMe controller (serial {NVME_SERIAL}) on this raw image")
            p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... (run in /src)")
    options = parser.parse_args(argv)
    try:
        if options.action == "lock":
            lock(options.arch)
            return 0
        if options.action == "run" and options.nvme is not None and not options.nvme.is_file():
            raise LabError(f"--nvme {options.nvme}: not a file (a raw image, e.g. truncate -s 16M)")
        system = System(options.arch)
        system.build()
        if options.action == "build":
            return 0
        command = list(options.command)
        if command[:1] == ["--"]:
            command = command[1:]
        if not command:
            parser.error("run needs a command after --")
        if not shutil.which(ARCHES[options.arch].qemu):
            raise LabError(f"{ARCHES[options.arch].qemu} is not installed")
        extra = [_added(spec, system) for spec in options.add]
        pci = PciExtras(options.iommu, options.edu, options.nvme.resolve() if options.nvme else None)
        return boot(system, shlex.join(command), smp=options.smp, memory=options.memory,
                    timeout=options.timeout, verbose=options.verbose, extra=extra, pci=pci)
    except LabError as exc:
        log(str(exc))
        return 3


if __name__ == "__main__":
    sys.exit(main())
