"""Snapshot state of KVM's arm64 vCPUs and in-kernel GICv3/ITS, in vmmkit's backend-neutral
types (:class:`vmmkit.aarch64.CpuState`, :mod:`vmmkit.aarch64_platform`).

vCPUs (Documentation/virt/kvm/api.rst, 4.68 ``KVM_SET_ONE_REG`` "ARM64 registers", 4.84
``KVM_GET_REG_LIST``): the core registers of ``struct kvm_regs`` (x0-x30, SP_EL0, PC, PSTATE,
SP_EL1, ELR_EL1, SPSR_EL1, V0-V31, FPSR, FPCR) by offset; every system register
``KVM_GET_REG_LIST`` reports, saved in its order and restored in that order (Cloud Hypervisor's
``KvmVcpu::sys_regs``/``set_sys_regs``, crosvm's ``get_all_registers``), the virtual timer's three
(``KVM_REG_ARM_TIMER_CTL``/``CNT``/``CVAL``; note that KVM's ids for CNT and CVAL are each
other's architectural encodings, a historical swap the uapi keeps) and MPIDR_EL1 taken out into
:class:`vmmkit.aarch64.VirtualTimer` and ``mpidr``; the firmware pseudo-registers and
demultiplexed CCSIDRs as opaque KVM registers; PSCI power through ``KVM_GET/SET_MP_STATE``.

The vGIC (devices/arm-vgic-v3.rst, arm-vgic-its.rst): distributor words through
``KVM_DEV_ARM_VGIC_GRP_DIST_REGS``, each redistributor's through ``..._REDIST_REGS`` and its CPU
interface through ``..._CPU_SYSREGS`` (both addressed by the vCPU's MPIDR), the SPIs' line levels
through ``..._LEVEL_INFO``; with an ITS, ``KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES`` and
``KVM_DEV_ARM_ITS_SAVE_TABLES`` write the LPI pending and translation tables into guest RAM
(which the snapshot saves afterwards), its registers through ``KVM_DEV_ARM_VGIC_GRP_ITS_REGS``;
a restore writes them back in the documented order and ``KVM_DEV_ARM_ITS_RESTORE_TABLES``
reloads the tables before GITS_CTLR.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from vmmkit import aarch64_platform as P
from vmmkit.aarch64 import CpuState, FpSimdRegisters, PowerState, SysRegEncoding, VirtualTimer
from vmmkit.errors import HypervisorError
from vmmkit.log import get_logger
from vmmkit.state import StateError

log = get_logger()

KVMIO: Final = 0xAE
_IOC_WRITE, _IOC_READ = 1, 2
KVM_GET_REG_LIST: Final = ((_IOC_READ | _IOC_WRITE) << 30) | (8 << 16) | (KVMIO << 8) | 0xB0
KVM_GET_DEVICE_ATTR: Final = (_IOC_WRITE << 30) | (24 << 16) | (KVMIO << 8) | 0xE2
KVM_SET_DEVICE_ATTR: Final = (_IOC_WRITE << 30) | (24 << 16) | (KVMIO << 8) | 0xE1

KVM_REG_ARM64: Final = 0x6000_0000_0000_0000
KVM_REG_SIZE_SHIFT: Final = 52
KVM_REG_SIZE_U32: Final = 0x0020_0000_0000_0000
KVM_REG_SIZE_U64: Final = 0x0030_0000_0000_0000
KVM_REG_SIZE_U128: Final = 0x0040_0000_0000_0000
KVM_REG_ARM_COPROC_SHIFT: Final = 16
KVM_REG_ARM_CORE: Final = 0x0010
KVM_REG_ARM64_SYSREG: Final = 0x0013


def reg_size(reg_id: int) -> int:
    """The bytes a ONE_REG id's value has (``KVM_REG_SIZE``)."""
    return 1 << ((reg_id >> KVM_REG_SIZE_SHIFT) & 0xF)


def reg_coproc(reg_id: int) -> int:
    return (reg_id >> KVM_REG_ARM_COPROC_SHIFT) & 0xFFF


