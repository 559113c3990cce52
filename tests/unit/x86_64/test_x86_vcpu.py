"""VM and vCPU set-up against fake backends: what is set, in which order, with which values."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import pytest
from vmmkit_x86_64 import layout as L
from vmmkit_x86_64 import vcpu as V
from vmmkit_x86_64.arch import X86_64
from x86_helpers import make_config

from vmmkit.arch import BootInfo
from vmmkit.config import CpuTopology
from vmmkit.errors import CapabilityError
from vmmkit.memory import MemoryRange
from vmmkit.x86 import (
    CpuIdEntry,
    CpuIdTable,
    FpuState,
    MpState,
    MsrEntry,
    SpecialRegisters,
    StandardRegisters,
)


class FakeHypervisor:
    def __init__(self) -> None:
        self.cpuid_calls = 0

    def supported_cpuid(self) -> list[CpuIdEntry]:
        self.cpuid_calls += 1
        return [
            CpuIdEntry(0, eax=0xD, ebx=0x756E6547, edx=0x49656E69, ecx=0x6C65746E),
            CpuIdEntry(1, eax=0x806EC, ebx=0x800, ecx=1 << 21, edx=1),
            CpuIdEntry(0xB, 0, 1),
            CpuIdEntry(0x80000008, eax=0x3027),
        ]

    def tsc_khz(self) -> int | None:
        return None


class FakeVcpu:
    def __init__(self, index: int) -> None:
        self.index = index
        self.calls: list[str] = []
        self.regs = StandardRegisters()
        self.sregs = SpecialRegisters()
        self.fpu: FpuState | None = None
        self.msrs: list[MsrEntry] = []
        self.cpuid: list[CpuIdEntry] = []
        lapic = bytearray(1024)
        struct.pack_into("<I", lapic, 0x20, index << 24)
        struct.pack_into("<I", lapic, 0x350, 0x10000)  # masked, fixed
        struct.pack_into("<I", lapic, 0x360, 0x10000)
        self.lapic = bytes(lapic)
        self.mp_state: int | None = None

    def _log(self, name: str) -> None:
        self.calls.append(name)

    def get_regs(self) -> StandardRegisters:
        return self.regs

    def set_regs(self, regs: StandardRegisters) -> None:
        self._log("set_regs")
        self.regs = regs

    def get_sregs(self) -> SpecialRegisters:
        return self.sregs

    def set_sregs(self, sregs: SpecialRegisters) -> None:
        self._log("set_sregs")
        self.sregs = sregs

    def set_fpu(self, fpu: FpuState) -> None:
        self._log("set_fpu")
        self.fpu = fpu

    def get_msrs(self, indices: Sequence[int]) -> list[MsrEntry]:
        return [m for m in self.msrs if m.index in indices]

    def set_msrs(self, msrs: Sequence[MsrEntry]) -> None:
        self._log("set_msrs")
        self.msrs = list(msrs)

    def set_cpuid(self, entries: Sequence[CpuIdEntry]) -> None:
        self._log("set_cpuid")
        self.cpuid = list(entries)

    def get_lapic(self) -> bytes:
        return self.lapic

    def set_lapic(self, state: bytes) -> None:
        self._log("set_lapic")
        self.lapic = state

    def get_mp_state(self) -> int:
        return self.mp_state or 0

    def set_mp_state(self, state: int) -> None:
        self._log("set_mp_state")
        self.mp_state = state


def boot(protocol: str) -> BootInfo:
    return BootInfo(protocol=protocol, entry=0x1000200, kernel=MemoryRange(0x1000000, 0x100000))


def configure(index: int, protocol: str = "linux64", **config: Any) -> FakeVcpu:
    vcpu = FakeVcpu(index)
    X86_64().configure_vcpu(vcpu, index, FakeHypervisor(), make_config(**config), boot(protocol))
    return vcpu


def lapic_reg(vcpu: FakeVcpu, offset: int) -> int:
    return struct.unpack_from("<I", vcpu.lapic, offset)[0]


def test_boot_vcpu_linux64() -> None:
    vcpu = configure(0, boot_vcpus=2)
    assert vcpu.calls.index("set_cpuid") < vcpu.calls.index("set_sregs")  # EFER.LMA needs CPUID's LM first
    assert vcpu.regs == StandardRegisters(
        rip=0x1000200, rsp=0x8FF0, rbp=0x8FF0, rsi=L.ZERO_PAGE_START, rflags=2
    )
    s = vcpu.sregs
    assert s.cr0 & 0x80000001 == 0x80000001
    assert s.cr4 & 0x20
    assert s.efer == 0x500
    assert s.cr3 == L.PML4_START
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.present, s.cs.s, s.cs.type) == (0x10, 1, 0, 1, 1, 0xB)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        assert (seg.selector, seg.type, seg.db, seg.limit) == (0x18, 3, 1, 0xFFFFFFFF)
    assert (s.gdt.base, s.gdt.limit) == (L.BOOT_GDT_START, 39)
    assert (s.idt.base, s.idt.limit) == (L.BOOT_IDT_START, 7)
    assert s.apic_base == 0xFEE00900
    assert vcpu.mp_state == MpState.RUNNABLE  # even if the last guest (before a reset) left it HALTED


def test_boot_vcpu_pvh() -> None:
    vcpu = configure(0, protocol="pvh")
    assert vcpu.regs == StandardRegisters(rip=0x1000200, rbx=L.PVH_INFO_START, rflags=2)
    s = vcpu.sregs
    assert s.cr0 & 0x80000001 == 1  # protected mode, paging off
    assert (s.cr4, s.efer) == (0, 0)
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.base, s.cs.limit) == (0x10, 0, 1, 0, 0xFFFFFFFF)
    assert (s.ds.selector, s.ds.db) == (0x18, 1)


def test_every_vcpu_gets_msrs_fpu_lapic_and_cpuid() -> None:
    for index in (0, 1):
        vcpu = configure(index, boot_vcpus=2)
        msrs = {m.index: m.data for m in vcpu.msrs}
        assert msrs[V.MSR_IA32_MISC_ENABLE] == 1
        assert msrs[V.MSR_MTRR_DEF_TYPE] == 0x806
        assert msrs[V.MSR_IA32_TSC] == 0
        for index_ in (
            V.MSR_STAR,
            V.MSR_LSTAR,
            V.MSR_CSTAR,
            V.MSR_SYSCALL_MASK,
            V.MSR_KERNEL_GS_BASE,
            V.MSR_IA32_SYSENTER_CS,
            V.MSR_IA32_SYSENTER_ESP,
            V.MSR_IA32_SYSENTER_EIP,
        ):
            assert msrs[index_] == 0
        assert vcpu.fpu == FpuState(fcw=0x37F, mxcsr=0x1F80)
        assert (lapic_reg(vcpu, 0x350) >> 8) & 7 == 0b111  # ExtINT
        assert (lapic_reg(vcpu, 0x360) >> 8) & 7 == 0b100  # NMI
        assert lapic_reg(vcpu, 0x350) & 0x10000  # other bits kept
        leaf1 = CpuIdTable(vcpu.cpuid).get(1)
        assert leaf1 is not None and leaf1.ebx >> 24 == index


def test_secondary_vcpus_wait_for_sipi() -> None:
    vcpu = configure(1, boot_vcpus=2)
    assert vcpu.mp_state == MpState.UNINITIALIZED
    assert "set_regs" not in vcpu.calls and "set_sregs" not in vcpu.calls


def test_sparse_apic_ids_are_written_to_the_lapic() -> None:
    topology = CpuTopology(threads_per_core=1, cores_per_die=3, dies_per_package=1, packages=2)
    vcpu = configure(3, boot_vcpus=6, topology=topology)
    assert lapic_reg(vcpu, 0x20) >> 24 == 4
    assert CpuIdTable(vcpu.cpuid).get(0xB, 0).edx == 4  # type: ignore[union-attr]


def test_supported_cpuid_is_read_once_per_hypervisor() -> None:
    arch = X86_64()
    hypervisor = FakeHypervisor()
    config = make_config(boot_vcpus=3)
    for index in range(3):
        arch.configure_vcpu(FakeVcpu(index), index, hypervisor, config, boot("linux64"))
    assert hypervisor.cpuid_calls == 1


def test_a_backend_without_the_x86_interface_is_refused() -> None:
    with pytest.raises(CapabilityError, match="x86-64 register interface"):
        X86_64().configure_vcpu(object(), 0, FakeHypervisor(), make_config(), boot("linux64"))  # type: ignore[arg-type]
    with pytest.raises(CapabilityError, match="supported CPUID"):
        X86_64().configure_vcpu(FakeVcpu(0), 0, object(), make_config(), boot("linux64"))  # type: ignore[arg-type]


def test_configure_vm_creates_the_interrupt_controller() -> None:
    class Vm:
        created = 0

        def setup_interrupt_controller(self) -> None:
            self.created += 1

    vm = Vm()
    X86_64().configure_vm(vm, FakeHypervisor(), make_config())  # type: ignore[arg-type]
    assert vm.created == 1


def test_lapic_page_must_be_1kib() -> None:
    with pytest.raises(ValueError, match="1024 bytes"):
        V.lapic_with_lints(bytes(16))
