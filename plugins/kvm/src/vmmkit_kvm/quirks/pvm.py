"""Quirks of ``kvm_pvm`` hosts: nested "PVM" KVM, without VMX or SVM.

Measured on such hosts (``shared/notes/pvm-host.md``): guest ring-0 code is *emulated* at
about 1 µs per instruction, user mode runs natively, and the emulator and the CPUID filter
have gaps. What the backend does about each, and only when this quirk set is active:

===================================  ==========================================================
gap                                  what vmmkit does
===================================  ==========================================================
``int3`` at CPL0 cannot be emulated  the emulation failure is resolved here: RIP moves past
(an INTERNAL_ERROR exit)             the ``0xcc`` and #BP is injected (KVM_SET_VCPU_EVENTS),
                                     which is what the CPU would have done
``fwait`` cannot be emulated         RIP moves past the ``0x9b`` (no x87 exception is ever
                                     pending in a guest kept off x87 state)
other instructions (``xrstor``,      the guest is kept off them: CPUID bits are hidden where
SSE, ``cmpxchg16b``, ``clac``,       KVM_SET_CPUID2 honours it (CX16) and the kernel is told
``clwb``...)                         the rest with ``clearcpuid=``; ``mitigations=off`` keeps
                                     mitigation code (``verw``...) out of the entry paths
user-mode ``syscall`` leaves CS at   a guest-debug hardware breakpoint on the guest's page-fault
the user selector, so the first      handler; when its exception frame shows a user CS and
fetch at LSTAR faults                RIP == LSTAR, the state is rewritten to what SYSCALL
                                     should have produced (kernel CS/SS from STAR[47:32],
                                     RIP = LSTAR, RSP and RFLAGS from the frame, RF clear).
                                     Other faults run the handler: the host ignores RF, so its
                                     first instruction is done here when trivial (a NOP, CLD:
                                     Linux's is a patched-out CLAC), else single-stepped
the real-time tick eats the guest    no in-kernel PIT: a userspace 8254 (``i8254`` device)
                                     whose clock runs ``dilation`` times slower than wall
                                     time, and ``no-kvmclock tsc_early_khz=<dilation x TSC
                                     kHz> tsc=reliable``, so every guest clock is slowed alike
zeroing and read-only remapping      ``init_on_alloc=0 rodata=off cryptomgr.notests=1``: at
cost minutes when emulated           1 µs per instruction they dominate the boot
===================================  ==========================================================

The breakpoint is armed per vCPU as soon as the guest has a page-fault handler and an LSTAR
(long before user space starts): once the VM runs (``vmmkit_vm_state_changed`` to Running, so
raw backend tests are left alone) a helper thread kicks vCPUs not yet armed twice a second, and the
vCPU's own thread, back in the backend, reads its IDT and arms it. The kick reaches the VMM
as an ordinary ``INTERRUPTED`` exit, which the machine's loop already ignores.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, ClassVar, Final

from attrs import define, evolve

from vmmkit.device import DeviceRequest
from vmmkit.hypervisor import ExitReason, VmExit
from vmmkit.log import get_logger
from vmmkit.sandbox import VMM, enter_thread
from vmmkit.x86 import CpuIdEntry, Segment
from vmmkit_kvm.quirks import PVM, HostQuirks, VmQuirks
from vmmkit_kvm.quirks.guestmem import CR0_PG, EFER_LMA, GuestPhysical, GuestVirtual, idt_gate_target

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vmmkit.x86 import SpecialRegisters, StandardRegisters
    from vmmkit_kvm.hypervisor import KvmExitInfo, KvmVcpu, KvmVm

log = get_logger()

MSR_STAR: Final = 0xC0000081
MSR_LSTAR: Final = 0xC0000082
RFLAGS_RF: Final = 1 << 16
RFLAGS_DF: Final = 1 << 10
PF_VECTOR: Final = 14
BP_VECTOR: Final = 3
INT3: Final = 0xCC
FWAIT: Final = 0x9B
INTERNAL_ERROR_EMULATION: Final = 1
#: Seconds between kicks of vCPUs whose syscall repair is not armed yet.
ARM_POLL_INTERVAL: Final = 0.5

#: PC PIT placement (where KVM's in-kernel PIT would be): ports 0x40-0x43, ISA IRQ 0.
PIT_PORTS: Final = (0x40, 4)
PIT_IRQ: Final = 0

#: ``(Linux feature name, CPUID leaf, subleaf, register, bit)`` the guest must not use.
#: KVM_SET_CPUID2 on these hosts honours only some leaf-1 ECX bits (CX16 among them); leaf 7
#: always shows the host's values. Each is therefore both cleared in the CPUID table and
#: passed to the kernel as ``clearcpuid=<word * 32 + bit>`` (6.1 takes only numbers).
HIDDEN_FEATURES: Final[tuple[tuple[str, int, int, str, int, int], ...]] = (
    # name,         leaf, sub, reg,  bit, Linux cpufeature number
    ("pclmulqdq", 1, 0, "ecx", 1, 4 * 32 + 1),
    ("ssse3", 1, 0, "ecx", 9, 4 * 32 + 9),
    ("sse4_1", 1, 0, "ecx", 19, 4 * 32 + 19),
    ("sse4_2", 1, 0, "ecx", 20, 4 * 32 + 20),
    ("popcnt", 1, 0, "ecx", 23, 4 * 32 + 23),
    ("aes", 1, 0, "ecx", 25, 4 * 32 + 25),
    ("xsave", 1, 0, "ecx", 26, 4 * 32 + 26),
    ("fsgsbase", 7, 0, "ebx", 0, 9 * 32 + 0),
    ("erms", 7, 0, "ebx", 9, 9 * 32 + 9),
    ("smap", 7, 0, "ebx", 20, 9 * 32 + 20),
    ("clwb", 7, 0, "ebx", 24, 9 * 32 + 24),  # the pmem driver's cache write-back: clflushopt instead
    ("sha_ni", 7, 0, "ebx", 29, 9 * 32 + 29),
    ("fsrm", 7, 0, "edx", 4, 18 * 32 + 4),
)
#: Cleared in the table only: the kernel has no feature number to hide it with, and the
#: host honours the table for it (``lock cmpxchg16b`` cannot be emulated).
TABLE_ONLY: Final[tuple[tuple[str, int, int, str, int], ...]] = (
    ("cx16", 1, 0, "ecx", 13),
    # KVM's paravirtual features that work through a hypercall (CPUID 0x40000001 EAX,
    # Documentation/virt/kvm/x86/cpuid.rst): a guest kernel's VMCALL never completes on these
    # hosts. It is emulated, and KVM's emulator (em_hypercall -> emulator_fix_hypercall)
    # rewrites the instruction in place without advancing RIP so that the guest re-executes it
    # as a real exit, which under PVM is the same emulation again: the vCPU spins on the VMCALL
    # with interrupts off for ever. Seen as Linux's RCU stall after a 2 -> 4 vCPU hotplug, the
    # first time it sent a PV IPI to more than one CPU (kvm_send_ipi_mask); snapshots of the
    # stalled guest showed two vCPUs at the VMCALL of kvm_hypercall4 with RAX=10
    # (KVM_HC_SEND_IPI). Without the bits Linux uses the APIC (x2APIC/xAPIC ICR writes).
    ("kvm_pv_unhalt", 0x4000_0001, 0, "eax", 7),  # KVM_HC_KICK_CPU (paravirtual spinlocks)
    ("kvm_pv_send_ipi", 0x4000_0001, 0, "eax", 11),  # KVM_HC_SEND_IPI
    ("kvm_pv_sched_yield", 0x4000_0001, 0, "eax", 13),  # KVM_HC_SCHED_YIELD
)

#: Kernel arguments that do not depend on the host's numbers, and why (see the module doc).
FIXED_ARGS: Final[tuple[str, ...]] = (
    "no-kvmclock",
    "tsc=reliable",
    "mitigations=off",
    "init_on_alloc=0",
    "rodata=off",
    "cryptomgr.notests=1",
)


def trivial_instruction(code: bytes) -> tuple[int, bool] | None:
    """``(length, clears DF)`` if ``code`` starts with an instruction whose only effect is to
    advance RIP (a NOP of any encoding, ENDBR64) or to clear DF (CLD); else ``None``."""
    if code[:1] == b"\x90":
        return 1, False
    if code[:2] == b"\x66\x90":
        return 2, False
    if code[:1] == b"\xfc":
        return 1, True
    if code[:4] == b"\xf3\x0f\x1e\xfa":
        return 4, False
    prefixes = 0
    while code[prefixes : prefixes + 1] == b"\x66" and prefixes < 4:
        prefixes += 1
    if code[prefixes : prefixes + 2] != b"\x0f\x1f" or len(code) < prefixes + 3:
        return None
    modrm = code[prefixes + 2]
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if reg != 0:
        return None
    length = prefixes + 3
    if mod != 3 and rm == 4:
        if len(code) < length + 1:
            return None
        base = code[length] & 7
        length += 1
        if mod == 0 and base == 5:
            length += 4
    if mod == 1:
        length += 1
    elif mod == 2 or (mod == 0 and rm == 5):
        length += 4
    return (length, False) if length <= len(code) else None


class PvmQuirks(HostQuirks):
    """The ``pvm`` quirk set. ``dilation``: how many times slower the guest's clocks run."""

    name: ClassVar[str] = PVM
    in_kernel_pit: ClassVar[bool] = False

    def __init__(self, dilation: int = 10, *, detected: bool = True) -> None:
        if dilation < 1:
            raise ValueError(f"the clock dilation must be at least 1, not {dilation}")
        self.dilation = dilation
        self.detected = detected

    def preload(self) -> None:
        from vmmkit_kvm.quirks import payload  # noqa: F401  (the Linux-kernel check at boot)

    def summary(self) -> str:
        how = "detected: /sys/module/kvm_pvm" if self.detected else "forced"
        return (
            f"host quirks: pvm ({how}): int3/fwait recovery, user SYSCALL repair, "
            f"userspace PIT and guest clock slowed {self.dilation}x, CX16 hidden"
        )

    def supported_cpuid(self, entries: Sequence[CpuIdEntry]) -> list[CpuIdEntry]:
        hidden: dict[tuple[int, int, str], int] = {}
        bits = [(leaf, sub, reg, bit) for _, leaf, sub, reg, bit, _number in HIDDEN_FEATURES]
        bits += [(leaf, sub, reg, bit) for _, leaf, sub, reg, bit in TABLE_ONLY]
        for leaf, subleaf, reg, bit in bits:
            hidden[(leaf, subleaf, reg)] = hidden.get((leaf, subleaf, reg), 0) | 1 << bit
        out = []
        for entry in entries:
            changes = {
                reg: getattr(entry, reg) & ~mask
                for (leaf, subleaf, reg), mask in hidden.items()
                if entry.function == leaf and entry.index == subleaf
            }
            out.append(evolve(entry, **changes) if changes else entry)
        return out

    def kernel_args(self, tsc_khz: int | None) -> list[str]:
        args = ["clearcpuid=" + ",".join(str(number) for *_, number in HIDDEN_FEATURES), *FIXED_ARGS]
        if tsc_khz:
            args.append(f"tsc_early_khz={tsc_khz * self.dilation}")
        else:
            log.warning("kvm.quirks.no_tsc_khz", hint="KVM_GET_TSC_KHZ is missing: the guest clock is not slowed")
        return args

    def platform_devices(self) -> list[DeviceRequest]:
        return [DeviceRequest("i8254", "_pit", {"dilation": self.dilation}, pio=PIT_PORTS, irq=PIT_IRQ)]

    def attach(self, vm: KvmVm) -> PvmVm:
        return PvmVm(vm)


