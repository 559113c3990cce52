"""The partition and VP side of the MSHV backend (imported when a VM is created):
:class:`MshvVm` and :class:`MshvVcpu`, on the checked bindings. See
:mod:`vmmkit_mshv.hypervisor` for what ran where (the simulated kernel only)."""

from __future__ import annotations

import collections
import struct
import threading
from collections.abc import Sequence
from typing import Any

from vmmkit import x86_decode
from vmmkit.errors import CapabilityError, HypervisorError
from vmmkit.hypervisor import ExitReason, PortSink, Vcpu, VcpuOps, Vm, VmExit
from vmmkit.ioapic import IOAPIC_BASE, IOAPIC_SIZE, IoApic
from vmmkit.x86 import (
    CpuIdEntry,
    CpuIdTable,
    FpuState,
    MpState,
    MsrEntry,
    SpecialRegisters,
    StandardRegisters,
)
from vmmkit_mshv import registers as hvreg
from vmmkit_mshv.bindings import (
    InterceptType,
    MessageType,
    MshvDevice,
    MshvError,
    PartitionFd,
    PortSinks,
    RegisterPage,
    VpFd,
    VpState,
)
from vmmkit_mshv.kernel import Kernel
from vmmkit_mshv.lapic import lapic_page_from_state, lapic_state_from_page

__all__ = ["MshvVm", "MshvVcpu"]

#: HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION (hvhdk_mini.h) and the value Cloud Hypervisor
#: sets: HV_UNIMPLEMENTED_MSR_ACTION_IGNORE_WRITE_READ_ZERO.
PROPERTY_UNIMPLEMENTED_MSR_ACTION = 0x00050017
UNIMPLEMENTED_MSR_IGNORE_WRITE_READ_ZERO = 1
#: HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING: needed before MSHV_GET_GPAP_ACCESS_BITMAP.
PROPERTY_GPA_PAGE_ACCESS_TRACKING = 0x00050005
HV_INTERCEPT_ACCESS_MASK_EXECUTE = 0x04
_PAGE = 0x1000
_U64 = 0xFFFF_FFFF_FFFF_FFFF
#: MSI address bits (Intel SDM 11.11.1): destination ID 19:12, destination mode bit 2.
_MSI_DEST_SHIFT = 12


