"""The Microsoft Hypervisor's x64 register names and value encodings, and their translation to
vmmkit's neutral :mod:`vmmkit.x86` types.

Names are ``enum hv_register_name`` (include/hyperv/hvgdk_mini.h); a value is the 16-byte
``union hv_register_value``: integers little-endian in the low bytes, segments as
``struct hv_x64_segment_register`` (base u64, limit u32, selector u16, attributes u16), tables
as ``struct hv_x64_table_register`` (pad u16[3], limit u16, base u64).
"""

from __future__ import annotations

import enum
import struct

from vmmkit.x86 import DescriptorTable, Segment, SpecialRegisters, StandardRegisters


class Reg(enum.IntEnum):
    EXPLICIT_SUSPEND = 0x00000000
    INTERCEPT_SUSPEND = 0x00000001
    INTERNAL_ACTIVITY_STATE = 0x00000004  # startup_suspend:1 halt_suspend:1 idle_suspend:1
    PENDING_INTERRUPTION = 0x00010002
    INTERRUPT_STATE = 0x00010003
    RAX = 0x00020000
    RCX = 0x00020001
    RDX = 0x00020002
    RBX = 0x00020003
    RSP = 0x00020004
    RBP = 0x00020005
    RSI = 0x00020006
    RDI = 0x00020007
    R8 = 0x00020008
    R9 = 0x00020009
    R10 = 0x0002000A
    R11 = 0x0002000B
    R12 = 0x0002000C
    R13 = 0x0002000D
    R14 = 0x0002000E
    R15 = 0x0002000F
    RIP = 0x00020010
    RFLAGS = 0x00020011
    FP_CONTROL_STATUS = 0x00030018
    XMM_CONTROL_STATUS = 0x00030019
    CR0 = 0x00040000
    CR2 = 0x00040001
    CR3 = 0x00040002
    CR4 = 0x00040003
    CR8 = 0x00040004
    ES = 0x00060000
    CS = 0x00060001
    SS = 0x00060002
    DS = 0x00060003
    FS = 0x00060004
    GS = 0x00060005
    LDTR = 0x00060006
    TR = 0x00060007
    IDTR = 0x00070000
    GDTR = 0x00070001
    TSC = 0x00080000
    EFER = 0x00080001
    KERNEL_GS_BASE = 0x00080002
    APIC_BASE = 0x00080003
    PAT = 0x00080004
    SYSENTER_CS = 0x00080005
    SYSENTER_EIP = 0x00080006
    SYSENTER_ESP = 0x00080007
    STAR = 0x00080008
    LSTAR = 0x00080009
    CSTAR = 0x0008000A
    SFMASK = 0x0008000B
    MTRR_DEF_TYPE = 0x0008000E
    TSC_AUX = 0x0008007B


#: The general registers in the hypervisor's numbering (also the register page's order).
GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
STANDARD = tuple(Reg[name.upper()] for name in GPR_ORDER) + (Reg.RIP, Reg.RFLAGS)
SEGMENTS = {"es": Reg.ES, "cs": Reg.CS, "ss": Reg.SS, "ds": Reg.DS, "fs": Reg.FS, "gs": Reg.GS,
            "ldt": Reg.LDTR, "tr": Reg.TR}
SPECIAL = (*SEGMENTS.values(), Reg.GDTR, Reg.IDTR, Reg.CR0, Reg.CR2, Reg.CR3, Reg.CR4, Reg.CR8,
           Reg.EFER, Reg.APIC_BASE)
#: MSRs with a register name of their own (the rest are not reachable through registers).
MSR_REGISTERS = {
    0x10: Reg.TSC, 0xC000_0080: Reg.EFER, 0xC000_0102: Reg.KERNEL_GS_BASE, 0x1B: Reg.APIC_BASE,
    0x277: Reg.PAT, 0x174: Reg.SYSENTER_CS, 0x176: Reg.SYSENTER_EIP, 0x175: Reg.SYSENTER_ESP,
    0xC000_0081: Reg.STAR, 0xC000_0082: Reg.LSTAR, 0xC000_0083: Reg.CSTAR, 0xC000_0084: Reg.SFMASK,
    0x2FF: Reg.MTRR_DEF_TYPE, 0xC000_0103: Reg.TSC_AUX,
}

