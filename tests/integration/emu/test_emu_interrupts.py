"""Interrupts on emu's x86 vCPUs: MSIs and I/O APIC lines accepted by the local APIC and
delivered through the guest's IDT, EOI, priorities, level-triggered re-delivery, NMIs and
exceptions. Tiny guests count their handler runs in memory and report on port 0x80."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from vmmkit.memory import GuestMemory, MemoryRange

from .test_emu_backend import Ops

RAM = 2 << 20
COUNTS = 0x7000  # one u32 per vector handled
APIC = 0xFEE0_0000
IOAPIC = 0xFEC0_0000

#: A handler per vector: count it, EOI (for the interrupts), IRET.
HANDLERS = """
handler_40: incl 0x7000 + 4*0x40
    jmp eoi
handler_41: incl 0x7000 + 4*0x41
eoi: push %rdi
    mov $0xfee00000, %edi
    movl $0, 0xb0(%rdi)
    pop %rdi
    iretq
handler_nmi: incl 0x7000 + 4*2
    iretq
handler_ud: incl 0x7000 + 4*6
    addq $2, (%rsp)          # step over the ud2
    iretq
"""

#: Enable the APIC (SVR bit 8), then wait with interrupts on, reporting each change of the
#: interrupt count on port 0x80.
WAIT = """
    mov $0xfee00000, %edi
    movl $0x1ff, 0xf0(%rdi)
    sti
1:  hlt
    jmp 1b
"""


@pytest.fixture
def irq_guest(emu: Any, x86_setup: Any, assemble_with_symbols: Any) -> Any:
    made: list[tuple[Any, GuestMemory]] = []

    def make(body: str) -> tuple[Any, Any, GuestMemory]:
        image = assemble_with_symbols(body + HANDLERS, bits=64, base=0x1000)
        memory = GuestMemory.allocate([MemoryRange(0, RAM)])
        vm = emu.create_vm("x86_64")
        vm.add_memory_region(0, 0, RAM, memory.host_address(0, RAM))
        vm.setup_interrupt_controller()
        memory.write(0x1000, image.code)
        ops = Ops()
        vcpu = vm.create_vcpu(0, ops)
        ops.vcpu = vcpu
        x86_setup.long_mode(vcpu, memory, entry=0x1000, stack=0x6000)
        for vector, name in ((0x40, "handler_40"), (0x41, "handler_41"), (2, "handler_nmi"), (6, "handler_ud")):
            x86_setup.write_idt_gate(memory, vector, image.symbols[name])
        made.append((vm, memory))
        thread = threading.Thread(target=vcpu.run, daemon=True)
        thread.start()
        return vm, vcpu, memory

    yield make
    for vm, memory in made:
        for vcpu in vm.vcpus:
            vcpu.kick()
        time.sleep(0.05)
        vm.close()
        memory.close()


def count(memory: GuestMemory, vector: int) -> int:
    return int.from_bytes(memory.read(COUNTS + 4 * vector, 4), "little")


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("the guest did not handle the interrupt")
        time.sleep(0.005)


def test_an_msi_reaches_the_handler_its_vector_names(irq_guest: Any) -> None:
    vm, _, memory = irq_guest(WAIT)
    time.sleep(0.05)
    vm.signal_msi(APIC, 0x40)
    wait_for(lambda: count(memory, 0x40) == 1)
    vm.signal_msi(APIC, 0x40)
    vm.signal_msi(APIC, 0x41)
    wait_for(lambda: count(memory, 0x40) == 2 and count(memory, 0x41) == 1)


def test_nothing_is_delivered_while_interrupts_are_off(irq_guest: Any) -> None:
    """The guest spins with IF clear until the test sets a flag in its memory; the MSI stays
    pending in the IRR until the guest's STI."""
    vm, _, memory = irq_guest("""
        mov $0xfee00000, %edi
        movl $0x1ff, 0xf0(%rdi)
    1:  cmpl $0, 0x7800
        je 1b
        sti
    2:  hlt
        jmp 2b
    """)
    vm.signal_msi(APIC, 0x40)
    time.sleep(0.1)
    assert count(memory, 0x40) == 0
    memory.write(0x7800, (1).to_bytes(4, "little"))
    wait_for(lambda: count(memory, 0x40) == 1)


def test_an_ioapic_pin_routes_to_its_vector_and_masking_stops_it(irq_guest: Any) -> None:
    vm, vcpu, memory = irq_guest(f"""
        mov ${IOAPIC:#x}, %esi
        movl $0x18, (%rsi)               # IOREGSEL: redirection entry 4, low half
        movl $0x41, 0x10(%rsi)           # vector 0x41, fixed, edge, unmasked
        movl $0x19, (%rsi)
        movl $0, 0x10(%rsi)              # destination APIC 0
    """ + WAIT)
    time.sleep(0.05)
    vm.set_irq_line(4, True)
    vm.set_irq_line(4, False)
    wait_for(lambda: count(memory, 0x41) == 1)
    vm.set_irq_line(4, True)  # a level that stays high is one edge
    vm.set_irq_line(4, True)
    wait_for(lambda: count(memory, 0x41) == 2)
    time.sleep(0.05)
    assert count(memory, 0x41) == 2


def test_irq0_arrives_on_pin_2_as_the_madt_says(irq_guest: Any) -> None:
    vm, _, memory = irq_guest(f"""
        mov ${IOAPIC:#x}, %esi
        movl $0x14, (%rsi)               # redirection entry 2
        movl $0x40, 0x10(%rsi)
    """ + WAIT)
    time.sleep(0.05)
    vm.set_irq_line(0, True)
    vm.set_irq_line(0, False)
    wait_for(lambda: count(memory, 0x40) == 1)


def test_a_level_triggered_line_is_delivered_again_after_eoi_while_it_is_high(irq_guest: Any) -> None:
    vm, _, memory = irq_guest(f"""
        mov ${IOAPIC:#x}, %esi
        movl $0x1a, (%rsi)               # redirection entry 5
        movl $0x8041, 0x10(%rsi)         # vector 0x41, level-triggered
    """ + WAIT)
    time.sleep(0.05)
    vm.set_irq_line(5, True)
    wait_for(lambda: count(memory, 0x41) >= 3)  # each EOI finds the line still high
    vm.set_irq_line(5, False)
    # one interrupt accepted before the line fell may still be delivered; then nothing more
    previous = -1
    for _ in range(25):
        if count(memory, 0x41) == previous:
            break
        previous = count(memory, 0x41)
        time.sleep(0.2)
    time.sleep(0.3)
    assert count(memory, 0x41) == previous


def test_an_nmi_is_delivered_even_with_interrupts_off(irq_guest: Any) -> None:
    vm, _, memory = irq_guest("""
        cli
    1:  jmp 1b
    """)
    time.sleep(0.05)
    vm.signal_msi(APIC | 0xFF << 12, 4 << 8)  # NMI to every APIC, as vmmkit_x86_64 sends vm.nmi
    wait_for(lambda: count(memory, 2) == 1)


def test_an_exception_goes_through_the_guests_gate_and_returns(irq_guest: Any) -> None:
    vm, vcpu, memory = irq_guest("""
        ud2
        movb $0x66, %al
        outb %al, $0x80
    1:  jmp 1b
    """)
    wait_for(lambda: ("pio_write", 0x80, b"\x66") in vcpu.ops.log)
    assert count(memory, 6) == 1
