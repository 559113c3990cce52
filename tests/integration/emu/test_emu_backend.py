"""The emu backend driven directly: tiny x86 and AArch64 guests, port I/O, MMIO, kicks, PSCI
hand-off, exception delivery and atomics across vCPUs."""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import pytest

from vmmkit.aarch64 import Aarch64Vcpu, CoreRegisters, FirmwareCall, PowerState, SysReg, mpidr_for
from vmmkit.hypervisor import ExitReason
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.x86 import X86Vcpu

A64_RAM = 0x4000_0000
X86_RAM = 2 << 20
MMIO = 0x1000_0000


class Ops:
    """Records accesses; a write to port 0xf4 / address MMIO+0xf4 kicks the vCPU given."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, Any]] = []
        self.vcpu: Any = None
        self.read_value = 0x5A

    def pio_read(self, port: int, size: int) -> bytes:
        self.log.append(("pio_read", port, size))
        return self.read_value.to_bytes(size, "little")

    def pio_write(self, port: int, data: bytes) -> None:
        self.log.append(("pio_write", port, bytes(data)))
        if port == 0xF4:
            self.vcpu.kick()

    def mmio_read(self, addr: int, size: int) -> bytes:
        self.log.append(("mmio_read", addr, size))
        return (0x1122334455667788).to_bytes(8, "little")[:size]

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.log.append(("mmio_write", addr, bytes(data)))
        if addr == MMIO + 0xF4:
            self.vcpu.kick()


def run_until_kicked(vcpu: Any, timeout: float = 10.0) -> Any:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(vcpu.run()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        vcpu.kick()
        thread.join(5)
        pytest.fail("the vCPU did not stop by itself")
    return result[0]


@pytest.fixture
def x86(emu, x86_setup, assemble_with_symbols):
    made: list[tuple[Any, GuestMemory]] = []

    def make(source: str) -> tuple[Any, Ops, GuestMemory, dict[str, int]]:
        image = assemble_with_symbols(source, bits=64, base=0x1000)
        memory = GuestMemory.allocate([MemoryRange(0, X86_RAM)])
        vm = emu.create_vm("x86_64")
        vm.add_memory_region(0, 0, X86_RAM, memory.host_address(0, X86_RAM))
        memory.write(0x1000, image.code)
        ops = Ops()
        vcpu = vm.create_vcpu(0, ops)
        ops.vcpu = vcpu
        x86_setup.long_mode(vcpu, memory, entry=0x1000, stack=0x8000)
        made.append((vm, memory))
        return vcpu, ops, memory, image.symbols

    yield make
    for vm, memory in made:
        vm.close()
        memory.close()


@pytest.fixture
def a64(emu, arm64_assemble):
    made: list[tuple[Any, GuestMemory]] = []

    def make(source: str, vcpus: int = 1, handler: Any = None):
        code, symbols = arm64_assemble(source, A64_RAM)
        memory = GuestMemory.allocate([MemoryRange(A64_RAM, 4 << 20)])
        vm = emu.create_vm("aarch64")
        vm.add_memory_region(0, A64_RAM, 4 << 20, memory.host_address(A64_RAM, 4 << 20))
        memory.write(A64_RAM, code)
        if handler is not None:
            vm.set_firmware_handler(handler)
        ops = Ops()
        cpus = [vm.create_vcpu(i, ops) for i in range(vcpus)]
        ops.vcpu = cpus[0]
        for i, vcpu in enumerate(cpus):
            vcpu.set_core_registers(CoreRegisters(x=(i,), sp=A64_RAM + (3 << 20) - i * 0x1000, pc=A64_RAM))
        made.append((vm, memory))
        return vm, cpus, ops, memory, symbols

    yield make
    for vm, memory in made:
        vm.close()
        memory.close()


def test_emu_is_available_and_runs_both_architectures(emu) -> None:
    assert emu.is_available()
    assert emu.priority == 90
    assert set(emu.architectures) == {"x86_64", "aarch64"}


def test_x86_port_io_and_mmio_reach_the_ops(x86) -> None:
    vcpu, ops, _, _ = x86(f"""
        mov $0x12, %al
        outb %al, $0x80
        inw $0x60, %ax
        mov %eax, %ebx
        movabs ${MMIO + 8:#x}, %rsi
        movl (%rsi), %ecx
        movl $0xabcd, 4(%rsi)
        outb %al, $0xf4
        jmp .
    """)
    assert isinstance(vcpu, X86Vcpu)
    exit_ = run_until_kicked(vcpu)
    assert exit_.reason is ExitReason.INTERRUPTED
    assert ("pio_write", 0x80, b"\x12") in ops.log
    assert ("pio_read", 0x60, 2) in ops.log
    assert ("mmio_read", MMIO + 8, 4) in ops.log
    assert ("mmio_write", MMIO + 12, struct.pack("<I", 0xABCD)) in ops.log
    regs = vcpu.get_regs()
    assert regs.rbx & 0xFFFF == 0x5A and regs.rcx == 0x55667788


def test_x86_hlt_resumes_after_the_instruction(x86) -> None:
    vcpu, ops, _, _ = x86("hlt\n hlt\n mov $1, %al\n outb %al, $0xf4\n jmp .")
    assert run_until_kicked(vcpu).reason is ExitReason.INTERRUPTED
    assert vcpu.exit_counts()["halt"] == 2


def test_x86_exceptions_without_a_gate_end_the_run_naming_the_vector(x86) -> None:
    """The fixture's IDT has no present gates: an exception cannot be delivered (the CPU would
    triple-fault), so the run ends naming it."""
    vcpu, _, _, _ = x86("ud2")
    exit_ = run_until_kicked(vcpu)
    assert exit_.reason is ExitReason.INTERNAL_ERROR
    # unicorn reports #UD as an invalid instruction, other vectors through the interrupt hook
    assert "Invalid instruction" in exit_.detail and "0f 0b" in exit_.detail and "IDT" in exit_.detail


def test_a_kick_stops_a_spinning_vcpu_promptly(x86) -> None:
    vcpu, _, _, _ = x86("1: inc %rax\n jmp 1b")
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(vcpu.run()), daemon=True)
    thread.start()
    time.sleep(0.2)
    start = time.monotonic()
    vcpu.kick()
    thread.join(5)
    assert result and result[0].reason is ExitReason.INTERRUPTED
    assert time.monotonic() - start < 1.0
    assert vcpu.get_regs().rax > 1000
    vcpu.clear_kick()


def test_a_kick_before_run_is_not_lost(x86) -> None:
    vcpu, _, _, _ = x86("jmp .")
    vcpu.kick()
    assert vcpu.run().reason is ExitReason.INTERRUPTED


def test_x86_cpuid_comes_from_the_table_set(x86, emu) -> None:
    from vmmkit.x86 import CpuIdEntry

    vcpu, _, _, _ = x86("mov $0x40000000, %eax\n cpuid\n outb %al, $0xf4\n jmp .")
    supported = emu.supported_cpuid()
    assert any(entry.function == 0 for entry in supported)
    vcpu.set_cpuid([*supported, CpuIdEntry(0x4000_0000, ebx=0x766D6D6B)])
    run_until_kicked(vcpu)
    assert vcpu.get_regs().rbx == 0x766D6D6B


def test_arm64_hvc_goes_to_the_firmware_handler(a64) -> None:
    calls: list[FirmwareCall] = []

    class Handler:
        def firmware_call(self, call: FirmwareCall):
            calls.append(call)
            return (0x10000, 7) if call.function == 0x8400_0000 else None

    _, (vcpu,), _, _, _ = a64(f"""
        movz x0, #0x8400, lsl #16
        mov x1, #11
        hvc #0
        mov x20, x0
        mov x21, x1
        movz x0, #0x8600, lsl #16
        hvc #0
        mov x22, x0
        mrs x23, mpidr_el1
        ldr x9, ={MMIO + 0xF4:#x}
        str w0, [x9]
        b .
    """, handler=Handler())
    assert isinstance(vcpu, Aarch64Vcpu)
    assert run_until_kicked(vcpu).reason is ExitReason.INTERRUPTED
    regs = vcpu.get_core_registers()
    assert regs.x[20:23] == (0x10000, 7, (1 << 64) - 1)
    assert regs.x[23] == mpidr_for(0)
    assert calls[0] == FirmwareCall(0, "hvc", 0x8400_0000, (11, 0, 0, 0, 0, 0, 0))


def test_arm64_svc_is_delivered_to_the_guest_vectors(a64) -> None:
    _, (vcpu,), _, _, symbols = a64(f"""
        ldr x1, =vectors
        msr vbar_el1, x1
        isb
        svc #0x42
        b .
        .balign 2048
    vectors:
        .skip 0x200
        mrs x2, esr_el1
        mrs x3, elr_el1
        ldr x9, ={MMIO + 0xF4:#x}
        str w0, [x9]
        b .
    """)
    assert run_until_kicked(vcpu).reason is ExitReason.INTERRUPTED
    regs = vcpu.get_core_registers()
    assert regs.x[2] >> 26 == 0x15 and regs.x[2] & 0xFFFF == 0x42
    assert regs.x[3] == A64_RAM + 16  # the instruction after the SVC
    assert vcpu.get_sys_reg(SysReg.VBAR_EL1) == symbols["vectors"]


def test_arm64_power_off_and_on(a64) -> None:
    _, (vcpu,), _, _, _ = a64(f"""
        ldr x9, ={MMIO + 0xF4:#x}
        str w0, [x9]
        b .
    """)
    vcpu.power_off()
    assert vcpu.power_state() is PowerState.OFF
    vcpu.power_on(A64_RAM, 0x77)
    assert run_until_kicked(vcpu).reason is ExitReason.INTERRUPTED
    assert vcpu.get_core_registers().x[0] == 0x77


def test_arm64_atomics_are_atomic_across_vcpus(a64) -> None:
    """Two vCPUs increment one counter 20000 times each with LDXR/STXR: none is lost (the
    vCPUs take turns, so unicorn's non-atomic exclusives cannot race)."""
    vm, cpus, ops, memory, symbols = a64("""
        ldr x1, =counter
        ldr x3, =done
        mov x2, #20000
    1:  ldxr x4, [x1]
        add x4, x4, #1
        stxr w5, x4, [x1]
        cbnz w5, 1b
        subs x2, x2, #1
        b.ne 1b
    2:  ldxr x4, [x3]
        add x4, x4, #1
        stxr w5, x4, [x3]
        cbnz w5, 2b
    3:  wfi
        b 3b
        .balign 64
    counter: .quad 0
    done: .quad 0
    """, vcpus=2)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda v=v: results.append(v.run()), daemon=True) for v in cpus]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while memory.read_u64(symbols["done"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    for vcpu in cpus:
        vcpu.kick()
    for thread in threads:
        thread.join(5)
    assert memory.read_u64(symbols["done"]) == 2
    assert memory.read_u64(symbols["counter"]) == 40000


def test_firmware_calls_survive_turns_and_kicks(a64) -> None:
    """Two vCPUs make 4000 PSCI calls each while they take short turns (each turn ends with
    an emu_stop from the other thread): every call is answered once and the instruction before
    each hvc runs exactly once. (The AArch64 boot tests are the sharper check of the hook race
    the backend avoids by answering firmware calls outside its hooks: before that, one boot in
    three of the 2-vCPU test guest went wrong.)"""

    class Handler:
        def firmware_call(self, call: FirmwareCall):
            return (0x10000,)

    vm, cpus, ops, memory, symbols = a64("""
        ldr x20, =count
        add x20, x20, x0, lsl #3
        movz x23, #0x8400, lsl #16
        mov x21, #0
    1:  movz x0, #0x8400, lsl #16
        mov x14, x0
        hvc #0
        cmp x14, x23
        b.ne bad
        add x21, x21, #1
        str x21, [x20]
        mov x9, #4000
        cmp x21, x9
        b.ne 1b
    2:  wfi
        b 2b
    bad:
        ldr x9, =failed
        str x14, [x9]
        b .
        .balign 64
    count: .quad 0, 0
    failed: .quad 0
    """, vcpus=2, handler=Handler())
    vm.token._slice = 0.0005  # many turns, many stops from the other thread
    threads = [threading.Thread(target=v.run, daemon=True) for v in cpus]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    done = lambda: all(memory.read_u64(symbols["count"] + 8 * i) == 4000 for i in range(2))  # noqa: E731
    while not done() and not memory.read_u64(symbols["failed"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    for vcpu in cpus:
        vcpu.kick()
    for thread in threads:
        thread.join(5)
    assert memory.read_u64(symbols["failed"]) == 0
    assert done()