_U64 = 0xFFFF_FFFF_FFFF_FFFF


def u64(value: int) -> bytes:
    if not 0 <= value <= _U64:
        raise ValueError(f"register value {value:#x} does not fit 64 bits")
    return value.to_bytes(8, "little") + bytes(8)


def as_u64(raw: bytes) -> int:
    return int.from_bytes(raw[:8], "little")


def encode_segment(seg: Segment) -> bytes:
    """``struct hv_x64_segment_register``; attributes as in the VMX access-rights byte pair."""
    attributes = (seg.type & 0xF) | (seg.s & 1) << 4 | (seg.dpl & 3) << 5 | (seg.present & 1) << 7 \
        | (seg.avl & 1) << 12 | (seg.l & 1) << 13 | (seg.db & 1) << 14 | (seg.g & 1) << 15
    return struct.pack("<QIHH", seg.base, seg.limit, seg.selector, attributes)


def decode_segment(raw: bytes) -> Segment:
    base, limit, selector, attributes = struct.unpack_from("<QIHH", raw)
    present = (attributes >> 7) & 1
    return Segment(base=base, limit=limit, selector=selector, type=attributes & 0xF, s=(attributes >> 4) & 1,
                   dpl=(attributes >> 5) & 3, present=present, avl=(attributes >> 12) & 1,
                   l=(attributes >> 13) & 1, db=(attributes >> 14) & 1, g=(attributes >> 15) & 1,
                   unusable=0 if present else 1)


def encode_table(table: DescriptorTable) -> bytes:
    return struct.pack("<6xHQ", table.limit, table.base)


def decode_table(raw: bytes) -> DescriptorTable:
    limit, base = struct.unpack_from("<6xHQ", raw)
    return DescriptorTable(base=base, limit=limit)


def standard_to_values(regs: StandardRegisters) -> list[tuple[int, bytes]]:
    names = (*GPR_ORDER, "rip", "rflags")
    return [(int(reg), u64(getattr(regs, name))) for reg, name in zip(STANDARD, names, strict=True)]


def standard_from_values(values: list[bytes]) -> StandardRegisters:
    names = (*GPR_ORDER, "rip", "rflags")
    return StandardRegisters(**{name: as_u64(raw) for name, raw in zip(names, values, strict=True)})


def special_to_values(sregs: SpecialRegisters) -> list[tuple[int, bytes]]:
    pairs = [(int(reg), encode_segment(getattr(sregs, name))) for name, reg in SEGMENTS.items()]
    pairs += [(int(Reg.GDTR), encode_table(sregs.gdt)), (int(Reg.IDTR), encode_table(sregs.idt))]
    pairs += [(int(Reg.CR0), u64(sregs.cr0)), (int(Reg.CR2), u64(sregs.cr2)), (int(Reg.CR3), u64(sregs.cr3)),
              (int(Reg.CR4), u64(sregs.cr4)), (int(Reg.CR8), u64(sregs.cr8)), (int(Reg.EFER), u64(sregs.efer)),
              (int(Reg.APIC_BASE), u64(sregs.apic_base))]
    return pairs


def special_from_values(values: list[bytes]) -> SpecialRegisters:
    it = iter(values)
    segs = {name: decode_segment(next(it)) for name in SEGMENTS}
    gdt, idt = decode_table(next(it)), decode_table(next(it))
    cr0, cr2, cr3, cr4, cr8, efer, apic_base = (as_u64(next(it)) for _ in range(7))
    return SpecialRegisters(**segs, gdt=gdt, idt=idt, cr0=cr0, cr2=cr2, cr3=cr3, cr4=cr4, cr8=cr8, efer=efer,
                            apic_base=apic_base)
