"""The simulated hypervisor's processors: the emu backend's unicorn x86 vCPUs
(:class:`vmmkit_emu.x86.X86Vcpu`), changed where the Microsoft Hypervisor behaves differently
from emu's direct dispatch:

* Guest RAM is mapped from the partition's regions (read-only ones without write access);
  every other guest-physical address is **unmapped**, so an access there faults with the
  instruction pointer exact (unicorn restores it), which the VP turns into an
  ``HVMSG_UNMAPPED_GPA`` / ``HVMSG_GPA_INTERCEPT`` message. Only the xAPIC page is served
  inside, as the hypervisor's LAPIC (emu's register file, INIT/SIPI start-up).
* IN/OUT and (when intercepted) CPUID reach the VP's ``ops``, which *park* the engine thread
  inside the hook while the VMM handles the intercept (unicorn cannot stop before an IN/OUT:
  ``emu_stop`` takes effect only at the end of a translation block), see :mod:`.vp`.
* HLT ends the run with a halt (an ``HVMSG_X64_HALT`` message); CPU exceptions with an
  exception intercept message (the engine cannot deliver them through the IDT).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unicorn import (
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE_PROT,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MEM_WRITE_PROT,
    UC_MEM_WRITE_UNMAPPED,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
)
from vmmkit_emu.x86 import APIC_DEFAULT_BASE, APIC_PAGE, X86Vcpu, X86Vm

from vmmkit.hypervisor import ExitReason, VcpuOps, VmExit

if TYPE_CHECKING:
    from vmmkit_mshv.simulator.partition import Partition
    from vmmkit_mshv.simulator.vp import InterceptOps


class Fault:
    """An access to an address without RAM (or a write to read-only RAM)."""

    __slots__ = ("address", "size", "value", "write", "protected")

    def __init__(self, address: int, size: int, value: int, write: bool, protected: bool) -> None:
        self.address = address
        self.size = size
        self.value = value
        self.write = write
        self.protected = protected


class EngineVm(X86Vm):
    """emu's x86 VM (run token, IPIs between engines) for one simulated partition."""

    def __init__(self, partition: Partition) -> None:
        super().__init__("x86_64")
        self.partition = partition

    def _new_vcpu(self, index: int, ops: VcpuOps) -> Engine:
        return Engine(self, index, ops)

    @property
    def dirty_logging(self) -> bool:
        """The engines hook RAM writes while the partition tracks GPA page access (the
        hypervisor's dirty bits), set by HvCallSetPartitionProperty at any time."""
        return self.partition.dirty_tracking

    def end_of_interrupt(self, vector: int) -> None:
        """A guest EOI of a level-triggered interrupt: the hypervisor tells the root partition
        (HVMSG_X64_APIC_EOI), whose userspace I/O APIC clears its remote IRR."""
        for vcpu in self.vcpus:
            if isinstance(vcpu, Engine) and vcpu.in_eoi:
                vcpu.ops.apic_eoi(vector)
                return


class Engine(X86Vcpu):
    vm: EngineVm
    ops: InterceptOps

    def __init__(self, vm: EngineVm, index: int, ops: VcpuOps) -> None:
        self.fault: Fault | None = None
        self.exception: int | None = None
        self.in_eoi = False
        super().__init__(vm, index, ops)

    def _end_of_interrupt(self) -> None:
        self.in_eoi = True  # EngineVm.end_of_interrupt finds the engine that wrote the EOI
        try:
            super()._end_of_interrupt()
        finally:
            self.in_eoi = False

    def _make_engine(self) -> Any:
        uc = super()._make_engine()
        uc.hook_add(UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED | UC_HOOK_MEM_WRITE_PROT, self._on_fault)
        return uc  # RAM write hooks: emu's _sync_write_hooks, while dirty_logging

    def _map_memory(self) -> None:
        for start, size, host, writable in self.vm.partition.ram():
            prot = UC_PROT_ALL if writable else UC_PROT_READ | UC_PROT_EXEC
            self.uc.mem_map_ptr(start, size, prot, host)
        base = APIC_DEFAULT_BASE
        self.uc.mmio_map(base, APIC_PAGE, self._mmio_read_cb, base, self._mmio_write_cb, base)

    def _on_fault(self, uc: Any, access: int, address: int, size: int, value: int, _: Any) -> bool:
        write = access in (UC_MEM_WRITE_UNMAPPED, UC_MEM_WRITE_PROT)
        self.fault = Fault(address, size, value & ((1 << (8 * size)) - 1), write, access == UC_MEM_WRITE_PROT)
        return False  # stop: emu_start raises with the instruction pointer at the access

    def _on_unmapped(self, uc: Any, access: int, address: int, size: int, value: int, _: Any) -> bool:
        """Not emu's MMIO emulation: here a fault is an intercept for the VMM (:meth:`_on_fault`)."""
        return False

    def _ram(self) -> list[tuple[int, int]]:
        return [(start, size) for start, size, _host, writable in self.vm.partition.ram() if writable]

    def _ram_write_cb(self, uc: Any, access: int, address: int, size: int, value: int, _: Any) -> None:
        self.vm.partition.mark_dirty(address, size)

    def _engine_error(self, exc: Exception) -> VmExit | None:
        if self.fault is not None:
            return VmExit(ExitReason.INTERNAL_ERROR, "memory intercept")
        return super()._engine_error(exc)  # retries an access whose hook unicorn skipped

    def _on_exception(self, uc: Any, intno: int, _: Any) -> None:
        if self._gate(intno) is None:
            self.exception = intno  # not deliverable: the VP sends an exception intercept
        super()._on_exception(uc, intno, _)

    def _on_cpuid(self, uc: Any, _: Any) -> bool:
        if self.vm.partition.cpuid_intercept:
            self.ops.cpuid()
            return True
        return super()._on_cpuid(uc, _)

    def _stopped_by_engine(self) -> None:
        """HLT: end the run with a halt (the VP sends HVMSG_X64_HALT)."""
        self.count("halt")
        self._pending = VmExit(ExitReason.HLT)
