"""x86-64 vCPUs on unicorn: the :class:`vmmkit.x86.X86Vcpu` protocol.

Engine mode
    Each vCPU is a unicorn engine in ``UC_MODE_32``: in that mode unicorn loads segment
    registers through the descriptor tables (``cpu_x86_load_seg``), so register writes can put
    the vCPU in real mode (AP start-up), 32-bit protected mode (PVH) or long mode (linux64), and
    the guest's own mode switches run as on hardware. unicorn's register API reaches only the low
    32 bits of the general registers and of RIP in this mode; ``get_regs``/``set_regs`` carry all
    64 bits of RAX-R15 and RIP through the saved context (:mod:`vmmkit_emu.fullregs`), but
    ``emu_start`` takes a 32-bit start address, so **guest code must run below 4 GiB** (every
    vmmkit boot protocol and the test guest do; a Linux kernel mapped at 0xffffffff8... does not
    run on emu). Segment registers are loaded by selector from the guest's GDT (the boot GDT the
    architecture wrote); their other :class:`vmmkit.x86.Segment` fields are not used, except in
    real mode where base = selector << 4.

MMIO
    Addresses that are not RAM are left unmapped: a device access faults with EIP exact, and the
    backend decodes the instruction (:mod:`vmmkit.x86_decode`: the moves compilers emit), does
    the access through ``VcpuOps.mmio_read``/``mmio_write`` with its real width (1-8 bytes) and
    steps past it. Another instruction is run alone with the page mapped as unicorn MMIO (whose
    callbacks split 8-byte accesses in two). The local and I/O APIC pages are unicorn MMIO,
    served here.

Port I/O
    IN/OUT (and INS/OUTS, element by element) reach ``VcpuOps.pio_read``/``pio_write`` through
    unicorn's instruction hooks. Port sinks are not served natively (``add_port_sink`` is
    ``False``): the devices handle those ports.

CPUID
    :func:`supported_cpuid` runs CPUID on a scratch engine (unicorn's CPU model); the table the
    architecture sets with ``set_cpuid`` is then served from an instruction hook.

Interrupt controllers (:mod:`vmmkit_emu.x86_irq`)
    With ``setup_interrupt_controller`` the VM has an I/O APIC at 0xfec00000
    (:mod:`vmmkit.ioapic`) and each vCPU a local APIC: the xAPIC page (at the APIC base) with
    the state of ``get_lapic``/``set_lapic``; IRR, ISR and TMR, priorities (TPR, in-service
    class), EOI (a level-triggered vector's EOI reaches the I/O APIC). Fixed interrupts (I/O
    APIC pins, MSIs, fixed IPIs) and NMIs are injected through the guest's IDT while the engine
    is stopped; a vCPU with one pending and IF clear stops every millisecond to look again. The
    ICR also sends INIT and STARTUP (INIT-SIPI-SIPI starts APs in real mode at ``vector << 12``).
    Delivery status always reads idle. The x2APIC MSRs are not emulated, nor the APIC timer.

HLT, exceptions
    HLT ends ``emu_start``; the vCPU sleeps until an interrupt, IPI or kick wakes it (2 ms at
    most) and continues after the HLT. CPU exceptions and software interrupts go to the guest's
    IDT gate (``#UD`` from an invalid instruction too); error-code exceptions push 0 (unicorn
    does not report the code). Without a present gate the run ends with an internal error naming
    the vector and EIP.
"""

from __future__ import annotations

import collections
import functools
import struct
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MODE_32,
)
from unicorn import x86_const as X

from vmmkit import x86_decode, x86_platform
from vmmkit.hypervisor import ExitReason, VcpuOps, VmExit
from vmmkit.state import StateError
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
from vmmkit_emu import fullregs
from vmmkit_emu.hypervisor import EmuVcpu, EmuVm, _retry, new_engine
from vmmkit_emu.x86_irq import (
    ERROR_CODE_VECTORS,
    FIXED,
    IOAPIC_BASE,
    IOAPIC_SIZE,
    LOWEST_PRIORITY,
    NMI,
    IoApic,
    highest_bit,
    set_bit,
    test_bit,
)

