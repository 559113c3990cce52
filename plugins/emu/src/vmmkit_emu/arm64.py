"""AArch64 vCPUs on unicorn (a Cortex-A72 at EL1, no EL2/EL3): the :class:`vmmkit.aarch64.Aarch64Vcpu`
and :class:`vmmkit.aarch64.Aarch64Vm` protocols.

Firmware calls
    Without EL2/EL3, unicorn reports ``hvc``/``smc`` as an undefined instruction (interrupt
    hook, exception 1) with the PC at the instruction. The hook reads the instruction (walking
    the guest's stage-1 tables when its MMU is on: 4 KiB granule only) and stops the engine;
    then, outside the emulator, ``hvc #0`` / ``smc #0`` hands x0-x7 to the VM's
    :class:`vmmkit.aarch64.FirmwareHandler` (the architecture's PSCI), writes the answer to
    x0-x3 and steps past the instruction. Without a handler, or when it declines, x0 =
    SMCCC_NOT_SUPPORTED. (Registers are never written inside an interrupt hook: such writes
    race with an ``emu_stop`` from another thread, after which unicorn resumes from a stale PC.)

Address translation
    unicorn 2.1's own AArch64 stage-1 walk (``UC_TLB_CPU``) faults on valid tables, so the engine
    runs with ``UC_TLB_VIRTUAL`` and a TLB-fill hook that walks the guest's tables in Python
    (:meth:`Arm64Vcpu.translate`): 4 KiB granule, TTBR0/TTBR1 by VA bit 55, table/block/page
    descriptors, identity with the MMU off. Permissions and memory attributes are not applied
    (every mapped page is readable, writable and executable; an unmapped one ends the run), and
    16/64 KiB granules are not supported. QEMU's TLB caches the result until the guest flushes.

MPIDR_EL1
    Every unicorn engine is CPU 0 to QEMU, so ``mrs MPIDR_EL1`` is hooked (an MRS instruction
    hook) and answers :func:`vmmkit.aarch64.mpidr_for` of the vCPU's index, as KVM does.

Exceptions the guest takes
    unicorn never runs the guest's vectors. This backend delivers the synchronous exceptions it
    can describe: undefined instruction (EC 0x00), SVC (EC 0x15) and BRK (EC 0x3c). It writes
    ESR_EL1, ELR_EL1, SPSR_EL1, moves to EL1h with DAIF masked and jumps to VBAR_EL1 + 0x000
    (from EL1t), 0x200 (from EL1h) or 0x400 (from EL0). Aborts (MMU faults, alignment) are not
    delivered: unicorn does not expose their syndrome, so the run ends with an internal error
    naming the exception and the PC. IRQ/FIQ never happen (no GIC; see the package docs), and
    nor do timer interrupts: the generic timer's counters (CNTVCT_EL0, CNTFRQ_EL0 = 62.5 MHz)
    run, its interrupts do not.

WFI / WFE
    WFI ends ``emu_start``: the vCPU sleeps briefly (or until woken by CPU_ON, a kick) and
    continues after it (WFI may complete spuriously, architecturally). WFE is a no-op in
    unicorn: a guest that waits with WFE spins, taking its turns.

Snapshots
    :class:`vmmkit.aarch64.CpuState` with the EL1 system registers of :data:`EMU_SYSREGS`, the
    banked stack pointers (unicorn's SP is the current one), V0-V31, FPSR/FPCR, the virtual timer
    (its count restored through CNTVOFF_EL2, which unicorn keeps although the guest has no EL2)
    and the power state. A state from KVM crosses when nothing in it needs what emu lacks: an
    enabled GICv3 or ITS, an armed timer interrupt, hardware breakpoints, watchpoints, debug
    exceptions or a running PMU are refused (:func:`refusal`); KVM's firmware registers and the
    other system registers it lists (identification, disabled debug and PMU, AArch32) are left
    out and logged (``emu.snapshot.dropped``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

from unicorn import UC_ARCH_ARM64, UC_HOOK_INSN, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MODE_ARM, UC_PROT_ALL
from unicorn import arm64_const as A
from unicorn.unicorn_const import UC_TLB_VIRTUAL

from vmmkit import aarch64_platform
from vmmkit.aarch64 import (
    BOOT_PSTATE,
    CNTV_CTL_ENABLE,
    CNTV_CTL_IMASK,
    SMCCC_NOT_SUPPORTED,
    CoreRegisters,
    CpuState,
    FirmwareCall,
    FirmwareHandler,
    FpSimdRegisters,
    PowerState,
    SysReg,
    SysRegEncoding,
    VirtualTimer,
    mpidr_for,
    sysreg_name,
)
from vmmkit.hypervisor import ExitReason, VcpuOps
from vmmkit.log import get_logger
from vmmkit.state import StateError
from vmmkit_emu.hypervisor import EmuVcpu, EmuVm, new_engine

log = get_logger()

_X = [getattr(A, f"UC_ARM64_REG_X{i}") for i in range(31)]
_V = [getattr(A, f"UC_ARM64_REG_V{i}") for i in range(32)]

#: The EL1 system registers this backend saves and restores (unicorn keeps their values).
EMU_SYSREGS: Final[tuple[SysRegEncoding, ...]] = (
    (3, 0, 1, 0, 0),  # SCTLR_EL1
    (3, 0, 1, 0, 2),  # CPACR_EL1
    (3, 0, 2, 0, 0),  # TTBR0_EL1
    (3, 0, 2, 0, 1),  # TTBR1_EL1
    (3, 0, 2, 0, 2),  # TCR_EL1
    (3, 0, 5, 2, 0),  # ESR_EL1
    (3, 0, 6, 0, 0),  # FAR_EL1
    (3, 0, 7, 4, 0),  # PAR_EL1
    (3, 0, 10, 2, 0),  # MAIR_EL1
    (3, 0, 12, 0, 0),  # VBAR_EL1
    (3, 0, 13, 0, 1),  # CONTEXTIDR_EL1
    (3, 0, 13, 0, 4),  # TPIDR_EL1
    (3, 0, 14, 1, 0),  # CNTKCTL_EL1
    (3, 3, 13, 0, 2),  # TPIDR_EL0
    (3, 3, 13, 0, 3),  # TPIDRRO_EL0
    (2, 0, 0, 2, 2),  # MDSCR_EL1
)
SPSR_EL1: Final = (3, 0, 4, 0, 0)
CNTVCT_EL0: Final = (3, 3, 14, 0, 2)
CNTV_CTL_EL0: Final = (3, 3, 14, 3, 1)
CNTV_CVAL_EL0: Final = (3, 3, 14, 3, 2)
#: unicorn has no EL2 for the guest, but keeps CNTVOFF_EL2: CNTVCT_EL0 = the count - it.
CNTVOFF_EL2: Final = (3, 4, 14, 0, 3)
MDSCR_EL1: Final = (2, 0, 0, 2, 2)
#: MDSCR_EL1.MDE (breakpoints, watchpoints) and SS (software step): debug exceptions emu never takes.
MDSCR_DEBUG: Final = (1 << 15) | (1 << 0)
PMCR_EL0: Final = (3, 3, 9, 12, 0)
CNTP_CTL_EL0: Final = (3, 3, 14, 2, 1)


def refusal(encoding: SysRegEncoding, value: int) -> str | None:
    """Why this backend cannot take a system register another backend saved, or None when
    leaving it out loses nothing the guest relies on. Left out: the identification registers
    (op0 3, CRn 0: they describe the CPU that saved them), the debug registers of breakpoints
    and watchpoints that are disabled, a stopped PMU, AArch32-only and IMPLEMENTATION DEFINED
    registers (ACTLR, AFSR, AMAIR), the physical timer when its interrupt is not armed."""
    op0, op1, crn, crm, op2 = encoding
    name = sysreg_name(encoding)
    if encoding == MDSCR_EL1 and value & MDSCR_DEBUG:
        return f"{name} = {value:#x}: the guest enabled debug exceptions (MDE/SS), which emu never raises"
    if op0 == 2 and op1 == 0 and crn == 0 and op2 in (5, 7) and value & 1:
        kind = "breakpoint" if op2 == 5 else "watchpoint"
        return f"{name} = {value:#x}: a hardware {kind} is enabled and emu has none"
    if encoding == PMCR_EL0 and value & 1:
        return f"{name} = {value:#x}: the guest's PMU counters are enabled and emu has no PMU"
    if encoding == CNTP_CTL_EL0 and value & CNTV_CTL_ENABLE and not value & CNTV_CTL_IMASK:
        return f"{name} = {value:#x}: the physical timer's interrupt is armed and emu delivers no interrupts"
    return None

# unicorn's ARM exception numbers (QEMU's EXCP_*).
EXCP_UDEF = 1
EXCP_SWI = 2
EXCP_PREFETCH_ABORT = 3
EXCP_DATA_ABORT = 4
EXCP_IRQ = 5
EXCP_FIQ = 6
EXCP_BKPT = 7
_EXCEPTION_NAMES = {EXCP_PREFETCH_ABORT: "prefetch abort", EXCP_DATA_ABORT: "data abort", EXCP_IRQ: "IRQ",
                    EXCP_FIQ: "FIQ"}

EC_UNKNOWN = 0x00
EC_SVC64 = 0x15
EC_BRK64 = 0x3C

_HVC_MASK = 0xFFE0001F
_HVC = 0xD4000002
_SMC = 0xD4000003
_SVC = 0xD4000001
_BRK = 0xD4200000

#: SCTLR_EL1 bits cleared for a CPU_ON entry: M (MMU), C (data cache), I (instruction cache).
_SCTLR_OFF_ON_ENTRY = (1 << 0) | (1 << 2) | (1 << 12)


class Arm64Vm(EmuVm):
    """An emulated AArch64 VM; PSCI goes to the handler the architecture installs."""

    firmware_in_hypervisor = False

    def __init__(self, arch: str) -> None:
        super().__init__(arch)
        self.firmware_handler: FirmwareHandler | None = None

    def set_firmware_handler(self, handler: FirmwareHandler | None) -> None:
        self.firmware_handler = handler

    def set_gic_layout(self, distributor: int, redistributors: int) -> None:
        """Recorded only: this backend has no interrupt controller (see the package docs)."""
        self.gic_layout = (distributor, redistributors)

    def set_gic_its(self, base: int) -> bool:
        """No: without a GIC model there is no ITS to translate MSIs, so the device tree
        describes none and PCI functions fall back to INTx (which is not delivered either)."""
        return False

    def _new_vcpu(self, index: int, ops: VcpuOps) -> Arm64Vcpu:
        return Arm64Vcpu(self, index, ops)

    # -- snapshots (vmmkit.state.Snapshottable, vmmkit.aarch64_platform's layout) ----------------

    state_version: ClassVar[int] = aarch64_platform.STATE_VERSION

    def save_state(self) -> dict[str, Any]:
        """No GIC, no ITS on this backend."""
        return aarch64_platform.platform_state()

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """A GICv3 state from another backend (KVM's in-kernel vGIC) crosses only if the guest
        never enabled it: this backend has no interrupt controller to put it into."""
        parsed = aarch64_platform.parse_platform_state(state)
        for piece in (parsed.gic, parsed.its):
            reason = piece.in_use() if piece is not None else None
            if reason is not None:
                raise StateError(f"{reason}, and emu has no interrupt controller to restore it into")


class Arm64Vcpu(EmuVcpu):
    """One AArch64 vCPU; implements :class:`vmmkit.aarch64.Aarch64Vcpu`."""

    vm: Arm64Vm

    def __init__(self, vm: Arm64Vm, index: int, ops: VcpuOps) -> None:
        self._mpidr = mpidr_for(index)
        #: The last virtual address the guest's tables did not map (for error messages).
        self.last_fault: int | None = None
        super().__init__(vm, index, ops)

    def _make_engine(self) -> Any:
        uc = new_engine(UC_ARCH_ARM64, UC_MODE_ARM)
        uc.ctl_set_cpu_model(A.UC_CPU_ARM64_A72)
        # unicorn 2.1's own AArch64 stage-1 walk faults on valid tables: translate here.
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.hook_add(UC_HOOK_TLB_FILL, self._tlb_fill)
        uc.hook_add(UC_HOOK_INTR, self._on_exception)
        uc.hook_add(UC_HOOK_INSN, self._on_mrs, None, 1, 0, A.UC_ARM64_INS_MRS)
        uc.reg_write(A.UC_ARM64_REG_PSTATE, BOOT_PSTATE)
        return uc

    def _pc(self) -> int:
        return int(self.uc.reg_read(A.UC_ARM64_REG_PC))

    def _enter(self, pc: int) -> None:
        # The end address must be one the guest never runs and that unicorn can translate
        # (it looks its page up when it stops: an upper-half address fails the guest's walk
        # and ends the run). 0 is a device address, never code, in every layout here.
        self.uc.emu_start(pc, 0)

    def _stopped_by_engine(self) -> None:
        if self._pc() == 0:
            self.stop_with(ExitReason.INTERNAL_ERROR, f"vcpu{self.index}: guest jumped to address 0")
            return
        super()._stopped_by_engine()

    # -- Aarch64Vcpu ------------------------------------------------------------------------

    def get_core_registers(self) -> CoreRegisters:
        uc = self.uc
        return CoreRegisters(
            x=tuple(uc.reg_read(reg) for reg in _X),
            sp=uc.reg_read(A.UC_ARM64_REG_SP),
            pc=uc.reg_read(A.UC_ARM64_REG_PC),
            pstate=uc.reg_read(A.UC_ARM64_REG_PSTATE),
        )

    def set_core_registers(self, regs: CoreRegisters) -> None:
        uc = self.uc
        uc.reg_write(A.UC_ARM64_REG_PSTATE, regs.pstate)
        for reg, value in zip(_X, regs.x, strict=True):
            uc.reg_write(reg, value)
        uc.reg_write(A.UC_ARM64_REG_SP, regs.sp)
        uc.reg_write(A.UC_ARM64_REG_PC, regs.pc)

    def get_sys_reg(self, reg: SysReg) -> int:
        if reg is SysReg.MPIDR_EL1:
            return self._mpidr
        op0, op1, crn, crm, op2 = reg.value
        return int(self.uc.cpr_read(op0, op1, crn, crm, op2))

    def set_sys_reg(self, reg: SysReg, value: int) -> None:
        if reg is SysReg.MPIDR_EL1:
            self._mpidr = value
            return
        op0, op1, crn, crm, op2 = reg.value
        self.uc.cpr_write(op0, op1, crn, crm, op2, value)

    def mpidr(self) -> int:
        return self._mpidr

    def power_state(self) -> PowerState:
        return PowerState.ON if self.powered_on else PowerState.OFF

    def power_on(self, entry: int, context: int) -> None:
        """CPU_ON (called while this vCPU is off): the registers are set by this vCPU's own
        thread before it runs again (see :meth:`EmuVcpu.start_at`)."""

        def setup() -> None:
            sctlr = self.get_sys_reg(SysReg.SCTLR_EL1)
            self.set_sys_reg(SysReg.SCTLR_EL1, sctlr & ~_SCTLR_OFF_ON_ENTRY)
            self.set_core_registers(CoreRegisters(x=(context,), pc=entry, pstate=BOOT_PSTATE))

        self.start_at(setup)

    def power_off(self) -> None:
        self.set_powered(False)
        if self._in_emu:
            self._stop_engine()

    # -- snapshots (vmmkit.aarch64.Aarch64VcpuSnapshot) --------------------------------------

    def _cpr(self, encoding: SysRegEncoding) -> int:
        return int(self.uc.cpr_read(*encoding))

    def save_cpu_state(self) -> CpuState:
        """The registers unicorn keeps (:data:`EMU_SYSREGS`), the counter as the guest reads it."""
        uc = self.uc
        pstate = int(uc.reg_read(A.UC_ARM64_REG_PSTATE))
        current = int(uc.reg_read(A.UC_ARM64_REG_SP))
        el1h = (pstate >> 2) & 3 == 1 and pstate & 1
        # unicorn's SP is the current one; the banked copy of the current stack pointer is stale
        sp_el0 = int(uc.reg_read(A.UC_ARM64_REG_SP_EL0)) if el1h else current
        sp_el1 = current if el1h else int(uc.reg_read(A.UC_ARM64_REG_SP_EL1))
        return CpuState(
            x=tuple(int(uc.reg_read(reg)) for reg in _X), pc=self._pc(), pstate=pstate,
            sp_el0=sp_el0, sp_el1=sp_el1, elr_el1=int(uc.reg_read(A.UC_ARM64_REG_ELR_EL1)),
            spsr_el1=self._cpr(SPSR_EL1),
            fp=FpSimdRegisters(v=tuple(int(uc.reg_read(reg)) for reg in _V),
                               fpsr=int(uc.reg_read(A.UC_ARM64_REG_FPSR)), fpcr=int(uc.reg_read(A.UC_ARM64_REG_FPCR))),
            sysregs=tuple((encoding, self._cpr(encoding)) for encoding in EMU_SYSREGS),
            timer=VirtualTimer(count=self._cpr(CNTVCT_EL0), cval=self._cpr(CNTV_CVAL_EL0), ctl=self._cpr(CNTV_CTL_EL0)),
            mpidr=self._mpidr, power=self.power_state(), opaque_backend="emu",
        )

    def restore_cpu_state(self, state: CpuState) -> None:
        """Everything checked first: an armed timer interrupt, enabled debug or PMU registers
        are refused (:func:`refusal`); other registers emu does not model are left out and
        logged. The virtual count goes on from the saved value (through CNTVOFF_EL2)."""
        what = f"vcpu{self.index}"
        if state.timer.interrupt_armed:
            raise StateError(f"{what}: the virtual timer's interrupt is armed (CNTV_CTL_EL0 = {state.timer.ctl:#x}) "
                             "and emu delivers no interrupts")
        keep = set(EMU_SYSREGS)
        dropped = []
        for encoding, value in state.sysregs:
            if encoding in keep:
                continue
            reason = refusal(encoding, value)
            if reason is not None:
                raise StateError(f"{what}: {reason}")
            if value:
                dropped.append(sysreg_name(encoding))
        if dropped or state.opaque:
            log.info("emu.snapshot.dropped", vcpu=self.index, registers=dropped,
                     opaque=f"{len(state.opaque)} {state.opaque_backend} register(s)")
        uc = self.uc
        for encoding, value in state.sysregs:
            if encoding in keep:
                uc.cpr_write(*encoding, value)
        uc.cpr_write(*SPSR_EL1, state.spsr_el1)
        uc.reg_write(A.UC_ARM64_REG_ELR_EL1, state.elr_el1)
        uc.reg_write(A.UC_ARM64_REG_PSTATE, state.pstate)
        for reg, value in zip(_X, state.x, strict=True):
            uc.reg_write(reg, value)
        if (state.pstate >> 2) & 3 == 1 and state.pstate & 1:
            uc.reg_write(A.UC_ARM64_REG_SP_EL0, state.sp_el0)
            uc.reg_write(A.UC_ARM64_REG_SP, state.sp_el1)
        else:
            uc.reg_write(A.UC_ARM64_REG_SP_EL1, state.sp_el1)
            uc.reg_write(A.UC_ARM64_REG_SP, state.sp_el0)
        for reg, value in zip(_V, state.fp.v, strict=True):
            uc.reg_write(reg, value)
        uc.reg_write(A.UC_ARM64_REG_FPSR, state.fp.fpsr)
        uc.reg_write(A.UC_ARM64_REG_FPCR, state.fp.fpcr)
        uc.reg_write(A.UC_ARM64_REG_PC, state.pc)
        uc.cpr_write(*CNTV_CVAL_EL0, state.timer.cval)
        uc.cpr_write(*CNTV_CTL_EL0, state.timer.ctl)
        raw = self._cpr(CNTVCT_EL0) + self._cpr(CNTVOFF_EL2)
        uc.cpr_write(*CNTVOFF_EL2, (raw - state.timer.count) & 0xFFFF_FFFF_FFFF_FFFF)
        self._mpidr = state.mpidr
        self.set_powered(state.power is PowerState.ON)

    # -- hooks ------------------------------------------------------------------------------

    def _tlb_fill(self, uc: Any, vaddr: int, access: int, entry: Any, _: Any) -> bool:
        self.count("tlb_fill")
        pa = self.translate(vaddr)
        if pa is None:
            # Not mapped by the guest: no permissions, so that only a real access fails (as
            # a protection error that ends the run); unicorn may probe pages it never uses.
            self.last_fault = vaddr
            entry.paddr = vaddr & 0x0000_FFFF_FFFF_FFFF
            entry.perms = 0
            return True
        entry.paddr = pa  # unicorn masks with its own page size (1 KiB on ARM), not 4 KiB
        entry.perms = UC_PROT_ALL
        return True

    def _on_mrs(self, uc: Any, reg: int, cp_reg: Any, _: Any) -> bool:
        if (cp_reg.op0, cp_reg.op1, cp_reg.crn, cp_reg.crm, cp_reg.op2) == SysReg.MPIDR_EL1.value:
            uc.reg_write(reg, self._mpidr)
            return True
        return False

    def _on_exception(self, uc: Any, intno: int, _: Any) -> None:
        # Nothing is written here: a register or PC write in this hook races with an
        # emu_stop from another thread (a kick or the end of a turn) and unicorn may then
        # resume from a stale PC with the new registers. The work is deferred to run(),
        # after the engine stopped (EmuVcpu.defer); the PC stays at the trapping instruction.
        pc = int(uc.reg_read(A.UC_ARM64_REG_PC))
        if intno == EXCP_UDEF:
            insn = self._instruction(pc)
            if insn is not None and insn & _HVC_MASK in (_HVC, _SMC) and (insn >> 5) & 0xFFFF == 0:
                conduit = "hvc" if insn & _HVC_MASK == _HVC else "smc"
                self.defer(lambda: self._firmware_call(self.uc, pc, conduit))
                return
            self.count("undefined")
            what = "undefined instruction" if insn is None else f"undefined instruction {insn:#010x}"
            self.defer(lambda: self._deliver(EC_UNKNOWN, 0, pc, what=what))
        elif intno == EXCP_SWI:
            # The PC is already past the SVC (its preferred return address).
            insn = self._instruction(pc - 4)
            iss = (insn >> 5) & 0xFFFF if insn is not None else 0
            self.defer(lambda: self._deliver(EC_SVC64, iss, pc, what="svc"))
        elif intno == EXCP_BKPT:
            insn = self._instruction(pc)
            iss = (insn >> 5) & 0xFFFF if insn is not None else 0
            self.defer(lambda: self._deliver(EC_BRK64, iss, pc, what="brk"))
        else:
            name = _EXCEPTION_NAMES.get(intno, f"exception {intno}")
            self.stop_with(ExitReason.INTERNAL_ERROR,
                           f"vcpu{self.index}: guest {name} at pc {pc:#x} (not delivered by the emu backend)")

    def _firmware_call(self, uc: Any, pc: int, conduit: str) -> None:
        """Serve the ``hvc``/``smc`` at ``pc`` (on this vCPU's thread, the engine stopped)."""
        self.count("firmware_call")
        x = [int(uc.reg_read(reg)) for reg in _X[:8]]
        handler = self.vm.firmware_handler
        result: Sequence[int] | None = None
        if handler is not None:
            result = handler.firmware_call(FirmwareCall(self.index, conduit, x[0] & 0xFFFF_FFFF, tuple(x[1:8])))
        if result is None:
            result = (SMCCC_NOT_SUPPORTED,)
        for reg, value in zip(_X, list(result)[:4], strict=False):
            uc.reg_write(reg, value & 0xFFFF_FFFF_FFFF_FFFF)
        uc.reg_write(A.UC_ARM64_REG_PC, pc + 4)

    def _deliver(self, ec: int, iss: int, elr: int, *, what: str) -> None:
        """Take a synchronous exception to EL1 through VBAR_EL1."""
        uc = self.uc
        vbar = int(uc.reg_read(A.UC_ARM64_REG_VBAR_EL1))
        pstate = int(uc.reg_read(A.UC_ARM64_REG_PSTATE))
        if vbar == 0:
            self.stop_with(ExitReason.INTERNAL_ERROR,
                           f"vcpu{self.index}: guest {what} at pc {elr:#x} and no exception vectors (VBAR_EL1 = 0)")
            return
        el = (pstate >> 2) & 3
        if el == 0:
            offset = 0x400
        elif pstate & 1:
            offset = 0x200
        else:
            offset = 0x000
        sp_el1 = int(uc.reg_read(A.UC_ARM64_REG_SP_EL1)) if el == 0 or not pstate & 1 else None
        if sp_el1 is not None:
            uc.reg_write(A.UC_ARM64_REG_SP_EL0, uc.reg_read(A.UC_ARM64_REG_SP))
        uc.reg_write(A.UC_ARM64_REG_ESR_EL1, (ec << 26) | (1 << 25) | (iss & 0x1FF_FFFF))
        uc.reg_write(A.UC_ARM64_REG_ELR_EL1, elr)
        op0, op1, crn, crm, op2 = SysReg.SPSR_EL1.value
        uc.cpr_write(op0, op1, crn, crm, op2, pstate)
        uc.reg_write(A.UC_ARM64_REG_PSTATE, BOOT_PSTATE)
        if sp_el1 is not None:
            uc.reg_write(A.UC_ARM64_REG_SP, sp_el1)
        uc.reg_write(A.UC_ARM64_REG_PC, vbar + offset)
        self.count("exception")

    def _error_context(self, pc: int) -> str:
        words = [self._instruction(pc - 4), self._instruction(pc)]
        text = " ".join("?" if w is None else f"{w:08x}" for w in words)
        fault = self.last_fault
        fault_text = f"; no translation for {fault:#x}" if fault is not None else ""
        return f" (instructions at pc-4, pc: {text}{fault_text})"

    # -- guest memory as the guest sees it -----------------------------------------------------

    def _instruction(self, va: int) -> int | None:
        pa = self.translate(va)
        if pa is None:
            return None
        try:
            return int.from_bytes(self.uc.mem_read(pa, 4), "little")
        except Exception:
            return None

    def translate(self, va: int) -> int | None:
        """The physical address of ``va`` through the guest's stage-1 tables (4 KiB granule,
        read-only walk); ``va`` itself with the MMU off; ``None`` if unmapped or unsupported."""
        sctlr = self.get_sys_reg(SysReg.SCTLR_EL1)
        if not sctlr & 1:
            return va
        tcr = self.get_sys_reg(SysReg.TCR_EL1)
        upper = (va >> 55) & 1
        if upper:
            tsz, tg, ttbr = (tcr >> 16) & 0x3F, (tcr >> 30) & 3, self.get_sys_reg(SysReg.TTBR1_EL1)
            granule_4k = tg == 2
        else:
            tsz, tg, ttbr = tcr & 0x3F, (tcr >> 14) & 3, self.get_sys_reg(SysReg.TTBR0_EL1)
            granule_4k = tg == 0
        if not granule_4k or tsz < 16:
            return None
        bits = 64 - tsz
        level = 4 - (bits - 12 + 8) // 9  # 4 KiB granule: 9 bits per level
        table = ttbr & 0x0000_FFFF_FFFF_FFFE
        while level <= 3:
            shift = 12 + 9 * (3 - level)
            index = (va >> shift) & 0x1FF
            try:
                desc = int.from_bytes(self.uc.mem_read(table + 8 * index, 8), "little")
            except Exception:
                return None
            if not desc & 1:
                return None
            if level == 3 or not desc & 2:  # page, or block
                if level == 3 and not desc & 2:
                    return None
                out = desc & 0x0000_FFFF_FFFF_F000 & ~((1 << shift) - 1)
                return out | (va & ((1 << shift) - 1))
            table = desc & 0x0000_FFFF_FFFF_F000
            level += 1
        return None
