"""The KVM backend's snapshot pieces against the real kernel: the irqchip layouts of
:mod:`vmmkit_kvm.platform_state` mean what the kernel means (a guest reads back through the
in-kernel I/O APIC what the neutral state put there), and an x86 vCPU's saved state restores
into another VM's vCPU register for register."""

from __future__ import annotations

from typing import Any

import attrs
from kvm_testlib import DONE_PORT
from vmmkit_kvm import platform_state as kvm_state
from vmmkit_x86_64.snapshot import restore_vcpu, save_vcpu

from vmmkit.x86_platform import IOAPIC_PINS, IoApicState, parse_platform_state

READ_PIN5 = f"""
    mov $0xfec00000, %ebx            # the I/O APIC
    movl $0x1a, (%rbx)               # IOREGSEL: redirection entry 5, low dword
    movl 0x10(%rbx), %eax
    out %eax, $0x10
    movl $0x1b, (%rbx)               # high dword
    movl 0x10(%rbx), %eax
    out %eax, $0x10
    out %al, ${DONE_PORT:#x}
"""


def test_a_fresh_in_kernel_irqchip_reads_as_the_hardware_resets(make_guest: Any) -> None:
    guest = make_guest("hlt", irqchip=True)
    state = parse_platform_state(guest.vm.save_state())
    assert state.ioapic is not None
    assert all(entry & 1 << 16 for entry in state.ioapic.redirection)  # every pin masked
    master, slave = state.pics
    assert (master["elcr_mask"], slave["elcr_mask"]) == (0xF8, 0xDE)  # KVM's kvm_pic_reset values
    assert state.kvm_pit2 is None or len(state.kvm_pit2) > 0
    assert state.clock_ns is not None


def test_the_guest_reads_the_ioapic_entry_the_neutral_state_set(make_guest: Any) -> None:
    guest = make_guest(READ_PIN5, irqchip=True)
    saved = guest.vm.save_state()
    table = [1 << 16] * IOAPIC_PINS
    table[5] = 0x0300_0000_0000_A035  # destination 3, level, vector 0x35
    saved["ioapic"] = {"id": 0, "select": 0, "irr": 0, "redirection": table}
    guest.vm.restore_state(saved)
    guest.run_to_done()
    words = [int.from_bytes(data, "little") for port, data in guest.ops.of("pio_write") if port == 0x10]
    assert words == [0x0000_A035, 0x0300_0000]
    assert parse_platform_state(guest.vm.save_state()).ioapic == IoApicState(0, 0x1b, 0, tuple(table))


def test_kvm_layout_round_trip_keeps_the_base_address(make_guest: Any) -> None:
    guest = make_guest("hlt", irqchip=True)
    raw = guest.vm._fd.get_irqchip(kvm_state.KVM_IRQCHIP_IOAPIC)
    assert kvm_state.ioapic_to_kvm(kvm_state.ioapic_from_kvm(raw), raw) == raw
    assert int.from_bytes(raw[:8], "little") == 0xFEC0_0000


def test_a_vcpu_state_restores_into_another_vm(make_guest: Any, kvm: Any) -> None:
    source = make_guest("hlt", irqchip=True, regs=[{"rax": 0x1122, "r15": 0xFEED_F00D}])
    vcpu = source.vcpu
    vcpu.set_msrs([attrs.evolve(entry, data=0x1234_5678) for entry in vcpu.get_msrs([0xC000_0102])])
    state = save_vcpu(vcpu, kvm)
    assert state["regs"]["rax"] == 0x1122 and [0xC000_0102, 0x1234_5678] in state["msrs"]
    target = make_guest("hlt", irqchip=True).vcpu
    restore_vcpu(target, state)
    assert target.get_regs() == vcpu.get_regs()
    assert target.get_sregs() == vcpu.get_sregs()
    assert target.get_xsave() == vcpu.get_xsave()
    assert target.get_lapic() == vcpu.get_lapic()
    assert target.get_msrs([0xC000_0102]) == vcpu.get_msrs([0xC000_0102])
    saved, again = dict(map(tuple, state["msrs"])), dict(map(tuple, save_vcpu(target, kvm)["msrs"]))
    tsc = 0x10  # counts on between the two reads
    assert {k: v for k, v in again.items() if k != tsc} == {k: v for k, v in saved.items() if k != tsc}
    assert 0 <= again[tsc] - saved[tsc] < 10 * 3_000_000_000  # went on from the saved value, not from 0
