"""The KVM-arm64 backend's vCPU loop (``runloop.c`` through ``vmmkit_kvm._native``, built from
arm64's ``<linux/kvm.h>``) on a real arm64 ``/dev/kvm``: run inside the AArch64 lab (the
``runloop`` section of ``test_lab_aarch64.py``, and ``tox -e py311-kvm-aarch64``); skipped
elsewhere. Tiny guests, their instructions encoded here (Arm ARM C6), ending in PSCI SYSTEM_OFF.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmmkit.aarch64 import CoreRegisters
from vmmkit.hypervisor import ExitReason

RAM_BASE = 0x4000_0000
RAM_SIZE = 0x20_0000
MMIO = 0x0900_0000  # unbacked

MOV_X1_MMIO = (0xD280_0001, 0xF2A1_2001)  # movz x1, #0; movk x1, #0x900, lsl #16
STR_W0_X1 = 0xB900_0020  # str w0, [x1]
LDR_W3_X1 = 0xB940_0023  # ldr w3, [x1]
STR_W3_X1_4 = 0xB900_0423  # str w3, [x1, #4]
MOVZ_W0_BEEF = 0x5297_DDE0  # movz w0, #0xbeef
PSCI_OFF = (0x5280_0100, 0x72B0_8000, 0xD400_0002, 0x1400_0000)  # w0 = SYSTEM_OFF; hvc #0; b .
SPIN = 0x1400_0000  # b .


def code(*words: int) -> bytes:
    return struct.pack(f"<{len(words)}I", *words)


class RecordingOps:
    """Records MMIO; reads return ``read_value``; a write raises ``fail`` if set."""

    def __init__(self, read_value: int = 0x1234_5678, fail: BaseException | None = None) -> None:
        self.read_value = read_value
        self.fail = fail
        self.log: list[tuple[str, int, bytes]] = []

    def pio_read(self, port: int, size: int) -> bytes:
        raise AssertionError("arm64 has no port I/O")

    def pio_write(self, port: int, data: bytes) -> None:
        raise AssertionError("arm64 has no port I/O")

    def mmio_read(self, addr: int, size: int) -> bytes:
        data = self.read_value.to_bytes(8, "little")[:size]
        self.log.append(("read", addr, data))
        return data

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.log.append(("write", addr, bytes(data)))
        if self.fail is not None:
            raise self.fail


@pytest.fixture
def kvm() -> Iterator[Any]:
    from vmmkit_kvm.arm64 import KvmArm64Hypervisor

    availability = KvmArm64Hypervisor.is_available()
    if not availability:
        pytest.skip(f"needs KVM on an arm64 host (the AArch64 lab): {availability.reason}")
    hypervisor = KvmArm64Hypervisor()
    yield hypervisor
    hypervisor.close()


def guest(hypervisor: Any, program: bytes, ops: RecordingOps, *, callback: bool) -> tuple[Any, Any, Any]:
    from vmmkit.memory import GuestMemory, MemoryRange

    vm = hypervisor.create_vm("aarch64")
    memory = GuestMemory.allocate([MemoryRange(RAM_BASE, RAM_SIZE)])
    vm.add_memory_region(0, RAM_BASE, RAM_SIZE, memory.host_address(RAM_BASE, RAM_SIZE))
    memory.write(RAM_BASE, program)
    vcpu = vm.create_vcpu(0, ops)
    vcpu.callback_dispatch = callback
    vcpu.set_core_registers(CoreRegisters(pc=RAM_BASE))
    return vm, memory, vcpu


@pytest.mark.parametrize("callback", [False, True], ids=["return", "callback"])
def test_mmio_reaches_the_ops_and_a_read_lands_in_the_guest_register(kvm: Any, callback: bool) -> None:
    ops = RecordingOps()
    vm, memory, vcpu = guest(kvm, code(*MOV_X1_MMIO, MOVZ_W0_BEEF, STR_W0_X1, LDR_W3_X1, STR_W3_X1_4, *PSCI_OFF),
                             ops, callback=callback)
    try:
        exit_ = vcpu.run()
        assert exit_.reason is ExitReason.POWER_OFF, exit_
        assert ops.log == [("write", MMIO, (0xBEEF).to_bytes(4, "little")), ("read", MMIO, b"\x78\x56\x34\x12"),
                           ("write", MMIO + 4, b"\x78\x56\x34\x12")]
        counts = vcpu.exit_counts()
        assert counts["mmio"] == 3
        assert counts["system-event"] == 1
        assert vcpu.callback_dispatch is callback
    finally:
        vm.close()
        memory.close()


@pytest.mark.parametrize("callback", [False, True], ids=["return", "callback"])
def test_a_device_exception_comes_out_of_run(kvm: Any, callback: bool) -> None:
    ops = RecordingOps(fail=RuntimeError("device broke"))
    vm, memory, vcpu = guest(kvm, code(*MOV_X1_MMIO, STR_W0_X1, *PSCI_OFF), ops, callback=callback)
    try:
        with pytest.raises(RuntimeError, match="device broke"):
            vcpu.run()
        ops.fail = None
        assert vcpu.run().reason is ExitReason.POWER_OFF  # the store was completed; the guest goes on
    finally:
        vm.close()
        memory.close()


def test_a_kick_interrupts_a_spinning_guest_and_clear_kick_lets_it_run(kvm: Any) -> None:
    ops = RecordingOps()
    vm, memory, vcpu = guest(kvm, code(SPIN, *PSCI_OFF), ops, callback=False)
    exits: list[Any] = []
    try:
        thread = threading.Thread(target=lambda: exits.append(vcpu.run()))
        thread.start()
        time.sleep(0.5)
        vcpu.kick()
        thread.join(30)
        assert not thread.is_alive()
        assert exits[0].reason is ExitReason.INTERRUPTED
        assert vcpu.kicked
        assert vcpu.exit_counts()["intr"] >= 1
        vcpu.kick()  # a kick before run(): run() comes straight back
        assert vcpu.run().reason is ExitReason.INTERRUPTED
        vcpu.clear_kick()
        assert not vcpu.kicked
        vcpu.set_core_registers(CoreRegisters(pc=RAM_BASE + 4))  # past the spin
        assert vcpu.run().reason is ExitReason.POWER_OFF
    finally:
        vm.close()
        memory.close()
