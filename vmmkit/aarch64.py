"""Backend-neutral AArch64 vCPU state and firmware calls: the types an architecture plugin uses
to set up a vCPU and serve PSCI, and that a backend translates to its own terms (``KVM_SET_ONE_REG``
ids, unicorn register numbers, ...). The AArch64 counterpart of :mod:`vmmkit.x86`.

Firmware calls (SMCCC: PSCI and friends) reach the VMM in one of two ways:

- the hypervisor serves them itself (KVM with ``KVM_ARM_VCPU_PSCI_0_2``): the backend says so
  with :attr:`Aarch64Vm.firmware_in_hypervisor` and the architecture only creates secondary
  vCPUs powered off;
- the backend traps ``hvc``/``smc`` and hands each call to the :class:`FirmwareHandler` the
  architecture installed with :meth:`Aarch64Vm.set_firmware_handler`; the handler's answer goes
  back to x0-x3 and the vCPU resumes after the instruction. A call nobody handles returns
  ``SMCCC_NOT_SUPPORTED`` (-1) in x0, as firmware does.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final, Protocol, runtime_checkable

from attrs import field, frozen

#: PSTATE at boot (Linux's arm64 boot protocol): EL1h (SPSel = 1), D, A, I, F masked.
PSTATE_EL1H: Final = 0x5
PSTATE_DAIF: Final = 0x3C0
BOOT_PSTATE: Final = PSTATE_EL1H | PSTATE_DAIF

#: What a firmware call nobody serves returns in x0 (SMCCC).
SMCCC_NOT_SUPPORTED: Final = 0xFFFF_FFFF_FFFF_FFFF


def _x_registers(value: Sequence[int]) -> tuple[int, ...]:
    regs = tuple(int(v) for v in value)
    if len(regs) > 31:
        raise ValueError(f"AArch64 has 31 general registers (x0-x30), not {len(regs)}")
    return regs + (0,) * (31 - len(regs))


@frozen
class CoreRegisters:
    """The core registers a boot protocol sets: x0-x30, SP_EL1, PC and PSTATE."""

    x: tuple[int, ...] = field(default=(), converter=_x_registers)
    sp: int = 0
    pc: int = 0
    pstate: int = BOOT_PSTATE


class SysReg(enum.Enum):
    """System registers the core knows by name, valued ``(op0, op1, CRn, CRm, op2)`` (the
    encoding ``KVM_REG_ARM64_SYSREG`` and unicorn's ``uc_arm64_cp_reg`` use)."""

    MPIDR_EL1 = (3, 0, 0, 0, 5)
    MIDR_EL1 = (3, 0, 0, 0, 0)
    SCTLR_EL1 = (3, 0, 1, 0, 0)
    TTBR0_EL1 = (3, 0, 2, 0, 0)
    TTBR1_EL1 = (3, 0, 2, 0, 1)
    TCR_EL1 = (3, 0, 2, 0, 2)
    ESR_EL1 = (3, 0, 5, 2, 0)
    FAR_EL1 = (3, 0, 6, 0, 0)
    MAIR_EL1 = (3, 0, 10, 2, 0)
    VBAR_EL1 = (3, 0, 12, 0, 0)
    ELR_EL1 = (3, 0, 4, 0, 1)
    SPSR_EL1 = (3, 0, 4, 0, 0)
    CNTFRQ_EL0 = (3, 3, 14, 0, 0)
    CNTVCT_EL0 = (3, 3, 14, 0, 2)


def mpidr_for(index: int) -> int:
    """The MPIDR_EL1 affinity of vCPU ``index`` as KVM assigns it (Aff0 = index % 16,
    Aff1 = index // 16 % 256, Aff2 = index // 4096 % 256), with the RES1 bit 31."""
    aff0 = index & 0xF
    aff1 = (index >> 4) & 0xFF
    aff2 = (index >> 12) & 0xFF
    return (1 << 31) | (aff2 << 16) | (aff1 << 8) | aff0


def mpidr_affinity(mpidr: int) -> int:
    """Aff3..Aff0 of an MPIDR (what PSCI's ``target_cpu`` carries), without the flag bits."""
    return mpidr & 0xFF_00FF_FFFF


class PowerState(enum.Enum):
    ON = "on"
    OFF = "off"  #: never started, or PSCI CPU_OFF: waits for CPU_ON


@frozen
class FirmwareCall:
    """One ``hvc #0`` / ``smc #0`` by vCPU ``vcpu``: x0 (the function id) and x1-x7."""

    vcpu: int
    conduit: str  #: "hvc" or "smc"
    function: int
    args: tuple[int, ...] = ()


class FirmwareHandler(Protocol):
    """Serves firmware calls (PSCI) for a backend that traps them."""

    def firmware_call(self, call: FirmwareCall) -> Sequence[int] | None:
        """The values for x0, x1, ... (at most four), or ``None`` if the call is not for this
        handler (the guest then gets ``SMCCC_NOT_SUPPORTED``). May power vCPUs on or off
        through their :class:`Aarch64Vcpu` methods, from the calling vCPU's thread."""
        ...


@runtime_checkable
class Aarch64Vcpu(Protocol):
    """The AArch64 register and power interface an architecture plugin drives."""

    def get_core_registers(self) -> CoreRegisters: ...

    def set_core_registers(self, regs: CoreRegisters) -> None: ...

    def get_sys_reg(self, reg: SysReg) -> int: ...

    def set_sys_reg(self, reg: SysReg, value: int) -> None: ...

    def mpidr(self) -> int:
        """The MPIDR_EL1 the guest reads on this vCPU (firmware tables must match it)."""
        ...

    def power_state(self) -> PowerState: ...

    def power_on(self, entry: int, context: int) -> None:
        """PSCI CPU_ON: leave OFF and start at ``entry`` in EL1h with interrupts masked, the
        MMU off and x0 = ``context`` (from any thread)."""
        ...

    def power_off(self) -> None:
        """PSCI CPU_OFF (or never started): stop running guest code until :meth:`power_on`."""
        ...


@runtime_checkable
class Aarch64Vm(Protocol):
    """What an AArch64 VM offers the architecture plugin beyond :class:`vmmkit.hypervisor.Vm`."""

    #: True when the hypervisor serves PSCI itself (no handler needed; secondary vCPUs are
    #: created powered off by the backend and started by the hypervisor).
    firmware_in_hypervisor: bool

    def set_firmware_handler(self, handler: FirmwareHandler | None) -> None: ...

    def set_gic_layout(self, distributor: int, redistributors: int) -> None:
        """Where the architecture puts the GICv3 distributor and the first redistributor
        (before :meth:`vmmkit.hypervisor.Vm.setup_interrupt_controller`); a backend without
        an interrupt controller just accepts it."""
        ...

    def set_gic_its(self, base: int) -> bool:
        """Ask for a GICv3 ITS (MSI translation) at ``base`` (before
        :meth:`vmmkit.hypervisor.Vm.setup_interrupt_controller`). True when the backend creates
        one: the device tree then describes it and PCI MSIs go through it, with the function's
        requester ID as device ID; False when it has none (nothing describes it, and PCI
        functions interrupt through INTx)."""
        ...


# -- snapshots: a vCPU's whole state, backend-neutral -------------------------------------------

#: A system register's architectural encoding ``(op0, op1, CRn, CRm, op2)``.
SysRegEncoding = tuple[int, int, int, int, int]

#: CNTV_CTL_EL0 bits (Arm ARM D13.8.22): ENABLE, IMASK, ISTATUS.
CNTV_CTL_ENABLE: Final = 1 << 0
CNTV_CTL_IMASK: Final = 1 << 1


def sysreg_name(encoding: SysRegEncoding) -> str:
    """The assembler's generic name of a system register, ``S3_0_C1_C0_0`` (or its
    :class:`SysReg` name when the core knows it)."""
    for reg in SysReg:
        if reg.value == encoding:
            return reg.name
    op0, op1, crn, crm, op2 = encoding
    return f"S{op0}_{op1}_C{crn}_C{crm}_{op2}"


def _v_registers(value: Sequence[int]) -> tuple[int, ...]:
    regs = tuple(int(v) for v in value)
    if len(regs) > 32:
        raise ValueError(f"AArch64 has 32 SIMD&FP registers (v0-v31), not {len(regs)}")
    if any(not 0 <= v < 1 << 128 for v in regs):
        raise ValueError("a SIMD&FP register holds 128 bits")
    return regs + (0,) * (32 - len(regs))


@frozen
class FpSimdRegisters:
    """V0-V31 (128 bits each), FPSR and FPCR (``struct user_fpsimd_state``)."""

    v: tuple[int, ...] = field(default=(), converter=_v_registers)
    fpsr: int = 0
    fpcr: int = 0


@frozen
class VirtualTimer:
    """The EL1 virtual timer of the generic timer: the count the guest reads (CNTVCT_EL0), its
    compare value (CNTV_CVAL_EL0) and control (CNTV_CTL_EL0). A restore sets the count, so the
    guest's time goes on from where it was (KVM: ``KVM_REG_ARM_TIMER_CNT`` moves the virtual
    offset)."""

    count: int = 0
    cval: int = 0
    ctl: int = 0

    @property
    def interrupt_armed(self) -> bool:
        """The guest expects this timer's interrupt (enabled, not masked)."""
        return bool(self.ctl & CNTV_CTL_ENABLE) and not self.ctl & CNTV_CTL_IMASK


@frozen
class CpuState:
    """Everything of one AArch64 vCPU a snapshot carries, in architectural terms.

    ``sysregs`` are the system registers by encoding (KVM: every ``KVM_REG_ARM64_SYSREG`` of
    ``KVM_GET_REG_LIST`` but the timer's and MPIDR_EL1, in the kernel's order; emu: the EL1
    context it models). ``opaque`` are registers only the backend named by ``opaque_backend``
    knows (KVM: its firmware pseudo-registers ``KVM_REG_ARM_FW`` and the demultiplexed CCSIDRs),
    as ``(id, bytes)``: they describe the host's firmware and caches, not the guest's progress, and
    another backend leaves them out."""

    x: tuple[int, ...] = field(default=(), converter=_x_registers)
    pc: int = 0
    pstate: int = BOOT_PSTATE
    sp_el0: int = 0
    sp_el1: int = 0
    elr_el1: int = 0
    spsr_el1: int = 0
    fp: FpSimdRegisters = FpSimdRegisters()
    sysregs: tuple[tuple[SysRegEncoding, int], ...] = ()
    timer: VirtualTimer = VirtualTimer()
    mpidr: int = 0
    power: PowerState = PowerState.ON
    opaque_backend: str = ""
    opaque: tuple[tuple[int, bytes], ...] = ()

    def sysreg(self, encoding: SysRegEncoding, default: int | None = None) -> int | None:
        for saved, value in self.sysregs:
            if saved == encoding:
                return value
        return default


@runtime_checkable
class Aarch64VcpuSnapshot(Protocol):
    """A backend's AArch64 vCPU whose whole state can be saved and put back (snapshots,
    migration). A backend without it makes ``vm.snapshot`` fail naming it."""

    def save_cpu_state(self) -> CpuState:
        """The state of this paused vCPU."""
        ...

    def restore_cpu_state(self, state: CpuState) -> None:
        """Take ``state`` before the vCPU runs again.

        :raises vmmkit.state.StateError: a piece this backend cannot take, named."""
        ...
