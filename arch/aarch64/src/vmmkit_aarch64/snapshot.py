"""An AArch64 vCPU's state in a snapshot: :class:`vmmkit.aarch64.CpuState` as JSON (version
:data:`VCPU_STATE_VERSION`)::

    x         [x0, ..., x30]
    pc, pstate, sp_el0, sp_el1, elr_el1, spsr_el1
    fp        {"v": [v0, ..., v31] (128-bit integers), "fpsr", "fpcr"}
    sysregs   [["S3_0_C1_C0_0", value], ...]: system registers by encoding, in the order saved
              (the order a restore writes them: KVM's ``KVM_GET_REG_LIST`` order, as Cloud
              Hypervisor and crosvm restore it)
    timer     {"count", "cval", "ctl"}: the virtual timer (CNTVCT_EL0, CNTV_CVAL_EL0, CNTV_CTL_EL0)
    mpidr     MPIDR_EL1
    power     "on" or "off" (PSCI: KVM_GET_MP_STATE on KVM)
    opaque    {"backend": name, "registers": [[id, base64], ...]}: registers only that backend knows

The backend's :class:`vmmkit.aarch64.Aarch64VcpuSnapshot` reads and writes it; what a backend
cannot take (emu: an armed timer interrupt, enabled debug or PMU registers) it refuses by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from vmmkit.aarch64 import CpuState, FpSimdRegisters, PowerState, SysRegEncoding, VirtualTimer
from vmmkit.state import StateError, field, int_field, pack_bytes, unpack_bytes

VCPU_STATE_VERSION: Final = 1

_U64: Final = (1 << 64) - 1
_SYSREG_NAME: Final = re.compile(r"S([0-3])_([0-7])_C([0-9]|1[0-5])_C([0-9]|1[0-5])_([0-7])")


def encoding_text(encoding: SysRegEncoding) -> str:
    op0, op1, crn, crm, op2 = encoding
    return f"S{op0}_{op1}_C{crn}_C{crm}_{op2}"


def parse_encoding(text: Any, what: str) -> SysRegEncoding:
    match = _SYSREG_NAME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise StateError(f"{what}: {text!r} is not a system register encoding (S<op0>_<op1>_C<n>_C<m>_<op2>)")
    op0, op1, crn, crm, op2 = (int(g) for g in match.groups())
    return (op0, op1, crn, crm, op2)


def cpu_state_to_json(state: CpuState) -> dict[str, Any]:
    return {
        "x": list(state.x), "pc": state.pc, "pstate": state.pstate, "sp_el0": state.sp_el0,
        "sp_el1": state.sp_el1, "elr_el1": state.elr_el1, "spsr_el1": state.spsr_el1,
        "fp": {"v": list(state.fp.v), "fpsr": state.fp.fpsr, "fpcr": state.fp.fpcr},
        "sysregs": [[encoding_text(enc), value] for enc, value in state.sysregs],
        "timer": {"count": state.timer.count, "cval": state.timer.cval, "ctl": state.timer.ctl},
        "mpidr": state.mpidr,
        "power": state.power.value,
        "opaque": {"backend": state.opaque_backend,
                   "registers": [[reg_id, pack_bytes(data)] for reg_id, data in state.opaque]},
    }


def _ints(raw: Any, count: int, bits: int, what: str) -> tuple[int, ...]:
    if (not isinstance(raw, list) or len(raw) != count
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << bits for v in raw)):
        raise StateError(f"{what}: expected {count} {bits}-bit integers")
    return tuple(raw)


def cpu_state_from_json(raw: Mapping[str, Any], what: str) -> CpuState:
    """:raises StateError: malformed (every field checked before any is used)."""
    fp = field(raw, "fp", dict, what)
    timer = field(raw, "timer", dict, what)
    sysregs = []
    seen = set()
    for entry in field(raw, "sysregs", list, what):
        if not isinstance(entry, list) or len(entry) != 2:
            raise StateError(f"{what}.sysregs: bad entry {entry!r}")
        encoding = parse_encoding(entry[0], f"{what}.sysregs")
        value = entry[1]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64:
            raise StateError(f"{what}.sysregs.{entry[0]}: {value!r} is not a 64-bit value")
        if encoding in seen:
            raise StateError(f"{what}.sysregs: {entry[0]} twice")
        seen.add(encoding)
        sysregs.append((encoding, value))
    power = field(raw, "power", str, what)
    if power not in ("on", "off"):
        raise StateError(f"{what}.power: {power!r} is neither 'on' nor 'off'")
    opaque_raw = field(raw, "opaque", dict, what)
    opaque = []
    for entry in field(opaque_raw, "registers", list, f"{what}.opaque"):
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], int)
                or isinstance(entry[0], bool) or not 0 <= entry[0] <= _U64):
            raise StateError(f"{what}.opaque.registers: bad entry {entry!r}")
        opaque.append((entry[0], unpack_bytes(entry[1], f"{what}.opaque.registers[{entry[0]:#x}]")))
    return CpuState(
        x=_ints(field(raw, "x", list, what), 31, 64, f"{what}.x"),
        pc=int_field(raw, "pc", what), pstate=int_field(raw, "pstate", what, 0, 0xFFFF_FFFF),
        sp_el0=int_field(raw, "sp_el0", what), sp_el1=int_field(raw, "sp_el1", what),
        elr_el1=int_field(raw, "elr_el1", what), spsr_el1=int_field(raw, "spsr_el1", what, 0, 0xFFFF_FFFF),
        fp=FpSimdRegisters(v=_ints(field(fp, "v", list, f"{what}.fp"), 32, 128, f"{what}.fp.v"),
                           fpsr=int_field(fp, "fpsr", f"{what}.fp", 0, 0xFFFF_FFFF),
                           fpcr=int_field(fp, "fpcr", f"{what}.fp", 0, 0xFFFF_FFFF)),
        sysregs=tuple(sysregs),
        timer=VirtualTimer(int_field(timer, "count", f"{what}.timer"), int_field(timer, "cval", f"{what}.timer"),
                           int_field(timer, "ctl", f"{what}.timer", 0, 0xFFFF_FFFF)),
        mpidr=int_field(raw, "mpidr", what),
        power=PowerState(power),
        opaque_backend=field(opaque_raw, "backend", str, f"{what}.opaque"),
        opaque=tuple(opaque),
    )