#: The general registers in the CPU's numbering (unicorn's saved context keeps them so).
_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
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
APIC_TPR = 0x80
APIC_EOI = 0xB0
APIC_LDR = 0xD0
APIC_SVR = 0xF0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_ICR_LO = 0x300
APIC_ICR_HI = 0x310
ICR_DELIVERY_MODE = 0x700
ICR_INIT = 0x500
ICR_STARTUP = 0x600
ICR_LEVEL_ASSERT = 1 << 14
ICR_PENDING = 1 << 12
ICR_NMI = 0x400
EFLAGS_IF = 1 << 9
EFLAGS_TF = 1 << 8
EFLAGS_RF = 1 << 16
EFLAGS_NT = 1 << 14
EFER_LMA = 1 << 10
#: How often a vCPU with an interrupt it could not take yet (IF clear) stops to look again.
IRQ_WINDOW_POLL = 0.001

#: Leaves whose output depends on ECX (CPUID_FLAG_SIGNIFICANT_INDEX), and how many subleaves
#: :func:`supported_cpuid` collects of each.
_INDEXED_LEAVES = {4: 8, 7: 2, 0xB: 3, 0xD: 4, 0xF: 2, 0x10: 2, 0x12: 3, 0x14: 2, 0x17: 4, 0x18: 4,
                   0x1D: 2, 0x1E: 1, 0x1F: 3, 0x8000_001D: 5}


