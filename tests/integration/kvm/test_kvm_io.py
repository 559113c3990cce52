"""Port and MMIO accesses reach VcpuOps with the right address, size and data; IN data and
MMIO read data get back into the guest; string I/O; natively served port sinks."""

from __future__ import annotations

import os

import pytest
from kvm_testlib import DONE_PORT, MMIO_BASE, RecordingOps

from vmmkit.hypervisor import ExitReason, PortSink

pytestmark = pytest.mark.requires_kvm

DONE = f"out %al, ${DONE_PORT:#x}\n hlt\n"


def test_hlt_without_irqchip_is_an_exit(make_guest) -> None:
    guest = make_guest("mov $0x1234, %rbx\n hlt")
    exit_ = guest.run()
    assert exit_.reason is ExitReason.HLT
    assert guest.vcpu.get_regs().rbx == 0x1234
    assert guest.vcpu.exit_counts()["hlt"] == 1


def test_port_writes_of_each_size(make_guest, callback) -> None:
    guest = make_guest(
        """
        mov $0x11, %al
        out %al, $0x70
        mov $0x2233, %ax
        mov $0x3f8, %dx
        out %ax, %dx
        mov $0x44556677, %eax
        mov $0xcfc, %dx
        out %eax, %dx
        """ + DONE,
        callback=callback,
    )
    guest.run_to_done()
    assert guest.ops.of("pio_write")[:3] == [
        (0x70, b"\x11"),
        (0x3F8, b"\x33\x22"),
        (0xCFC, b"\x77\x66\x55\x44"),
    ]
    assert guest.vcpu.exit_counts()["io"] == 4


def test_port_reads_of_each_size_return_data_to_the_guest(make_guest, callback) -> None:
    ops = RecordingOps(reads={0x71: b"\xab", 0x1f0: b"\x34\x12", 0xcfc: b"\x78\x56\x34\x12"})
    guest = make_guest(
        """
        xor %eax, %eax
        in $0x71, %al
        mov %eax, 0x3000
        mov $0x1f0, %dx
        in %dx, %ax
        mov %ax, 0x3004
        mov $0xcfc, %dx
        in %dx, %eax
        mov %eax, 0x3008
        mov %eax, %ebx
        in $0x99, %al
        mov %al, 0x300c
        """ + DONE,
        ops=ops,
        callback=callback,
    )
    guest.run_to_done()
    assert [port for port, _ in ops.of("pio_read")] == [0x71, 0x1F0, 0xCFC, 0x99]
    assert guest.memory.read_u32(0x3000) == 0xAB
    assert guest.memory.read_u16(0x3004) == 0x1234
    assert guest.memory.read_u32(0x3008) == 0x12345678
    assert guest.memory.read_u8(0x300C) == 0xFF  # unclaimed ports read as ones
    assert guest.vcpu.get_regs().rbx == 0x12345678


def test_mmio_writes_of_each_size(make_guest, callback) -> None:
    guest = make_guest(
        f"""
        mov ${MMIO_BASE:#x}, %rdi
        movb $0x11, (%rdi)
        movw $0x2233, 0x10(%rdi)
        movl $0x44556677, 0x20(%rdi)
        mov $0x8899aabbccddeeff, %rax
        mov %rax, 0x30(%rdi)
        """ + DONE,
        callback=callback,
    )
    guest.run_to_done()
    assert guest.ops.of("mmio_write") == [
        (MMIO_BASE, b"\x11"),
        (MMIO_BASE + 0x10, b"\x33\x22"),
        (MMIO_BASE + 0x20, b"\x77\x66\x55\x44"),
        (MMIO_BASE + 0x30, bytes.fromhex("ffeeddccbbaa9988")),
    ]
    assert guest.vcpu.exit_counts()["mmio"] == 4


