"""PSCI 1.0 as the VMM serves it for backends that trap hvc."""

from __future__ import annotations

from aarch64_helpers import FakeVcpu
from vmmkit_aarch64 import layout as L
from vmmkit_aarch64 import psci as P

from vmmkit.aarch64 import FirmwareCall, PowerState, mpidr_for
from vmmkit.memory import MemoryRange

MASK = (1 << 64) - 1
ENTRY = L.RAM_START + 0x1000


class Power:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def power_off(self, reason: str) -> None:
        self.calls.append(("off", reason))

    def power_reset(self, reason: str) -> None:
        self.calls.append(("reset", reason))


def firmware(cpus: int = 3) -> tuple[P.Psci, list[FakeVcpu], Power]:
    psci = P.Psci()
    vcpus = [FakeVcpu(i, on=i == 0) for i in range(cpus)]
    for vcpu in vcpus:
        psci.add_vcpu(vcpu.index, vcpu)
    psci.ram = (MemoryRange(L.RAM_START, 64 << 20),)
    power = Power()
    psci.power = power  # type: ignore[assignment]
    return psci, vcpus, power


def call(psci: P.Psci, function: int, *args: int, vcpu: int = 0) -> int:
    result = psci.firmware_call(FirmwareCall(vcpu, "hvc", function, tuple(args)))
    assert result is not None
    return result[0]


def signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def test_version_and_features() -> None:
    psci, _, _ = firmware()
    assert call(psci, P.PSCI_VERSION) == 0x10000
    assert call(psci, P.PSCI_FEATURES, P.CPU_ON | P.SMC64) == 0
    assert call(psci, P.PSCI_FEATURES, P.SYSTEM_OFF) == 0
    assert signed(call(psci, P.PSCI_FEATURES, 0x8400_00FF)) == P.NOT_SUPPORTED
    assert call(psci, P.MIGRATE_INFO_TYPE) == 2
    assert call(psci, P.SMCCC_VERSION) == 0x10001


def test_cpu_on_starts_an_off_cpu_with_its_context() -> None:
    psci, vcpus, _ = firmware()
    assert call(psci, P.CPU_ON | P.SMC64, mpidr_for(2), ENTRY, 0xC0FFEE) == P.SUCCESS
    assert vcpus[2].started == [(ENTRY, 0xC0FFEE)]
    assert vcpus[2].power_state() is PowerState.ON
    assert vcpus[1].power_state() is PowerState.OFF


def test_cpu_on_errors() -> None:
    psci, vcpus, _ = firmware()
    assert signed(call(psci, P.CPU_ON | P.SMC64, mpidr_for(0), ENTRY, 0)) == P.ALREADY_ON
    assert signed(call(psci, P.CPU_ON | P.SMC64, mpidr_for(7), ENTRY, 0)) == P.INVALID_PARAMETERS
    assert signed(call(psci, P.CPU_ON | P.SMC64, mpidr_for(1), 0x1000, 0)) == P.INVALID_ADDRESS
    assert vcpus[1].started == []


def test_smc32_arguments_are_truncated_to_32_bits() -> None:
    psci, vcpus, _ = firmware()
    assert call(psci, P.CPU_ON, (1 << 32) | mpidr_for(1), (1 << 40) | ENTRY, (1 << 33) | 5) == P.SUCCESS
    assert vcpus[1].started == [(ENTRY, 5)]


def test_affinity_info_and_cpu_off() -> None:
    psci, vcpus, _ = firmware()
    assert call(psci, P.AFFINITY_INFO | P.SMC64, mpidr_for(0), 0) == P.AFFINITY_ON
    assert call(psci, P.AFFINITY_INFO | P.SMC64, mpidr_for(1), 0) == P.AFFINITY_OFF
    assert call(psci, P.AFFINITY_INFO | P.SMC64, mpidr_for(1), 1) == P.AFFINITY_ON  # cluster 0 has cpu 0 on
    assert signed(call(psci, P.AFFINITY_INFO | P.SMC64, mpidr_for(9), 0)) == P.INVALID_PARAMETERS
    call(psci, P.CPU_ON | P.SMC64, mpidr_for(1), ENTRY, 0)
    assert call(psci, P.CPU_OFF, vcpu=1) == P.SUCCESS
    assert vcpus[1].power_state() is PowerState.OFF
    assert call(psci, P.AFFINITY_INFO | P.SMC64, mpidr_for(1), 0) == P.AFFINITY_OFF


def test_system_off_and_reset_reach_the_machine() -> None:
    psci, _, power = firmware()
    call(psci, P.SYSTEM_OFF)
    call(psci, P.SYSTEM_RESET)
    assert power.calls == [("off", "psci system-off"), ("reset", "psci system-reset")]


def test_unknown_functions_are_not_answered() -> None:
    psci, _, _ = firmware()
    assert psci.firmware_call(FirmwareCall(0, "hvc", 0x8600_0000, ())) is None
    assert psci.firmware_call(FirmwareCall(0, "hvc", P.CPU_ON | 0x100, ())) is None