class X86Vm(EmuVm):
    """An emulated x86-64 VM. With :meth:`setup_interrupt_controller` it has the PC's interrupt
    controllers (an I/O APIC at 0xfec00000 and the local APICs), as KVM's in-kernel irqchip."""

    def __init__(self, arch: str) -> None:
        super().__init__(arch)
        self.ioapic: IoApic | None = None

    def _new_vcpu(self, index: int, ops: VcpuOps) -> X86Vcpu:
        return X86Vcpu(self, index, ops)

    # -- snapshots (vmmkit.state.Snapshottable, vmmkit.x86_platform's layout) --------------------

    state_version: ClassVar[int] = x86_platform.STATE_VERSION

    def save_state(self) -> dict[str, Any]:
        """The I/O APIC model; no PIC, no PIT, no paravirtual clock on this backend."""
        if self.ioapic is None:
            return x86_platform.platform_state()
        apic_id, select, levels, table = self.ioapic.save_registers()
        return x86_platform.platform_state(ioapic=x86_platform.IoApicState(apic_id, select, levels, table))

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """A state from another backend too, when this one has every piece it holds in use: a
        PIC that is unmasked, KVM's in-kernel PIT cannot cross (they are refused, naming them)."""
        parsed = x86_platform.parse_platform_state(state)
        if parsed.pics_in_use():
            raise StateError("the guest uses the 8259 PICs (unmasked) and emu has none")
        if parsed.kvm_pit2 is not None:
            raise StateError("the snapshot has KVM's in-kernel PIT, which cannot cross to emu (it has a "
                             "userspace PIT only: take the snapshot with the KVM host quirks that use one)")
        if parsed.ioapic is not None:
            if self.ioapic is None:
                raise StateError("the snapshot has an I/O APIC state; this VM has no interrupt controller")
            io = parsed.ioapic
            self.ioapic.restore_registers(io.id, io.select, io.irr, io.redirection)

    # -- interrupts ---------------------------------------------------------------------------

    def setup_interrupt_controller(self) -> None:
        super().setup_interrupt_controller()
        self.ioapic = IoApic(self.deliver_interrupt)

    def set_irq_line(self, gsi: int, level: bool) -> None:
        """ISA IRQ 0 (the PIT) reaches I/O APIC pin 2, GSI n pin n (the MADT's overrides)."""
        super().set_irq_line(gsi, level)
        if self.ioapic is not None:
            self.ioapic.set_level(2 if gsi == 0 else gsi, level)

    def signal_msi(self, address: int, data: int, *, devid: int | None = None) -> None:
        """An MSI (Intel SDM vol. 3 10.11): destination address bits 19:12, logical mode bit 2;
        vector data bits 7:0, delivery mode 10:8, level-triggered bit 15."""
        super().signal_msi(address, data, devid=devid)
        self.deliver_interrupt(data & 0xFF, (address >> 12) & 0xFF, (data >> 8) & 7, bool(address & 4),
                               bool(data & (1 << 15)), -1)

    def _targets(self, destination: int, logical: bool) -> list[X86Vcpu]:
        cpus = [v for v in self.vcpus if isinstance(v, X86Vcpu)]
        if logical:
            return [v for v in cpus if v.logical_id() & destination]
        if destination == 0xFF:
            return cpus
        return [v for v in cpus if v.apic_id() == destination]

    def deliver_interrupt(self, vector: int, destination: int, mode: int, logical: bool, level: bool,
                          pin: int) -> None:
        """An interrupt message from the I/O APIC or an MSI to the local APICs it names."""
        targets = self._targets(destination, logical)
        if mode == LOWEST_PRIORITY:
            targets = targets[:1]
        for target in targets:
            if mode in (FIXED, LOWEST_PRIORITY):
                target.accept_interrupt(vector, level)
            elif mode == NMI:
                target.accept_nmi()

    def end_of_interrupt(self, vector: int) -> None:
        if self.ioapic is not None:
            self.ioapic.eoi(vector)

    def deliver_ipi(self, source: int, icr: int, destination: int) -> None:
        """An ICR write of vCPU ``source``: INIT / STARTUP / NMI / fixed."""
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
            elif mode == ICR_NMI:
                target.accept_nmi()
            else:
                target.accept_interrupt(icr & 0xFF, False)


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
        self._nmi_pending = False
        self._irq_polling = False
        self._mmio_fault: tuple[int, int, bool] | None = None
        self._skipped_at: int | None = None
        self._skipped_tries = 0
        self.injected: collections.Counter[int] = collections.Counter()
        super().__init__(vm, index, ops)

    def _make_engine(self) -> Any:
        uc = new_engine(UC_ARCH_X86, UC_MODE_32)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.hook_add(UC_HOOK_INTR, self._on_exception)
        uc.hook_add(UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED, self._on_unmapped)
        return uc

    # -- MMIO: faults on unmapped addresses, completed by decoding the instruction -----------------

    def _map_memory(self) -> None:
        """RAM, and the local and I/O APIC pages as unicorn MMIO (registers served here); every
        other address stays unmapped, so a device access faults with EIP exact and is completed
        by :meth:`_emulate_mmio` (unicorn's own MMIO regions split 8-byte accesses in two)."""
        from unicorn import UC_PROT_ALL

        for start, size, host in self.vm.ram_ranges():
            self.uc.mem_map_ptr(start, size, UC_PROT_ALL, host)
        for base in (APIC_DEFAULT_BASE, IOAPIC_BASE):
            self.uc.mmio_map(base, APIC_PAGE, self._mmio_read_cb, base, self._mmio_write_cb, base)

    def _on_unmapped(self, uc: Any, access: int, address: int, size: int, value: int, _: Any) -> bool:
        from unicorn import UC_MEM_WRITE_UNMAPPED

        self._mmio_fault = (address, size, access == UC_MEM_WRITE_UNMAPPED)
        return False  # emu_start raises: _engine_error completes the access

    def code_bits(self) -> int:
        """The running code's mode: 64 with EFER.LMA and CS.L, else 32 or 16 from CS.D."""
        uc = self.uc
        if not int(uc.reg_read(X.UC_X86_REG_CR0)) & 1:
            return 16
        long_mode = self._long_mode()
        _, gdt_base, _, _ = uc.reg_read(X.UC_X86_REG_GDTR)
        cs = int(uc.reg_read(X.UC_X86_REG_CS))
        try:
            descriptor = int.from_bytes(bytes(uc.mem_read(gdt_base + (cs & ~7), 8)), "little")
        except Exception:
            return 64 if long_mode else 32
        if long_mode and descriptor >> 53 & 1:
            return 64
        return 32 if descriptor >> 54 & 1 else 16

    def _emulate_mmio(self, address: int, write: bool) -> bool:
        """Do the faulting instruction's device access and step past it (the moves a compiler
        emits: :mod:`vmmkit.x86_decode`); False if it is not one of them."""
        uc = self.uc
        gprs, rip, _ = fullregs.read(uc)
        try:
            code = bytes(uc.mem_read(rip, 16))
        except Exception:
            code = bytes(uc.mem_read(rip, 0x1000 - (rip & 0xFFF)))[:16]
        try:
            access = x86_decode.decode(code, self.code_bits())
        except x86_decode.UnsupportedInstruction:
            return False
        self.count("mmio")
        if access.write:
            if access.immediate is not None:
                data = access.immediate.to_bytes(access.size, "little")
            else:
                data = x86_decode.register_bytes(gprs[access.register], access)
            self.mmio_write(address, data)
            fullregs.write(uc, {}, rip + access.length)
            return True
        data = self.mmio_read(address, access.size)
        value = x86_decode.merge_read(gprs[access.register], access, data)
        fullregs.write(uc, {access.register: value}, rip + access.length)
        return True

    def _step_with_mmio_page(self, address: int) -> None:
        """An instruction the decoder does not know touched a device: run it alone with the
        page as unicorn MMIO (its accesses then reach the devices through callbacks)."""
        uc = self.uc
        page = address & ~0xFFF
        uc.mmio_map(page, 0x1000, self._mmio_read_cb, page, self._mmio_write_cb, page)
        try:
            uc.emu_start(self._pc(), 0xFFFF_FFFF_FFFF_FFFF, 0, 1)
        finally:
            uc.mem_unmap(page, 0x1000)

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
        """A CPU exception or software interrupt: delivered through the guest's IDT (after the
        engine stopped, on this thread) when its gate is present; else the run ends naming it."""
        eip = self._pc()
        if self._gate(intno) is not None:
            error_code = 0 if intno in ERROR_CODE_VECTORS else None

            def deliver() -> None:
                self._inject(intno, error_code)

            self.defer(deliver)
            return
        self.stop_with(ExitReason.INTERNAL_ERROR,
                       f"vcpu{self.index}: guest exception or interrupt vector {intno} at eip {eip:#x} "
                       "(no present gate for it in the guest's IDT)")

    def _engine_error(self, exc: Exception) -> VmExit | None:
        """A device access (an unmapped address) is completed here; an invalid instruction is
        #UD (vector 6) for the guest when its IDT has the gate."""
        import unicorn

        fault, self._mmio_fault = self._mmio_fault, None
        if fault is None and self._hook_skipped(exc):
            return None  # nothing was done: the next entry runs the instruction again
        if fault is not None:
            address, _, write = fault
            try:
                if not self._emulate_mmio(address, write):
                    self._step_with_mmio_page(address)
            except Exception as error:  # the single step faulted again (a bad address)
                return super()._engine_error(error)
            return None

        uc_error = getattr(unicorn, "UcError")  # noqa: B009  (untyped binding)
        invalid = isinstance(exc, uc_error) and getattr(exc, "errno", None) == unicorn.UC_ERR_INSN_INVALID
        if invalid and self._inject(6, None):
            self.count("exception")
            return None
        return super()._engine_error(exc)

    def _hook_skipped(self, exc: Exception) -> bool:
        """An unmapped access whose hook unicorn skipped (it does while a stop is requested: a
        kick, a preemption): no side effect happened, so the access may be retried -- a few
        times at one address, then it is an error after all."""
        import unicorn

        unmapped = (unicorn.UC_ERR_READ_UNMAPPED, unicorn.UC_ERR_WRITE_UNMAPPED, unicorn.UC_ERR_WRITE_PROT)
        if not isinstance(exc, getattr(unicorn, "UcError")) or getattr(exc, "errno", None) not in unmapped:  # noqa: B009
            self._skipped_at = None
            return False
        pc = self._pc()
        tries = self._skipped_tries + 1 if self._skipped_at == pc else 1
        self._skipped_at, self._skipped_tries = pc, tries
        return tries <= 3

    def _error_context(self, pc: int) -> str:
        try:
            code = bytes(self.uc.mem_read(pc, 4)).hex(" ")
        except Exception:
            code = "?"
        return f" (bytes {code}; no present gate for it in the guest's IDT)"

    # -- interrupt delivery ---------------------------------------------------------------------

    def _long_mode(self) -> bool:
        return bool(int(self.uc.msr_read(MSR_EFER)) & EFER_LMA)

    def _gate(self, vector: int) -> tuple[int, int, int] | None:
        """``(offset, selector, type)`` of the present IDT gate for ``vector``, else None."""
        uc = self.uc
        _, base, limit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
        size = 16 if self._long_mode() else 8
        if vector * size + size - 1 > limit:
            return None
        try:
            raw = bytes(uc.mem_read(base + vector * size, size))
        except Exception:
            return None
        low = int.from_bytes(raw[:8], "little")
        if not low >> 47 & 1:
            return None
        offset = (low & 0xFFFF) | ((low >> 48) & 0xFFFF) << 16
        if size == 16:
            offset |= int.from_bytes(raw[8:12], "little") << 32
        return offset, (low >> 16) & 0xFFFF, (low >> 40) & 0xF

    def _inject(self, vector: int, error_code: int | None) -> bool:
        """Enter the guest's handler for ``vector`` as the CPU does (SDM vol. 3 6.12, 6.14);
        False if the gate is missing. Runs on this vCPU's thread with the engine stopped."""
        gate = self._gate(vector)
        if gate is None:
            return False
        offset, selector, kind = gate
        uc = self.uc
        rip = self._pc()
        rflags = int(uc.reg_read(X.UC_X86_REG_EFLAGS))
        cs = int(uc.reg_read(X.UC_X86_REG_CS))
        rsp = int(uc.reg_read(X.UC_X86_REG_ESP))
        if self._long_mode():
            ss = int(uc.reg_read(X.UC_X86_REG_SS))
            # from the new RSP up: [error code], RIP, CS, RFLAGS, RSP, SS (SS was pushed first)
            words = ([error_code] if error_code is not None else []) + [rip, cs, rflags, rsp, ss]
            new_rsp = (rsp & ~0xF) - 8 * len(words)
            uc.mem_write(new_rsp, struct.pack(f"<{len(words)}Q", *words))
        else:
            words = ([error_code] if error_code is not None else []) + [rip, cs, rflags]
            new_rsp = rsp - 4 * len(words)
            uc.mem_write(new_rsp, struct.pack(f"<{len(words)}I", *(w & 0xFFFF_FFFF for w in words)))
        flags = rflags & ~(EFLAGS_TF | EFLAGS_RF | EFLAGS_NT)
        if kind == 0xE:  # interrupt gate (0xF, a trap gate, keeps IF)
            flags &= ~EFLAGS_IF
        uc.reg_write(X.UC_X86_REG_ESP, new_rsp & 0xFFFF_FFFF)
        uc.reg_write(X.UC_X86_REG_EFLAGS, flags)
        if selector != cs:
            uc.reg_write(X.UC_X86_REG_CS, selector)
        uc.reg_write(X.UC_X86_REG_EIP, offset & 0xFFFF_FFFF)
        self.injected[vector] += 1
        return True

    def accept_interrupt(self, vector: int, level: bool) -> None:
        """A fixed interrupt arrives at this local APIC: into the IRR (and the TMR for a
        level-triggered one), then delivered when the guest can take it."""
        if vector < 16:
            return  # illegal vectors are dropped (the ESR would say so)
        with self._lapic_lock:
            set_bit(self._lapic, APIC_IRR, vector, True)
            set_bit(self._lapic, APIC_TMR, vector, level)
        self._request_injection()

    def accept_nmi(self) -> None:
        self._nmi_pending = True
        self._request_injection()

    def _request_injection(self) -> None:
        """Wake a halted vCPU and stop a running one so :meth:`_before_entry` runs soon; keep
        stopping it now and then while the guest cannot take the interrupt (IF clear)."""
        self.wake()
        if self._in_emu:
            self.preempt()
        if not self._irq_polling:
            self._irq_polling = True
            _retry(self._poll_injection, IRQ_WINDOW_POLL, tries=1 << 30)

    def _poll_injection(self) -> bool:
        if self._closed or not self._deliverable_pending():
            self._irq_polling = False
            return False
        if self._in_emu:
            self.preempt()
        else:
            self.wake()
        return True

    def _deliverable_pending(self) -> bool:
        if self._nmi_pending:
            return True
        with self._lapic_lock:
            return self._pending_vector_locked() >= 0

    def _pending_vector_locked(self) -> int:
        """The IRR's highest vector if its priority class beats the ISR's and the TPR's and the
        APIC is software-enabled (SVR bit 8), else -1."""
        if not struct.unpack_from("<I", self._lapic, APIC_SVR)[0] & 0x100:
            return -1
        irr = highest_bit(self._lapic, APIC_IRR)
        if irr < 0:
            return -1
        isr = highest_bit(self._lapic, APIC_ISR)
        tpr = struct.unpack_from("<I", self._lapic, APIC_TPR)[0] & 0xFF
        if isr >= 0 and irr >> 4 <= isr >> 4:
            return -1
        if irr >> 4 <= tpr >> 4:
            return -1
        return irr

    def _before_entry(self) -> None:
        if self._nmi_pending:
            self._nmi_pending = False
            if self._inject(2, None):
                return
        if not int(self.uc.reg_read(X.UC_X86_REG_EFLAGS)) & EFLAGS_IF:
            return
        with self._lapic_lock:
            vector = self._pending_vector_locked()
            if vector < 0:
                return
            set_bit(self._lapic, APIC_IRR, vector, False)
            set_bit(self._lapic, APIC_ISR, vector, True)
        if not self._inject(vector, None):
            with self._lapic_lock:
                set_bit(self._lapic, APIC_ISR, vector, False)

    def _end_of_interrupt(self) -> None:
        """An EOI write: the highest in-service vector is done; a level-triggered one tells the
        I/O APIC (the broadcast EOI clears its remote IRR)."""
        with self._lapic_lock:
            vector = highest_bit(self._lapic, APIC_ISR)
            if vector < 0:
                return
            set_bit(self._lapic, APIC_ISR, vector, False)
            level = test_bit(self._lapic, APIC_TMR, vector)
        if level:
            self.vm.end_of_interrupt(vector)
        if self._deliverable_pending():
            self._request_injection()

    def logical_id(self) -> int:
        """The flat-model logical ID (LDR bits 31:24)."""
        with self._lapic_lock:
            return self._lapic[APIC_LDR + 3]

    # -- the local APIC page ----------------------------------------------------------------------

    def _apic_page(self, addr: int) -> int | None:
        base = self._apic_base & ~0xFFF & ((1 << 52) - 1)
        return addr - base if base <= addr < base + APIC_PAGE else None

    def _ioapic_offset(self, addr: int) -> int | None:
        ioapic = self.vm.ioapic
        return addr - IOAPIC_BASE if ioapic is not None and IOAPIC_BASE <= addr < IOAPIC_BASE + IOAPIC_SIZE else None

    def mmio_read(self, addr: int, size: int) -> bytes:
        offset = self._apic_page(addr)
        if offset is None:
            io_offset = self._ioapic_offset(addr)
            if io_offset is not None and self.vm.ioapic is not None:
                return self.vm.ioapic.mmio_read(io_offset, size)
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
            io_offset = self._ioapic_offset(addr)
            if io_offset is not None and self.vm.ioapic is not None:
                self.vm.ioapic.mmio_write(io_offset, data)
                return
            self.ops.mmio_write(addr, data)
            return
        if offset in (APIC_ID, APIC_VERSION, APIC_ISR, APIC_TMR, APIC_IRR) or APIC_ISR <= offset < APIC_IRR + 0x80:
            return  # read-only registers
        if offset == APIC_EOI:
            self._end_of_interrupt()
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
        """All 64 bits of RAX-R15 and RIP (:mod:`vmmkit_emu.fullregs`: this mode's register API
        reaches only their low halves)."""
        gprs, rip, rflags = fullregs.read(self.uc)
        return StandardRegisters(**dict(zip(_GPR_ORDER, gprs, strict=True)), rip=rip, rflags=rflags)

    def set_regs(self, regs: StandardRegisters) -> None:
        for name in (*_GPR_ORDER, "rip", "rflags"):
            value = getattr(regs, name)
            if not 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:
                raise ValueError(f"{name}={value:#x} does not fit 64 bits")
        gprs = {i: getattr(regs, name) for i, name in enumerate(_GPR_ORDER)}
        fullregs.write(self.uc, gprs, regs.rip, regs.rflags)

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
        self._cpuid = CpuIdTable(entries)

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