def core_id(offset: int, size: int = KVM_REG_SIZE_U64) -> int:
    return KVM_REG_ARM64 | size | (KVM_REG_ARM_CORE << KVM_REG_ARM_COPROC_SHIFT) | (offset // 4)


def sysreg_id(encoding: SysRegEncoding) -> int:
    op0, op1, crn, crm, op2 = encoding
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | (KVM_REG_ARM64_SYSREG << KVM_REG_ARM_COPROC_SHIFT)
            | (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2)


def sysreg_encoding(reg_id: int) -> SysRegEncoding:
    return ((reg_id >> 14) & 3, (reg_id >> 11) & 7, (reg_id >> 7) & 0xF, (reg_id >> 3) & 0xF, reg_id & 7)


# struct kvm_regs: user_pt_regs {x[31], sp, pc, pstate}, sp_el1, elr_el1, spsr[5], then
# (16-byte aligned) user_fpsimd_state {vregs[32] (128-bit), fpsr, fpcr}.
REG_X: Final = tuple(core_id(8 * i) for i in range(31))
REG_SP_EL0: Final = core_id(8 * 31)
REG_PC: Final = core_id(8 * 32)
REG_PSTATE: Final = core_id(8 * 33)
REG_SP_EL1: Final = core_id(8 * 34)
REG_ELR_EL1: Final = core_id(8 * 35)
REG_SPSR_EL1: Final = core_id(8 * 36)  #: spsr[KVM_SPSR_EL1 = 0]
FP_OFFSET: Final = 336
REG_V: Final = tuple(core_id(FP_OFFSET + 16 * i, KVM_REG_SIZE_U128) for i in range(32))
REG_FPSR: Final = core_id(FP_OFFSET + 512, KVM_REG_SIZE_U32)
REG_FPCR: Final = core_id(FP_OFFSET + 516, KVM_REG_SIZE_U32)

#: The virtual timer's ids (arch/arm64/include/uapi/asm/kvm.h): CTL is CNTV_CTL_EL0's encoding,
#: but CNT is CNTV_CVAL_EL0's and CVAL is CNTVCT_EL0's.
TIMER_CTL: Final = (3, 3, 14, 3, 1)
TIMER_CNT: Final = (3, 3, 14, 3, 2)
TIMER_CVAL: Final = (3, 3, 14, 0, 2)
MPIDR_EL1: Final = (3, 0, 0, 0, 5)
_TAKEN_OUT: Final = {TIMER_CTL, TIMER_CNT, TIMER_CVAL, MPIDR_EL1}

KVM_MP_STATE_RUNNABLE: Final = 0
KVM_MP_STATE_STOPPED: Final = 5

IoctlFn = Callable[[int, int, Any, str], int]


def get_reg_list(fd: int, ioctl: IoctlFn) -> list[int]:
    """``KVM_GET_REG_LIST``: asked with n = 0 first (E2BIG tells the size)."""
    probe = ctypes.create_string_buffer(struct.pack("<Q", 0))
    try:
        ioctl(fd, KVM_GET_REG_LIST, probe, "KVM_GET_REG_LIST")
    except HypervisorError as exc:
        if exc.errno != 7:  # E2BIG
            raise
    count = struct.unpack_from("<Q", probe.raw)[0]
    buffer = ctypes.create_string_buffer(8 + 8 * count)
    struct.pack_into("<Q", buffer, 0, count)
    ioctl(fd, KVM_GET_REG_LIST, buffer, "KVM_GET_REG_LIST")
    count = struct.unpack_from("<Q", buffer.raw)[0]
    return list(struct.unpack_from(f"<{count}Q", buffer.raw, 8))


class OneReg:
    """``KVM_GET_ONE_REG``/``KVM_SET_ONE_REG`` of any size on one vCPU fd."""

    def __init__(self, fd: int, ioctl: IoctlFn, get_request: int, set_request: int) -> None:
        self.fd, self._ioctl, self._get_request, self._set_request = fd, ioctl, get_request, set_request

    def get(self, reg_id: int, name: str = "KVM_GET_ONE_REG") -> bytes:
        data = ctypes.create_string_buffer(reg_size(reg_id))
        request = ctypes.create_string_buffer(struct.pack("<QQ", reg_id, ctypes.addressof(data)))
        self._ioctl(self.fd, self._get_request, request, name)
        return data.raw

    def set(self, reg_id: int, value: bytes, name: str = "KVM_SET_ONE_REG") -> None:
        if len(value) != reg_size(reg_id):
            raise StateError(f"register {reg_id:#x}: {len(value)} bytes, KVM's id says {reg_size(reg_id)}")
        data = ctypes.create_string_buffer(value, len(value))
        request = ctypes.create_string_buffer(struct.pack("<QQ", reg_id, ctypes.addressof(data)))
        self._ioctl(self.fd, self._set_request, request, name)

    def get_int(self, reg_id: int) -> int:
        return int.from_bytes(self.get(reg_id), "little")

    def set_int(self, reg_id: int, value: int, name: str = "KVM_SET_ONE_REG") -> None:
        self.set(reg_id, value.to_bytes(reg_size(reg_id), "little"), name)


def save_cpu(regs: OneReg, reg_list: Sequence[int], mp_state: int) -> CpuState:
    """A vCPU's :class:`CpuState` (its registers through ``regs``, the list KVM reports)."""
    sysregs: list[tuple[SysRegEncoding, int]] = []
    opaque: list[tuple[int, bytes]] = []
    for reg_id in reg_list:
        coproc = reg_coproc(reg_id)
        if coproc == KVM_REG_ARM_CORE:
            continue  # by name below
        if coproc == KVM_REG_ARM64_SYSREG and reg_size(reg_id) == 8:
            encoding = sysreg_encoding(reg_id)
            if encoding not in _TAKEN_OUT:
                sysregs.append((encoding, regs.get_int(reg_id)))
        else:
            opaque.append((reg_id, regs.get(reg_id, f"KVM_GET_ONE_REG({reg_id:#x})")))
    return CpuState(
        x=tuple(regs.get_int(r) for r in REG_X), pc=regs.get_int(REG_PC), pstate=regs.get_int(REG_PSTATE),
        sp_el0=regs.get_int(REG_SP_EL0), sp_el1=regs.get_int(REG_SP_EL1), elr_el1=regs.get_int(REG_ELR_EL1),
        spsr_el1=regs.get_int(REG_SPSR_EL1),
        fp=FpSimdRegisters(v=tuple(regs.get_int(r) for r in REG_V), fpsr=regs.get_int(REG_FPSR),
                           fpcr=regs.get_int(REG_FPCR)),
        sysregs=tuple(sysregs),
        timer=VirtualTimer(count=regs.get_int(sysreg_id(TIMER_CNT)), cval=regs.get_int(sysreg_id(TIMER_CVAL)),
                           ctl=regs.get_int(sysreg_id(TIMER_CTL))),
        mpidr=regs.get_int(sysreg_id(MPIDR_EL1)),
        power=PowerState.OFF if mp_state == KVM_MP_STATE_STOPPED else PowerState.ON,
        opaque_backend="kvm", opaque=tuple(opaque),
    )


def restore_cpu(regs: OneReg, state: CpuState, reg_list: Sequence[int], *, set_count: bool = True) -> int:
    """Put ``state`` back: MPIDR_EL1 first, the system registers in their saved order, the
    core and FP/SIMD registers, the timer (count, compare value, then control; the count not
    when ``set_count`` is false: the caller sets it when the guest runs again, see
    :func:`set_counter`); opaque registers only when KVM saved them and this KVM lists them.
    Returns the MP state to set.

    :raises StateError: a register this KVM refuses, named."""
    listed = set(reg_list)

    def put(reg_id: int, value: int | bytes, name: str) -> None:
        try:
            if isinstance(value, bytes):
                regs.set(reg_id, value, name)
            else:
                regs.set_int(reg_id, value, name)
        except HypervisorError as exc:
            raise StateError(f"vcpu: KVM refuses {name} = {value!r}: {exc}") from None

    from vmmkit.aarch64 import sysreg_name

    put(sysreg_id(MPIDR_EL1), state.mpidr, "MPIDR_EL1")
    for encoding, value in state.sysregs:
        reg_id = sysreg_id(encoding)
        if reg_id not in listed:
            raise StateError(f"vcpu: system register {sysreg_name(encoding)} is in the snapshot but this KVM "
                             "does not list it (KVM_GET_REG_LIST)")
        put(reg_id, value, sysreg_name(encoding))
    for reg_id, value in zip(REG_X, state.x, strict=True):
        put(reg_id, value, "x")
    for reg_id, value, name in ((REG_SP_EL0, state.sp_el0, "SP_EL0"), (REG_SP_EL1, state.sp_el1, "SP_EL1"),
                                (REG_ELR_EL1, state.elr_el1, "ELR_EL1"), (REG_SPSR_EL1, state.spsr_el1, "SPSR_EL1"),
                                (REG_PSTATE, state.pstate, "PSTATE"), (REG_PC, state.pc, "PC")):
        put(reg_id, value, name)
    for reg_id, value in zip(REG_V, state.fp.v, strict=True):
        put(reg_id, value, "V")
    put(REG_FPSR, state.fp.fpsr, "FPSR")
    put(REG_FPCR, state.fp.fpcr, "FPCR")
    if state.opaque_backend == "kvm":
        for reg_id, data in state.opaque:
            if reg_id in listed:
                put(reg_id, data, f"KVM register {reg_id:#x}")
            else:
                log.info("kvm.snapshot.register_dropped", id=hex(reg_id), reason="not listed by this KVM")
    if set_count:
        put(sysreg_id(TIMER_CNT), state.timer.count, "KVM_REG_ARM_TIMER_CNT")
    put(sysreg_id(TIMER_CVAL), state.timer.cval, "KVM_REG_ARM_TIMER_CVAL")
    put(sysreg_id(TIMER_CTL), state.timer.ctl, "KVM_REG_ARM_TIMER_CTL")
    return KVM_MP_STATE_STOPPED if state.power is PowerState.OFF else KVM_MP_STATE_RUNNABLE


def set_counter(vcpus: Sequence[OneReg], count: int) -> None:
    """Set the guest's virtual count on every vCPU (``KVM_REG_ARM_TIMER_CNT`` moves the virtual
    offset: VM-wide on Linux 5.x-6.x, so the last write sets everyone's; written on each, as
    QEMU's ``kvm_arm_put_virtual_time`` does, so that no kernel's per-vCPU offset is left behind)."""
    for regs in vcpus:
        regs.set_int(sysreg_id(TIMER_CNT), count, "KVM_REG_ARM_TIMER_CNT")


# -- the vGIC -----------------------------------------------------------------------------------

KVM_DEV_ARM_VGIC_GRP_DIST_REGS: Final = 1
KVM_DEV_ARM_VGIC_GRP_REDIST_REGS: Final = 5
KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS: Final = 6
KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO: Final = 7
KVM_DEV_ARM_VGIC_GRP_ITS_REGS: Final = 8
KVM_DEV_ARM_VGIC_GRP_CTRL: Final = 4
KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES: Final = 3
KVM_DEV_ARM_ITS_SAVE_TABLES: Final = 1
KVM_DEV_ARM_ITS_RESTORE_TABLES: Final = 2
VGIC_LEVEL_INFO_LINE_LEVEL: Final = 0
KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT: Final = 10


def mpidr_attr(mpidr: int) -> int:
    """The ``mpidr`` field of a redistributor/CPU-interface attribute: Aff3.Aff2.Aff1.Aff0 in
    bits 63:32."""
    aff = ((mpidr >> 32) & 0xFF) << 24 | (mpidr & 0xFF_FFFF)
    return aff << 32


class DeviceAttrs:
    """``KVM_GET/SET_DEVICE_ATTR`` on a device fd, 32- or 64-bit values."""

    def __init__(self, fd: int, ioctl: IoctlFn) -> None:
        self.fd, self._ioctl = fd, ioctl

    def get(self, group: int, attr: int, size: int = 4) -> int:
        value = ctypes.c_uint32() if size == 4 else ctypes.c_uint64()
        request = ctypes.create_string_buffer(struct.pack("<IIQQ", 0, group, attr, ctypes.addressof(value)))
        self._ioctl(self.fd, KVM_GET_DEVICE_ATTR, request, f"KVM_GET_DEVICE_ATTR(group {group}, attr {attr:#x})")
        return int(value.value)

    def set(self, group: int, attr: int, value: int | None, size: int = 4) -> None:
        address = 0
        holder: Any = None
        if value is not None:
            holder = ctypes.c_uint32(value) if size == 4 else ctypes.c_uint64(value)
            address = ctypes.addressof(holder)
        request = ctypes.create_string_buffer(struct.pack("<IIQQ", 0, group, attr, address))
        self._ioctl(self.fd, KVM_SET_DEVICE_ATTR, request, f"KVM_SET_DEVICE_ATTR(group {group}, attr {attr:#x})")


def _cpu_attr(mpidr: int, encoding: SysRegEncoding) -> int:
    op0, op1, crn, crm, op2 = encoding
    return mpidr_attr(mpidr) | (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2


def save_gic(gic: DeviceAttrs, nr_irqs: int, mpidrs: Sequence[int]) -> P.GicState:
    distributor = {offset: gic.get(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, offset)
                   for offset in P.distributor_offsets(nr_irqs)}
    first = mpidr_attr(mpidrs[0]) if mpidrs else 0
    levels = tuple(gic.get(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
                           first | VGIC_LEVEL_INFO_LINE_LEVEL << KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT | 32 * word)
                   for word in range(1, nr_irqs // 32))
    redistributors = []
    for mpidr in mpidrs:
        registers = {offset: gic.get(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, mpidr_attr(mpidr) | offset)
                     for offset in P.REDISTRIBUTOR_OFFSETS}
        icc_ctlr = gic.get(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, _cpu_attr(mpidr, P.ICC_CTLR_EL1), 8)
        cpu = {name: gic.get(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, _cpu_attr(mpidr, encoding), 8)
               for name, encoding in P.cpu_interface_registers(icc_ctlr)}
        redistributors.append(P.Redistributor(mpidr, registers, cpu))
    return P.GicState(nr_irqs, distributor, levels, tuple(redistributors))


def restore_gic(gic: DeviceAttrs, state: P.GicState, nr_irqs: int, mpidrs: Sequence[int]) -> None:
    """:raises StateError: another number of IRQs or other vCPUs, or a register KVM refuses."""
    if state.nr_irqs != nr_irqs:
        raise StateError(f"vm.gic: {state.nr_irqs} interrupts in the snapshot, this VM's GIC has {nr_irqs}")
    saved = [r.mpidr for r in state.redistributors]
    if sorted(saved) != sorted(mpidrs):
        raise StateError(f"vm.gic: redistributors of MPIDRs {[hex(m) for m in saved]} in the snapshot, "
                         f"this VM's vCPUs are {[hex(m) for m in mpidrs]}")
    try:
        for offset in P.distributor_offsets(nr_irqs):
            if offset in state.distributor:
                gic.set(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, offset, state.distributor[offset])
        for redist in state.redistributors:
            for offset in P.REDISTRIBUTOR_OFFSETS:
                if offset in redist.registers:
                    gic.set(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, mpidr_attr(redist.mpidr) | offset,
                            redist.registers[offset])
            for name, encoding in P.CPU_INTERFACE_REGISTERS:
                if name in redist.cpu_interface:
                    gic.set(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, _cpu_attr(redist.mpidr, encoding),
                            redist.cpu_interface[name], 8)
        first = mpidr_attr(mpidrs[0]) if mpidrs else 0
        for word, level in enumerate(state.line_levels, start=1):
            gic.set(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
                    first | VGIC_LEVEL_INFO_LINE_LEVEL << KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT | 32 * word, level)
    except HypervisorError as exc:
        raise StateError(f"vm.gic: KVM refuses the saved state: {exc}") from None


def save_its(gic: DeviceAttrs, its: DeviceAttrs) -> P.ItsState:
    """Flush the LPI pending and ITS tables into guest RAM, then read the ITS's registers."""
    gic.set(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES, None)
    its.set(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_ITS_SAVE_TABLES, None)
    return P.ItsState({offset: its.get(KVM_DEV_ARM_VGIC_GRP_ITS_REGS, offset, 8) for offset in P.ITS_OFFSETS})


def restore_its(its: DeviceAttrs, state: P.ItsState) -> None:
    try:
        for offset in P.ITS_OFFSETS[:-1]:
            if offset in state.registers:
                its.set(KVM_DEV_ARM_VGIC_GRP_ITS_REGS, offset, state.registers[offset], 8)
        its.set(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_ITS_RESTORE_TABLES, None)
        if P.GITS_CTLR in state.registers:
            its.set(KVM_DEV_ARM_VGIC_GRP_ITS_REGS, P.GITS_CTLR, state.registers[P.GITS_CTLR], 8)
    except HypervisorError as exc:
        raise StateError(f"vm.its: KVM refuses the saved state: {exc}") from None