class MshvVm(Vm):
    """One partition."""

    supports_ioeventfd = True  # MMIO only: the kernel refuses port ioeventfds (EOPNOTSUPP)
    supports_irqfd = True

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        device = MshvDevice.open(kernel)
        try:
            self.partition = PartitionFd(kernel, device.create_partition(lapic=True))
        finally:
            device.close()
        self.partition.set_property(PROPERTY_UNIMPLEMENTED_MSR_ACTION, UNIMPLEMENTED_MSR_IGNORE_WRITE_READ_ZERO)
        self.partition.initialize()
        self.slots: dict[int, tuple[int, int, int, bool]] = {}
        self.vcpus: list[MshvVcpu] = []
        self.msi_routes: dict[int, tuple[int, int]] = {}
        self.irq_levels: dict[int, bool] = {}
        self.irq_count = 0
        self.ioapic: IoApic | None = None
        self.sinks = PortSinks()
        self._cpuid_intercept = False
        self._dirty_tracking = False
        self._lock = threading.Lock()

    # memory

    def add_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int, *,
                          readonly: bool = False, log_dirty: bool = False) -> None:
        if slot in self.slots:
            raise HypervisorError("MSHV_SET_GUEST_MEMORY", None, f"slot {slot} is in use")
        if log_dirty and not self._dirty_tracking:
            self.partition.set_property(PROPERTY_GPA_PAGE_ACCESS_TRACKING, 1)
            self._dirty_tracking = True
        self.partition.set_guest_memory(guest_addr, size, host_addr, writable=not readonly)
        self.slots[slot] = (guest_addr, size, host_addr, readonly)

    def remove_memory_region(self, slot: int) -> None:
        if slot not in self.slots:
            raise ValueError(f"memory slot {slot} is not in use")
        guest_addr, size, host_addr, readonly = self.slots.pop(slot)
        self.partition.set_guest_memory(guest_addr, size, host_addr, writable=not readonly, unmap=True)

    supports_dirty_log = True

    def start_dirty_log(self) -> None:
        """HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING on, then every slot's dirty bits read
        and cleared (Cloud Hypervisor's ``MshvVm::start_dirty_log``, ``hypervisor/src/mshv/mod.rs``)."""
        if not self._dirty_tracking:
            self.partition.set_property(PROPERTY_GPA_PAGE_ACCESS_TRACKING, 1)
            self._dirty_tracking = True
        for slot in list(self.slots):
            self.get_dirty_log(slot)

    def stop_dirty_log(self) -> None:
        """Every slot's dirty bits set (MSHV_GPAP_ACCESS_OP_SET: the Microsoft Hypervisor
        requires it before tracking is turned off, as Cloud Hypervisor's ``stop_dirty_log``
        says), then the property off."""
        if not self._dirty_tracking:
            return
        for guest_addr, size, _host, readonly in list(self.slots.values()):
            if not readonly:
                self.partition.gpap_access_bitmap(guest_addr // _PAGE, size // _PAGE, dirty=True, set_dirty=True)
        self.partition.set_property(PROPERTY_GPA_PAGE_ACCESS_TRACKING, 0)
        self._dirty_tracking = False

    def get_dirty_log(self, slot: int) -> bytes:
        """Pages written since the last call, one bit per page (MSHV_GET_GPAP_ACCESS_BITMAP)."""
        if slot not in self.slots:
            raise ValueError(f"memory slot {slot} is not in use")
        if not self._dirty_tracking:
            raise HypervisorError("MSHV_GET_GPAP_ACCESS_BITMAP", None, "the slot was not added with log_dirty")
        guest_addr, size, _, _ = self.slots[slot]
        return self.partition.gpap_access_bitmap(guest_addr // _PAGE, size // _PAGE, dirty=True, clear=True)

    # vCPUs

    def create_vcpu(self, index: int, ops: VcpuOps) -> MshvVcpu:
        vcpu = MshvVcpu(self, index, ops)
        self.vcpus.append(vcpu)
        return vcpu

    def intercept_cpuid(self) -> None:
        """Have CPUID exit to the VMM (answered from the table ``set_cpuid`` gave)."""
        with self._lock:
            if not self._cpuid_intercept:
                self.partition.install_intercept(InterceptType.X64_CPUID, HV_INTERCEPT_ACCESS_MASK_EXECUTE)
                self._cpuid_intercept = True

    # interrupts

    def setup_interrupt_controller(self) -> None:
        """The LAPICs are the hypervisor's (created with the partition). The hypervisor has no
        I/O APIC: the VMM emulates one at 0xfec00000 (as Cloud Hypervisor does on MSHV) whose
        messages become HVCALL_ASSERT_VIRTUAL_INTERRUPT; its MMIO arrives as memory intercepts."""
        self.ioapic = IoApic(self._ioapic_deliver)

    def _ioapic_deliver(self, vector: int, destination: int, mode: int, logical: bool, level: bool,
                        pin: int) -> None:
        self.partition.assert_interrupt(vector, destination, interrupt_type=mode, level=level, logical=logical)

    def set_irq_line(self, gsi: int, level: bool) -> None:
        """ISA IRQ 0 (the PIT) reaches I/O APIC pin 2, GSI n pin n (the MADT's overrides)."""
        with self._lock:
            if level and not self.irq_levels.get(gsi, False):
                self.irq_count += 1
            self.irq_levels[gsi] = level
        if self.ioapic is not None:
            self.ioapic.set_level(2 if gsi == 0 else gsi, level)

    def signal_msi(self, address: int, data: int, *, devid: int | None = None) -> None:
        """HVCALL_ASSERT_VIRTUAL_INTERRUPT for the MSI's vector, destination and mode."""
        vector = data & 0xFF
        delivery = (data >> 8) & 7  # fixed 0, lowest priority 1, NMI 4, INIT 5, ExtINT 7
        level = bool(data & (1 << 15))
        logical = bool(address & (1 << 2))
        destination = (address >> _MSI_DEST_SHIFT) & 0xFF
        self.partition.assert_interrupt(vector, destination, interrupt_type=delivery, level=level, logical=logical)

    def set_msi_route(self, gsi: int, address: int, data: int, *, devid: int | None = None) -> None:
        with self._lock:
            self.msi_routes[gsi] = (address, data)
            routes = [(g, a, d) for g, (a, d) in self.msi_routes.items()]
        self.partition.set_msi_routing(routes)

    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        """An irqfd for an MSI route. MSHV routes irqfds only through the MSI routing table; a
        wired line (no route) is the VMM's I/O APIC's: refused, so the device drives
        :meth:`set_irq_line` instead."""
        with self._lock:
            routed = gsi in self.msi_routes
        if not routed:
            raise NotImplementedError(f"irqfd for GSI {gsi}: not an MSI route (wired lines go through "
                                      "the VMM's I/O APIC)")
        self.partition.irqfd(fd, gsi, resample_fd=resample_fd)

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        self.partition.irqfd(fd, gsi, deassign=True)

    def register_ioeventfd(self, fd: int, addr: int, *, pio: bool, length: int = 0,
                           datamatch: int | None = None) -> None:
        if pio:
            raise NotImplementedError("port ioeventfds (MSHV refuses them: EOPNOTSUPP)")
        self.partition.ioeventfd(fd, addr, length=length, datamatch=datamatch)

    def unregister_ioeventfd(self, fd: int, addr: int, *, pio: bool, length: int = 0,
                             datamatch: int | None = None) -> None:
        if pio:
            raise NotImplementedError("port ioeventfds (MSHV refuses them: EOPNOTSUPP)")
        self.partition.ioeventfd(fd, addr, length=length, datamatch=datamatch, deassign=True)

    def add_port_sink(self, sink: PortSink) -> bool:
        """Serve the port in the C loop (plain bytes; timestamped lines stay with the device)."""
        if sink.timestamp:
            return False
        return self.sinks.add(sink.port, sink.fd, sink.read_value)

    def remove_port_sink(self, port: int) -> None:
        self.sinks.remove(port)

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        self.partition.close()


class MshvVcpu(Vcpu):
    """One VP; implements :class:`vmmkit.x86.X86Vcpu`. Intercepts are handled in :meth:`run`."""

    def __init__(self, vm: MshvVm, index: int, ops: VcpuOps) -> None:
        self.index = index
        self.vm = vm
        self.ops = ops
        self.fd = VpFd(vm.kernel, vm.partition.create_vp(index), index, vm.sinks)
        self.page: RegisterPage | None = self.fd.map_register_page()
        self.fd.use_register_page(self.page)
        self._cpuid: CpuIdTable | None = None
        self._msrs: dict[int, int] = {}
        self._kicked = False
        self._thread: int | None = None
        self._run_lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._closed = False

    # -- the run loop -------------------------------------------------------------------------

    def run(self) -> VmExit:
        while True:
            if self._kicked:
                self._counts["interrupted"] += 1
                return VmExit(ExitReason.INTERRUPTED, "kicked")
            with self._run_lock:
                self._thread = threading.get_ident()
            try:
                if self._kicked:
                    continue
                intercept = self.fd.run()
            except InterruptedError:
                continue
            finally:
                with self._run_lock:
                    self._thread = None
            self._counts["intercepts"] += 1
            exit_ = self._handle(intercept)
            if exit_ is not None:
                self._counts[exit_.reason.value] += 1
                return exit_

    def _handle(self, msg: Any) -> VmExit | None:
        kind = msg.kind
        if kind is MessageType.X64_IO_PORT_INTERCEPT:
            return self._port(msg)
        if kind in (MessageType.UNMAPPED_GPA, MessageType.GPA_INTERCEPT):
            return self._memory(msg)
        if kind is MessageType.X64_CPUID_INTERCEPT:
            return self._cpuid_exit(msg)
        if kind is MessageType.X64_MSR_INTERCEPT:
            return self._msr(msg)
        if kind is MessageType.X64_HALT:
            self._counts["halt"] += 1
            return VmExit(ExitReason.HLT)
        if kind is MessageType.X64_APIC_EOI:
            if self.vm.ioapic is not None:  # a level-triggered interrupt is done
                self.vm.ioapic.eoi(msg.vector)
            return None
        if kind is MessageType.UNRECOVERABLE_EXCEPTION:
            return VmExit(ExitReason.SHUTDOWN, f"vcpu{self.index}: unrecoverable exception at rip {msg.rip:#x}")
        if kind is MessageType.X64_EXCEPTION_INTERCEPT:
            code = "" if msg.error_code is None else f", error code {msg.error_code:#x}"
            return VmExit(ExitReason.INTERNAL_ERROR,
                          f"vcpu{self.index}: guest exception vector {msg.vector} at rip {msg.rip:#x}{code} "
                          f"(bytes {msg.instruction.hex(' ') or '?'})")
        return VmExit(ExitReason.INTERNAL_ERROR, f"vcpu{self.index}: unexpected intercept {kind.name}")

    def _port(self, msg: Any) -> VmExit | None:
        self._counts["pio"] += 1
        if msg.string or msg.size not in (1, 2, 4):
            return VmExit(ExitReason.INTERNAL_ERROR,
                          f"vcpu{self.index}: string port I/O (INS/OUTS) at rip {msg.rip:#x} is not emulated")
        if msg.write:
            self.ops.pio_write(msg.port, (msg.rax & ((1 << (8 * msg.size)) - 1)).to_bytes(msg.size, "little"))
            self._complete(msg.rip + msg.length)
            return None
        data = _fit(self.ops.pio_read(msg.port, msg.size), msg.size)
        value = int.from_bytes(data, "little")
        rax = value if msg.size == 4 else (msg.rax & ~((1 << (8 * msg.size)) - 1)) | value
        self._complete(msg.rip + msg.length, {0: rax})
        return None

    def _memory(self, msg: Any) -> VmExit | None:
        self._counts["mmio"] += 1
        try:
            access = x86_decode.decode(msg.instruction, msg.code_bits)
        except x86_decode.UnsupportedInstruction as exc:
            return VmExit(ExitReason.INTERNAL_ERROR, f"vcpu{self.index}: {exc} at rip {msg.rip:#x}, gpa {msg.gpa:#x}")
        gprs = self._general()
        ioapic = self.vm.ioapic
        in_ioapic = ioapic is not None and IOAPIC_BASE <= msg.gpa < IOAPIC_BASE + IOAPIC_SIZE
        if access.write:
            if access.immediate is not None:
                data = access.immediate.to_bytes(access.size, "little")
            else:
                data = x86_decode.register_bytes(gprs[access.register], access)
            if in_ioapic and ioapic is not None:
                ioapic.mmio_write(msg.gpa - IOAPIC_BASE, data)
            else:
                self.ops.mmio_write(msg.gpa, data)
            self._complete(msg.rip + access.length)
            return None
        if in_ioapic and ioapic is not None:
            data = ioapic.mmio_read(msg.gpa - IOAPIC_BASE, access.size)
        else:
            data = _fit(self.ops.mmio_read(msg.gpa, access.size), access.size)
        value = x86_decode.merge_read(gprs[access.register], access, data)
        self._complete(msg.rip + access.length, {access.register: value})
        return None

    def _cpuid_exit(self, msg: Any) -> VmExit | None:
        leaf, subleaf = msg.rax & 0xFFFF_FFFF, msg.rcx & 0xFFFF_FFFF
        table = self._cpuid
        entry = table.get(leaf, subleaf) if table is not None else None
        if entry is not None:
            values = (entry.eax, entry.ebx, entry.ecx, entry.edx)
        else:
            values = msg.default
        eax, ebx, ecx, edx = (v & 0xFFFF_FFFF for v in values)
        self._complete(msg.rip + msg.length, {0: eax, 3: ebx, 1: ecx, 2: edx})
        return None

    def _msr(self, msg: Any) -> VmExit | None:
        if msg.write:
            self._msrs[msg.msr] = (msg.rdx & 0xFFFF_FFFF) << 32 | (msg.rax & 0xFFFF_FFFF)
            self._complete(msg.rip + msg.length)
        else:
            value = self._msrs.get(msg.msr, 0)
            self._complete(msg.rip + msg.length, {0: value & 0xFFFF_FFFF, 2: value >> 32})
        return None

    def _general(self) -> list[int]:
        """rax rcx rdx rbx rsp rbp rsi rdi r8-r15 (register page when valid, else hypercall)."""
        page = self.page
        if page is not None and page.valid:
            return page.general()
        values = self.fd.get_registers([int(r) for r in hvreg.STANDARD[:16]])
        return [hvreg.as_u64(v) for v in values]

    def _complete(self, rip: int, gprs: dict[int, int] | None = None) -> None:
        """Finish an intercepted instruction: write its results and step past it."""
        rip &= _U64
        page = self.page
        if page is not None and page.valid:
            for index, value in (gprs or {}).items():
                page.set_general(index, value & _U64)
            page.set_rip(rip)
            return
        pairs = [(int(hvreg.STANDARD[index]), hvreg.u64(value & _U64)) for index, value in (gprs or {}).items()]
        pairs.append((int(hvreg.Reg.RIP), hvreg.u64(rip)))
        self.fd.set_registers(pairs)

    # -- kicks --------------------------------------------------------------------------------

    def kick(self) -> None:
        self._kicked = True
        self.fd.kick()
        self._signal()

    def _signal(self) -> None:
        with self._run_lock:
            thread = self._thread
        if thread is not None and self._kicked and not self._closed:
            self.vm.kernel.kick_thread(thread)
            # A signal that lands before the thread enters MSHV_RUN_VP is lost: repeat.
            timer = threading.Timer(0.005, self._signal)
            timer.daemon = True
            timer.start()

    def clear_kick(self) -> None:
        self._kicked = False
        self.fd.clear_kick()

    def exit_counts(self) -> dict[str, int]:
        return {**self._counts, **{f"native_{k}": v for k, v in self.fd.counts().items()}}

    # -- X86Vcpu --------------------------------------------------------------------------------

    def get_regs(self) -> StandardRegisters:
        return hvreg.standard_from_values(self.fd.get_registers([int(r) for r in hvreg.STANDARD]))

    def set_regs(self, regs: StandardRegisters) -> None:
        self.fd.set_registers(hvreg.standard_to_values(regs))

    def get_sregs(self) -> SpecialRegisters:
        return hvreg.special_from_values(self.fd.get_registers([int(r) for r in hvreg.SPECIAL]))

    def set_sregs(self, sregs: SpecialRegisters) -> None:
        self.fd.set_registers(hvreg.special_to_values(sregs))

    def get_fpu(self) -> FpuState:
        fp, xmm = self.fd.get_registers([int(hvreg.Reg.FP_CONTROL_STATUS), int(hvreg.Reg.XMM_CONTROL_STATUS)])
        return FpuState(fcw=struct.unpack_from("<H", fp)[0], mxcsr=struct.unpack_from("<I", xmm, 8)[0])

    def set_fpu(self, fpu: FpuState) -> None:
        # hv_x64_fp_control_status_register: fp_control u16 first; hv_x64_xmm_control_status_register:
        # last_fp_rdp u64, then xmm_status_control (MXCSR) u32 and its mask u32.
        fp = struct.pack("<H14x", fpu.fcw)
        xmm = struct.pack("<QII", 0, fpu.mxcsr, 0xFFFF)
        self.fd.set_registers([(int(hvreg.Reg.FP_CONTROL_STATUS), fp), (int(hvreg.Reg.XMM_CONTROL_STATUS), xmm)])

    def get_msrs(self, indices: Sequence[int]) -> list[MsrEntry]:
        named = [i for i in indices if i in hvreg.MSR_REGISTERS]
        values = dict(zip(named, self.fd.get_registers([int(hvreg.MSR_REGISTERS[i]) for i in named]), strict=True))
        return [MsrEntry(i, hvreg.as_u64(values[i]) if i in values else self._msrs.get(i, 0)) for i in indices]

    def set_msrs(self, msrs: Sequence[MsrEntry]) -> None:
        pairs = []
        for msr in msrs:
            reg = hvreg.MSR_REGISTERS.get(msr.index)
            if reg is None:
                self._msrs[msr.index] = msr.data  # served from MSR intercepts
            else:
                pairs.append((int(reg), hvreg.u64(msr.data)))
        if pairs:
            self.fd.set_registers(pairs)

    def set_cpuid(self, entries: Sequence[CpuIdEntry]) -> None:
        self._cpuid = CpuIdTable(entries)
        self.vm.intercept_cpuid()

    def get_lapic(self) -> bytes:
        return lapic_page_from_state(self.fd.get_state(VpState.LAPIC))

    def set_lapic(self, state: bytes) -> None:
        current = self.fd.get_state(VpState.LAPIC)
        self.fd.set_state(VpState.LAPIC, lapic_state_from_page(state, current))

    def get_xsave(self) -> bytes:
        """The XSAVE area in compacted form (MSHV_VP_STATE_XSAVE)."""
        return self.fd.get_state(VpState.XSAVE)

    def set_xsave(self, data: bytes) -> None:
        self.fd.set_state(VpState.XSAVE, data)

    def get_mp_state(self) -> int:
        (raw,) = self.fd.get_registers([int(hvreg.Reg.INTERNAL_ACTIVITY_STATE)])
        return MpState.UNINITIALIZED if hvreg.as_u64(raw) & 1 else MpState.RUNNABLE

    def set_mp_state(self, state: int) -> None:
        """UNINITIALIZED: startup-suspended until the guest's INIT/SIPI; RUNNABLE: running."""
        if state not in (MpState.UNINITIALIZED, MpState.RUNNABLE):
            raise CapabilityError("set_mp_state", None, f"MSHV has no equivalent of MP state {state}")
        value = 1 if state == MpState.UNINITIALIZED else 0
        self.fd.set_registers([(int(hvreg.Reg.INTERNAL_ACTIVITY_STATE), hvreg.u64(value))])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.page is not None:
            self.page.unmap()
            self.page = None
        try:
            self.fd.close()
        except OSError as exc:
            raise MshvError("close(vp)", exc.errno) from None


def _fit(value: bytes, size: int) -> bytes:
    """A device answered with the wrong number of bytes: pad with ones or truncate."""
    data = bytes(value)[:size]
    return data + b"\xff" * (size - len(data))
