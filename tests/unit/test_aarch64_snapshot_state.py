"""AArch64 snapshot state (issue 16, beyond x86): the backend-neutral vCPU state's JSON
(:mod:`vmmkit_aarch64.snapshot`), the GICv3/ITS layout (:mod:`vmmkit.aarch64_platform`), and
KVM-arm64's register ids and save/restore order (:mod:`vmmkit_kvm.arm64_state`) against a
register file standing in for a vCPU fd (a contract test of the order, not of KVM: the lab test
``tests/lab/test_lab_snapshot_aarch64.py`` runs the real one)."""

from __future__ import annotations

import ctypes
import struct
from typing import Any

import attrs
import pytest
from vmmkit_aarch64.snapshot import cpu_state_from_json, cpu_state_to_json
from vmmkit_kvm import arm64_state as S

from vmmkit import aarch64_platform as P
from vmmkit.aarch64 import CpuState, FpSimdRegisters, PowerState, VirtualTimer, mpidr_for, sysreg_name
from vmmkit.state import StateError

SCTLR = (3, 0, 1, 0, 0)
TPIDR_EL1 = (3, 0, 13, 0, 4)


def sample_state() -> CpuState:
    return CpuState(
        x=tuple(range(100, 131)), pc=0x4008_0000, pstate=0x3C5, sp_el0=0x1234, sp_el1=0x4010_0000,
        elr_el1=0x4008_1000, spsr_el1=0x3C4,
        fp=FpSimdRegisters(v=((1 << 127) | 5, 0xFFFF_FFFF_FFFF_FFFF_0000), fpsr=0x0800_0000, fpcr=0x0300_0000),
        sysregs=((SCTLR, 0x30D0_1805), (TPIDR_EL1, 1)), timer=VirtualTimer(123_456_789, 200_000_000, 1),
        mpidr=mpidr_for(1), power=PowerState.OFF, opaque_backend="kvm",
        opaque=((0x6030_0000_0014_0000, b"\x02\x00\x01\x00\x00\x00\x00\x00"),),
    )


def test_a_cpu_state_round_trips_through_json() -> None:
    state = sample_state()
    raw = cpu_state_to_json(state)
    assert raw["sysregs"] == [["S3_0_C1_C0_0", 0x30D0_1805], ["S3_0_C13_C0_4", 1]]
    assert raw["power"] == "off" and raw["fp"]["v"][0] == (1 << 127) | 5
    assert cpu_state_from_json(raw, "vcpu1") == state


def _broken(change: Any) -> dict[str, Any]:
    raw = cpu_state_to_json(sample_state())
    change(raw)
    return raw


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["x"].pop(), "vcpu1.x: expected 31 64-bit integers"),
    (lambda r: r["fp"]["v"].__setitem__(3, 1 << 128), "vcpu1.fp.v: expected 32 128-bit integers"),
    (lambda r: r["sysregs"].append(["SCTLR_EL1", 0]), "'SCTLR_EL1' is not a system register encoding"),
    (lambda r: r["sysregs"].append(["S3_0_C1_C0_0", 1]), "vcpu1.sysregs: S3_0_C1_C0_0 twice"),
    (lambda r: r["sysregs"].append(["S3_0_C1_C1_0", -1]), "is not a 64-bit value"),
    (lambda r: r.__setitem__("power", "suspended"), "'suspended' is neither 'on' nor 'off'"),
    (lambda r: r["opaque"]["registers"][0].__setitem__(1, "!!"), "not valid base64"),
    (lambda r: r["timer"].pop("cval"), "vcpu1.timer: missing 'cval'"),
    (lambda r: r.__setitem__("pc", True), "vcpu1.pc: expected int, found bool"),
], ids=["x", "v", "name", "twice", "negative", "power", "opaque", "timer", "bool"])
def test_a_malformed_cpu_state_is_refused_naming_the_field(change: Any, message: str) -> None:
    with pytest.raises(StateError) as info:
        cpu_state_from_json(_broken(change), "vcpu1")
    assert message in str(info.value)


