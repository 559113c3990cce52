"""Interrupts through the in-kernel irqchip: irqfd (MSI route and IOAPIC pin), KVM_SIGNAL_MSI,
KVM_IRQ_LINE, and a guest IDT handler that counts them."""

from __future__ import annotations

import os
import threading
import time

import pytest
from kvm_testlib import DONE_PORT

from vmmkit.hypervisor import ExitReason
from vmmkit.irq import GsiLine, MsiVector

pytestmark = pytest.mark.requires_kvm

COUNTER = 0x3000
READY = 0x3004  # the guest has set up its LAPIC and IOAPIC
MSI_VECTOR = 0x40
IOAPIC_VECTOR = 0x41
IOAPIC_PIN = 10
LAPIC_MSI_ADDRESS = 0xFEE0_0000  # destination APIC 0, physical

#: Enable the LAPIC, mask the PIC, route IOAPIC pin 10 to vector 0x41 on APIC 0, then
#: sleep with interrupts on until the handler has counted ``want`` interrupts (in %ebx).
GUEST = f"""
    mov $0xfee00000, %r8             # LAPIC
    mov $0xfec00000, %r9             # IOAPIC
    movl $0x1ff, 0xf0(%r8)           # SVR: software enable, spurious vector 0xff
    mov $0xff, %al
    out %al, $0x21                   # mask both PICs (in-kernel)
    out %al, $0xa1
    movl ${0x10 + 2 * IOAPIC_PIN}, (%r9)
    movl ${IOAPIC_VECTOR}, 0x10(%r9)    # edge, fixed, unmasked
    movl ${0x11 + 2 * IOAPIC_PIN}, (%r9)
    movl $0, 0x10(%r9)               # destination APIC 0
    movl $1, {READY:#x}
1:  cli
    cmp %ebx, {COUNTER:#x}
    jae 2f
    sti
    hlt
    jmp 1b
2:  out %al, ${DONE_PORT:#x}
    hlt
handler:
    incl {COUNTER:#x}
    movl $0, 0xb0(%r8)               # EOI
    iretq
"""


def _start(make_guest, x86_setup, want: int):
    guest = make_guest(GUEST, irqchip=True, regs=[{"rbx": want}])
    for vector in (MSI_VECTOR, IOAPIC_VECTOR):
        x86_setup.write_idt_gate(guest.memory, vector, guest.symbols["handler"])
    result: list = []
    thread = threading.Thread(target=lambda: result.append(guest.run(timeout=30)), daemon=True)
    thread.start()
    _wait_ready(guest)
    return guest, thread, result


def _wait_ready(guest, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while guest.memory.read_u32(READY) != 1:
        assert time.monotonic() < deadline, "the guest never set up its interrupt controllers"
        time.sleep(0.001)


def _wait_count(guest, value: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while guest.memory.read_u32(COUNTER) < value:
        assert time.monotonic() < deadline, f"guest counted {guest.memory.read_u32(COUNTER)}, want {value}"
        time.sleep(0.002)


def _finish(guest, thread, result, want: int) -> None:
    thread.join(30)
    assert result and result[0].reason is ExitReason.INTERRUPTED, result
    assert guest.ops.done.is_set()
    assert guest.memory.read_u32(COUNTER) == want


def test_irqfd_on_an_msi_route_reaches_the_guest_idt_handler(make_guest, x86_setup) -> None:
    guest, thread, result = _start(make_guest, x86_setup, want=3)
    vm = guest.vm
    gsi = 24
    vm.set_msi_route(gsi, LAPIC_MSI_ADDRESS, MSI_VECTOR)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        vm.register_irqfd(efd, gsi)
        for i in range(1, 4):
            os.eventfd_write(efd, 1)
            _wait_count(guest, i)
        _finish(guest, thread, result, 3)
        vm.unregister_irqfd(efd, gsi)
    finally:
        os.close(efd)
    # irqfd injection costs no exit: only the done port reached userspace
    assert guest.vcpu.exit_counts()["io"] == 1


def test_irqfd_on_an_ioapic_pin_reaches_the_guest(make_guest, x86_setup) -> None:
    guest, thread, result = _start(make_guest, x86_setup, want=2)
    line = GsiLine(guest.vm, IOAPIC_PIN)  # the core's wrapper picks the irqfd path
    try:
        for i in range(1, 3):
            line.trigger()
            _wait_count(guest, i)
        _finish(guest, thread, result, 2)
    finally:
        line.close()


def test_irq_line_and_signal_msi_reach_the_guest(make_guest, x86_setup) -> None:
    guest, thread, result = _start(make_guest, x86_setup, want=3)
    assert guest.vm.irq_line_status(IOAPIC_PIN, True) != 0
    guest.vm.set_irq_line(IOAPIC_PIN, False)
    _wait_count(guest, 1)
    guest.vm.signal_msi(LAPIC_MSI_ADDRESS, MSI_VECTOR)
    _wait_count(guest, 2)
    vector = MsiVector(guest.vm, gsi=30)  # the core's MSI-X vector: route + irqfd
    try:
        vector.update(LAPIC_MSI_ADDRESS, MSI_VECTOR, masked=False)
        vector.trigger()
        _finish(guest, thread, result, 3)
    finally:
        vector.close()


def test_a_vcpu_halted_with_interrupts_off_is_stopped_promptly(make_guest) -> None:
    guest = make_guest("cli\n hlt\n jmp .", irqchip=True)
    result: list = []
    returned = threading.Event()

    def run() -> None:
        result.append(guest.run(timeout=30))
        returned.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert not returned.is_set()  # HLT with an in-kernel LAPIC blocks inside KVM_RUN
    start = time.monotonic()
    guest.vcpu.kick()
    assert returned.wait(2)
    latency = time.monotonic() - start
    thread.join()
    assert result[0].reason is ExitReason.INTERRUPTED
    assert latency < 0.5, latency
    assert guest.vcpu.get_regs().rip == guest.symbols["_start"] + 2  # still at the HLT
    assert guest.vcpu.exit_counts()["hlt"] == 0


def test_resample_irqfd_is_signalled_on_eoi(make_guest, x86_setup) -> None:
    """A level-triggered IOAPIC pin with a resample fd: the guest's EOI signals it."""
    source = GUEST.replace(f"movl ${IOAPIC_VECTOR}, 0x10(%r9)    # edge",
                           f"movl ${IOAPIC_VECTOR | 0x8000}, 0x10(%r9)    # level")
    assert source != GUEST
    guest = make_guest(source, irqchip=True, regs=[{"rbx": 1}])
    x86_setup.write_idt_gate(guest.memory, IOAPIC_VECTOR, guest.symbols["handler"])
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    resample = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(guest.run(timeout=30)), daemon=True)
    try:
        guest.vm.register_irqfd(efd, IOAPIC_PIN, resample_fd=resample)
        thread.start()
        _wait_ready(guest)
        os.eventfd_write(efd, 1)
        _wait_count(guest, 1)
        _finish(guest, thread, result, 1)
        assert os.eventfd_read(resample) >= 1
        guest.vm.unregister_irqfd(efd, IOAPIC_PIN)
    finally:
        os.close(efd)
        os.close(resample)
