"""PSCI 1.0 (with the 0.2 function set) served by the VMM, for backends that trap ``hvc``.

The backend hands each ``hvc #0`` to :meth:`Psci.firmware_call` (the
:class:`vmmkit.aarch64.FirmwareHandler` protocol) on the calling vCPU's thread. Functions:

==========================  ===========  ==============================================================
function                    id (32/64)   what it does here
==========================  ===========  ==============================================================
PSCI_VERSION                0x84000000   1.0
CPU_SUSPEND                 0x84000001   returns at once (a standby state with no wake-up event)
                            0xC4000001
CPU_OFF                     0x84000002   the caller powers off until a CPU_ON
CPU_ON                      0x84000003   starts a powered-off vCPU at ``entry`` in EL1h, MMU off,
                            0xC4000003   x0 = ``context``; ALREADY_ON / INVALID_PARAMETERS /
                                         INVALID_ADDRESS (entry not in RAM) otherwise
AFFINITY_INFO               0x84000004   ON (0) / OFF (1) of the vCPU(s) at the affinity (levels 0-3)
                            0xC4000004
MIGRATE_INFO_TYPE           0x84000006   2: no Trusted OS, nothing to migrate
SYSTEM_OFF                  0x84000008   the machine powers off (the guest's exit status stands)
SYSTEM_RESET                0x84000009   the machine resets
PSCI_FEATURES               0x8400000A   0 for every function above, NOT_SUPPORTED otherwise
SMCCC_VERSION               0x80000000   1.1 (SMCCC_ARCH_FEATURES then says NOT_SUPPORTED)
==========================  ===========  ==============================================================

Any other function id returns NOT_SUPPORTED (-1). Power actions reach the machine through
:class:`PsciPower`, a platform device whose only purpose is to carry the machine's power
callbacks (:meth:`vmmkit.device.DeviceContext.request_shutdown` / ``request_reset``) to PSCI.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final

from vmmkit.aarch64 import Aarch64Vcpu, FirmwareCall, PowerState, mpidr_affinity
from vmmkit.device import Device
from vmmkit.log import get_logger
from vmmkit.memory import MemoryRange
from vmmkit_aarch64.arch import PsciPowerType as PsciPowerType  # declared there, re-exported

log = get_logger()

PSCI_VERSION: Final = 0x8400_0000
CPU_SUSPEND: Final = 0x8400_0001
CPU_OFF: Final = 0x8400_0002
CPU_ON: Final = 0x8400_0003
AFFINITY_INFO: Final = 0x8400_0004
MIGRATE_INFO_TYPE: Final = 0x8400_0006
SYSTEM_OFF: Final = 0x8400_0008
SYSTEM_RESET: Final = 0x8400_0009
PSCI_FEATURES: Final = 0x8400_000A
SMC64: Final = 0x4000_0000  #: the SMC64 bit of a function id (0xC4... = 0x84... | SMC64)
SMCCC_VERSION: Final = 0x8000_0000

VERSION_1_0: Final = 0x0001_0000
SMCCC_1_1: Final = 0x0001_0001

SUCCESS: Final = 0
NOT_SUPPORTED: Final = -1
INVALID_PARAMETERS: Final = -2
DENIED: Final = -3
ALREADY_ON: Final = -4
ON_PENDING: Final = -5
INVALID_ADDRESS: Final = -9

AFFINITY_ON: Final = 0
AFFINITY_OFF: Final = 1

_SUPPORTED: Final = frozenset({PSCI_VERSION, CPU_SUSPEND, CPU_SUSPEND | SMC64, CPU_OFF, CPU_ON, CPU_ON | SMC64,
                               AFFINITY_INFO, AFFINITY_INFO | SMC64, MIGRATE_INFO_TYPE, SYSTEM_OFF,
                               SYSTEM_RESET, PSCI_FEATURES})
_MASK64: Final = (1 << 64) - 1


def _u64(value: int) -> int:
    return value & _MASK64


class Psci:
    """The PSCI firmware of one VM: knows its vCPUs, RAM and how to power the machine off."""

    def __init__(self) -> None:
        self.vcpus: dict[int, Aarch64Vcpu] = {}
        self.ram: tuple[MemoryRange, ...] = ()
        self.power: PsciPower | None = None
        self._lock = threading.Lock()
        self.calls = 0

    def add_vcpu(self, index: int, vcpu: Aarch64Vcpu) -> None:
        self.vcpus[index] = vcpu

    # FirmwareHandler

    def firmware_call(self, call: FirmwareCall) -> Sequence[int] | None:
        self.calls += 1
        function = call.function
        a = call.args + (0,) * (3 - len(call.args))
        if not function & SMC64:
            a = tuple(arg & 0xFFFF_FFFF for arg in a)
        if function == SMCCC_VERSION:
            return (SMCCC_1_1,)
        if function == PSCI_VERSION:
            return (VERSION_1_0,)
        if function == PSCI_FEATURES:
            return (_u64(SUCCESS if a[0] & 0xFFFF_FFFF in _SUPPORTED else NOT_SUPPORTED),)
        if function == MIGRATE_INFO_TYPE:
            return (2,)
        base = function & ~SMC64
        if base == CPU_ON and function in _SUPPORTED:
            return (_u64(self.cpu_on(a[0], a[1], a[2])),)
        if base == AFFINITY_INFO and function in _SUPPORTED:
            return (_u64(self.affinity_info(a[0], a[1])),)
        if base == CPU_SUSPEND and function in _SUPPORTED:
            return (SUCCESS,)
        if function == CPU_OFF:
            vcpu = self.vcpus.get(call.vcpu)
            if vcpu is None:
                return (_u64(DENIED),)
            vcpu.power_off()
            return (SUCCESS,)
        if function == SYSTEM_OFF:
            self._power("off")
            return (SUCCESS,)
        if function == SYSTEM_RESET:
            self._power("reset")
            return (SUCCESS,)
        return None

    def cpu_on(self, target: int, entry: int, context: int) -> int:
        vcpu = self._by_affinity(target)
        if vcpu is None:
            return INVALID_PARAMETERS
        if not any(rng.contains(entry, 4) for rng in self.ram):
            return INVALID_ADDRESS
        with self._lock:
            if vcpu.power_state() is PowerState.ON:
                return ALREADY_ON
            log.debug("psci.cpu_on", target=hex(target), entry=hex(entry))
            vcpu.power_on(entry, context)
        return SUCCESS

    def affinity_info(self, target: int, level: int) -> int:
        if level > 3:
            return INVALID_PARAMETERS
        mask = mpidr_affinity(~0 << (8 * level) if level < 3 else 0xFF << 32)
        matching = [v for v in self.vcpus.values() if mpidr_affinity(v.mpidr()) & mask == mpidr_affinity(target) & mask]
        if not matching:
            return INVALID_PARAMETERS
        return AFFINITY_ON if any(v.power_state() is PowerState.ON for v in matching) else AFFINITY_OFF

    def _by_affinity(self, target: int) -> Aarch64Vcpu | None:
        wanted = mpidr_affinity(target)
        for vcpu in self.vcpus.values():
            if mpidr_affinity(vcpu.mpidr()) == wanted:
                return vcpu
        return None

    def _power(self, what: str) -> None:
        if self.power is None:
            log.warning("psci.no_power_device", request=what)
            return
        if what == "off":
            self.power.power_off("psci system-off")
        else:
            self.power.power_reset("psci system-reset")


class PsciPower(Device):
    """The platform device that gives PSCI the machine's power callbacks (kind ``psci``).

    Its page (see :mod:`vmmkit_aarch64.layout`) is not described to the guest and reads as all
    ones; it exists because devices are how the machine hands out power callbacks."""

    kind: ClassVar[str] = "psci"

    def __init__(self, device_id: str, shutdown: Callable[[str], None], reset: Callable[[str], None]) -> None:
        super().__init__(device_id)
        self.power_off = shutdown
        self.power_reset = reset

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * max(0, min(size, 8))

    #: Nothing to save: the vCPUs' power states are theirs (vmmkit.state.Snapshottable).
    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        return {}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        pass

    def write(self, offset: int, data: bytes) -> None:
        pass

    def firmware_properties(self) -> Mapping[str, Any]:
        return {}