def test_system_registers_are_named_as_the_assembler_names_them() -> None:
    assert sysreg_name((3, 0, 0, 0, 5)) == "MPIDR_EL1"
    assert sysreg_name((2, 0, 0, 0, 5)) == "S2_0_C0_C0_5"


# -- the GICv3 layout ---------------------------------------------------------------------------


def sample_gic() -> P.GicState:
    cpu = {name: 0 for name, _ in P.cpu_interface_registers(0x400)}
    redists = tuple(P.Redistributor(mpidr_for(i), {offset: i if offset == P.GICR_PROPBASER else 0
                                                   for offset in P.REDISTRIBUTOR_OFFSETS}, cpu)
                    for i in range(2))
    return P.GicState(256, {offset: 0 for offset in P.distributor_offsets(256)} | {P.GICD_CTLR: 0x10},
                      (0,) * 7, redists)


def test_the_gic_layout_round_trips_and_restores_the_enables_last() -> None:
    offsets = P.distributor_offsets(256)
    assert offsets[-1] == P.GICD_CTLR and len(set(offsets)) == len(offsets)
    assert P.REDISTRIBUTOR_OFFSETS[-1] == P.GICR_CTLR
    assert P.REDISTRIBUTOR_OFFSETS.index(P.GICR_PROPBASER) < P.REDISTRIBUTOR_OFFSETS.index(P.GICR_ISENABLER0)
    assert [n for n, _ in P.CPU_INTERFACE_REGISTERS][-2:] == ["ICC_IGRPEN0_EL1", "ICC_IGRPEN1_EL1"]
    # ICC_CTLR_EL1.PRIbits: 5 bits -> one ICC_AP<g>R<n> per group, 7 bits -> four
    assert [n for n, _ in P.cpu_interface_registers(4 << 8) if n.startswith("ICC_AP")] == ["ICC_AP0R0_EL1",
                                                                                            "ICC_AP1R0_EL1"]
    assert len([n for n, _ in P.cpu_interface_registers(6 << 8) if n.startswith("ICC_AP")]) == 8
    gic, its = sample_gic(), P.ItsState({offset: 0 for offset in P.ITS_OFFSETS})
    assert P.parse_platform_state(P.platform_state(gic, its)) == P.PlatformState(gic, its)
    assert P.parse_platform_state(P.platform_state()) == P.PlatformState(None, None)
    assert gic.in_use() is None and its.in_use() is None


def test_what_the_guest_enabled_is_in_use() -> None:
    gic = sample_gic()
    enabled = P.GicState(gic.nr_irqs, {**gic.distributor, P.GICD_CTLR: 0x12}, gic.line_levels, gic.redistributors)
    assert enabled.in_use() == "the guest enabled the GICv3 distributor (GICD_CTLR)"
    redist = P.Redistributor(0x8000_0001, {}, {"ICC_IGRPEN1_EL1": 1})
    cpu_on = P.GicState(gic.nr_irqs, gic.distributor, gic.line_levels, (redist,))
    assert "CPU interface of MPIDR 0x80000001 (ICC_IGRPEN1_EL1)" in (cpu_on.in_use() or "")
    assert P.ItsState({P.GITS_CTLR: 1}).in_use() == "the guest enabled the GICv3 ITS (GITS_CTLR)"


