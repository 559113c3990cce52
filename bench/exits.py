#!/usr/bin/env python3
"""Guest port-I/O and MMIO exits per second through vmmkit's KVM run loop, side by side with
a minimal pure-C ``KVM_RUN`` loop (built here with gcc) and a plain-Python ``fcntl.ioctl``
loop, all running the same guest code in the same process run. x86-64 and AArch64 hosts (the
guest and the loops are picked by ``platform.machine()``).

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
in an unrolled loop, then ``hlt``. Usage:
``python bench/exits.py [--exits N] [--repeat R] [--clock cpu|wall] [--only TEXT]``.

On AArch64 (the lab: ``lab/README.md``) there is no port I/O and no MMIO sink (the x86 loop's
native sinks are ports): the guest does ``str w0, [x1]`` to unbacked memory in an unrolled loop,
then PSCI ``SYSTEM_OFF`` through ``hvc`` (KVM's ``KVM_EXIT_SYSTEM_EVENT``). Its code is encoded
here (:func:`arm64_guest`), so the lab needs no assembler; the pure-C loop is built on the host
with the cross compiler against the lab's sysroot (``--build-pure-c BINARY --arch aarch64``,
static) and carried in (``lab/run --add BINARY -- python3 bench/exits.py --pure-c
/lab/files/BINARY``). ``--json PATH`` (``-``: stdout, the lab writes nothing back) writes the
record ``bench/results/*.json`` keeps.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import platform
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
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

        struct timespec t0, t1, c0, c1;
        long exits = 0;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
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
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
        printf("%ld %lld %lld\n", exits,
               (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec),
               (long long)(c1.tv_sec - c0.tv_sec) * 1000000000LL + (c1.tv_nsec - c0.tv_nsec));
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

#: What a measurement's seconds are: the measuring thread's CPU time (the default: on a shared
#: host a descheduled vCPU thread is not charged for the wait) or wall-clock time (``--clock``).
CLOCK = {"cpu": time.thread_time, "wall": time.perf_counter}
now: Callable[[], float] = CLOCK["cpu"]
pure_c_column = 2  # the pure-C loop prints: exits, wall ns, thread CPU ns


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


def build_pure_c(work: Path, *, static: bool = False, arch: str = "x86_64") -> Path:
    """The pure-C loop for ``arch``: x86-64 with gcc; aarch64 with ``aarch64-linux-gnu-gcc``
    against the AArch64 lab's sysroot (Debian's arm64 libc and kernel headers)."""
    source = work / "kvm_loop.c"
    binary = work / "kvm_loop"
    if arch == "aarch64":
        source.write_text(f"#define RAM_SIZE {RAM_SIZE:#x}\n#define RAM_BASE {ARM64_RAM_BASE:#x}ULL\n" + PURE_C_ARM64)
        argv = ["aarch64-linux-gnu-gcc", f"--sysroot={lab_sysroot()}", "-O2", *(["-static"] if static else [])]
    else:
        source.write_text(f"#define RAM_SIZE {RAM_SIZE:#x}\n#define CODE_BASE {CODE_BASE:#x}\n" + PURE_C)
        argv = ["gcc", "-O2", *(["-static"] if static else [])]
    result = subprocess.run([*argv, "-o", str(binary), str(source)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"building the pure-C loop failed:\n{result.stderr}")
    return binary


# -- the loops --------------------------------------------------------------------------------


def run_pure_c(binary: Path, guest: Path, repeat: int) -> list[tuple[int, float]]:
    out = subprocess.run([str(binary), str(guest), str(repeat)], check=True, capture_output=True, text=True)
    samples = []
    for line in out.stdout.split("\n"):
        if line.strip():
            fields = line.split()
            if len(fields) <= pure_c_column:
                raise SystemExit(f"{binary} printed no CPU time (built by an older bench/exits.py?): "
                                 "rebuild it, or pass --clock wall")
            samples.append((int(fields[0]), int(fields[pure_c_column]) / 1e9))
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
        start = now()
        exit_ = vcpu.run()
        elapsed = now() - start
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
    start = now()
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
        return exits, now() - start
    finally:
        run.close()
        os.close(vcpu)
        os.close(vm)
        ram.close()
        os.close(kvm)


# -- AArch64 ----------------------------------------------------------------------------------

ARM64_RAM_BASE = 0x4000_0000  # where the arm64 boot protocols put RAM; the code is at its start
ARM64_MMIO_ADDR = 0x0900_0000  # unbacked: every store is an MMIO exit
PSCI_SYSTEM_OFF = 0x8400_0008
KVM_EXIT_SYSTEM_EVENT = 24
KVM_SYSTEM_EVENT_SHUTDOWN = 1


def _movz(rd: int, imm16: int, shift: int, *, wide: bool = True) -> int:
    return (0xD280_0000 if wide else 0x5280_0000) | (shift // 16) << 21 | imm16 << 5 | rd


def _movk(rd: int, imm16: int, shift: int, *, wide: bool = True) -> int:
    return (0xF280_0000 if wide else 0x7280_0000) | (shift // 16) << 21 | imm16 << 5 | rd


def arm64_guest(n: int) -> bytes:
    """``n`` MMIO stores, then PSCI SYSTEM_OFF (Arm ARM C6: MOVZ/MOVK, STR (immediate), SUBS
    (immediate), B.cond, HVC; PSCI: DEN0022)::

        movz x1, #lo16(MMIO); movk x1, #hi16(MMIO), lsl #16
        movz x2, #lo16(n/16); movk x2, #hi16(n/16), lsl #16
    1:  str w0, [x1]   (16 times)
        subs x2, x2, #1
        b.ne 1b
        movz w0, #0x0008; movk w0, #0x8400, lsl #16; hvc #0
        b .
    """
    rounds = n // UNROLL
    words = [_movz(1, ARM64_MMIO_ADDR & 0xFFFF, 0), _movk(1, ARM64_MMIO_ADDR >> 16, 16),
             _movz(2, rounds & 0xFFFF, 0), _movk(2, rounds >> 16, 16)]
    loop = len(words)
    words += [0xB900_0020] * UNROLL  # str w0, [x1]
    words.append(0xF100_0442)  # subs x2, x2, #1
    back = (loop - len(words)) & 0x7FFFF  # imm19, in instructions
    words.append(0x5400_0001 | back << 5)  # b.ne 1b
    words += [_movz(0, PSCI_SYSTEM_OFF & 0xFFFF, 0, wide=False), _movk(0, PSCI_SYSTEM_OFF >> 16, 16, wide=False),
              0xD400_0002,  # hvc #0
              0x1400_0000]  # b .
    return struct.pack(f"<{len(words)}I", *words)


PURE_C_ARM64 = r"""
#include <fcntl.h>
#include <stddef.h>
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
        memcpy(ram, code, len);
        struct kvm_userspace_memory_region region = {
            .slot = 0, .guest_phys_addr = RAM_BASE, .memory_size = RAM_SIZE,
            .userspace_addr = (unsigned long)ram};
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
        int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
        if (vcpu < 0) die("KVM_CREATE_VCPU");
        struct kvm_vcpu_init init;
        if (ioctl(vm, KVM_ARM_PREFERRED_TARGET, &init) < 0) die("KVM_ARM_PREFERRED_TARGET");
        init.features[0] |= 1u << KVM_ARM_VCPU_PSCI_0_2;
        if (ioctl(vcpu, KVM_ARM_VCPU_INIT, &init) < 0) die("KVM_ARM_VCPU_INIT");
        unsigned long long pc = RAM_BASE;
        struct kvm_one_reg reg = {
            .id = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE |
                  (offsetof(struct kvm_regs, regs.pc) / sizeof(__u32)),
            .addr = (unsigned long)&pc};
        if (ioctl(vcpu, KVM_SET_ONE_REG, &reg) < 0) die("KVM_SET_ONE_REG(pc)");
        struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);

        struct timespec t0, t1, c0, c1;
        long exits = 0;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
            if (run->exit_reason == KVM_EXIT_MMIO) {
                exits++;
                continue;
            }
            if (run->exit_reason == KVM_EXIT_SYSTEM_EVENT &&
                run->system_event.type == KVM_SYSTEM_EVENT_SHUTDOWN)
                break;
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
        printf("%ld %lld %lld\n", exits,
               (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec),
               (long long)(c1.tv_sec - c0.tv_sec) * 1000000000LL + (c1.tv_nsec - c0.tv_nsec));
        fflush(stdout);
        munmap(run, mmap_size);
        munmap(ram, RAM_SIZE);
        close(vcpu);
        close(vm);
    }
    return 0;
}
"""


class CountingOps(NullOps):
    """:class:`NullOps` that counts the MMIO writes it was handed (the arm64 backend's proof
    that every exit reached Python)."""

    def __init__(self) -> None:
        self.writes = 0

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.writes += 1


def lab_sysroot() -> Path:
    """The newest AArch64 lab's sysroot (``lab.py`` extracts Debian's arm64 libc6-dev there)."""
    cache = Path(os.environ.get("VMMKIT_LAB_CACHE", Path.home() / ".cache" / "vmmkit-lab"))
    roots = sorted((cache / "aarch64").glob("system-*/sysroot"), key=lambda p: p.stat().st_mtime)
    if not roots:
        raise SystemExit(f"no AArch64 lab sysroot under {cache}: build the lab first (lab/lab.py build)")
    return roots[-1]


def run_vmmkit_arm64(code: bytes, *, callback: bool) -> tuple[int, float]:
    from vmmkit_kvm.arm64 import KvmArm64Hypervisor

    from vmmkit.aarch64 import CoreRegisters
    from vmmkit.hypervisor import ExitReason
    from vmmkit.memory import GuestMemory, MemoryRange

    hypervisor = KvmArm64Hypervisor()
    vm = hypervisor.create_vm("aarch64")
    memory = GuestMemory.allocate([MemoryRange(ARM64_RAM_BASE, RAM_SIZE)])
    ops = CountingOps()
    try:
        vm.add_memory_region(0, ARM64_RAM_BASE, RAM_SIZE, memory.host_address(ARM64_RAM_BASE, RAM_SIZE))
        memory.write(ARM64_RAM_BASE, code)
        vcpu: Any = vm.create_vcpu(0, ops)
        if callback:
            vcpu.callback_dispatch = True
        vcpu.set_core_registers(CoreRegisters(pc=ARM64_RAM_BASE))
        start = now()
        exit_ = vcpu.run()
        elapsed = now() - start
        if exit_.reason is not ExitReason.POWER_OFF:
            raise RuntimeError(f"guest stopped with {exit_}")
        counts = vcpu.exit_counts()  # {} from the ctypes loop before the cffi one
        if counts.get("mmio", ops.writes) != ops.writes:
            raise RuntimeError(f"the run loop counted {counts['mmio']} MMIO exits, the ops saw {ops.writes}")
        return ops.writes, elapsed
    finally:
        vm.close()
        memory.close()
        hypervisor.close()


KVM_ARM_PREFERRED_TARGET = _io(2, 0xAE, 0xAF, 32)
KVM_ARM_VCPU_INIT = _io(1, 0xAE, 0xAE, 32)
KVM_SET_ONE_REG = _io(1, 0xAE, 0xAC, 16)
ARM64_REG_PC = 0x6030_0000_0010_0000 | (8 * 32 // 4)  # KVM_REG_ARM64 | U64 | ARM_CORE | regs.pc


def run_plain_python_arm64(code: bytes) -> tuple[int, float]:
    """The arm64 VMM loop one would write with nothing but the standard library."""
    import ctypes

    ops = NullOps()
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    ram = mmap.mmap(-1, RAM_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ram[0 : len(code)] = code
    ram_addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("IIQQQ", 0, 0, ARM64_RAM_BASE, RAM_SIZE, ram_addr))
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    init = bytearray(32)
    fcntl.ioctl(vm, KVM_ARM_PREFERRED_TARGET, init)
    struct.pack_into("I", init, 4, struct.unpack_from("I", init, 4)[0] | 1 << 2)  # KVM_ARM_VCPU_PSCI_0_2
    fcntl.ioctl(vcpu, KVM_ARM_VCPU_INIT, bytes(init))
    pc = ctypes.c_uint64(ARM64_RAM_BASE)
    fcntl.ioctl(vcpu, KVM_SET_ONE_REG, struct.pack("QQ", ARM64_REG_PC, ctypes.addressof(pc)))
    size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    run = mmap.mmap(vcpu, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    ioctl, unpack_from = fcntl.ioctl, struct.unpack_from
    exits = 0
    start = now()
    try:
        while True:
            ioctl(vcpu, KVM_RUN, 0)
            reason = unpack_from("I", run, 8)[0]
            if reason == KVM_EXIT_MMIO:
                addr, data, length, is_write = unpack_from("Q8sIB", run, 32)
                if is_write:
                    ops.mmio_write(addr, data[:length])
                else:
                    run[40 : 40 + length] = ops.mmio_read(addr, length)
                exits += 1
            elif reason == KVM_EXIT_SYSTEM_EVENT and unpack_from("I", run, 32)[0] == KVM_SYSTEM_EVENT_SHUTDOWN:
                break
            else:
                raise RuntimeError(f"unexpected exit {reason}")
        return exits, now() - start
    finally:
        run.close()
        os.close(vcpu)
        os.close(vm)
        ram.close()
        os.close(kvm)


# -- main -------------------------------------------------------------------------------------


Runner = Callable[[], tuple[int, float]]
Paths = tuple[Path, dict[str, Path], list[tuple[str, dict[str, Runner | None]]]]


def x86_paths(n: int, pure_c: Path | None, work: Path) -> Paths:
    """The pure-C loop, the guests and vmmkit's paths on an x86-64 host."""
    binary = pure_c or build_pure_c(work)
    guests = {kind: assemble(src.replace("{n}", str(n)), work, kind) for kind, src in GUEST.items()}
    codes = {kind: path.read_bytes() for kind, path in guests.items()}
    return binary, guests, [
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


def arm64_paths(n: int, pure_c: Path | None, work: Path) -> Paths:
    """The same on an AArch64 host: MMIO only (no ports; no MMIO sink in the run loop)."""
    from vmmkit_kvm.arm64 import KvmArm64Vcpu

    binary = pure_c or build_pure_c(work, arch="aarch64")
    code = arm64_guest(n)
    guest = work / "mmio.bin"
    guest.write_bytes(code)
    paths: list[tuple[str, dict[str, Runner | None]]] = [
        ("vmmkit native sink (none on arm64)", {"pio": None, "mmio": None}),
        ("vmmkit Python dispatch (return)", {"pio": None, "mmio": lambda: run_vmmkit_arm64(code, callback=False)}),
    ]
    if hasattr(KvmArm64Vcpu, "callback_dispatch"):  # the ctypes backend before the cffi loop had none
        paths.append(("vmmkit Python dispatch (callback)",
                      {"pio": None, "mmio": lambda: run_vmmkit_arm64(code, callback=True)}))
    paths.append(("plain Python fcntl.ioctl loop", {"pio": None, "mmio": lambda: run_plain_python_arm64(code)}))
    return binary, {"mmio": guest}, paths


def write_json(path: str, arch: str, args: argparse.Namespace, n: int, started: float,
               rows: list[dict[str, Any]]) -> None:
    """One record of this run for the trend (``bench/results/*.json``, issue 20 item 6)."""
    import json

    record = {"bench": "exits", "arch": arch, "clock": args.clock, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": time.monotonic() - started, "exits": n,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"},
              "lab_qemu": os.environ.get("VMMKIT_LAB_QEMU"), "load": os.getloadavg(), "rows": rows}
    text = json.dumps(record, indent=1) + "\n"
    if path == "-":
        print("--- json ---\n" + text + "--- end json ---")
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(f"results: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=4000, help="exits per measurement (default 4000)")
    parser.add_argument("--repeat", type=int, default=15, help="rounds (each measures every path once)")
    parser.add_argument("--pure-c", type=Path, metavar="BINARY",
                        help="a pure-C loop built elsewhere (--build-pure-c), for a host without gcc (the labs)")
    parser.add_argument("--build-pure-c", type=Path, metavar="BINARY",
                        help="only build the pure-C loop (static) to BINARY, and exit")
    parser.add_argument("--arch", choices=("x86_64", "aarch64"), default=None,
                        help="with --build-pure-c: the loop's architecture (default: this host's)")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="measure only the paths whose label contains TEXT (and the pure-C loop)")
    parser.add_argument("--clock", choices=tuple(CLOCK), default="cpu",
                        help="cpu: the vCPU thread's CPU time per exit (default; steady on a loaded host); "
                             "wall: elapsed time")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the record here ('-': stdout; default: bench/results/exits-<arch>-<time>.json)")
    args = parser.parse_args(argv)
    machine = "aarch64" if platform.machine() in ("aarch64", "arm64") else platform.machine()
    if args.arch is not None and args.build_pure_c is None:
        parser.error("--arch only goes with --build-pure-c (the measurement runs on this host's architecture)")
    n = max(UNROLL, args.exits // UNROLL * UNROLL)
    if args.build_pure_c is not None:
        with tempfile.TemporaryDirectory(prefix="vmmkit-bench-") as tmp:
            shutil.copy(build_pure_c(Path(tmp), static=True, arch=args.arch or machine), args.build_pure_c)
        return 0
    if machine not in ("x86_64", "aarch64"):
        print(f"SKIPPED: no guest for a {machine} host")
        return 0
    started = time.monotonic()
    global now, pure_c_column
    now, pure_c_column = CLOCK[args.clock], 2 if args.clock == "cpu" else 1

    import logging

    import structlog

    # A program, not a library: keep the backend's debug events off the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    if machine == "aarch64":
        from vmmkit_kvm.arm64 import KvmArm64Hypervisor as Backend
        tools: tuple[str, ...] = ()
    else:
        from vmmkit_kvm.hypervisor import KvmHypervisor as Backend  # type: ignore[assignment]
        tools = ("as", "ld", "objcopy")
    availability = Backend.is_available()
    if not availability:
        print(f"SKIPPED: KVM is not usable here: {availability.reason}")
        return 0
    for tool in tools if args.pure_c or machine == "aarch64" else ("gcc", *tools):
        if shutil.which(tool) is None:
            print(f"SKIPPED: {tool} is needed")
            return 0
    if machine == "aarch64" and args.pure_c is None and shutil.which("aarch64-linux-gnu-gcc") is None \
            and shutil.which("gcc") is None:
        print("SKIPPED: no compiler for the pure-C loop here: build it elsewhere (--build-pure-c BINARY "
              "--arch aarch64) and pass --pure-c BINARY")
        return 0
    kinds = ("mmio",) if machine == "aarch64" else ("pio", "mmio")

    with tempfile.TemporaryDirectory(prefix="vmmkit-bench-") as tmp:
        work = Path(tmp)
        build = arm64_paths if machine == "aarch64" else x86_paths
        pure_c, guests, paths = build(n, args.pure_c, work)
        if args.only is not None:
            paths = [(label, runners) for label, runners in paths if args.only in label]
        samples: dict[tuple[str, str], list[float]] = {}
        ratios: dict[tuple[str, str], list[float]] = {}
        added: dict[tuple[str, str], list[float]] = {}
        rng = random.Random(1)

        def pure_c_runner(kind: str) -> Runner:
            return lambda: run_pure_c(pure_c, guests[kind], 1)[0]

        # Each round measures every path once, in a shuffled order, so that the host's load
        # (this is a shared, nested machine) hits them alike; ratios are taken within a round.
        for _ in range(args.repeat):
            jobs: list[tuple[str, str, Runner]] = []
            for kind in kinds:
                jobs.append((PURE_C_LABEL, kind, pure_c_runner(kind)))
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
                added.setdefault(key, []).append(per_exit - round_[(PURE_C_LABEL, key[1])])

    labels = [PURE_C_LABEL] + [label for label, _ in paths]
    guest = (f"AArch64 EL1, {UNROLL}x unrolled str to unbacked memory, PSCI SYSTEM_OFF" if machine == "aarch64"
             else f"16-bit, {UNROLL}x unrolled out/mov")
    print(f"KVM exits ({machine}): {n} per measurement, {args.repeat} rounds; guest: {guest}")
    print(f"us/exit ({args.clock} time): best [median] over the rounds; x C and +us: medians over the rounds")
    print("of the ratio to, and the time added over, the pure-C loop measured in the same round\n")
    cell = "{:>8} {:>9} {:>7} {:>7}"
    print(f"{'':36} | {'port I/O':^34} | {'MMIO':^34}")
    print(f"{'path':36} | " + cell.format("us/exit", "[median]", "x C", "+us") + " | "
          + cell.format("us/exit", "[median]", "x C", "+us"))
    print("-" * 112)
    rows: list[dict[str, Any]] = []
    for label in labels:
        cells = []
        for kind in ("pio", "mmio"):
            key = (label, kind)
            if key not in samples:
                cells.append(cell.format("n/a", "", "", ""))
                continue
            best, median = min(samples[key]), statistics.median(samples[key])
            ratio, plus = statistics.median(ratios[key]), statistics.median(added[key])
            cells.append(cell.format(f"{best * 1e6:.2f}", f"[{median * 1e6:.2f}]", f"{ratio:.2f}x",
                                     f"{plus * 1e6:+.2f}"))
            rows.append({"path": label, "kind": kind, "us_best": round(best * 1e6, 3),
                         "us_median": round(median * 1e6, 3), "x_c_median": round(ratio, 3),
                         "us_added_median": round(plus * 1e6, 3)})
        print(f"{label:36} | {cells[0]} | {cells[1]}")
    print("\ntargets (issue 20): the native sink adds <= 0.3 us per exit over pure C, Python dispatch <= 0.8 us")
    default = REPO / "bench" / "results" / time.strftime(f"exits-{machine}-%Y%m%dT%H%M%S.json")
    write_json(args.json or str(default), machine, args, n, started, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