def test_mmio_reads_of_each_size_return_data_to_the_guest(make_guest, callback) -> None:
    ops = RecordingOps(
        mmio_reads={
            MMIO_BASE: b"\x5a",
            MMIO_BASE + 0x10: b"\xcd\xab",
            MMIO_BASE + 0x20: b"\x04\x03\x02\x01",
            MMIO_BASE + 0x30: bytes(range(1, 9)),
        }
    )
    guest = make_guest(
        f"""
        mov ${MMIO_BASE:#x}, %rdi
        movzbl (%rdi), %eax
        mov %eax, 0x3000
        movzwl 0x10(%rdi), %eax
        mov %eax, 0x3004
        mov 0x20(%rdi), %eax
        mov %eax, 0x3008
        mov 0x30(%rdi), %rax
        mov %rax, 0x3010
        mov %rax, %r12
        """ + DONE,
        ops=ops,
        callback=callback,
    )
    guest.run_to_done()
    assert [(a, len(d)) for a, d in ops.of("mmio_read")] == [
        (MMIO_BASE, 1), (MMIO_BASE + 0x10, 2), (MMIO_BASE + 0x20, 4), (MMIO_BASE + 0x30, 8)
    ]
    mem = guest.memory
    assert (mem.read_u32(0x3000), mem.read_u32(0x3004), mem.read_u32(0x3008)) == (0x5A, 0xABCD, 0x01020304)
    assert mem.read_u64(0x3010) == 0x0807060504030201
    assert guest.vcpu.get_regs().r12 == 0x0807060504030201


def test_string_port_output_delivers_each_element_in_order(make_guest, callback) -> None:
    guest = make_guest(
        """
        cld
        lea msg(%rip), %rsi
        mov $0xe9, %dx
        mov $11, %rcx
        rep outsb
        lea words(%rip), %rsi
        mov $0x3f8, %dx
        mov $3, %rcx
        rep outsw
        """ + DONE + """
        msg: .ascii "hello world"
        words: .word 0x0102, 0x0304, 0x0506
        """,
        callback=callback,
    )
    guest.run_to_done()
    writes = guest.ops.of("pio_write")
    assert b"".join(d for p, d in writes if p == 0xE9) == b"hello world"
    assert all(len(d) == 1 for p, d in writes if p == 0xE9)
    assert [d for p, d in writes if p == 0x3F8] == [b"\x02\x01", b"\x04\x03", b"\x06\x05"]
    # (KVM's emulator exits once per element for OUTS; INS is read ahead in batches)


def test_string_port_input_fills_guest_memory(make_guest, callback) -> None:
    counter = iter(range(1, 1000))
    ops = RecordingOps(reads={0x60: lambda size: next(counter).to_bytes(size, "little")})
    guest = make_guest(
        """
        cld
        mov $0x3000, %rdi
        mov $0x60, %dx
        mov $8, %rcx
        rep insb
        mov $0x3010, %rdi
        mov $3, %rcx
        rep insl
        """ + DONE,
        ops=ops,
        callback=callback,
    )
    guest.run_to_done()
    assert guest.memory.read(0x3000, 8) == bytes(range(1, 9))
    assert [guest.memory.read_u32(0x3010 + 4 * i) for i in range(3)] == [9, 10, 11]
    assert len(ops.of("pio_read")) == 11
    print(guest.vcpu.exit_counts())
    # INS is batched: one exit (KVM_EXIT_IO with count > 1) serves several elements
    assert guest.vcpu.exit_counts()["io"] < 11 + 1


def test_port_sink_serves_writes_and_reads_natively(make_guest) -> None:
    guest = make_guest(
        """
        lea msg(%rip), %rsi
        mov $0xe9, %dx
        mov $5, %rcx
        rep outsb
        mov $'!', %al
        out %al, $0xe9
        in $0xe9, %al
        mov %al, 0x3000
        """ + DONE + """
        msg: .ascii "hello"
        """
    )
    read_fd, write_fd = os.pipe()
    try:
        assert guest.vm.add_port_sink(PortSink(port=0xE9, fd=write_fd, read_value=0xE9)) is True
        assert guest.vm.add_port_sink(PortSink(port=0xE9, fd=write_fd)) is False  # taken
        guest.run_to_done()
        assert os.read(read_fd, 100) == b"hello!"
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert guest.memory.read_u8(0x3000) == 0xE9
    counts = guest.vcpu.exit_counts()
    assert counts["io-native"] >= 3 and counts["io"] == 1  # only the done port reached Python
    assert [p for p, _ in guest.ops.of("pio_write")] == [DONE_PORT]


