"""vCPU state at power-on: MSRs, FPU, local APIC and the boot registers of each protocol.

``linux64`` (64-bit boot protocol): long mode with paging on the identity tables, CS = 0x10
(64-bit code), DS/ES/FS/GS/SS = 0x18, RSI = the zero page, RIP = the entry point.
``pvh``: 32-bit flat protected mode, paging off, CS = 0x10 (32-bit code), EBX = start_info.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

import attrs

from vmmkit.x86 import CpuIdEntry, DescriptorTable, FpuState, MsrEntry, SpecialRegisters, StandardRegisters
from vmmkit_x86_64 import gdt
from vmmkit_x86_64 import layout as L

# -- MSRs -------------------------------------------------------------------------------------
MSR_IA32_TSC: Final = 0x10
MSR_IA32_SYSENTER_CS: Final = 0x174
MSR_IA32_SYSENTER_ESP: Final = 0x175
MSR_IA32_SYSENTER_EIP: Final = 0x176
MSR_IA32_MISC_ENABLE: Final = 0x1A0
MSR_MTRR_DEF_TYPE: Final = 0x2FF
MSR_STAR: Final = 0xC0000081
MSR_LSTAR: Final = 0xC0000082
MSR_CSTAR: Final = 0xC0000083
MSR_SYSCALL_MASK: Final = 0xC0000084
MSR_KERNEL_GS_BASE: Final = 0xC0000102

MISC_ENABLE_FAST_STRING: Final = 1 << 0
MTRR_ENABLE: Final = 1 << 11
MTRR_MEM_TYPE_WB: Final = 6


#: AMD's hardware configuration register.
MSR_K7_HWCR: Final = 0xC001_0015
#: HWCR.TscFreqSel (bit 24): the TSC counts at the P0 frequency. Every AMD CPU since family 10h
#: revision C reads it as 1; Linux warns "[Firmware Bug]: TSC doesn't count with P0 frequency!"
#: (arch/x86/kernel/cpu/amd.c) when a later family with a constant TSC reads it clear. KVM
#: accepts it from the VMM since Linux 6.7 (arch/x86/kvm/x86.c, ``MSR_K7_HWCR``).
HWCR_TSC_FREQ_SEL: Final = 1 << 24


def amd_msrs() -> list[MsrEntry]:
    """What an AMD vCPU starts with beyond :func:`boot_msrs` (a backend may refuse them)."""
    return [MsrEntry(MSR_K7_HWCR, HWCR_TSC_FREQ_SEL)]


def boot_msrs() -> list[MsrEntry]:
    """The MSRs every vCPU starts with (as Cloud Hypervisor sets them)."""
    return [
        MsrEntry(MSR_IA32_SYSENTER_CS, 0),
        MsrEntry(MSR_IA32_SYSENTER_ESP, 0),
        MsrEntry(MSR_IA32_SYSENTER_EIP, 0),
        MsrEntry(MSR_STAR, 0),
        MsrEntry(MSR_CSTAR, 0),
        MsrEntry(MSR_LSTAR, 0),
        MsrEntry(MSR_KERNEL_GS_BASE, 0),
        MsrEntry(MSR_SYSCALL_MASK, 0),
        MsrEntry(MSR_IA32_TSC, 0),
        MsrEntry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        MsrEntry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]


#: KVM's paravirtual MSRs (Documentation/virt/kvm/x86/msr.rst) with the feature bit of CPUID
#: 0x40000001 EAX that offers each, and its reset value. A guest that enabled steal time, async
#: page faults or PV EOI left guest-physical addresses in them that KVM keeps writing to: after a
#: reset they would land in the next kernel's memory. QEMU clears them on reset too
#: (target/i386/kvm/kvm.c, ``kvm_put_msrs``).
KVM_CPUID_SIGNATURE: Final = 0x4000_0000
KVM_CPUID_FEATURES: Final = 0x4000_0001
KVM_SIGNATURE: Final = (0x4B4D564B, 0x564B4D56, 0x4D)  # "KVMKVMKVM\0\0\0"
KVM_PV_MSRS: Final[tuple[tuple[int, int, int], ...]] = (
    # (feature bit, MSR, value after reset)
    (0, 0x11, 0),  # MSR_KVM_WALL_CLOCK
    (0, 0x12, 0),  # MSR_KVM_SYSTEM_TIME
    (3, 0x4B56_4D00, 0),  # MSR_KVM_WALL_CLOCK_NEW
    (3, 0x4B56_4D01, 0),  # MSR_KVM_SYSTEM_TIME_NEW
    (14, 0x4B56_4D06, 0),  # MSR_KVM_ASYNC_PF_INT
    (4, 0x4B56_4D02, 0),  # MSR_KVM_ASYNC_PF_EN
    (5, 0x4B56_4D03, 0),  # MSR_KVM_STEAL_TIME
    (6, 0x4B56_4D04, 0),  # MSR_KVM_PV_EOI_EN
    (12, 0x4B56_4D05, 1),  # MSR_KVM_POLL_CONTROL (1: host-side haltpoll allowed)
)
MSR_IA32_TSC_DEADLINE: Final = 0x6E0
CPUID_1_ECX_TSC_DEADLINE: Final = 1 << 24


def reset_msrs(cpuid: Sequence[CpuIdEntry]) -> list[MsrEntry]:
    """MSRs a guest may have armed that must be disarmed at every (re)boot, for the features
    ``cpuid`` (what the guest is given) offers: KVM's paravirtual MSRs and the TSC deadline."""
    by_function = {entry.function: entry for entry in cpuid if entry.index == 0}
    msrs: list[MsrEntry] = []
    leaf1 = by_function.get(1)
    if leaf1 is not None and leaf1.ecx & CPUID_1_ECX_TSC_DEADLINE:
        msrs.append(MsrEntry(MSR_IA32_TSC_DEADLINE, 0))
    signature = by_function.get(KVM_CPUID_SIGNATURE)
    features = by_function.get(KVM_CPUID_FEATURES)
    if signature is None or features is None or (signature.ebx, signature.ecx, signature.edx) != KVM_SIGNATURE:
        return msrs
    return msrs + [MsrEntry(msr, value) for bit, msr, value in KVM_PV_MSRS if features.eax >> bit & 1]


