"""The MSHV backend: :class:`MshvHypervisor` -> :class:`MshvVm` -> :class:`MshvVcpu`.

Written to the Linux ``/dev/mshv`` interface (include/uapi/linux/mshv.h, drivers/hv/
mshv_root_main.c) with Cloud Hypervisor's ``hypervisor/src/mshv`` as the reference user. No
vmmkit host has had ``/dev/mshv``: every line here has run only against the simulated kernel
(:mod:`vmmkit_mshv.simulator`, a contract test), never on the Microsoft Hypervisor.

The run loop is C (``mshv_runloop.c``): MSHV_RUN_VP until an intercept Python must handle, with
port sinks served natively; the ioctl is a function pointer, the host's ioctl(2) or a callback
into a kernel implemented in Python (the simulator).

Interrupts: the LAPIC lives in the hypervisor (``MSHV_PT_BIT_LAPIC``); MSIs are asserted with
HVCALL_ASSERT_VIRTUAL_INTERRUPT and irqfds route through MSHV_SET_MSI_ROUTING. The hypervisor
has no I/O APIC, PIC or PIT: the VMM emulates the I/O APIC (:mod:`vmmkit.ioapic`, its EOIs from
HVMSG_X64_APIC_EOI) and the plugin adds a userspace 8254 (``i8254``) to x86 VMs.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, ClassVar

from vmmkit.errors import CapabilityError
from vmmkit.hypervisor import Availability, Hypervisor
from vmmkit_mshv.selection import DEVICE, simulator_selected

if TYPE_CHECKING:
    from vmmkit.x86 import CpuIdEntry
    from vmmkit_mshv.kernel import Kernel
    from vmmkit_mshv.vm import MshvVm

__all__ = ["MshvHypervisor"]


class MshvHypervisor(Hypervisor):
    """The Microsoft Hypervisor through ``/dev/mshv`` (Linux as the root partition)."""

    name: ClassVar[str] = "mshv"
    description: ClassVar[str] = (
        "Microsoft Hypervisor via /dev/mshv (verified against a simulated kernel only)"
    )
    priority: ClassVar[int] = 20
    architectures: ClassVar[tuple[str, ...]] = ("x86_64",)
    #: MSIs through HVCALL_ASSERT_VIRTUAL_INTERRUPT, wired lines through the VMM's I/O APIC.
    delivers_interrupts: ClassVar[bool] = True

    def __init__(self) -> None:
        from vmmkit_mshv.kernel import kernel_from_environment

        self.kernel: Kernel = kernel_from_environment()

    @classmethod
    def is_available(cls) -> Availability:
        if simulator_selected():
            try:
                import vmmkit_emu  # noqa: F401  (the simulator's engine)
            except ImportError:
                return Availability(False, "the simulated /dev/mshv needs the vmmkit-emu plugin")
            host = "present but not used" if os.path.exists(DEVICE) else "not found"
            return Availability(True, f"{DEVICE} {host}; running on the simulated /dev/mshv, a contract test "
                                      "that --hypervisor auto never picks", auto=False)
        if not os.path.exists(DEVICE):
            return Availability(False, f"{DEVICE} not found; verified against a simulated kernel")
        try:
            fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            return Availability(False, f"{DEVICE}: {os.strerror(exc.errno or errno.EIO)}")
        os.close(fd)
        return Availability(True)

    def create_vm(self, arch: str = "x86_64") -> MshvVm:
        if arch not in self.architectures:
            raise CapabilityError("MSHV_CREATE_PARTITION", None, f"cannot run {arch} guests")
        from vmmkit_mshv.vm import MshvVm

        return MshvVm(self.kernel)

    # X86Hypervisor (vmmkit.x86)

    def supported_cpuid(self) -> list[CpuIdEntry]:
        """The machine's CPUID leaves (basic and extended ranges; indexed leaves by subleaf)."""
        from vmmkit.x86 import CpuIdEntry

        entries: list[CpuIdEntry] = []
        indexed = {4: 8, 7: 2, 0xB: 3, 0xD: 4, 0xF: 2, 0x10: 2, 0x14: 2, 0x1F: 3, 0x8000_001D: 5}
        for start in (0, 0x8000_0000):
            top = min(self.kernel.cpuid(start, 0)[0], start + 0x40)
            for leaf in range(start, top + 1):
                subleaves = indexed.get(leaf)
                for sub in range(subleaves or 1):
                    eax, ebx, ecx, edx = self.kernel.cpuid(leaf, sub)
                    entries.append(CpuIdEntry(leaf, sub, 1 if subleaves else 0, eax, ebx, ecx, edx))
        return entries

    def tsc_khz(self) -> int | None:
        return None
