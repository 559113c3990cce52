"""virtio-pci on the real KVM backend: a tiny 64-bit guest kicks a queue through the notify
ioeventfd (no exit) and takes the device's MSI-X interrupt through irqfd + MSI route in its
IDT handler. The BAR is moved before the run, so the ioeventfd the guest hits is the one
re-registered at the new address. Needs /dev/kvm and GNU binutils (skipped otherwise).

It borrows the assembler and CPU-mode helpers of tests/integration (loaded by path, as they
live in that folder's conftest); it belongs with the KVM integration tests if they move.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pci_support import (
    AVAIL,
    DESC,
    MSI_ADDRESS,
    S_DRIVER_OK,
    USED,
    Driver,
    FakeDevice,
    FakeMachine,
    virtio_request,
    write_ring,
)

from vmmkit.hypervisor import ExitReason
from vmmkit.machine import VcpuDispatch
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.pci import config as c
from vmmkit.virtio.device import VIRTIO_F_VERSION_1, ActivationContext, VirtioInterruptType

pytestmark = pytest.mark.requires_kvm

RAM_SIZE = 2 << 20
CODE = 0x1000
STACK = 0x8000
COUNTER = 0x3000
DONE_PORT = 0xF4
BAR = 0xC800_0000  # below 4 GiB, inside the guest's identity map
QUEUE_VECTOR = 0x41  # MSI data of MSI-X entry 1 (Driver.enable_msix programs 0x40 + i)

GUEST = f"""
    mov $0xfee00000, %r8
    movl $0x1ff, 0xf0(%r8)           # LAPIC: software enable
    mov $0xff, %al
    out %al, $0x21                   # mask the PICs
    out %al, $0xa1
    mov ${BAR + 0x6000:#x}, %r9
    movw $0, (%r9)                   # notify queue 0: the ioeventfd takes it
1:  cli
    cmpl $2, {COUNTER:#x}
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


def _integration_helpers() -> Any:
    path = Path(__file__).resolve().parents[2] / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_vmmkit_integration_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def kvm_vm() -> Iterator[Any]:
    hypervisor_module = pytest.importorskip("vmmkit_kvm.hypervisor")
    availability = hypervisor_module.KvmHypervisor.is_available()
    if not availability:
        pytest.skip(f"KVM is not usable here: {availability.reason}")
    hypervisor = hypervisor_module.KvmHypervisor()
    vm = hypervisor.create_vm("x86_64")
    vm.setup_interrupt_controller(pit=False)
    yield vm
    vm.close()
    hypervisor.close()


def _record_refusals(vm: Any) -> list[str]:
    """Wrap the VM's irqfd and route calls so a refusal is recorded (then raised as usual)."""
    refused: list[str] = []
    for name in ("register_irqfd", "unregister_irqfd", "set_msi_route"):
        original = getattr(vm, name)

        def wrapper(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            try:
                return _original(*args, **kwargs)
            except Exception as exc:
                refused.append(f"{_name}{args}: {exc}")
                raise

        setattr(vm, name, wrapper)
    return refused


class Ops(VcpuDispatch):
    """The machine's dispatch, plus a done port that kicks the vCPU."""

    def __init__(self, machine: FakeMachine) -> None:
        super().__init__(machine.pio_bus, machine.mmio_bus)
        self.vcpu: Any = None
        self.done = threading.Event()

    def pio_write(self, port: int, data: bytes) -> None:
        if port == DONE_PORT:
            self.done.set()
            self.vcpu.kick()
            return
        super().pio_write(port, data)


class Rng(FakeDevice):
    def activate(self, ctx: ActivationContext) -> None:
        super().activate(ctx)
        queue, fd = ctx.queues[0], ctx.queue_events[0]

        def serve() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            while (chain := queue.pop()) is not None:
                queue.add_used(chain.head, chain.write(b"\xa5" * chain.writable_bytes))
            if queue.needs_notification():
                ctx.interrupt.trigger(VirtioInterruptType.QUEUE, 0)

        ctx.event_loop.add_reader(fd, serve)


def test_kick_by_ioeventfd_and_msix_by_irqfd_on_kvm(kvm_vm: Any) -> None:
    helpers = _integration_helpers()
    image = helpers.assemble_image(GUEST, bits=64, base=CODE)
    memory = GuestMemory.allocate([MemoryRange(0, RAM_SIZE)])
    kvm_vm.add_memory_region(0, 0, RAM_SIZE, memory.host_address(0, RAM_SIZE))
    memory.write(CODE, image.code)
    machine = FakeMachine(kvm_vm, memory)
    machine.event_loop.start()
    try:
        assert kvm_vm.supports_ioeventfd and kvm_vm.supports_irqfd
        device = Rng(sizes=(8,), offered=VIRTIO_F_VERSION_1)
        placed = machine.place(device, virtio_request("rng0"))
        transport = placed.device
        slot = placed.properties["slot"]
        # the driver's set-up, through the same bus paths a guest's exits take
        drv = Driver(machine, slot)
        fn = drv.fn
        cmd = fn.read16(c.COMMAND)
        fn.write16(c.COMMAND, cmd & ~c.COMMAND_MEMORY)
        fn.write32(0x10, BAR | 0x4)
        fn.write32(0x14, 0)
        fn.write16(c.COMMAND, cmd)
        drv = Driver(machine, slot)  # re-probe at the new address
        assert drv.bars[0].address == BAR
        assert [addr for _fd, addr in transport.ioeventfds] == [BAR + 0x6000]  # KVM took the move
        drv.enable_msix(2)
        assert drv.negotiate(VIRTIO_F_VERSION_1)
        write_ring(memory)
        assert drv.setup_queue(0, 8, DESC, AVAIL, USED, vector=1) == 1
        drv.enable_queue(0)
        drv.add_status(S_DRIVER_OK)
        assert device.contexts

        ops = Ops(machine)
        vcpu = kvm_vm.create_vcpu(0, ops)
        ops.vcpu = vcpu
        x86 = helpers.X86Setup()
        x86.long_mode(vcpu, memory, entry=CODE, stack=STACK)
        x86.write_idt_gate(memory, QUEUE_VECTOR, image.symbols["handler"])
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(vcpu.run()), daemon=True)
        watchdog = threading.Timer(30, vcpu.kick)
        watchdog.start()
        thread.start()

        deadline = time.monotonic() + 20
        while memory.read_u32(COUNTER) < 1:
            assert time.monotonic() < deadline, "the device's MSI-X interrupt never reached the guest"
            time.sleep(0.002)
        assert memory.read_u16(USED + 2) == 1
        assert struct.unpack("<II", memory.read(USED + 4, 8)) == (0, 16)
        assert memory.read(0x20000, 16) == b"\xa5" * 16

        # mask and unmask the vector a few times (irqfd deassigned and assigned again each
        # time): KVM must accept every step, and the next message must still arrive
        refused = _record_refusals(kvm_vm)
        table = drv.table
        for _ in range(3):
            drv.guest.write(table + 16 + 12, 4, 1)
            drv.guest.write(table + 16 + 12, 4, 0)
        transport.signal(VirtioInterruptType.QUEUE, 0)
        assert refused == []
        thread.join(20)
        watchdog.cancel()
        assert result and result[0].reason is ExitReason.INTERRUPTED and ops.done.is_set(), result
        assert memory.read_u32(COUNTER) == 2
        # the kick never left the kernel: no trapped notification, no MMIO exit at all
        assert transport.counters()["notifications_trapped"] == 0
        assert vcpu.exit_counts().get("mmio", 0) == 0
        assert (MSI_ADDRESS, QUEUE_VECTOR) == transport.msix.entry(1)[:2]
        vcpu.close()
    finally:
        machine.close()
        memory.close()