# -- FPU and local APIC -----------------------------------------------------------------------
FPU: Final = FpuState(fcw=0x37F, mxcsr=0x1F80)

APIC_ID: Final = 0x20
APIC_LVT_LINT0: Final = 0x350
APIC_LVT_LINT1: Final = 0x360
APIC_MODE_NMI: Final = 0b100
APIC_MODE_EXTINT: Final = 0b111
LAPIC_PAGE_SIZE: Final = 1024


def _delivery_mode(register: int, mode: int) -> int:
    return (register & ~0x700) | (mode << 8)


def lapic_with_lints(state: bytes, apic_id: int | None = None) -> bytes:
    """``state`` (the 1 KiB register page) with LINT0 = ExtINT, LINT1 = NMI and, when given,
    the xAPIC ID register set."""
    if len(state) < LAPIC_PAGE_SIZE:
        raise ValueError(f"a local APIC page is {LAPIC_PAGE_SIZE} bytes, not {len(state)}")
    page = bytearray(state)
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        value = struct.unpack_from("<I", page, offset)[0]
        struct.pack_into("<I", page, offset, _delivery_mode(value, mode))
    if apic_id is not None and apic_id < 0xFF:
        value = struct.unpack_from("<I", page, APIC_ID)[0]
        struct.pack_into("<I", page, APIC_ID, (value & 0x00FFFFFF) | (apic_id << 24))
    return bytes(page)


def lapic_id(state: bytes) -> int:
    return int(struct.unpack_from("<I", state, APIC_ID)[0]) >> 24


# -- control registers ------------------------------------------------------------------------
X86_CR0_PE: Final = 1 << 0
X86_CR0_ET: Final = 1 << 4
X86_CR0_NE: Final = 1 << 5
X86_CR0_PG: Final = 1 << 31
X86_CR4_PAE: Final = 1 << 5
EFER_LME: Final = 1 << 8
EFER_LMA: Final = 1 << 10
RFLAGS_RESERVED: Final = 0x2
APIC_BASE_ENABLE: Final = 1 << 11
APIC_BASE_BSP: Final = 1 << 8


def boot_registers(protocol: str, entry: int) -> StandardRegisters:
    if protocol == "linux64":
        return StandardRegisters(
            rip=entry,
            rsp=L.BOOT_STACK_POINTER,
            rbp=L.BOOT_STACK_POINTER,
            rsi=L.ZERO_PAGE_START,
            rflags=RFLAGS_RESERVED,
        )
    if protocol == "pvh":
        return StandardRegisters(rip=entry, rbx=L.PVH_INFO_START, rflags=RFLAGS_RESERVED)
    raise ValueError(f"unknown boot protocol {protocol!r}")


def boot_special_registers(protocol: str, current: SpecialRegisters) -> SpecialRegisters:
    """``current`` (the vCPU's reset state) changed to what ``protocol`` enters with."""
    long_mode = protocol == "linux64"
    if protocol not in ("linux64", "pvh"):
        raise ValueError(f"unknown boot protocol {protocol!r}")
    code, data, tss = gdt.boot_segments(long_mode)
    cr0, cr3, cr4, efer = X86_CR0_PE | X86_CR0_ET, 0, 0, 0
    if long_mode:
        cr0, cr3, cr4, efer = cr0 | X86_CR0_NE | X86_CR0_PG, L.PML4_START, X86_CR4_PAE, EFER_LME | EFER_LMA
    return attrs.evolve(
        current,
        cs=code,
        ds=data,
        es=data,
        fs=data,
        gs=data,
        ss=data,
        tr=tss,
        gdt=DescriptorTable(base=L.BOOT_GDT_START, limit=8 * len(gdt.gdt_entries(long_mode)) - 1),
        idt=DescriptorTable(base=L.BOOT_IDT_START, limit=7),
        cr2=0,
        cr8=0,
        apic_base=L.APIC_START | APIC_BASE_ENABLE | APIC_BASE_BSP,
        cr0=cr0,
        cr3=cr3,
        cr4=cr4,
        efer=efer,
    )
