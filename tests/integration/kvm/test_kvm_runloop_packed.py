"""The run loop's fast Python path (issue 20 item 5): a single access comes back packed in
``vmk_vcpu_run()``'s return value with its data in ``vmk_exit.buf``, and a read's answer reaches
the guest at the next run; vCPUs sync only the general registers unless asked for more."""

from __future__ import annotations

import pytest
from kvm_testlib import DONE_PORT, MMIO_BASE, RecordingOps
from vmmkit_kvm import bindings

from vmmkit.hypervisor import ExitReason

pytestmark = pytest.mark.requires_kvm

DONE = f"out %al, ${DONE_PORT:#x}\n hlt\n"


class Boom(Exception):
    pass


def test_a_read_whose_device_raised_reads_as_ones_after_the_next_run(make_guest, callback) -> None:
    class FailingOnce(RecordingOps):
        failed = False

        def pio_read(self, port: int, size: int) -> bytes:
            if port == 0x71 and not self.failed:
                self.failed = True
                raise Boom("device failed")
            return super().pio_read(port, size)

        def mmio_read(self, addr: int, size: int) -> bytes:
            if addr == MMIO_BASE and not self.failed:
                self.failed = True
                raise Boom("device failed")
            return super().mmio_read(addr, size)

    ops = FailingOnce(reads={0x71: b"\x12"}, mmio_reads={MMIO_BASE: b"\x34\x12"})
    guest = make_guest(
        """
        mov $0x5a, %al
        in $0x71, %al
        mov %al, 0x3000
        in $0x71, %al
        mov %al, 0x3001
        """ + DONE,
        ops=ops,
        callback=callback,
    )
    with pytest.raises(Boom):
        guest.run()
    guest.run_to_done()
    assert guest.memory.read_u8(0x3000) == 0xFF  # the failed read: ones, not the old AL
    assert guest.memory.read_u8(0x3001) == 0x12  # the next one is answered as usual

    ops = FailingOnce(mmio_reads={MMIO_BASE: b"\x34\x12"})
    guest = make_guest(
        f"""
        mov $0x5a5a, %ax
        movw ({MMIO_BASE:#x}), %ax
        mov %ax, 0x3000
        movw ({MMIO_BASE:#x}), %ax
        mov %ax, 0x3002
        """ + DONE,
        ops=ops,
        callback=callback,
    )
    with pytest.raises(Boom):
        guest.run()
    guest.run_to_done()
    assert guest.memory.read_u16(0x3000) == 0xFFFF
    assert guest.memory.read_u16(0x3002) == 0x1234


def test_eight_byte_mmio_goes_both_ways_through_the_packed_buffer(make_guest, callback) -> None:
    ops = RecordingOps(mmio_reads={MMIO_BASE + 8: bytes(range(1, 9))})
    guest = make_guest(
        f"""
        mov $0x1122334455667788, %rax
        mov %rax, {MMIO_BASE:#x}
        mov {MMIO_BASE + 8:#x}, %rbx
        mov %rbx, 0x3000
        """ + DONE,
        ops=ops,
        callback=callback,
    )
    guest.run_to_done()
    assert ops.of("mmio_write")[0] == (MMIO_BASE, bytes.fromhex("8877665544332211"))
    assert guest.memory.read_u64(0x3000) == int.from_bytes(bytes(range(1, 9)), "little")


def test_vcpus_sync_the_general_registers_and_the_special_ones_only_when_asked(make_guest) -> None:
    guest = make_guest("hlt\n hlt\n hlt")
    vcpu = guest.vcpu
    native = vcpu._fd
    assert native.sync_regs == bindings.SYNC_REGS  # each synced set costs every exit
    assert guest.run().reason is ExitReason.HLT
    assert native._sync(bindings.SYNC_REGS) and not native._sync(bindings.SYNC_SREGS)
    by_ioctl = vcpu.get_sregs()

    vcpu.set_sync_sregs(True)
    assert native.sync_regs == bindings.SYNC_REGS | bindings.SYNC_SREGS
    assert not native._sync(bindings.SYNC_SREGS)  # the area holds them after the next run
    assert guest.run().reason is ExitReason.HLT
    assert native._sync(bindings.SYNC_SREGS)
    assert vcpu.get_sregs() == by_ioctl

    vcpu.set_sync_sregs(False)
    assert guest.run().reason is ExitReason.HLT
    assert not native._sync(bindings.SYNC_SREGS)
    assert vcpu.get_sregs() == by_ioctl