@define
class _VcpuQuirkState:
    vcpu: KvmVcpu
    #: The address the hardware breakpoint is on (the page-fault handler), once armed.
    breakpoint: int | None = None
    #: Single-stepping over the instruction at the breakpoint (the breakpoint is off).
    stepping: bool = False
    int3: int = 0
    fwait: int = 0
    syscalls: int = 0
    faults: int = 0


class PvmVm(VmQuirks):
    """Per-VM state of the ``pvm`` quirks: resolves exits on each vCPU's thread."""

    def __init__(self, vm: KvmVm) -> None:
        self.memory = GuestPhysical(vm.memory_slots)
        self._states: dict[int, _VcpuQuirkState] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None
        self._logged: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    def vcpu_created(self, vcpu: KvmVcpu) -> None:
        with self._lock:
            self._states[vcpu.index] = _VcpuQuirkState(vcpu)
            running = self._poller is not None
        if running:  # a vCPU hot-added to a running VM needs its repair armed too
            self.start()

    def start(self) -> None:
        with self._lock:
            idle = self._poller is None or not self._poller.is_alive()
            if idle and not self._closed.is_set():
                self._poller = threading.Thread(target=self._poll, name="kvm-quirks", daemon=True)
                self._poller.start()

    def close(self) -> None:
        self._closed.set()
        poller = self._poller
        if poller is not None and poller is not threading.current_thread():
            poller.join(timeout=2)

    def restored(self) -> None:
        """Arm every vCPU's repair now, before it runs: a restored guest may be in user mode, and
        its first SYSCALL (no exit to arm on before it) would fault without the repair."""
        with self._lock:
            states = [s for s in self._states.values() if s.breakpoint is None]
        for state in states:
            self._try_arm(state.vcpu, state)

    def reset(self) -> None:
        """Disarm every vCPU's repair: the breakpoint is on the old guest's page-fault handler,
        where the new one may not be, and it would fire before the new kernel patched that
        handler's first instruction (a CLAC, which this host cannot emulate). Each vCPU arms
        again once the new kernel has an IDT and an LSTAR."""
        with self._lock:
            states = list(self._states.values())
            for state in states:
                state.breakpoint = None
                state.stepping = False
        for state in states:
            state.vcpu.set_guest_debug(enable=False)
        self.start()

    def _poll(self) -> None:
        """Kick vCPUs whose repair is not armed, so their threads get to arm it."""
        enter_thread(VMM, "kvm-quirks")
        while not self._closed.wait(ARM_POLL_INTERVAL):
            with self._lock:
                pending = [s.vcpu for s in self._states.values() if s.breakpoint is None]
            if not pending:
                return
            for vcpu in pending:
                vcpu.kick()

    def counts(self, vcpu: KvmVcpu) -> dict[str, int]:
        state = self._states.get(vcpu.index)
        if state is None:
            return {}
        return {
            "quirk-int3": state.int3,
            "quirk-fwait": state.fwait,
            "quirk-syscall": state.syscalls,
            "quirk-pf-pass": state.faults,
        }

    # -- exits ---------------------------------------------------------------------------------

    def handle_exit(self, vcpu: KvmVcpu, exit_: VmExit, info: KvmExitInfo) -> bool:
        state = self._states.get(vcpu.index)
        if state is None:
            return False
        reason = exit_.reason
        if reason is ExitReason.DEBUG:
            return self._debug(vcpu, state, info)
        if reason is ExitReason.INTERNAL_ERROR:
            return self._emulation_failure(vcpu, state, info)
        if state.breakpoint is None:
            self._try_arm(vcpu, state)
        return False

    def _once(self, event: str, **values: object) -> None:
        if event not in self._logged:
            self._logged.add(event)
            log.info(event, **values)

    def _emulation_failure(self, vcpu: KvmVcpu, state: _VcpuQuirkState, info: KvmExitInfo) -> bool:
        if not info.words or info.words[0] != INTERNAL_ERROR_EMULATION:
            return False
        instruction = info.instruction or self._instruction_at_rip(vcpu)
        if not instruction:
            return False
        regs = vcpu.get_regs()
        if instruction[0] == INT3:
            vcpu.set_regs(evolve(regs, rip=regs.rip + 1))
            events = vcpu.get_vcpu_events()
            vcpu.set_vcpu_events(
                evolve(
                    events,
                    exception_injected=1,
                    exception_pending=0,
                    exception_nr=BP_VECTOR,
                    exception_has_error_code=0,
                    exception_error_code=0,
                )
            )
            state.int3 += 1
            self._once("kvm.quirks.int3_recovered", vcpu=vcpu.index, rip=hex(regs.rip))
            return True
        if instruction[0] == FWAIT:
            vcpu.set_regs(evolve(regs, rip=regs.rip + 1))
            state.fwait += 1
            self._once("kvm.quirks.fwait_skipped", vcpu=vcpu.index, rip=hex(regs.rip))
            return True
        return False

    def _instruction_at_rip(self, vcpu: KvmVcpu) -> bytes:
        """The bytes at RIP when the exit did not carry them (no EXIT_ON_EMULATION_FAILURE)."""
        view = self._view(vcpu.get_sregs())
        if view is None:
            return b""
        return view.read(vcpu.get_regs().rip, 1) or b""

    def _view(self, sregs: SpecialRegisters) -> GuestVirtual | None:
        if not sregs.cr0 & CR0_PG or not sregs.efer & EFER_LMA:
            return None
        return GuestVirtual(self.memory, sregs.cr3, sregs.cr4)

    # -- the SYSCALL repair --------------------------------------------------------------------

    def _try_arm(self, vcpu: KvmVcpu, state: _VcpuQuirkState) -> None:
        """Arm the breakpoint once the guest has a page-fault handler and an LSTAR."""
        (lstar,) = vcpu.get_msrs([MSR_LSTAR])
        if not lstar.data:
            return
        sregs = vcpu.get_sregs()
        view = self._view(sregs)
        if view is None or sregs.idt.limit < 16 * PF_VECTOR + 15:
            return
        idt = view.read(sregs.idt.base, 16 * (PF_VECTOR + 1))
        handler = None if idt is None else idt_gate_target(idt, PF_VECTOR)
        if handler is None:
            return
        vcpu.set_guest_debug(hw_breakpoints=[handler])
        vcpu.set_sync_sregs(True)  # every guest page fault is now an exit that reads them
        with self._lock:
            state.breakpoint = handler
        log.info("kvm.quirks.syscall_repair_armed", vcpu=vcpu.index, page_fault_handler=hex(handler))

    def _debug(self, vcpu: KvmVcpu, state: _VcpuQuirkState, info: KvmExitInfo) -> bool:
        if state.stepping:
            return self._single_step_done(vcpu, state)
        if state.breakpoint is None or len(info.words) < 2 or info.words[1] != state.breakpoint:
            return False
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        view = self._view(sregs)
        frame = None if view is None else view.u64s(regs.rsp, 6)
        if frame is not None:
            _error, rip, cs, rflags, rsp, _ss = frame
            if cs & 3 == 3:
                star, lstar = (m.data for m in vcpu.get_msrs([MSR_STAR, MSR_LSTAR]))
                if rip == lstar and lstar:
                    self._repair_syscall(vcpu, regs, sregs, star, lstar, rsp, rflags)
                    state.syscalls += 1
                    self._once("kvm.quirks.syscall_repaired", vcpu=vcpu.index, lstar=hex(lstar))
                    return True
        # A genuine page fault: let the handler run. These hosts ignore RF, so the breakpoint
        # would hit again at once: execute the handler's first instruction here when it is
        # trivial (Linux's is a patched-out CLAC), else single-step over it.
        state.faults += 1
        self._step_past(vcpu, state, regs, view)
        return True

    def _step_past(
        self, vcpu: KvmVcpu, state: _VcpuQuirkState, regs: StandardRegisters, view: GuestVirtual | None
    ) -> None:
        code = None if view is None else view.read(regs.rip, 15)
        step = trivial_instruction(code or b"")
        if step is not None:
            length, clear_df = step
            rflags = regs.rflags & ~RFLAGS_DF if clear_df else regs.rflags
            vcpu.set_regs(evolve(regs, rip=regs.rip + length, rflags=rflags))
            return
        vcpu.set_guest_debug(single_step=True)
        state.stepping = True

    def _single_step_done(self, vcpu: KvmVcpu, state: _VcpuQuirkState) -> bool:
        state.stepping = False
        assert state.breakpoint is not None
        vcpu.set_guest_debug(hw_breakpoints=[state.breakpoint])
        return True

    @staticmethod
    def _repair_syscall(
        vcpu: KvmVcpu, regs: StandardRegisters, sregs: SpecialRegisters, star: int, lstar: int, rsp: int, rflags: int
    ) -> None:
        """Make the vCPU look as SYSCALL should have left it: at LSTAR, in the kernel's code
        segment (STAR[47:32]) and stack segment (+8), user RSP, masked RFLAGS."""
        selector = (star >> 32) & 0xFFFC
        code = Segment(base=0, limit=0xFFFF_FFFF, selector=selector, type=11, present=1, dpl=0,
                       db=0, s=1, l=1, g=1)
        stack = Segment(base=0, limit=0xFFFF_FFFF, selector=selector + 8, type=3, present=1, dpl=0,
                        db=1, s=1, l=0, g=1)
        vcpu.set_sregs(evolve(sregs, cs=code, ss=stack))
        vcpu.set_regs(evolve(regs, rip=lstar, rsp=rsp, rflags=rflags & ~RFLAGS_RF))
