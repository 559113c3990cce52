#!/usr/bin/env python3
"""Hotplug latency: from the API request to the Linux guest seeing the new vCPU, memory and
disk, vmmkit vs QEMU in the same run.

Both VMMs boot the team's Linux kernel (``../shared/guests/linux/vmlinux``, PVH) with 1 vCPU
and 128 MiB and the project's initramfs (``tests/linux/initramfs.py``) whose ``/init`` is
``bench/hotplug_init.sh``: it polls ``/sys/devices/system/cpu/{present,online}``,
``MemTotal`` and ``/sys/block`` and prints a line when they change (onlining new processors
itself; memory is onlined by the kernel, ``memhp_default_state=online``). Once the first line
is out the host, one step at a time, waiting for the guest to see each:

- **vCPU**: vmmkit ``vm.resize desired_vcpus=2`` (``--cpus boot=1,max=2``; ACPI CPU hotplug
  through the GED); QEMU ``-smp 1,maxcpus=2`` and QMP ``device_add`` of the CPU type and
  socket ``query-hotpluggable-cpus`` names (ACPI CPU hotplug of the PC machine). Two times:
  ``present`` (Linux's ACPI processor driver added it) and ``online`` (``/init`` onlined it).
- **memory**: 128 MiB. ``--memory-method acpi`` (default): vmmkit ``--memory
  hotplug_method=acpi,hotplug_size=256M`` + ``vm.resize desired_ram``; QEMU ``-m
  128M,slots=2,maxmem=384M`` + ``object-add memory-backend-ram`` + ``device_add pc-dimm``.
  ``--memory-method virtio-mem``: vmmkit ``hotplug_method=virtio-mem``; QEMU a
  ``virtio-mem-pci`` of 256 MiB and ``qom-set requested-size``. Two times: MemTotal's first
  change and MemTotal grown by all 128 MiB.
- **disk**: an 8 MiB raw image; vmmkit ``vm.add-disk``; QEMU ``blockdev-add`` + ``device_add
  virtio-blk-pci`` on the PC's root bus (ACPI PCI hotplug, PIIX4). Time: ``/sys/block`` lists it.

Times are host wall-clock seconds from sending the (first) request to the serial line's
arrival, so they include the guest's polling interval (``--poll-ms``, wall time: vmmkit's
guest clocks run ``DEFAULT_DILATION`` times slow on a kvm_pvm host, so its ``/init`` sleeps
that many times less in guest seconds) and the serial console's path. ``answered`` is when the
API/QMP request returned.

**Caveat**: QEMU runs with TCG (``--accel``). Its ``-accel kvm`` cannot run this guest on a
kvm_pvm host (tried: with ``-cpu max`` QEMU aborts setting MSR 0x10a; with ``-cpu qemu64`` the
vCPU stops with a KVM internal error at the kernel's first ``xrstor``, which the in-kernel
emulator lacks, ``shared/notes/pvm-host.md``; nor could it repair user-mode SYSCALL), vmmkit on
that kvm_pvm ``/dev/kvm`` whose guest kernel code is emulated at ~1 us per instruction. Guest
kernel work (ACPI's AML interpreter, onlining a CPU with stop_machine, adding memory sections,
probing virtio) is therefore much slower under vmmkit for reasons outside the VMM; the
``answered`` column is the VMM's own share.

    python bench/hotplug.py [--memory-method acpi|virtio-mem] [--poll-ms 100] [--vmm qemu,vmmkit]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "linux"))

from initramfs import build_initramfs, missing_busybox_reason  # noqa: E402
from linuxboot import BASE_CMDLINE, LINUX_DIR, QEMU, Boot, linux_missing_reason  # noqa: E402

from vmmkit.api.client import ApiClient  # noqa: E402

PREFIX = "VMMKIT-HPBENCH: "
MiB = 1 << 20
BOOT_RAM = 128 * MiB
PLUG = 128 * MiB
HOTPLUG_SIZE = 256 * MiB
DISK_SIZE = 8 * MiB
#: The kernel onlines hot-added memory itself; ``/init`` has no udev.
CMDLINE = f"{BASE_CMDLINE} memhp_default_state=online"


def guest_clock_dilation() -> int:
    """How many times slow vmmkit's KVM backend runs the guest's clocks on this host."""
    from vmmkit_kvm.quirks import DEFAULT_DILATION, PVM, detect

    return DEFAULT_DILATION if detect() == PVM else 1


class State:
    """One line of ``hotplug_init.sh``: what the guest sees."""

    def __init__(self, line: str) -> None:
        fields = dict(word.split("=", 1) for word in line.split(PREFIX, 1)[1].split())
        self.present = fields["present"]
        self.online = fields["online"]
        self.mem_kib = int(fields["mem"])
        self.disks = [d for d in fields["blk"].split(",") if d]


class Guest:
    """A booting VMM; :meth:`wait_for` returns when a state line satisfies a predicate."""

    def __init__(self, boot: Boot) -> None:
        self.boot = boot
        self.seen = 0

    def wait_for(self, what: str, predicate: Callable[[State], bool], deadline: float) -> tuple[float, State]:
        """Monotonic time of the first new line whose state satisfies ``predicate``."""
        while time.monotonic() < deadline:
            lines = self.boot.result.lines
            while self.seen < len(lines):
                at, line = lines[self.seen]
                self.seen += 1
                if PREFIX in line:
                    state = State(line)
                    if predicate(state):
                        return self.boot._start + at, state
            if self.boot._proc.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"the guest did not see {what}\n{self.boot.wait().describe()}")


class Qmp:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path: Path, deadline: float) -> None:
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU made no QMP socket")
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            answer = json.loads(self.file.readline())
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                raise RuntimeError(f"QMP {command}: {answer['error']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


#: One step's times: seconds from the request to the answer and to each thing the guest saw.
Times = dict[str, float]


class Peer:
    """What differs between the two VMMs: the command and the requests."""

    name = ""

    def __init__(self, tmp: Path, initramfs: Path, args: argparse.Namespace) -> None:
        self.tmp = tmp
        self.initramfs = initramfs
        self.args = args
        self.disk = tmp / f"{self.name}-hot.img"
        with open(self.disk, "wb") as image:
            image.truncate(DISK_SIZE)

    def command(self) -> list[str]:
        raise NotImplementedError

    def connect(self, deadline: float) -> None:
        raise NotImplementedError

    def add_cpu(self) -> None:
        raise NotImplementedError

    def add_memory(self) -> None:
        raise NotImplementedError

    def add_disk(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Vmmkit(Peer):
    name = "vmmkit"

    def command(self) -> list[str]:
        poll = self.args.poll_ms / 1000 / guest_clock_dilation()
        return [
            sys.executable, "-m", "vmmkit", "--hypervisor", "kvm", "--kernel", str(LINUX_DIR / "vmlinux"),
            "--initramfs", str(self.initramfs), "--cpus", "boot=1,max=2", "--serial", "tty",
            "--memory", f"size={BOOT_RAM // MiB}M,hotplug_method={self.args.memory_method},"
                        f"hotplug_size={HOTPLUG_SIZE // MiB}M",
            "--platform", "virtio_transport=pci",
            "--cmdline", f"{CMDLINE} -- poll={poll:g}", "--api-socket", f"path={self.tmp / 'api.sock'}",
        ]

    def connect(self, deadline: float) -> None:
        self.api = ApiClient(str(self.tmp / "api.sock"), timeout=300)

    def add_cpu(self) -> None:
        self.api.put("vm.resize", {"desired_vcpus": 2})

    def add_memory(self) -> None:
        self.api.put("vm.resize", {"desired_ram": BOOT_RAM + PLUG})

    def add_disk(self) -> None:
        self.api.add_disk({"path": str(self.disk), "id": "hot0"})


class Qemu(Peer):
    name = "qemu"

    def command(self) -> list[str]:
        poll = self.args.poll_ms / 1000  # QEMU's guest clocks run at wall-clock speed
        memory = ["-m", f"{BOOT_RAM // MiB}M,slots=2,maxmem={(BOOT_RAM + HOTPLUG_SIZE) // MiB}M"]
        if self.args.memory_method == "virtio-mem":
            memory += ["-object", f"memory-backend-ram,id=vmem0,size={HOTPLUG_SIZE // MiB}M",
                       "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,block-size=2M,requested-size=0"]
        return [
            QEMU, "-accel", self.args.accel, "-M", "pc", "-cpu", "max", "-smp", "1,maxcpus=2", *memory,
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
            "-kernel", str(LINUX_DIR / "vmlinux"), "-initrd", str(self.initramfs),
            "-append", f"{CMDLINE} -- poll={poll:g}",
            "-qmp", f"unix:{self.tmp / 'qmp.sock'},server=on,wait=off",
        ]

    def connect(self, deadline: float) -> None:
        self.qmp = Qmp(self.tmp / "qmp.sock", deadline)
        self.cpu = next(c for c in self.qmp.execute("query-hotpluggable-cpus") if "qom-path" not in c)

    def add_cpu(self) -> None:
        self.qmp.execute("device_add", driver=self.cpu["type"], id="cpu1", **self.cpu["props"])

    def add_memory(self) -> None:
        if self.args.memory_method == "virtio-mem":
            self.qmp.execute("qom-set", path="vm0", property="requested-size", value=PLUG)
            return
        self.qmp.execute("object-add", **{"qom-type": "memory-backend-ram", "id": "mem1", "size": PLUG})
        self.qmp.execute("device_add", driver="pc-dimm", id="dimm1", memdev="mem1")

    def add_disk(self) -> None:
        self.qmp.execute("blockdev-add", driver="raw", **{"node-name": "hot0"},
                         file={"driver": "file", "filename": str(self.disk)})
        self.qmp.execute("device_add", driver="virtio-blk-pci", drive="hot0", id="hot0")

    def close(self) -> None:
        qmp = getattr(self, "qmp", None)
        if qmp is not None:
            qmp.close()


def timed(request: Callable[[], None]) -> tuple[float, float]:
    """(monotonic time the request was sent, seconds until it returned)."""
    sent = time.monotonic()
    request()
    return sent, time.monotonic() - sent


def one_run(peer: Peer, args: argparse.Namespace) -> dict[str, Times]:
    boot = Boot(peer.name, peer.command(), timeout=args.timeout)
    guest = Guest(boot)
    deadline = time.monotonic() + args.timeout
    try:
        booted_at, first = guest.wait_for("its first state", lambda s: True, deadline)
        peer.connect(deadline)
        times: dict[str, Times] = {"boot": {"first line": booted_at - boot._start}}
        print(f"  {peer.name}: /init's first line after {booted_at - boot._start:.1f} s: "
              f"present={first.present} online={first.online} mem={first.mem_kib} kB blk={first.disks}",
              file=sys.stderr)

        sent, answered = timed(peer.add_cpu)
        # a line may show two milestones at once (both happened within one polling interval)
        present, state = guest.wait_for("vCPU 1 present", lambda s: s.present == "0-1", deadline)
        online = present if state.online == "0-1" else \
            guest.wait_for("vCPU 1 online", lambda s: s.online == "0-1", deadline)[0]
        times["vCPU"] = {"answered": answered, "present": present - sent, "online": online - sent}

        sent, answered = timed(peer.add_memory)
        target = first.mem_kib + PLUG // 1024
        changed, last = guest.wait_for("MemTotal change", lambda s: s.mem_kib != first.mem_kib, deadline)
        full = changed
        if last.mem_kib < target:
            full, last = guest.wait_for(f"MemTotal {target} kB", lambda s: s.mem_kib >= target, deadline)
        times["memory"] = {"answered": answered, "first change": changed - sent, "all of it": full - sent}

        sent, answered = timed(peer.add_disk)
        seen, state = guest.wait_for("a new disk", lambda s: len(s.disks) > len(last.disks), deadline)
        times["disk"] = {"answered": answered, "listed": seen - sent}
        print(f"  {peer.name}: done, the guest ends with present={state.present} online={state.online} "
              f"mem={state.mem_kib} kB blk={state.disks}", file=sys.stderr)
        return times
    finally:
        peer.close()
        boot.kill()


def fmt(value: float | None) -> str:
    return f"{value:9.3f}" if value is not None else f"{'-':>9}"


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.split()
    return out[3] if len(out) > 3 else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-method", choices=("acpi", "virtio-mem"), default="acpi")
    parser.add_argument("--poll-ms", type=float, default=100.0,
                        help="wall-clock milliseconds between two looks of the guest's /init")
    parser.add_argument("--accel", default="tcg", help="QEMU's accelerator (kvm dies on a kvm_pvm host)")
    parser.add_argument("--vmm", default="qemu,vmmkit", help="which VMMs to run, in this order (default: QEMU "
                        "first: its TCG boot is short and leaves the cores to vmmkit's)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for one VMM's whole run")
    parser.add_argument("--json", default=None, help="default: bench/results/hotplug-<time>.json")
    args = parser.parse_args()
    for reason in (linux_missing_reason(), missing_busybox_reason()):
        if reason:
            print(f"bench/hotplug.py: {reason}", file=sys.stderr)
            return 1
    started = time.monotonic()
    kinds = {"qemu": Qemu, "vmmkit": Vmmkit}
    names = [name for name in args.vmm.split(",") if name != "qemu" or shutil.which(QEMU)]
    if not names or any(name not in kinds for name in names):
        parser.error(f"--vmm: a comma-separated list of {', '.join(kinds)}")
    peers = [kinds[name] for name in names]
    results: dict[str, dict[str, Times]] = {}
    with tempfile.TemporaryDirectory(prefix="vmmkit-bench-hotplug-") as tmp:
        initramfs = build_initramfs(Path(tmp) / "init.cpio", init=REPO / "bench" / "hotplug_init.sh")
        for kind in peers:
            directory = Path(tmp) / kind.name
            directory.mkdir()
            results[kind.name] = one_run(kind(directory, initramfs, args), args)

    ours, theirs = results.get("vmmkit", {}), results.get("qemu", {})
    print(f"Hotplug seen by Linux, seconds from the request (memory: {args.memory_method}, guest polls every "
          f"{args.poll_ms:g} ms; QEMU {qemu_version()} with {args.accel}, vmmkit on /dev/kvm; see the caveat in "
          f"bench/hotplug.py)")
    print(f"{'step':<7} {'milestone':<13} | {'vmmkit':>9} {'QEMU':>9} | {'ratio':>7}")
    rows = []
    for step, milestones in (ours or theirs).items():
        for milestone in milestones:
            value, other = ours.get(step, {}).get(milestone), theirs.get(step, {}).get(milestone)
            ratio = value / other if value is not None and other else None
            print(f"{step:<7} {milestone:<13} | {fmt(value)} {fmt(other)} | "
                  f"{f'{ratio:6.1f}x' if ratio is not None else '-':>7}")
            rows.append({"step": step, "milestone": milestone, "vmmkit_s": value, "qemu_s": other, "ratio": ratio})

    path = Path(args.json) if args.json else REPO / "bench" / "results" / time.strftime("hotplug-%Y%m%dT%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"bench": "hotplug", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": time.monotonic() - started, "args": {k: v for k, v in vars(args).items() if k != "json"},
              "qemu": qemu_version(), "load": os.getloadavg(), "rows": rows}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