def test_timestamped_sink_writes_one_line_per_byte(make_guest) -> None:
    guest = make_guest("mov $0x12, %al\n out %al, $0x80\n mov $0xab, %al\n out %al, $0x80\n" + DONE)
    read_fd, write_fd = os.pipe()
    try:
        guest.vm.add_port_sink(PortSink(port=0x80, fd=write_fd, timestamp=True, label="post"))
        guest.run_to_done()
        lines = os.read(read_fd, 1000).decode().splitlines()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert len(lines) == 2
    assert lines[0].endswith("] post 0x12") and lines[1].endswith("] post 0xab")
    stamp = lines[0][1 : lines[0].index("]")]
    seconds, micros = stamp.split(".")
    assert seconds.isdigit() and len(micros) == 6


def test_removed_sink_goes_back_to_ops(make_guest) -> None:
    guest = make_guest("mov $1, %al\n out %al, $0xe9\n" + DONE)
    read_fd, write_fd = os.pipe()
    try:
        guest.vm.add_port_sink(PortSink(port=0xE9, fd=write_fd))
        guest.vm.remove_port_sink(0xE9)
        guest.run_to_done()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert guest.ops.of("pio_write")[0] == (0xE9, b"\x01")


def test_coalesced_pio_to_a_sink_is_drained_natively(make_guest) -> None:
    guest = make_guest(
        """
        mov $'a', %al
        out %al, $0x80
        mov $'b', %al
        out %al, $0x80
        mov $'c', %al
        out %al, $0x80
        """ + DONE
    )
    read_fd, write_fd = os.pipe()
    try:
        guest.vm.add_port_sink(PortSink(port=0x80, fd=write_fd))
        guest.vm.register_coalesced_pio(0x80, 1)
        guest.run_to_done()
        assert os.read(read_fd, 100) == b"abc"
    finally:
        os.close(read_fd)
        os.close(write_fd)
    counts = guest.vcpu.exit_counts()
    assert counts["coalesced-native"] == 3
    assert counts["io-native"] == 0


def test_coalesced_mmio_reaches_ops_in_order_before_the_next_exit(make_guest, callback) -> None:
    guest = make_guest(
        f"""
        mov ${MMIO_BASE:#x}, %rdi
        movl $1, (%rdi)
        movl $2, 4(%rdi)
        movw $3, 8(%rdi)
        mov $7, %al
        out %al, $0x70
        """ + DONE,
        callback=callback,
    )
    guest.vm.register_coalesced_mmio(MMIO_BASE, 0x1000)
    guest.run_to_done()
    events = guest.ops.events
    assert events[:4] == [
        ("mmio_write", MMIO_BASE, b"\x01\x00\x00\x00"),
        ("mmio_write", MMIO_BASE + 4, b"\x02\x00\x00\x00"),
        ("mmio_write", MMIO_BASE + 8, b"\x03\x00"),
        ("pio_write", 0x70, b"\x07"),
    ]
    assert guest.vcpu.exit_counts()["coalesced"] == 3
    assert guest.vcpu.exit_counts()["mmio"] == 0


def test_an_exception_in_ops_propagates_from_run(make_guest, callback) -> None:
    class Boom(Exception):
        pass

    class FailingOps(RecordingOps):
        def pio_write(self, port: int, data: bytes) -> None:
            if port == 0x70:
                raise Boom("device failed")
            super().pio_write(port, data)

    guest = make_guest("out %al, $0x70\n" + DONE, ops=FailingOps(), callback=callback)
    with pytest.raises(Boom):
        guest.run()
    guest.run_to_done()  # the vCPU goes on after the failed access