@pytest.mark.parametrize(("change", "message"), [
    (lambda g: g["distributor"].__setitem__("0x0008", 1), "vm.gic.distributor: '0x0008' is not a register"),
    (lambda g: g["distributor"].__setitem__("0x0000", 1 << 32), "is not a 32-bit value"),
    (lambda g: g.__setitem__("nr_irqs", 100), "vm.gic.nr_irqs: 100 is not a multiple of 32"),
    (lambda g: g["redistributors"][0]["cpu_interface"].__setitem__("ICC_SGI1R_EL1", 0), "bad entry 'ICC_SGI1R_EL1'"),
    (lambda g: g.__setitem__("line_levels", [0] * 9), "vm.gic.line_levels"),
], ids=["offset", "width", "nr-irqs", "sysreg", "levels"])
def test_a_malformed_gic_state_is_refused(change: Any, message: str) -> None:
    raw = P.platform_state(sample_gic())
    change(raw["gic"])
    with pytest.raises(StateError) as info:
        P.parse_platform_state(raw)
    assert message in str(info.value)


# -- KVM-arm64's ids and order ------------------------------------------------------------------


def test_kvm_register_ids_are_the_uapi_ones() -> None:
    """Values as QEMU's target/arm/kvm64.c and the uapi header compute them."""
    assert S.REG_X[0] == 0x6030_0000_0010_0000
    assert S.REG_PC == 0x6030_0000_0010_0040
    assert S.REG_V[0] == 0x6040_0000_0010_0054 and S.REG_V[31] == 0x6040_0000_0010_00D0
    assert S.REG_FPSR == 0x6020_0000_0010_00D4 and S.REG_FPCR == 0x6020_0000_0010_00D5
    assert S.sysreg_id(S.TIMER_CNT) == 0x6030_0000_0013_DF1A  # KVM_REG_ARM_TIMER_CNT
    assert S.sysreg_id(S.TIMER_CVAL) == 0x6030_0000_0013_DF02
    assert S.sysreg_id(S.TIMER_CTL) == 0x6030_0000_0013_DF19
    assert S.sysreg_encoding(S.sysreg_id((3, 0, 12, 12, 5))) == (3, 0, 12, 12, 5)
    assert (S.reg_size(S.REG_V[0]), S.reg_size(S.REG_FPSR), S.reg_size(S.REG_PC)) == (16, 4, 8)
    # the vGIC's mpidr field: Aff3.Aff2.Aff1.Aff0 in bits 63:32
    assert S.mpidr_attr(mpidr_for(17)) == 0x0000_0101 << 32
    assert S.mpidr_attr(0x12_8034_5678) == 0x1234_5678 << 32


class RegisterFile:
    """A vCPU fd's ONE_REG ioctls over a dict (what KVM_GET/SET_ONE_REG do to a register)."""

    def __init__(self, values: dict[int, int]) -> None:
        self.values = values
        self.writes: list[int] = []

    def ioctl(self, fd: int, request: int, buffer: Any, name: str) -> int:
        reg_id, address = struct.unpack_from("<QQ", buffer.raw)
        size = S.reg_size(reg_id)
        if request == 1:  # get
            ctypes.memmove(address, self.values[reg_id].to_bytes(size, "little"), size)
        else:
            self.values[reg_id] = int.from_bytes(ctypes.string_at(address, size), "little")
            self.writes.append(reg_id)
        return 0


def kvm_registers() -> tuple[dict[int, int], list[int]]:
    fw = 0x6030_0000_0014_0000  # KVM_REG_ARM_PSCI_VERSION
    listed = [*S.REG_X, S.REG_SP_EL0, S.REG_PC, S.REG_PSTATE, S.REG_SP_EL1, S.REG_ELR_EL1, S.REG_SPSR_EL1,
              *S.REG_V, S.REG_FPSR, S.REG_FPCR, fw, S.sysreg_id(S.MPIDR_EL1), S.sysreg_id(SCTLR),
              S.sysreg_id(S.TIMER_CTL), S.sysreg_id(S.TIMER_CNT), S.sysreg_id(TPIDR_EL1), S.sysreg_id(S.TIMER_CVAL)]
    values = {reg_id: index + 1 for index, reg_id in enumerate(listed)}
    values[S.REG_V[2]] = (1 << 127) | 7
    return values, listed


