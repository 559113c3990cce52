"""Fixtures for the KVM backend's tests: a real ``/dev/kvm``, guest RAM from
:class:`vmmkit.memory.GuestMemory`, and tiny guests assembled at test time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kvm_testlib import CODE_BASE, RAM_SIZE, STACK_TOP, Guest, RecordingOps

from vmmkit.memory import GuestMemory, MemoryRange


@pytest.fixture(scope="session")
def kvm() -> Iterator[Any]:
    """A :class:`KvmHypervisor` on the real /dev/kvm (skipped with the reason if unusable)."""
    from vmmkit_kvm.hypervisor import KvmHypervisor

    availability = KvmHypervisor.is_available()
    if not availability:
        pytest.skip(f"KVM is not usable here: {availability.reason}")
    hypervisor = KvmHypervisor()
    yield hypervisor
    hypervisor.close()


@pytest.fixture
def make_guest(
    kvm: Any, assemble_with_symbols: Callable[..., Any], x86_setup: Any
) -> Iterator[Callable[..., Guest]]:
    """``make_guest(source, *, bits=64, vcpus=1, irqchip=False, ops=None, callback=False,
    regs=None)`` -> a :class:`Guest` whose vCPUs start at the code with flat segments and the
    stack at :data:`STACK_TOP` (vCPU ``i`` gets ``STACK_TOP - i * 0x1000``)."""
    guests: list[Guest] = []

    def factory(
        source: str,
        *,
        bits: int = 64,
        vcpus: int = 1,
        irqchip: bool = False,
        pit: bool = False,
        ops: RecordingOps | None = None,
        callback: bool = False,
        regs: list[dict[str, int]] | None = None,
    ) -> Guest:
        image = assemble_with_symbols(source, bits=bits, base=CODE_BASE)
        vm = kvm.create_vm("x86_64")
        memory = GuestMemory.allocate([MemoryRange(0, RAM_SIZE)])
        ops = ops or RecordingOps()
        guest = Guest(vm, memory, [], ops, image.symbols)
        guests.append(guest)
        if irqchip:
            vm.setup_interrupt_controller(pit=pit)
        vm.add_memory_region(0, 0, RAM_SIZE, memory.host_address(0, RAM_SIZE))
        memory.write(CODE_BASE, image.code)
        for i in range(vcpus):
            vcpu = vm.create_vcpu(i, ops, callback=callback)
            ops.bind(vcpu)
            guest.vcpus.append(vcpu)
            extra = (regs[i] if regs else {})
            stack = STACK_TOP - i * 0x1000
            if bits == 64:
                x86_setup.long_mode(vcpu, memory, entry=CODE_BASE, stack=stack, **extra)
            elif bits == 32:
                x86_setup.protected_mode(vcpu, memory, entry=CODE_BASE, stack=stack, **extra)
            else:
                x86_setup.real_mode(vcpu, entry=CODE_BASE, rsp=stack, **extra)
        return guest

    yield factory
    for guest in guests:
        guest.vm.close()
        guest.memory.close()


@pytest.fixture(params=[False, True], ids=["return-dispatch", "callback-dispatch"])
def callback(request: pytest.FixtureRequest) -> bool:
    """Both Python dispatch paths of the native loop."""
    return bool(request.param)
