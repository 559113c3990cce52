"""ioeventfd: a guest write to a registered port or address signals an eventfd without an
exit to userspace (the vCPU's exit counters do not move)."""

from __future__ import annotations

import os
import select

import pytest
from kvm_testlib import DONE_PORT, MMIO_BASE

pytestmark = pytest.mark.requires_kvm

DONE = f"out %al, ${DONE_PORT:#x}\n hlt\n"


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _value(fd: int) -> int:
    return os.eventfd_read(fd) if _readable(fd) else 0


def test_ioeventfd_writes_cause_no_exit_and_signal_the_eventfd(make_guest) -> None:
    guest = make_guest(
        f"""
        mov $0x500, %dx
        mov $1, %al
        out %al, %dx                  # pio, any value
        mov $0x502, %dx
        mov $0x1234, %ax
        out %ax, %dx                  # pio, datamatch 0x1234
        mov $0x9999, %ax
        out %ax, %dx                  # pio, no match: an ordinary exit
        mov ${MMIO_BASE + 0x100:#x}, %rdi
        movl $0xcafe, (%rdi)          # mmio, datamatch 0xcafe
        movl $0xbeef, (%rdi)          # mmio, no match: an ordinary exit
        movq $5, 0x10(%rdi)           # mmio, length 0 (any width)
        """ + DONE
    )
    vm = guest.vm
    fds = [_eventfd() for _ in range(4)]
    try:
        vm.register_ioeventfd(fds[0], 0x500, pio=True, length=1)
        vm.register_ioeventfd(fds[1], 0x502, pio=True, length=2, datamatch=0x1234)
        vm.register_ioeventfd(fds[2], MMIO_BASE + 0x100, pio=False, length=4, datamatch=0xCAFE)
        vm.register_ioeventfd(fds[3], MMIO_BASE + 0x110, pio=False, length=0)
        guest.run_to_done()
        assert [_value(fd) for fd in fds] == [1, 1, 1, 1]
    finally:
        for fd in fds:
            os.close(fd)
    assert guest.ops.events == [
        ("pio_write", 0x502, b"\x99\x99"),
        ("mmio_write", MMIO_BASE + 0x100, b"\xef\xbe\x00\x00"),
        ("pio_write", DONE_PORT, b"\x99"),
    ]
    counts = guest.vcpu.exit_counts()
    assert counts["io"] == 2 and counts["mmio"] == 1  # only the non-matching writes and "done"


def test_many_ioeventfd_writes_leave_the_exit_counters_alone(make_guest) -> None:
    guest = make_guest(
        """
        mov $0x600, %dx
        mov $50, %ecx
    1:  out %al, %dx
        dec %ecx
        jnz 1b
        """ + DONE
    )
    fd = _eventfd()
    try:
        guest.vm.register_ioeventfd(fd, 0x600, pio=True, length=1)
        before = guest.vcpu.exit_counts()
        guest.run_to_done()
        assert os.eventfd_read(fd) == 50
    finally:
        os.close(fd)
    after = guest.vcpu.exit_counts()
    assert after["io"] - before["io"] == 1  # the done port only
    assert after["mmio"] == before["mmio"] == 0


def test_deassigned_ioeventfd_goes_back_to_exits(make_guest) -> None:
    guest = make_guest(
        f"mov $0x500, %dx\n out %al, %dx\n mov ${MMIO_BASE:#x}, %rdi\n movb $7, (%rdi)\n" + DONE
    )
    pio_fd, mmio_fd = _eventfd(), _eventfd()
    try:
        guest.vm.register_ioeventfd(pio_fd, 0x500, pio=True, length=1)
        guest.vm.register_ioeventfd(mmio_fd, MMIO_BASE, pio=False, length=1, datamatch=7)
        guest.vm.unregister_ioeventfd(pio_fd, 0x500, pio=True, length=1)
        guest.vm.unregister_ioeventfd(mmio_fd, MMIO_BASE, pio=False, length=1, datamatch=7)
        guest.run_to_done()
        assert not _readable(pio_fd) and not _readable(mmio_fd)
    finally:
        os.close(pio_fd)
        os.close(mmio_fd)
    assert [e[:2] for e in guest.ops.events] == [("pio_write", 0x500), ("mmio_write", MMIO_BASE),
                                                 ("pio_write", DONE_PORT)]


def test_unregistering_an_unknown_ioeventfd_names_the_ioctl(make_guest) -> None:
    from vmmkit.errors import HypervisorError

    guest = make_guest("hlt")
    fd = _eventfd()
    try:
        with pytest.raises(HypervisorError) as info:
            guest.vm.unregister_ioeventfd(fd, 0x700, pio=True, length=1)
    finally:
        os.close(fd)
    assert info.value.call == "KVM_IOEVENTFD" and info.value.errno is not None
