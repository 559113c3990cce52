"""Backend-neutral x86-64 vCPU state: the types an architecture plugin uses to set up a vCPU
and a backend translates to its own layout (``struct kvm_regs``, MSHV register names, ...)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from attrs import field, frozen


@frozen
class StandardRegisters:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


@frozen
class Segment:
    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741  (the architectural name)
    g: int = 0
    avl: int = 0
    unusable: int = 0


@frozen
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


@frozen
class SpecialRegisters:
    cs: Segment = Segment()
    ds: Segment = Segment()
    es: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    ss: Segment = Segment()
    tr: Segment = Segment(type=11, s=0)
    ldt: Segment = Segment(type=2, s=0)
    gdt: DescriptorTable = DescriptorTable()
    idt: DescriptorTable = DescriptorTable()
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900


@frozen
class FpuState:
    fcw: int = 0x37F
    mxcsr: int = 0x1F80


@frozen
class CpuIdEntry:
    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


#: ``CpuIdEntry.flags`` bit: the leaf's output depends on ECX (the ``index``).
CPUID_FLAG_SIGNIFICANT_INDEX = 1


@frozen
class MsrEntry:
    index: int
    data: int


class MpState:
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


@runtime_checkable
class X86Hypervisor(Protocol):
    def supported_cpuid(self) -> list[CpuIdEntry]:
        """The CPUID leaves the backend can present to a guest (KVM_GET_SUPPORTED_CPUID)."""
        ...

    def tsc_khz(self) -> int | None:
        """The guest TSC frequency in kHz, when the backend knows it."""
        ...


@runtime_checkable
class X86Vcpu(Protocol):
    """The x86-64 register interface an architecture plugin drives."""

    def get_regs(self) -> StandardRegisters: ...

    def set_regs(self, regs: StandardRegisters) -> None: ...

    def get_sregs(self) -> SpecialRegisters: ...

    def set_sregs(self, sregs: SpecialRegisters) -> None: ...

    def set_fpu(self, fpu: FpuState) -> None: ...

    def get_msrs(self, indices: Sequence[int]) -> list[MsrEntry]: ...

    def set_msrs(self, msrs: Sequence[MsrEntry]) -> None: ...

    def set_cpuid(self, entries: Sequence[CpuIdEntry]) -> None: ...

    def get_lapic(self) -> bytes:
        """The 1 KiB local APIC register page."""
        ...

    def set_lapic(self, state: bytes) -> None: ...

    def get_mp_state(self) -> int: ...

    def set_mp_state(self, state: int) -> None: ...


def _entry_tuple(entries: Iterable[CpuIdEntry]) -> tuple[CpuIdEntry, ...]:
    # a function, not ``converter=tuple``: attrs reads a converter's signature, and
    # inspect.signature(tuple) parses its text signature (~2 ms at every start)
    return tuple(entries)


@frozen
class CpuIdTable:
    """An ordered set of CPUID leaves with lookup by (function, index)."""

    entries: tuple[CpuIdEntry, ...] = field(converter=_entry_tuple)

    def get(self, function: int, index: int = 0) -> CpuIdEntry | None:
        for entry in self.entries:
            if entry.function == function and (
                entry.index == index or not entry.flags & CPUID_FLAG_SIGNIFICANT_INDEX
            ):
                return entry
        return None


@runtime_checkable
class X86VcpuXsave(Protocol):
    """What a backend offers to save and restore a vCPU's full FPU/SSE/AVX state: the XSAVE
    area in the architecture's own layout (Intel SDM vol. 1, 13.4: the 512-byte legacy FXSAVE
    region, the 64-byte XSAVE header, then the extended components), plus the XCRs."""

    def get_xsave(self) -> bytes: ...

    def set_xsave(self, area: bytes) -> None: ...

    def get_xcrs(self) -> dict[int, int]: ...

    def set_xcrs(self, xcrs: dict[int, int]) -> None: ...


@runtime_checkable
class X86VcpuFpu(Protocol):
    """A backend that reads the FPU control state back (:class:`FpuState`)."""

    def get_fpu(self) -> FpuState: ...


#: Offsets in the legacy (FXSAVE) region of an XSAVE area (Intel SDM vol. 1, table 10-2).
FXSAVE_FCW = 0
FXSAVE_MXCSR = 24
FXSAVE_REGISTERS = slice(32, 416)  #: ST0-ST7/MM0-MM7 then XMM0-XMM15
FXSAVE_SIZE = 512


def fpu_from_xsave(area: bytes) -> FpuState:
    """The control words of an XSAVE area's legacy region."""
    return FpuState(fcw=int.from_bytes(area[FXSAVE_FCW:FXSAVE_FCW + 2], "little"),
                    mxcsr=int.from_bytes(area[FXSAVE_MXCSR:FXSAVE_MXCSR + 4], "little"))


def xsave_registers_are_clear(area: bytes) -> bool:
    """Whether the x87/MMX and XMM registers of an XSAVE area's legacy region are all zero and
    no extended component is in use (XSTATE_BV, at offset 512, has no bit above SSE)."""
    header = int.from_bytes(area[FXSAVE_SIZE:FXSAVE_SIZE + 8], "little") if len(area) >= FXSAVE_SIZE + 8 else 0
    return not any(area[FXSAVE_REGISTERS]) and not header & ~0b11
