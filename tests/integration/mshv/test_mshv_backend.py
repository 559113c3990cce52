"""The MSHV backend driven directly with tiny guests, on the simulated /dev/mshv.

CONTRACT TESTS: the production backend (bindings, run loop, intercept decoding, MMIO
emulation) against the simulated kernel; nothing here ran on the Microsoft Hypervisor."""

from __future__ import annotations

import os
import threading
from typing import Any

import attrs
import pytest

from vmmkit.hypervisor import ExitReason
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.x86 import CpuIdEntry, MsrEntry, StandardRegisters

RAM = 2 << 20
MMIO = 0x1000_0000


class Ops:
    """Records accesses; reads answer from ``reads``; a write to port 0xf4 kicks the vCPU."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, Any]] = []
        self.vcpu: Any = None

    def pio_read(self, port: int, size: int) -> bytes:
        self.log.append(("pio_read", port, size))
        return (0xA1B2C3D4).to_bytes(4, "little")[:size]

    def pio_write(self, port: int, data: bytes) -> None:
        self.log.append(("pio_write", port, bytes(data)))
        if port == 0xF4:
            self.vcpu.kick()

    def mmio_read(self, addr: int, size: int) -> bytes:
        self.log.append(("mmio_read", addr, size))
        return (0x1122334455667788).to_bytes(8, "little")[:size]

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.log.append(("mmio_write", addr, bytes(data)))


def run(vcpu: Any, timeout: float = 20.0) -> Any:
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
def guest(simulated_mshv: Any, x86_setup: Any, assemble_with_symbols: Any) -> Any:
    made: list[tuple[Any, GuestMemory]] = []

    def make(source: str, *, bits: int = 64, log_dirty: bool = False, extra: Any = None) -> Any:
        image = assemble_with_symbols(source, bits=bits, base=0x1000)
        memory = GuestMemory.allocate([MemoryRange(0, RAM)])
        vm = simulated_mshv.create_vm("x86_64")
        vm.add_memory_region(0, 0, RAM, memory.host_address(0, RAM), log_dirty=log_dirty)
        if extra is not None:
            extra(vm)
        memory.write(0x1000, image.code)
        ops = Ops()
        vcpu = vm.create_vcpu(0, ops)
        ops.vcpu = vcpu
        if bits == 64:
            x86_setup.long_mode(vcpu, memory, entry=0x1000, stack=0x8000)
        else:
            x86_setup.protected_mode(vcpu, memory, entry=0x1000, stack=0x8000)
        made.append((vm, memory))
        return vm, vcpu, ops, memory, image.symbols

    yield make
    for vm, memory in made:
        vm.close()
        memory.close()


def test_port_io_of_every_size_reaches_the_ops_and_in_merges_into_rax(guest: Any) -> None:
    _, vcpu, ops, _, _ = guest("""
        mov $0x12345678, %eax
        outb %al, $0x80
        outw %ax, $0x82
        outl %eax, $0x84
        mov $0x3f8, %dx
        mov $0xffffffff, %ebx
        mov %ebx, %eax
        inb %dx, %al
        mov %eax, %esi
        mov %ebx, %eax
        inw %dx, %ax
        mov %eax, %edi
        mov %ebx, %eax
        inl %dx, %eax
        mov %eax, %ecx
        outb %al, $0xf4
    1:  jmp 1b
    """)
    assert run(vcpu).reason is ExitReason.INTERRUPTED
    assert ops.log == [
        ("pio_write", 0x80, b"\x78"), ("pio_write", 0x82, b"\x78\x56"), ("pio_write", 0x84, b"\x78\x56\x34\x12"),
        ("pio_read", 0x3F8, 1), ("pio_read", 0x3F8, 2), ("pio_read", 0x3F8, 4), ("pio_write", 0xF4, b"\xd4"),
    ]
    regs = vcpu.get_regs()
    assert regs.rsi & 0xFFFF_FFFF == 0xFFFF_FFD4  # IN AL keeps the rest of EAX
    assert regs.rdi & 0xFFFF_FFFF == 0xFFFF_C3D4
    assert regs.rcx & 0xFFFF_FFFF == 0xA1B2_C3D4


def test_mmio_of_every_access_size_is_decoded_and_completed(guest: Any) -> None:
    _, vcpu, ops, _, _ = guest(f"""
        mov ${MMIO:#x}, %ebx
        movb $0x5a, (%rbx)
        movw $0x1234, 2(%rbx)
        movl $0xcafef00d, 4(%rbx)
        mov $0x05060708, %eax
        mov %rax, 8(%rbx)
        movzbl 16(%rbx), %ecx
        movzwl 18(%rbx), %edx
        mov 20(%rbx), %esi
        mov 24(%rbx), %rdi
        outb %al, $0xf4
    1:  jmp 1b
    """)
    assert run(vcpu).reason is ExitReason.INTERRUPTED
    # 64-bit values: the engine keeps only the low halves of registers (vmmkit_emu.x86), so the
    # 8-byte accesses carry values below 2**32
    assert ops.log[:8] == [
        ("mmio_write", MMIO, b"\x5a"), ("mmio_write", MMIO + 2, b"\x34\x12"),
        ("mmio_write", MMIO + 4, b"\x0d\xf0\xfe\xca"), ("mmio_write", MMIO + 8, b"\x08\x07\x06\x05\0\0\0\0"),
        ("mmio_read", MMIO + 16, 1), ("mmio_read", MMIO + 18, 2), ("mmio_read", MMIO + 20, 4),
        ("mmio_read", MMIO + 24, 8),
    ]
    regs = vcpu.get_regs()
    assert (regs.rcx, regs.rdx, regs.rsi) == (0x88, 0x7788, 0x55667788)
    # the engine runs guests with 32-bit registers (vmmkit_emu.x86): the low half is checked
    assert regs.rdi & 0xFFFF_FFFF == 0x55667788


def test_registers_round_trip_through_the_hypercalls(guest: Any) -> None:
    _, vcpu, _, _, _ = guest("hlt")
    regs = StandardRegisters(rax=1, rbx=2, rcx=3, rdx=4, rsi=5, rdi=6, rsp=0x7000, rbp=8, rip=0x1000, rflags=0x202)
    vcpu.set_regs(regs)
    assert vcpu.get_regs() == regs
    sregs = vcpu.get_sregs()
    assert sregs.cs.selector == 0x08 and sregs.efer & 0x500 == 0x500 and sregs.cr3 == 0x9000
    vcpu.set_sregs(attrs.evolve(sregs, cr2=0xDEAD000))
    assert vcpu.get_sregs().cr2 == 0xDEAD000
    vcpu.set_msrs([MsrEntry(0xC000_0082, 0x1234_5000), MsrEntry(0x4B56_4D00, 77)])
    assert vcpu.get_msrs([0xC000_0082, 0x4B56_4D00]) == [MsrEntry(0xC000_0082, 0x1234_5000),
                                                          MsrEntry(0x4B56_4D00, 77)]


def test_hlt_is_a_halt_exit_and_the_guest_continues_after_it(guest: Any) -> None:
    _, vcpu, ops, _, _ = guest("""
        hlt
        outb %al, $0xf4
    1:  jmp 1b
    """)
    assert run(vcpu).reason is ExitReason.HLT
    assert run(vcpu).reason is ExitReason.INTERRUPTED
    assert ops.log == [("pio_write", 0xF4, b"\x00")]


def test_cpuid_is_answered_from_the_table_through_the_cpuid_intercept(guest: Any) -> None:
    _, vcpu, _, _, _ = guest("""
        mov $0x40000000, %eax
        xor %ecx, %ecx
        cpuid
        outb %al, $0xf4
    1:  jmp 1b
    """)
    vcpu.set_cpuid([CpuIdEntry(0x4000_0000, eax=0x4000_0001, ebx=0x6B6D6D76, ecx=0x74696B6D, edx=0x6873766D)])
    assert run(vcpu).reason is ExitReason.INTERRUPTED
    regs = vcpu.get_regs()
    assert (regs.rbx, regs.rcx, regs.rdx) == (0x6B6D6D76, 0x74696B6D, 0x6873766D)


def test_a_kick_stops_a_spinning_vcpu(guest: Any) -> None:
    _, vcpu, _, _, _ = guest("1: jmp 1b")
    threading.Timer(0.2, vcpu.kick).start()
    assert run(vcpu).reason is ExitReason.INTERRUPTED
    vcpu.clear_kick()
    threading.Timer(0.2, vcpu.kick).start()
    assert run(vcpu).reason is ExitReason.INTERRUPTED


def test_an_ioeventfd_write_signals_the_eventfd_and_is_not_an_mmio_exit(guest: Any) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        _, vcpu, ops, _, _ = guest(f"""
            mov ${MMIO:#x}, %ebx
            movl $7, 0x50(%rbx)
            movl $8, 0x54(%rbx)
            outb %al, $0xf4
        1:  jmp 1b
        """, extra=lambda vm: vm.register_ioeventfd(efd, MMIO + 0x50, pio=False, length=4))
        assert run(vcpu).reason is ExitReason.INTERRUPTED
        assert os.eventfd_read(efd) == 1
        assert ops.log == [("mmio_write", MMIO + 0x54, b"\x08\0\0\0"), ("pio_write", 0xF4, b"\x00")]
    finally:
        os.close(efd)


def test_port_ioeventfds_are_refused_as_the_kernel_does(guest: Any) -> None:
    vm, _, _, _, _ = guest("hlt")
    with pytest.raises(NotImplementedError, match="EOPNOTSUPP"):
        vm.register_ioeventfd(0, 0x3F8, pio=True)


def test_dirty_pages_are_reported_once(guest: Any) -> None:
    vm, vcpu, _, _, _ = guest("""
        movl $1, 0x40000
        movl $1, 0x42000
        outb %al, $0xf4
    1:  jmp 1b
    """, log_dirty=True)
    vm.get_dirty_log(0)  # forget what set-up wrote
    assert run(vcpu).reason is ExitReason.INTERRUPTED
    bitmap = vm.get_dirty_log(0)
    dirty = {i for i in range(RAM // 0x1000) if bitmap[i // 8] >> (i % 8) & 1}
    assert {0x40, 0x42} <= dirty
    assert not vm.get_dirty_log(0)[0x40 // 8] & 1  # cleared by the read


def test_the_local_apic_state_round_trips(guest: Any) -> None:
    _, vcpu, _, _, _ = guest("hlt")
    page = bytearray(vcpu.get_lapic())
    assert page[0x23] == 0  # APIC ID 0 in bits 31:24
    page[0x350:0x354] = (0x700).to_bytes(4, "little")  # LINT0: ExtINT
    vcpu.set_lapic(bytes(page))
    assert vcpu.get_lapic()[0x350:0x354] == (0x700).to_bytes(4, "little")


def test_msi_routes_and_irqfds_reach_the_hypervisor(guest: Any) -> None:
    vm, _, _, _, _ = guest("hlt")
    efd = os.eventfd(0)
    try:
        vm.set_msi_route(40, 0xFEE0_0000, 0x31)
        vm.register_irqfd(efd, 40)
        os.eventfd_write(efd, 1)
        from vmmkit_mshv.simulator import simulated_kernel

        partition = next(p for p in simulated_kernel()._fds.values() if getattr(p, "id", None) is not None
                         and p.msi_routes.get(40) == (0xFEE0_0000, 0x31))
        for _ in range(100):
            if (0x31, 0, 0) in partition.asserted:
                break
            threading.Event().wait(0.02)
        assert (0x31, 0, 0) in partition.asserted
        vm.signal_msi(0xFEE0_0000, 0x4_32)  # NMI delivery mode
        assert (0x32, 0, 4) in partition.asserted
        vm.unregister_irqfd(efd, 40)
    finally:
        os.close(efd)


def test_a_vmm_that_does_not_complete_a_port_intercept_is_caught(guest: Any) -> None:
    """A deliberately broken VMM: it runs the VP again without stepping past the OUT."""
    from vmmkit_mshv.bindings import MessageType, MshvError

    _, vcpu, _, _, _ = guest("""
        outb %al, $0x80
    1:  jmp 1b
    """)
    intercept = vcpu.fd.run()
    assert intercept.kind is MessageType.X64_IO_PORT_INTERCEPT and intercept.port == 0x80
    assert intercept.length == 2 and intercept.write
    with pytest.raises(MshvError, match="MSHV_RUN_VP.*did not step RIP past it"):
        vcpu.fd.run()


def test_port_sinks_are_served_by_the_c_loop(guest: Any) -> None:
    """Writes to a sink port go to its fd without reaching the ops; reads answer its value; the
    loop completes them through the register page."""
    from vmmkit.hypervisor import PortSink

    read_end, write_end = os.pipe()
    try:
        vm, vcpu, ops, _, _ = guest("""
            mov $0x3f8, %dx
            mov $'h', %al
            outb %al, %dx
            mov $'i', %al
            outb %al, %dx
            inb %dx, %al
            mov %eax, %esi
            outb %al, $0xf4
        1:  jmp 1b
        """)
        assert vm.add_port_sink(PortSink(port=0x3F8, fd=write_end, read_value=0x42))
        assert not vm.add_port_sink(PortSink(port=0x80, fd=write_end, timestamp=True))  # left to the device
        assert run(vcpu).reason is ExitReason.INTERRUPTED
        assert os.read(read_end, 16) == b"hi"
        assert ops.log == [("pio_write", 0xF4, b"\x42")]
        assert vcpu.get_regs().rsi & 0xFF == 0x42
        counts = vcpu.exit_counts()
        assert counts["native_sink_writes"] == 2 and counts["native_sink_reads"] == 1
        vm.remove_port_sink(0x3F8)
    finally:
        os.close(read_end)
        os.close(write_end)