def test_kvm_saves_every_listed_register_and_restores_in_order() -> None:
    values, listed = kvm_registers()
    source = RegisterFile(dict(values))
    state = S.save_cpu(S.OneReg(3, source.ioctl, 1, 2), listed, S.KVM_MP_STATE_STOPPED)
    assert [enc for enc, _ in state.sysregs] == [SCTLR, TPIDR_EL1]  # the timer's and MPIDR taken out
    assert state.timer == VirtualTimer(values[S.sysreg_id(S.TIMER_CNT)], values[S.sysreg_id(S.TIMER_CVAL)],
                                       values[S.sysreg_id(S.TIMER_CTL)])
    assert state.fp.v[2] == (1 << 127) | 7 and state.power is PowerState.OFF
    assert state.opaque == ((0x6030_0000_0014_0000, values[0x6030_0000_0014_0000].to_bytes(8, "little")),)
    assert cpu_state_from_json(cpu_state_to_json(state), "vcpu0") == state

    target = RegisterFile({reg_id: 0 for reg_id in listed})
    mp_state = S.restore_cpu(S.OneReg(4, target.ioctl, 1, 2), state, listed)
    assert mp_state == S.KVM_MP_STATE_STOPPED
    assert target.values == values
    assert target.writes[:3] == [S.sysreg_id(S.MPIDR_EL1), S.sysreg_id(SCTLR), S.sysreg_id(TPIDR_EL1)]
    assert target.writes[-3:] == [S.sysreg_id(S.TIMER_CNT), S.sysreg_id(S.TIMER_CVAL), S.sysreg_id(S.TIMER_CTL)]

    later = RegisterFile({reg_id: 0 for reg_id in listed})  # the count left for the first run
    S.restore_cpu(S.OneReg(4, later.ioctl, 1, 2), state, listed, set_count=False)
    assert S.sysreg_id(S.TIMER_CNT) not in later.writes and later.values[S.sysreg_id(S.TIMER_CNT)] == 0
    S.set_counter([S.OneReg(4, later.ioctl, 1, 2)], 77)
    assert later.writes[-1] == S.sysreg_id(S.TIMER_CNT) and later.values[S.sysreg_id(S.TIMER_CNT)] == 77


def test_kvm_refuses_a_system_register_it_does_not_list() -> None:
    values, listed = kvm_registers()
    state = S.save_cpu(S.OneReg(3, RegisterFile(values).ioctl, 1, 2), listed, 0)
    extra = attrs.evolve(state, sysregs=(((3, 0, 10, 4, 0), 1),))  # LORSA_EL1
    with pytest.raises(StateError, match="S3_0_C10_C4_0 is in the snapshot but this KVM does not list it"):
        S.restore_cpu(S.OneReg(4, RegisterFile(dict(values)).ioctl, 1, 2), extra, listed)


def test_emu_refuses_only_what_the_guest_relies_on() -> None:
    from vmmkit_emu.arm64 import refusal

    assert refusal((2, 0, 0, 0, 5), 0x1E4) is None  # DBGBCR0_EL1 disabled
    assert "hardware breakpoint" in (refusal((2, 0, 0, 3, 5), 0x1E5) or "")
    assert "hardware watchpoint" in (refusal((2, 0, 0, 1, 7), 0x1F) or "")
    assert "debug exceptions" in (refusal((2, 0, 0, 2, 2), 1 << 15) or "")
    assert "PMU" in (refusal((3, 3, 9, 12, 0), 0x41) or "")
    assert refusal((3, 3, 9, 12, 0), 0x40) is None
    assert "physical timer" in (refusal((3, 3, 14, 2, 1), 1) or "")
    assert refusal((3, 3, 14, 2, 1), 3) is None  # masked
    assert refusal((3, 0, 0, 4, 0), 0x1122) is None  # ID_AA64PFR0_EL1: describes the CPU
