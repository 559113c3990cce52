"""x86-64 vCPUs on unicorn: the :class:`vmmkit.x86.X86Vcpu` protocol.

Engine mode
    Each vCPU is a unicorn engine in ``UC_MODE_32``: in that mode unicorn loads segment
    registers through the descriptor tables (``cpu_x86_load_seg``), so register writes can put
    the vCPU in real mode (AP start-up), 32-bit protected mode (PVH) or long mode (linux64), and
    the guest's own mode switches run as on hardware. The price: unicorn reads and writes only
    the low 32 bits of the general registers and of RIP in this mode, so **guest code must run
    below 4 GiB** (every vmmkit boot protocol and the test guest do; a Linux kernel mapped at
    0xffffffff8... does not run on emu). Segment registers are loaded by selector from the
    guest's GDT (the boot GDT the architecture wrote); their other :class:`vmmkit.x86.Segment`
    fields are not used, except in real mode where base = selector << 4.

Port I/O
    IN/OUT (and INS/OUTS, element by element) reach ``VcpuOps.pio_read``/``pio_write`` through
    unicorn's instruction hooks. Port sinks are not served natively (``add_port_sink`` is
    ``False``): the devices handle those ports.

CPUID
    :func:`supported_cpuid` runs CPUID on a scratch engine (unicorn's CPU model); the table the
    architecture sets with ``set_cpuid`` is then served from an instruction hook.

Local APIC (a register file, no interrupts)
    The xAPIC page (at the APIC base, 0xfee00000) is served per vCPU by the backend, with the
    state of ``get_lapic``/``set_lapic``. The ICR sends INIT and STARTUP to other vCPUs (so
    INIT-SIPI-SIPI starts APs: the AP begins in real mode at ``vector << 12``); a fixed IPI only
    wakes a halted target, no interrupt is delivered. Delivery status always reads idle. The
    x2APIC MSRs are not emulated, nor the APIC timer.

HLT, exceptions
    HLT ends ``emu_start``; the vCPU sleeps briefly (or until an IPI wakes it) and continues
    after the HLT, as if an interrupt had woken it. CPU exceptions (#UD, #GP, #PF, ...) and
    software interrupts are **not delivered through the IDT**: the run ends with an internal
    error naming the vector and EIP.
"""

from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Sequence
from typing import Any

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_INTR, UC_MODE_32
from unicorn import x86_const as X

from vmmkit.hypervisor import ExitReason, VcpuOps
from vmmkit.x86 import (
    CPUID_FLAG_SIGNIFICANT_INDEX,
    CpuIdEntry,
    CpuIdTable,
    DescriptorTable,
    FpuState,
    MpState,
    MsrEntry,
    Segment,
    SpecialRegisters,
    StandardRegisters,
)
from vmmkit_emu.hypervisor import EmuVcpu, EmuVm, new_engine

_GPRS = {
    "rax": X.UC_X86_REG_EAX, "rbx": X.UC_X86_REG_EBX, "rcx": X.UC_X86_REG_ECX, "rdx": X.UC_X86_REG_EDX,
    "rsi": X.UC_X86_REG_ESI, "rdi": X.UC_X86_REG_EDI, "rsp": X.UC_X86_REG_ESP, "rbp": X.UC_X86_REG_EBP,
}
_SEGMENTS = {"es": X.UC_X86_REG_ES, "ss": X.UC_X86_REG_SS, "ds": X.UC_X86_REG_DS,
             "fs": X.UC_X86_REG_FS, "gs": X.UC_X86_REG_GS}

MSR_EFER = 0xC000_0080
MSR_APIC_BASE = 0x1B
#: MSRs written into the engine (QEMU keeps them as plain fields); the rest are only remembered.
_ENGINE_MSRS = frozenset({0x10, 0x174, 0x175, 0x176, 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,
                          0xC000_0102, 0x1A0, 0x2FF})

APIC_DEFAULT_BASE = 0xFEE0_0000
APIC_PAGE = 0x1000
LAPIC_STATE = 0x400
APIC_ID = 0x20
APIC_VERSION = 0x30
APIC_ICR_LO = 0x300
APIC_ICR_HI = 0x310
ICR_DELIVERY_MODE = 0x700
ICR_INIT = 0x500
ICR_STARTUP = 0x600
ICR_LEVEL_ASSERT = 1 << 14
ICR_PENDING = 1 << 12

#: Leaves whose output depends on ECX (CPUID_FLAG_SIGNIFICANT_INDEX), and how many subleaves
#: :func:`supported_cpuid` collects of each.
_INDEXED_LEAVES = {4: 8, 7: 2, 0xB: 3, 0xD: 4, 0xF: 2, 0x10: 2, 0x12: 3, 0x14: 2, 0x17: 4, 0x18: 4,
                   0x1D: 2, 0x1E: 1, 0x1F: 3, 0x8000_001D: 5}


