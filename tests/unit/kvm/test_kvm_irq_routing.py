"""The KVM backend's legacy interrupt routing without /dev/kvm: the GSI table it installs is
QEMU's, agrees with the MADT and MP table vmmkit gives the guest, and is in place from the
moment the in-kernel irqchip exists (not only once an MSI route appears)."""

from __future__ import annotations

from typing import Any

import pytest
from vmmkit_kvm.bindings import LEGACY_GSIS, PC_IRQ_ROUTES
from vmmkit_kvm.hypervisor import KvmVm
from vmmkit_kvm.quirks import HostQuirks
from vmmkit_kvm.quirks.pvm import PIT_IRQ, PvmQuirks
from vmmkit_x86_64 import interrupts

# KVM UAPI irqchip numbers (linux/kvm.h)
PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2

#: QEMU's kvm_pc_setup_irq_routing(pci_enabled=true) (hw/i386/kvm/ioapic.c), written out.
QEMU_PC_ROUTES = {
    *((gsi, PIC_MASTER, gsi) for gsi in (0, 1, 3, 4, 5, 6, 7)),
    *((gsi, PIC_SLAVE, gsi - 8) for gsi in range(8, 16)),
    (0, IOAPIC, 2),
    *((gsi, IOAPIC, gsi) for gsi in range(1, 24) if gsi != 2),
}


def _ioapic_pin(gsi: int) -> int | None:
    pins = [pin for g, chip, pin in PC_IRQ_ROUTES if g == gsi and chip == IOAPIC]
    assert len(pins) <= 1
    return pins[0] if pins else None


def test_the_legacy_routes_are_qemus_table() -> None:
    assert len(PC_IRQ_ROUTES) == len(set(PC_IRQ_ROUTES))
    assert set(PC_IRQ_ROUTES) == QEMU_PC_ROUTES
    assert all(0 <= gsi < LEGACY_GSIS for gsi, _, _ in PC_IRQ_ROUTES)


def test_irq0_reaches_ioapic_pin_2_and_the_cascade_nothing() -> None:
    assert _ioapic_pin(0) == 2
    assert (0, PIC_MASTER, 0) in PC_IRQ_ROUTES  # the PIC still sees the PIT on its pin 0
    assert not [route for route in PC_IRQ_ROUTES if route[0] == 2]
    # Every other IOAPIC pin has exactly one GSI, its own number; pin 0 none.
    driven = sorted(pin for _, chip, pin in PC_IRQ_ROUTES if chip == IOAPIC)
    assert driven == list(range(1, 24))


def test_the_routes_agree_with_the_madt_and_mp_table() -> None:
    """What the guest is told (interrupt source overrides, the MP table's I/O interrupt
    entries, both from vmmkit_x86_64.interrupts) is where KVM delivers: a device raising
    legacy interrupt n (a GsiLine on GSI n) reaches the pin the tables give ISA IRQ n."""
    for override in interrupts.INTERRUPT_OVERRIDES:
        assert _ioapic_pin(override.source) == override.gsi
    for irq, pin, _flags in interrupts.isa_routes():
        assert _ioapic_pin(irq) == pin, f"ISA IRQ {irq}"


def test_the_pits_interrupt_is_isa_irq_0_whichever_pit_runs() -> None:
    """The userspace i8254 that the pvm quirks add raises GSI 0, as KVM's own PIT does, so
    both reach pin 2."""
    assert PIT_IRQ == 0
    assert [r.irq for r in PvmQuirks().platform_devices() if r.type == "i8254"] == [0]


class _FakeVmFd:
    """The checked-bindings calls setup_interrupt_controller makes, recorded."""

    def __init__(self) -> None:
        self.fd = -1
        self.calls: list[tuple[str, Any]] = []

    def check_extension(self, cap: Any) -> int:
        return 1

    def enable_cap(self, cap: Any, value: int) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args[0] if args else None))


@pytest.mark.parametrize("quirks", [HostQuirks(), PvmQuirks()], ids=["in-kernel-pit", "pvm"])
def test_the_routing_is_installed_with_the_irqchip(quirks: HostQuirks) -> None:
    fd = _FakeVmFd()
    vm = KvmVm(fd, 4096, quirks=quirks)  # type: ignore[arg-type]
    vm.setup_interrupt_controller()
    names = [name for name, _ in fd.calls]
    assert names.index("set_gsi_routing") == names.index("create_irqchip") + 1
    assert dict(fd.calls)["set_gsi_routing"] == {}  # no MSI routes yet: the legacy table alone
    assert ("create_pit2" in names) == quirks.in_kernel_pit
    if "create_pit2" in names:
        assert names.index("create_pit2") > names.index("set_gsi_routing")
