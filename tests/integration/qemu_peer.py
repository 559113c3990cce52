"""QEMU as the reference peer for the test guest's virtio drivers (tests/guests/README.md).

- :func:`qemu_virtio_command` builds a QEMU command line that gives the guest virtio-blk,
  -net, -console and -rng devices over virtio-mmio (``-M microvm``) or modern virtio-pci
  (``-M q35`` / ``pc``), and the kernel command line that goes with it (virtio-mmio devices are
  announced with ``virtio_mmio.device=`` words, computed from microvm's fixed layout).
- :func:`blk_sector`, :func:`blk_runs`, :func:`check_blk_image` and :func:`blk_ok_line`
  recompute what ``test=blk`` writes and prints, to check the image file on the host.

The virtio device side is VMM-neutral: a vmmkit test passes the same :class:`VirtioSetup`
paths and checks the same lines and files.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"

# -- what test=blk writes (tests/guests/virtio/blk.c) ----------------------------------------

SECTOR = 512
BLK_RUN = 4  #: sectors per run
BLK_SEED = 0x5EED0001  #: default; the guest takes ``blk.seed=<n>`` from its command line
_MAGIC = 0x6B6D6D76  # "vmmk"


def blk_sector(n: int, seed: int = BLK_SEED) -> bytes:
    """The 512 bytes ``test=blk`` writes to sector ``n``."""
    words = [_MAGIC, n & 0xFFFFFFFF, n >> 32 & 0xFFFFFFFF, seed]
    words += [((n * 0x9E3779B1 + i * 0x85EBCA77) & 0xFFFFFFFF) ^ seed for i in range(4, 128)]
    return struct.pack("<128I", *words)


def blk_runs(capacity: int) -> list[int]:
    """First sectors of the three runs of :data:`BLK_RUN` sectors: start, middle, end."""
    return [0, capacity // 2 - BLK_RUN // 2, capacity - BLK_RUN]


def blk_sectors(capacity: int) -> list[int]:
    return [first + i for first in blk_runs(capacity) for i in range(BLK_RUN)]


def check_blk_image(image: Path, seed: int = BLK_SEED, *, rest_zero: bool = True) -> list[str]:
    """Problems with ``image`` after ``test=blk`` (empty when the pattern is all there and,
    with ``rest_zero``, every other sector of an image that started zeroed is still zero)."""
    data = image.read_bytes()
    capacity = len(data) // SECTOR
    written = set(blk_sectors(capacity))
    problems = []
    for n in sorted(written):
        if data[n * SECTOR:(n + 1) * SECTOR] != blk_sector(n, seed):
            problems.append(f"sector {n} does not hold the pattern")
    if rest_zero:
        zero = bytes(SECTOR)
        for n in range(capacity):
            if n not in written and data[n * SECTOR:(n + 1) * SECTOR] != zero:
                problems.append(f"sector {n} was written but is not in the pattern")
    return problems


def blk_ok_line(capacity: int, serial: str, seed: int = BLK_SEED, *, flush: bool = True) -> str:
    """The exact ``ok blk`` line for a device of ``capacity`` sectors."""
    runs = " ".join(f"{first}-{first + BLK_RUN - 1}" for first in blk_runs(capacity))
    return (f"selftest: ok blk ({capacity} sectors, serial '{serial}', wrote and read back "
            f"sectors {runs} seed {seed:#x}, {'flushed' if flush else 'no flush feature'}, "
            f"past the end: IOERR)")


CONSOLE_LINE = "vmmkit virtio-console says hello\n"
NET_OK_LINE = "selftest: ok net (3/3 replies)"
CONSOLE_OK_LINE = "selftest: ok console"
RNG_OK_LINE = "selftest: ok rng"

# -- QEMU -----------------------------------------------------------------------------------

#: QEMU microvm (hw/i386/microvm.c): virtio-mmio transport i at 0xfeb00000 + 512 * i; with ACPI
#: (the default) a second IOAPIC carries their interrupts from GSI 24. microvm puts
#: ``virtio_mmio.device=`` words on the command line itself only with ``acpi=off`` (QEMU 7.2),
#: so they are computed here and each device is pinned to its transport with ``bus=``.
MICROVM_MMIO_BASE = 0xFEB00000
MICROVM_MMIO_SIZE = 512
MICROVM_MMIO_IRQ_BASE = 24

#: PCI slots of the devices (bus 0), so the guest's info lines are predictable.
PCI_SLOTS = {"blk": 3, "net": 4, "console": 5, "rng": 6}
MMIO_ORDER = ("blk", "net", "console", "rng")

GUEST_MAC = "52:54:00:12:34:56"


@dataclass
class VirtioSetup:
    """The devices to give the guest (``None``: leave it out)."""

    blk_image: Path | None = None
    blk_serial: str = "vmmkit-blk0"
    net_tap: str | None = None
    net_mac: str = GUEST_MAC
    console_file: Path | None = None
    rng: bool = False

    def kinds(self) -> list[str]:
        present = {"blk": self.blk_image, "net": self.net_tap, "console": self.console_file,
                   "rng": self.rng or None}
        return [kind for kind in MMIO_ORDER if present[kind] is not None]


@dataclass
class QemuCommand:
    argv: list[str]
    cmdline: str  #: the kernel command line (already inside ``argv``)
    machine: str
    mmio: dict[str, tuple[int, int]] = field(default_factory=dict)  #: kind -> (base, irq)


def qemu_accel() -> str:
    """``$VMMKIT_QEMU_ACCEL``, else ``tcg``. What is checked here is QEMU's device models, which do
    not depend on the accelerator; on this project's nested ("PVM") KVM, ring-0 guest code and
    SeaBIOS are emulated, and a q35 boot takes ~3 s against ~0.2 s with TCG."""
    return os.environ.get("VMMKIT_QEMU_ACCEL", "tcg")


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def qemu_virtio_command(kernel: Path, tests: Sequence[str], setup: VirtioSetup, *,
                        transport: str = "mmio", machine: str | None = None, accel: str | None = None,
                        memory: str = "128M", cpus: int = 1, extra_cmdline: str = "") -> QemuCommand:
    """QEMU running ``kernel`` with ``test=<tests>`` and the devices of ``setup``.

    ``transport``: ``mmio`` (default machine ``microvm,rtc=on``, modern virtio-mmio) or ``pci``
    (default ``q35``; ``pc`` works too; non-transitional devices, SeaBIOS assigns the BARs).
    The guest's exit status becomes QEMU's through ``isa-debug-exit`` (see :func:`guest_status`).
    """
    if transport not in ("mmio", "pci"):
        raise ValueError(f"transport must be mmio or pci, not {transport!r}")
    machine = machine or ("microvm,rtc=on" if transport == "mmio" else "q35")
    words = [f"test={','.join(tests)}"] if tests else []
    if extra_cmdline:
        words.append(extra_cmdline)
    argv = [QEMU, "-M", machine, "-accel", accel or qemu_accel(), "-m", memory, "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
    mmio: dict[str, tuple[int, int]] = {}

    def where(kind: str) -> str:
        if transport == "pci":
            return f"addr={PCI_SLOTS[kind]:#x},disable-legacy=on"
        index = MMIO_ORDER.index(kind)
        base, irq = MICROVM_MMIO_BASE + MICROVM_MMIO_SIZE * index, MICROVM_MMIO_IRQ_BASE + index
        mmio[kind] = (base, irq)
        words.append(f"virtio_mmio.device={MICROVM_MMIO_SIZE}@{base:#x}:{irq}")
        return f"bus=virtio-mmio-bus.{index}"

    suffix = "pci" if transport == "pci" else "device"
    if transport == "mmio":
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    if setup.blk_image is not None:
        argv += ["-drive", f"file={setup.blk_image},format=raw,if=none,id=blk0,cache=writeback",
                 "-device", f"virtio-blk-{suffix},drive=blk0,serial={setup.blk_serial},{where('blk')}"]
    if setup.net_tap is not None:
        rom = ",romfile=" if transport == "pci" else ""
        argv += ["-netdev", f"tap,id=net0,ifname={setup.net_tap},script=no,downscript=no",
                 "-device", f"virtio-net-{suffix},netdev=net0,mac={setup.net_mac}{rom},{where('net')}"]
    if setup.console_file is not None:
        argv += ["-chardev", f"file,id=con0,path={setup.console_file}",
                 "-device", f"virtio-serial-{suffix},{where('console')}",
                 "-device", "virtconsole,chardev=con0"]
    if setup.rng:
        argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom",
                 "-device", f"virtio-rng-{suffix},rng=rng0,{where('rng')}"]
    cmdline = " ".join(words)
    argv += ["-kernel", str(kernel), "-append", cmdline]
    return QemuCommand(argv, cmdline, machine, mmio)


def guest_status(returncode: int) -> int | None:
    """The guest's exit status from QEMU's return code with ``isa-debug-exit``
    (``status << 1 | 1``); ``None`` if QEMU ended another way (ACPI power-off: 0)."""
    return returncode >> 1 if returncode & 1 else None


@dataclass
class QemuRun:
    command: QemuCommand
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def status(self) -> int | None:
        return guest_status(self.returncode)


def run_qemu(command: QemuCommand, *, prefix: Sequence[str] = (), timeout: float = 120) -> QemuRun:
    """Run QEMU (after ``prefix``, e.g. :meth:`NetNamespace.exec_prefix`) to the end."""
    start = time.monotonic()
    result = subprocess.run([*prefix, *command.argv], capture_output=True, text=True,
                            errors="replace", timeout=timeout, stdin=subprocess.DEVNULL)
    return QemuRun(command, result.returncode, result.stdout, result.stderr,
                   time.monotonic() - start)


def make_disk(path: Path, size: int = 4 << 20) -> Path:
    """A zero-filled raw image (sparse) of ``size`` bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path