class X86Vm(EmuVm):
    """An emulated x86-64 VM."""

    def _new_vcpu(self, index: int, ops: VcpuOps) -> X86Vcpu:
        return X86Vcpu(self, index, ops)

    def deliver_ipi(self, source: int, icr: int, destination: int) -> None:
        """An ICR write of vCPU ``source``: INIT / STARTUP / fixed (wake-up only)."""
        shorthand = (icr >> 18) & 3
        if shorthand == 1:
            targets = [v for v in self.vcpus if v.index == source]
        elif shorthand == 2:
            targets = list(self.vcpus)
        elif shorthand == 3:
            targets = [v for v in self.vcpus if v.index != source]
        else:
            targets = [v for v in self.vcpus if isinstance(v, X86Vcpu) and v.apic_id() == destination]
        mode = icr & ICR_DELIVERY_MODE
        for target in targets:
            assert isinstance(target, X86Vcpu)
            if mode == ICR_INIT:
                if icr & ICR_LEVEL_ASSERT:
                    target.receive_init()
            elif mode == ICR_STARTUP:
                target.receive_sipi(icr & 0xFF)
            else:
                target.wake()


class X86Vcpu(EmuVcpu):
    """One x86-64 vCPU; implements :class:`vmmkit.x86.X86Vcpu`."""

    vm: X86Vm

    def __init__(self, vm: X86Vm, index: int, ops: VcpuOps) -> None:
        self._cpuid: CpuIdTable | None = None
        self._msrs: dict[int, int] = {}
        self._apic_base = APIC_DEFAULT_BASE | (1 << 11) | (1 << 8 if index == 0 else 0)
        self._lapic = bytearray(APIC_PAGE)
        struct.pack_into("<I", self._lapic, APIC_ID, index << 24)
        struct.pack_into("<I", self._lapic, APIC_VERSION, 0x0005_0014)
        struct.pack_into("<I", self._lapic, 0xE0, 0xFFFF_FFFF)
        struct.pack_into("<I", self._lapic, 0xF0, 0xFF)
        for lvt in (0x320, 0x330, 0x340, 0x350, 0x360, 0x370):
            struct.pack_into("<I", self._lapic, lvt, 0x1_0000)
        self._lapic_lock = threading.Lock()
        self._wait_for_sipi = False
        super().__init__(vm, index, ops)

    def _make_engine(self) -> Any:
        uc = new_engine(UC_ARCH_X86, UC_MODE_32)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.hook_add(UC_HOOK_INTR, self._on_exception)
        return uc

    def _pc(self) -> int:
        return int(self.uc.reg_read(X.UC_X86_REG_EIP))

    # -- hooks ------------------------------------------------------------------------------

    def _on_in(self, uc: Any, port: int, size: int, _: Any) -> int:
        self.count("pio")
        return int.from_bytes(self.ops.pio_read(port, size), "little")

    def _on_out(self, uc: Any, port: int, size: int, value: int, _: Any) -> None:
        self.count("pio")
        self.ops.pio_write(port, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def _on_cpuid(self, uc: Any, _: Any) -> bool:
        table = self._cpuid
        if table is None:
            return False
        leaf = uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFF_FFFF
        subleaf = uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFF_FFFF
        entry = table.get(leaf, subleaf)
        values = (entry.eax, entry.ebx, entry.ecx, entry.edx) if entry is not None else (0, 0, 0, 0)
        for reg, value in zip((X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX),
                              values, strict=True):
            uc.reg_write(reg, value & 0xFFFF_FFFF)
        return True

    def _on_exception(self, uc: Any, intno: int, _: Any) -> None:
        eip = self._pc()
        self.stop_with(ExitReason.INTERNAL_ERROR,
                       f"vcpu{self.index}: guest exception or interrupt vector {intno} at eip {eip:#x} "
                       "(the emu backend does not deliver exceptions through the IDT)")

    def _error_context(self, pc: int) -> str:
        try:
            code = bytes(self.uc.mem_read(pc, 4)).hex(" ")
        except Exception:
            code = "?"
        return f" (bytes {code}; the emu backend does not deliver exceptions through the IDT)"

    # -- the local APIC page ----------------------------------------------------------------------

    def _apic_page(self, addr: int) -> int | None:
        base = self._apic_base & ~0xFFF & ((1 << 52) - 1)
        return addr - base if base <= addr < base + APIC_PAGE else None

    def mmio_read(self, addr: int, size: int) -> bytes:
        offset = self._apic_page(addr)
        if offset is None:
            return self.ops.mmio_read(addr, size)
        with self._lapic_lock:
            data = bytes(self._lapic[offset : offset + size])
        if offset <= APIC_ICR_LO < offset + size:
            value = bytearray(data)
            value[APIC_ICR_LO - offset + 1] &= ~(ICR_PENDING >> 8) & 0xFF
            data = bytes(value)
        return data.ljust(size, b"\0")

    def mmio_write(self, addr: int, data: bytes) -> None:
        offset = self._apic_page(addr)
        if offset is None:
            self.ops.mmio_write(addr, data)
            return
        if offset in (APIC_ID, APIC_VERSION):
            return
        with self._lapic_lock:
            self._lapic[offset : offset + len(data)] = data[: APIC_PAGE - offset]
            icr = struct.unpack_from("<I", self._lapic, APIC_ICR_LO)[0]
            destination = self._lapic[APIC_ICR_HI + 3]
        if offset == APIC_ICR_LO:
            self.count("ipi")
            self.vm.deliver_ipi(self.index, icr, destination)

    def apic_id(self) -> int:
        with self._lapic_lock:
            return self._lapic[APIC_ID + 3]

    def receive_init(self) -> None:
        """INIT: stop and wait for a STARTUP IPI (the BSP ignores INIT here)."""
        if self.index == 0:
            return
        self._wait_for_sipi = True
        self.set_powered(False)
        if self._in_emu:
            self._stop_engine()

    def receive_sipi(self, vector: int) -> None:
        """STARTUP: a vCPU waiting for it starts in real mode at CS:IP = (vector << 8):0."""
        if not self._wait_for_sipi:
            return
        self._wait_for_sipi = False

        def setup() -> None:  # on this vCPU's thread (EmuVcpu.start_at)
            uc = self.uc
            uc.reg_write(X.UC_X86_REG_CR0, 0x6000_0010)
            uc.msr_write(MSR_EFER, 0)
            uc.reg_write(X.UC_X86_REG_CR4, 0)
            uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
            uc.reg_write(X.UC_X86_REG_CS, vector << 8)
            for reg in _SEGMENTS.values():
                uc.reg_write(reg, 0)
            uc.reg_write(X.UC_X86_REG_EIP, 0)

        self.start_at(setup)

    # -- X86Vcpu ----------------------------------------------------------------------------

    def get_regs(self) -> StandardRegisters:
        uc = self.uc
        values = {name: int(uc.reg_read(reg)) for name, reg in _GPRS.items()}
        return StandardRegisters(**values, rip=self._pc(), rflags=int(uc.reg_read(X.UC_X86_REG_EFLAGS)))

    def set_regs(self, regs: StandardRegisters) -> None:
        uc = self.uc
        for name, reg in _GPRS.items():
            uc.reg_write(reg, getattr(regs, name) & 0xFFFF_FFFF)
        uc.reg_write(X.UC_X86_REG_EFLAGS, regs.rflags & 0xFFFF_FFFF)
        uc.reg_write(X.UC_X86_REG_EIP, regs.rip & 0xFFFF_FFFF)

    def get_sregs(self) -> SpecialRegisters:
        uc = self.uc
        gdt = uc.reg_read(X.UC_X86_REG_GDTR)
        idt = uc.reg_read(X.UC_X86_REG_IDTR)
        segs = {name: Segment(selector=int(uc.reg_read(reg))) for name, reg in _SEGMENTS.items()}
        return SpecialRegisters(
            cs=Segment(selector=int(uc.reg_read(X.UC_X86_REG_CS)), type=0xB),
            es=segs["es"], ss=segs["ss"], ds=segs["ds"], fs=segs["fs"], gs=segs["gs"],
            gdt=DescriptorTable(base=gdt[1], limit=gdt[2]),
            idt=DescriptorTable(base=idt[1], limit=idt[2]),
            cr0=int(uc.reg_read(X.UC_X86_REG_CR0)) & 0xFFFF_FFFF,
            cr2=int(uc.reg_read(X.UC_X86_REG_CR2)) & 0xFFFF_FFFF,
            cr3=int(uc.reg_read(X.UC_X86_REG_CR3)) & 0xFFFF_FFFF,
            cr4=int(uc.reg_read(X.UC_X86_REG_CR4)) & 0xFFFF_FFFF,
            efer=int(uc.msr_read(MSR_EFER)),
            apic_base=self._apic_base,
        )

    def set_sregs(self, sregs: SpecialRegisters) -> None:
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
        # EFER first: setting CR0.PG with EFER.LME and CR4.PAE is what activates long mode.
        uc.msr_write(MSR_EFER, sregs.efer & ~(1 << 10))
        uc.reg_write(X.UC_X86_REG_CR4, sregs.cr4 & 0xFFFF_FFFF)
        uc.reg_write(X.UC_X86_REG_CR3, sregs.cr3 & 0xFFFF_FFFF)
        uc.reg_write(X.UC_X86_REG_CR2, sregs.cr2 & 0xFFFF_FFFF)
        uc.reg_write(X.UC_X86_REG_CR0, sregs.cr0 & 0xFFFF_FFFF)
        uc.reg_write(X.UC_X86_REG_CS, sregs.cs.selector)
        for name, reg in _SEGMENTS.items():
            uc.reg_write(reg, getattr(sregs, name).selector)
        if sregs.tr.selector:
            uc.reg_write(X.UC_X86_REG_TR, (sregs.tr.selector, sregs.tr.base, sregs.tr.limit, _flags(sregs.tr)))
        self._apic_base = sregs.apic_base

    def set_fpu(self, fpu: FpuState) -> None:
        self.uc.reg_write(X.UC_X86_REG_FPCW, fpu.fcw)
        self.uc.reg_write(X.UC_X86_REG_MXCSR, fpu.mxcsr)

    def get_msrs(self, indices: Sequence[int]) -> list[MsrEntry]:
        out = []
        for index in indices:
            if index == MSR_APIC_BASE:
                value = self._apic_base
            elif index == MSR_EFER or index in _ENGINE_MSRS:
                value = int(self.uc.msr_read(index))
            else:
                value = self._msrs.get(index, 0)
            out.append(MsrEntry(index, value))
        return out

    def set_msrs(self, msrs: Sequence[MsrEntry]) -> None:
        for msr in msrs:
            if msr.index == MSR_APIC_BASE:
                self._apic_base = msr.data
            elif msr.index in _ENGINE_MSRS:
                self.uc.msr_write(msr.index, msr.data)
            else:
                self._msrs[msr.index] = msr.data

    def set_cpuid(self, entries: Sequence[CpuIdEntry]) -> None:
        self._cpuid = CpuIdTable(tuple(entries))  # type: ignore[arg-type]  # attrs converter

    def get_lapic(self) -> bytes:
        with self._lapic_lock:
            return bytes(self._lapic[:LAPIC_STATE])

    def set_lapic(self, state: bytes) -> None:
        if len(state) < LAPIC_STATE:
            raise ValueError(f"a local APIC page is {LAPIC_STATE} bytes, not {len(state)}")
        with self._lapic_lock:
            self._lapic[:LAPIC_STATE] = state[:LAPIC_STATE]

    def get_mp_state(self) -> int:
        if self._wait_for_sipi:
            return MpState.INIT_RECEIVED if self.index else MpState.UNINITIALIZED
        return MpState.RUNNABLE if self.powered_on else MpState.UNINITIALIZED

    def set_mp_state(self, state: int) -> None:
        if state == MpState.UNINITIALIZED:
            self._wait_for_sipi = True
            self.set_powered(False)
        elif state == MpState.RUNNABLE:
            self._wait_for_sipi = False
            self.set_powered(True)


def _flags(segment: Segment) -> int:
    """QEMU's descriptor flags word (the high dword of a descriptor, bits 8-23)."""
    return ((segment.type << 8) | (segment.s << 12) | (segment.dpl << 13) | (segment.present << 15)
            | (segment.avl << 20) | (segment.l << 21) | (segment.db << 22) | (segment.g << 23))


@functools.lru_cache(maxsize=1)
def _supported_cpuid() -> tuple[CpuIdEntry, ...]:
    uc = new_engine(UC_ARCH_X86, UC_MODE_32)
    base = 0x1000
    uc.mem_map(base, 0x1000)
    uc.mem_write(base, b"\x0f\xa2")  # cpuid

    def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        uc.reg_write(X.UC_X86_REG_EAX, leaf)
        uc.reg_write(X.UC_X86_REG_ECX, subleaf)
        uc.emu_start(base, base + 2)
        return tuple(int(uc.reg_read(r)) & 0xFFFF_FFFF for r in (  # type: ignore[return-value]
            X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX))

    entries: list[CpuIdEntry] = []
    for start in (0, 0x8000_0000):
        top = min(cpuid(start)[0], start + 0x40)
        for leaf in range(start, top + 1):
            subleaves = _INDEXED_LEAVES.get(leaf)
            for sub in range(subleaves or 1):
                eax, ebx, ecx, edx = cpuid(leaf, sub)
                flags = CPUID_FLAG_SIGNIFICANT_INDEX if subleaves else 0
                entries.append(CpuIdEntry(leaf, sub, flags, eax, ebx, ecx, edx))
    return tuple(entries)


def supported_cpuid() -> list[CpuIdEntry]:
    """What unicorn's x86 CPU model reports, leaf by leaf (basic and extended ranges)."""
    return list(_supported_cpuid())
