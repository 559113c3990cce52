"""Linux boot benchmark: the team's Linux 6.1 kernel with the project's initramfs, on vmmkit
(KVM) and on QEMU with TCG, in the same run, one after the other.

For each VMM and kernel image: wall time from spawning the VMM to the kernel's banner, to
``Run /init``, to the first line ``/init`` prints, and to the VMM's exit after ``/init`` has
checked the devices and powered off. Both get the same guest (2 vCPUs, 128 MiB, virtio disk,
RNG, console and, as root, a NIC on a tap in a private network namespace; see
``tests/linux/linuxboot.py``). QEMU with KVM is not in the table: on a kvm_pvm host it dies on
the first instruction the in-kernel emulator cannot run (``plugins/kvm/README.md``).

    python bench/linux.py [--runs 1] [--kernel vmlinux|bzImage|both] [--no-net] [--json PATH]

Each run writes a JSON record (``bench/results/linux-<time>.json``, ``bench/record.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "linux"))

from initramfs import build_initramfs, missing_busybox_reason  # noqa: E402
from linuxboot import (  # noqa: E402
    LINUX_DIR,
    QEMU,
    Boot,
    BootResult,
    GuestFiles,
    NetNamespace,
    linux_missing_reason,
    netns_missing_reason,
    qemu_command,
    vmmkit_command,
)
from record import write_record  # noqa: E402

MILESTONES = (
    ("banner", "Linux version "),
    ("Run /init", "Run /init as init process"),
    ("/init output", "VMMKIT-INIT: start:"),
)


def run_one(vmm: str, kernel: Path, initramfs: Path, workdir: Path, *, net: bool, timeout: float) -> BootResult:
    files = GuestFiles(workdir)
    namespace = NetNamespace(f"vmmkit-bench-{os.getpid()}") if net else None
    try:
        if vmm == "qemu":
            tap = None
            if namespace is not None:
                tap = "qtap0"
                namespace.add_tap(tap, "10.0.2.1/24")
            cmd = qemu_command(kernel, initramfs, files, pattern="bench", tap=tap)
        else:
            cmd = vmmkit_command(kernel, initramfs, files, pattern="bench", net=net, extra=["--hypervisor", "kvm"])
        if namespace is not None:
            cmd = namespace.wrap(cmd)
        boot = Boot(f"{vmm} {kernel.name}", cmd, timeout=timeout, cleanup=[namespace] if namespace else [])
        namespace = None
        return boot.wait()
    finally:
        if namespace is not None:
            namespace.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="boots per VMM and kernel (median reported)")
    parser.add_argument("--kernel", choices=("vmlinux", "bzImage", "both"), default="both")
    parser.add_argument("--no-net", action="store_true", help="leave the NIC out (no root needed)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a boot counts as hung")
    parser.add_argument("--json", default=None, help="the record's path ('-': stdout; default: "
                        "bench/results/linux-<time>.json)")
    args = parser.parse_args()
    started = time.monotonic()
    for reason in (linux_missing_reason(), missing_busybox_reason()):
        if reason:
            print(f"bench/linux.py: {reason}", file=sys.stderr)
            return 1
    net = not args.no_net and netns_missing_reason() is None
    kernels = ["vmlinux", "bzImage"] if args.kernel == "both" else [args.kernel]
    vmms = ["vmmkit"] + (["qemu"] if shutil.which(QEMU) else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="vmmkit-bench-linux-") as tmp:
        initramfs = build_initramfs(Path(tmp) / "init.cpio")
        for kernel in kernels:
            for vmm in vmms:
                results = []
                for run in range(args.runs):
                    result = run_one(vmm, LINUX_DIR / kernel, initramfs, Path(tmp) / f"{vmm}-{kernel}-{run}",
                                     net=net, timeout=args.timeout)
                    status = "ok" if result.returncode == 0 and not result.timed_out else "FAILED"
                    print(f"  {vmm:<7} {kernel:<8} run {run + 1}: {status}, {result.elapsed:.1f} s", file=sys.stderr)
                    if status != "ok":
                        print(result.describe(), file=sys.stderr)
                    results.append(result)
                rows.append((kernel, vmm, results))
    label = {"vmmkit": "vmmkit (KVM)", "qemu": "QEMU (TCG)"}
    header = ["kernel", "VMM", *(name for name, _ in MILESTONES), "power-off"]
    print(f"The team's Linux kernel ({LINUX_DIR}) to /init, {'with' if net else 'without'} a NIC; "
          f"median of {args.runs} run(s), seconds from spawning the VMM")
    print(" | ".join(f"{h:>12}" for h in header))
    records = []
    for kernel, vmm, results in rows:
        cells = [kernel, label[vmm]]
        for name, text in MILESTONES:
            times = [t for t in (r.time_of(text) for r in results) if t is not None]
            cells.append(f"{statistics.median(times):.2f}" if times else "-")
            records.append({"kernel": kernel, "vmm": label[vmm], "milestone": name,
                            "seconds": round(statistics.median(times), 3) if times else None})
        ends = [r.elapsed for r in results if r.returncode == 0 and not r.timed_out]
        cells.append(f"{statistics.median(ends):.2f}" if ends else "failed")
        records.append({"kernel": kernel, "vmm": label[vmm], "milestone": "power-off",
                        "seconds": round(statistics.median(ends), 3) if ends else None,
                        "failed_runs": len(results) - len(ends)})
        print(" | ".join(f"{c:>12}" for c in cells))
    write_record("linux", records, keys=("kernel", "vmm", "milestone"), args=args, started=started, path=args.json,
                 net=net)
    return 0


if __name__ == "__main__":
    sys.exit(main())
