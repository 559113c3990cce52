#!/usr/bin/env python3
"""Guest port-I/O and MMIO exits per second through vmmkit's KVM run loop, side by side with
a minimal pure-C ``KVM_RUN`` loop (built here with gcc) and a plain-Python ``fcntl.ioctl``
loop, all running the same guest code in the same process run.

Paths measured:

- pure C: ``ioctl(KVM_RUN)``, switch on the exit reason, count, re-enter; nothing else.
- vmmkit native: the port is a :class:`vmmkit.hypervisor.PortSink` (writes copied to
  /dev/null), served in C inside the run loop; no Python per exit.
- vmmkit Python (return): the C loop returns each access to Python, which calls a trivial
  :class:`VcpuOps` and re-enters (the default dispatch).
- vmmkit Python (callback): the C loop calls the ``VcpuOps`` through a cffi ``extern
  "Python"`` callback instead of returning.
- plain Python: ``fcntl.ioctl(KVM_RUN)`` and ``struct.unpack_from`` on the kvm_run mmap,
  dispatching to the same trivial ``VcpuOps``.

The guest is 16-bit code that does ``out %al, %dx`` (or ``mov %al, (%bx)`` to unbacked memory)
in an unrolled loop, then ``hlt``. Usage: ``python bench/exits.py [--exits N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CODE_BASE = 0x1000
RAM_SIZE = 0x8000
MMIO_ADDR = 0xF000  # unbacked: every store is an MMIO exit
PORT = 0xE9
UNROLL = 16

GUEST = {
    "pio": f"""
        mov $({{n}} / {UNROLL}), %ecx
        mov ${PORT:#x}, %dx
    1:
        .rept {UNROLL}
        out %al, %dx
        .endr
        dec %ecx
        jnz 1b
        hlt
    """,
    "mmio": f"""
        mov $({{n}} / {UNROLL}), %ecx
        mov ${MMIO_ADDR:#x}, %bx
    1:
        .rept {UNROLL}
        mov %al, (%bx)
        .endr
        dec %ecx
        jnz 1b
        hlt
    """,
}

PURE_C = r"""
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv)
{
    if (argc != 3) { fprintf(stderr, "usage: %s guest.bin repeats\n", argv[0]); return 2; }
    int repeats = atoi(argv[2]);
    FILE *f = fopen(argv[1], "rb");
    if (!f) die("guest");
    static unsigned char code[0x4000];
    size_t len = fread(code, 1, sizeof(code), f);
    fclose(f);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    for (int rep = 0; rep < repeats; rep++) {
        int vm = ioctl(kvm, KVM_CREATE_VM, 0);
        if (vm < 0) die("KVM_CREATE_VM");
        unsigned char *ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memcpy(ram + CODE_BASE, code, len);
        struct kvm_userspace_memory_region region = {
            .slot = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE,
            .userspace_addr = (unsigned long)ram};
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
        int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
        if (vcpu < 0) die("KVM_CREATE_VCPU");
        struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
        struct kvm_sregs sregs;
        ioctl(vcpu, KVM_GET_SREGS, &sregs);
        sregs.cs.base = 0; sregs.cs.selector = 0;
        sregs.ds.base = 0; sregs.ds.selector = 0;
        if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
        struct kvm_regs regs = {.rip = CODE_BASE, .rflags = 2};
        if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

        struct timespec t0, t1;
        long exits = 0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
            if (run->exit_reason == KVM_EXIT_IO || run->exit_reason == KVM_EXIT_MMIO) {
                exits++;
                continue;
            }
            if (run->exit_reason == KVM_EXIT_HLT)
                break;
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        printf("%ld %lld\n", exits,
               (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
        fflush(stdout);
        munmap(run, mmap_size);
        munmap(ram, RAM_SIZE);
        close(vcpu);
        close(vm);
    }
    return 0;
}
"""


PURE_C_LABEL = "pure C KVM_RUN loop"


class NullOps:
    """The trivial VcpuOps: accepts writes, reads as ones."""

    def pio_read(self, port: int, size: int) -> bytes:
        return b"\xff" * size

    def pio_write(self, port: int, data: bytes) -> None:
        pass

    def mmio_read(self, addr: int, size: int) -> bytes:
        return b"\xff" * size

    def mmio_write(self, addr: int, data: bytes) -> None:
        pass


# -- building -------------------------------------------------------------------------------


def assemble(source: str, work: Path, name: str) -> Path:
    src = work / f"{name}.S"
    src.write_text(f".code16\n.text\n.globl _start\n_start:\n{source}\n")
    obj, elf, binary = work / f"{name}.o", work / f"{name}.elf", work / f"{name}.bin"
    for cmd in (
        ["as", "--64", "-o", obj, src],
        ["ld", "-m", "elf_x86_64", "-N", "-nostdlib", f"-Ttext={CODE_BASE:#x}", "-o", elf, obj],
        ["objcopy", "-O", "binary", "-j", ".text", elf, binary],
    ):
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    return binary


def build_pure_c(work: Path, *, static: bool = False) -> Path:
    source = work / "kvm_loop.c"
    source.write_text(f"#define RAM_SIZE {RAM_SIZE:#x}\n#define CODE_BASE {CODE_BASE:#x}\n" + PURE_C)
    binary = work / "kvm_loop"
    subprocess.run(["gcc", "-O2", *(["-static"] if static else []), "-o", str(binary), str(source)], check=True,
                   capture_output=True, text=True)
    return binary


# -- the loops --------------------------------------------------------------------------------


def run_pure_c(binary: Path, guest: Path, repeat: int) -> list[tuple[int, float]]:
    out = subprocess.run([str(binary), str(guest), str(repeat)], check=True, capture_output=True, text=True)
    samples = []
    for line in out.stdout.split("\n"):
        if line.strip():
            exits, ns = line.split()
            samples.append((int(exits), int(ns) / 1e9))
    return samples


def run_vmmkit(code: bytes, *, native: bool, callback: bool) -> tuple[int, float]:
    import attrs
    from vmmkit_kvm.hypervisor import KvmHypervisor

    from vmmkit.hypervisor import ExitReason, PortSink
    from vmmkit.memory import GuestMemory, MemoryRange
    from vmmkit.x86 import Segment, StandardRegisters

    hypervisor = KvmHypervisor()
    vm = hypervisor.create_vm("x86_64")
    memory = GuestMemory.allocate([MemoryRange(0, RAM_SIZE)])
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        vm.add_memory_region(0, 0, RAM_SIZE, memory.host_address(0, RAM_SIZE))
        memory.write(CODE_BASE, code)
        if native:
            assert vm.add_port_sink(PortSink(port=PORT, fd=devnull))
        vcpu = vm.create_vcpu(0, NullOps(), callback=callback)
        flat = Segment(base=0, limit=0xFFFF, selector=0, type=0x3, present=1, s=1)
        code_seg = attrs.evolve(flat, type=0xB)
        vcpu.set_sregs(attrs.evolve(vcpu.get_sregs(), cs=code_seg, ds=flat, es=flat, ss=flat))
        vcpu.set_regs(StandardRegisters(rip=CODE_BASE, rflags=0x2))
        start = time.perf_counter()
        exit_ = vcpu.run()
        elapsed = time.perf_counter() - start
        if exit_.reason is not ExitReason.HLT:
            raise RuntimeError(f"guest stopped with {exit_}")
        counts = vcpu.exit_counts()
        return counts["io"] + counts["io-native"] + counts["mmio"], elapsed
    finally:
        vm.close()
        memory.close()
        os.close(devnull)
        hypervisor.close()


def run_vmmkit_filtered(code: bytes, *, native: bool) -> tuple[int, float]:
    """:func:`run_vmmkit` on a thread under vmmkit's vCPU seccomp filter (``--seccomp true``)."""
    import threading

    from vmmkit import sandbox

    sandbox.activate_seccomp("true")
    out: list[tuple[int, float] | BaseException] = []

    def vcpu_thread() -> None:
        sandbox.enter_thread(sandbox.VCPU, "bench-vcpu")
        try:
            out.append(run_vmmkit(code, native=native, callback=False))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=vcpu_thread)
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _io(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


KVM_GET_VCPU_MMAP_SIZE = _io(0, 0xAE, 0x04, 0)
KVM_CREATE_VM = _io(0, 0xAE, 0x01, 0)
KVM_CREATE_VCPU = _io(0, 0xAE, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _io(1, 0xAE, 0x46, 32)
KVM_RUN = _io(0, 0xAE, 0x80, 0)
KVM_SET_REGS = _io(1, 0xAE, 0x82, 144)
KVM_GET_SREGS = _io(2, 0xAE, 0x83, 312)
KVM_SET_SREGS = _io(1, 0xAE, 0x84, 312)
KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_MMIO = 2, 5, 6


def run_plain_python(code: bytes) -> tuple[int, float]:
    """A VMM loop as one would write it with nothing but the standard library."""
    ops = NullOps()
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    ram = mmap.mmap(-1, RAM_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ram[CODE_BASE : CODE_BASE + len(code)] = code
    import ctypes

    ram_addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("IIQQQ", 0, 0, 0, RAM_SIZE, ram_addr))
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    run = mmap.mmap(vcpu, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    sregs = bytearray(312)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    for seg in (0, 1):  # cs, ds: base 0, selector 0 (struct kvm_segment is 24 bytes)
        struct.pack_into("Q", sregs, 24 * seg, 0)
        struct.pack_into("H", sregs, 24 * seg + 12, 0)
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = [0] * 18
    regs[16], regs[17] = CODE_BASE, 2
    fcntl.ioctl(vcpu, KVM_SET_REGS, struct.pack("18Q", *regs))

    ioctl, unpack_from = fcntl.ioctl, struct.unpack_from
    exits = 0
    start = time.perf_counter()
    try:
        while True:
            ioctl(vcpu, KVM_RUN, 0)
            reason = unpack_from("I", run, 8)[0]
            if reason == KVM_EXIT_IO:
                direction, io_size, port, count, offset = unpack_from("BBHIQ", run, 32)
                if direction:  # out
                    for i in range(count):
                        at = offset + i * io_size
                        ops.pio_write(port, run[at : at + io_size])
                else:
                    for i in range(count):
                        at = offset + i * io_size
                        run[at : at + io_size] = ops.pio_read(port, io_size)
                exits += 1
            elif reason == KVM_EXIT_MMIO:
                addr, data, length, is_write = unpack_from("Q8sIB", run, 32)
                if is_write:
                    ops.mmio_write(addr, data[:length])
                else:
                    run[40 : 40 + length] = ops.mmio_read(addr, length)
                exits += 1
            elif reason == KVM_EXIT_HLT:
                break
            else:
                raise RuntimeError(f"unexpected exit {reason}")
        return exits, time.perf_counter() - start
    finally:
        run.close()
        os.close(vcpu)
        os.close(vm)
        ram.close()
        os.close(kvm)


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=4000, help="exits per measurement (default 4000)")
    parser.add_argument("--repeat", type=int, default=15, help="rounds (each measures every path once)")
    parser.add_argument("--pure-c", type=Path, metavar="BINARY",
                        help="a pure-C loop built elsewhere (--build-pure-c), for a host without gcc (the x86 lab)")
    parser.add_argument("--build-pure-c", type=Path, metavar="BINARY",
                        help="only build the pure-C loop (static) to BINARY, and exit")
    args = parser.parse_args(argv)
    n = max(UNROLL, args.exits // UNROLL * UNROLL)
    if args.build_pure_c is not None:
        with tempfile.TemporaryDirectory(prefix="vmmkit-bench-") as tmp:
            shutil.copy(build_pure_c(Path(tmp), static=True), args.build_pure_c)
        return 0

    import logging

    import structlog

    # A program, not a library: keep the backend's debug events off the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    from vmmkit_kvm.hypervisor import KvmHypervisor

    availability = KvmHypervisor.is_available()
    if not availability:
        print(f"SKIPPED: KVM is not usable here: {availability.reason}")
        return 0
    for tool in ("as", "ld", "objcopy") if args.pure_c else ("gcc", "as", "ld", "objcopy"):
        if shutil.which(tool) is None:
            print(f"SKIPPED: {tool} is needed")
            return 0

    with tempfile.TemporaryDirectory(prefix="vmmkit-bench-") as tmp:
        work = Path(tmp)
        pure_c = args.pure_c or build_pure_c(work)
        guests = {kind: assemble(src.replace("{n}", str(n)), work, kind) for kind, src in GUEST.items()}
        codes = {kind: path.read_bytes() for kind, path in guests.items()}

        paths: list[tuple[str, dict[str, Callable[[], tuple[int, float]] | None]]] = [
            ("vmmkit native (port sink, C)", {
                "pio": lambda: run_vmmkit(codes["pio"], native=True, callback=False),
                "mmio": None,
            }),
            ("vmmkit native, seccomp vCPU filter", {
                "pio": lambda: run_vmmkit_filtered(codes["pio"], native=True),
                "mmio": None,
            }),
            ("vmmkit Python dispatch (return)", {
                "pio": lambda: run_vmmkit(codes["pio"], native=False, callback=False),
                "mmio": lambda: run_vmmkit(codes["mmio"], native=False, callback=False),
            }),
            ("vmmkit Python (return), seccomp", {
                "pio": lambda: run_vmmkit_filtered(codes["pio"], native=False),
                "mmio": lambda: run_vmmkit_filtered(codes["mmio"], native=False),
            }),
            ("vmmkit Python dispatch (callback)", {
                "pio": lambda: run_vmmkit(codes["pio"], native=False, callback=True),
                "mmio": lambda: run_vmmkit(codes["mmio"], native=False, callback=True),
            }),
            ("plain Python fcntl.ioctl loop", {
                "pio": lambda: run_plain_python(codes["pio"]),
                "mmio": lambda: run_plain_python(codes["mmio"]),
            }),
        ]
        samples: dict[tuple[str, str], list[float]] = {}
        ratios: dict[tuple[str, str], list[float]] = {}
        rng = random.Random(1)
        # Each round measures every path once, in a shuffled order, so that the host's load
        # (this is a shared, nested machine) hits them alike; ratios are taken within a round.
        for _ in range(args.repeat):
            jobs: list[tuple[str, str, Callable[[], tuple[int, float]]]] = []
            for kind in ("pio", "mmio"):
                jobs.append((PURE_C_LABEL, kind, lambda kind=kind: run_pure_c(pure_c, guests[kind], 1)[0]))
                for label, runners in paths:
                    runner = runners[kind]
                    if runner is not None:
                        jobs.append((label, kind, runner))
            rng.shuffle(jobs)
            round_: dict[tuple[str, str], float] = {}
            for label, kind, runner in jobs:
                exits, seconds = runner()
                if exits != n:
                    raise RuntimeError(f"{label} saw {exits} exits, expected {n}")
                round_[(label, kind)] = seconds / exits
            for key, per_exit in round_.items():
                samples.setdefault(key, []).append(per_exit)
                ratios.setdefault(key, []).append(per_exit / round_[(PURE_C_LABEL, key[1])])

    labels = [PURE_C_LABEL] + [label for label, _ in paths]
    print(f"KVM exits: {n} per measurement, {args.repeat} rounds; guest: 16-bit, {UNROLL}x unrolled out/mov")
    print("us/exit: best [median] over the rounds; x C: median over the rounds of the ratio to the")
    print("pure-C loop measured in the same round\n")
    cell = "{:>8} {:>9} {:>9} {:>7}"
    print(f"{'':36} | {'port I/O':^36} | {'MMIO':^36}")
    print(f"{'path':36} | " + cell.format("us/exit", "[median]", "exits/s", "x C") + " | "
          + cell.format("us/exit", "[median]", "exits/s", "x C"))
    print("-" * 116)
    for label in labels:
        cells = []
        for kind in ("pio", "mmio"):
            key = (label, kind)
            if key not in samples:
                cells.append(cell.format("n/a", "", "", ""))
                continue
            best, median = min(samples[key]), statistics.median(samples[key])
            cells.append(cell.format(f"{best * 1e6:.2f}", f"[{median * 1e6:.2f}]", f"{1 / best:.0f}",
                                     f"{statistics.median(ratios[key]):.2f}x"))
        print(f"{label:36} | {cells[0]} | {cells[1]}")
    print("\ntargets: native within 1.15x of pure C, Python dispatch within 1.5x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
