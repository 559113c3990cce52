"""The emulation backend: :class:`EmuHypervisor` -> :class:`EmuVm` -> :class:`EmuVcpu`.

Every vCPU is its own unicorn engine (``Uc``) driven by its own thread (the Machine's
``vcpuN``); all of them map the same guest RAM, the host mappings of
:class:`vmmkit.memory.GuestMemory`, with ``uc.mem_map_ptr`` (no copy). Every guest-physical
range that is not RAM (up to :data:`PHYS_LIMIT`) is mapped with ``uc.mmio_map``: an access there
calls :class:`vmmkit.hypervisor.VcpuOps` ``mmio_read``/``mmio_write``, i.e. the machine's MMIO
bus. x86 port I/O arrives through instruction hooks for IN/OUT.

Taking turns
    unicorn's TCG is built for one CPU per engine: its atomic instructions (AArch64
    LDXR/STXR, CAS, LDADD; x86 LOCK-prefixed instructions and XCHG) are plain load / compare /
    store sequences, atomic only while no other engine touches the same memory. So the vCPUs of
    one VM take turns: a VM-wide run token (:class:`RunToken`) lets one vCPU run guest code at a
    time, for a slice of at most :data:`SLICE` seconds while others are waiting (a waiting vCPU
    stops the holder with ``emu_stop`` when its slice is over; turns are FIFO). The guest thus
    sees sequentially consistent memory and atomic read-modify-write across vCPUs. The price:
    an N-vCPU guest runs no faster than one host CPU, and a vCPU spinning on a lock burns its
    slice before the holder can release it (Linux spinlocks still work, slowly). Halted and
    powered-off vCPUs do not take turns.

Hooks
    Hooks write no registers that steer execution: a PC write inside a hook races with an
    ``emu_stop`` from another thread (unicorn then resumes from a stale PC with the new
    registers), so such work is deferred to the vCPU's thread after the engine stopped
    (:meth:`EmuVcpu.defer`), and a vCPU never writes another vCPU's engine
    (:meth:`EmuVcpu.start_at`).

Stopping
    :meth:`EmuVcpu.kick` sets a flag and calls ``emu_stop`` from the calling thread; a stop
    that races with the vCPU entering ``emu_start`` (which clears unicorn's stop request) is
    repeated from a short timer until the vCPU is out, so kicks are never lost.

Dirty pages (live migration)
    :meth:`EmuVm.start_dirty_log` makes every vCPU add a ``UC_HOOK_MEM_WRITE`` hook over RAM
    (on its own thread, before its next turn: :meth:`RunToken.barrier` waits out the turn in
    progress, so no guest store after the call goes unseen); the hook records the pages
    written, :meth:`EmuVm.get_dirty_log` hands them out per slot. Stores the backend makes
    itself with ``mem_write`` (an interrupt frame pushed onto the guest's stack) are not
    recorded, as KVM's log does not record the VMM's writes either.

Interrupts
    x86: the backend models the PC's interrupt controllers (an I/O APIC and local APICs) and
    injects interrupts and exceptions through the guest's IDT (see :mod:`vmmkit_emu.x86`).
    AArch64: no GIC model; :meth:`EmuVm.set_irq_line` and :meth:`EmuVm.signal_msi` are counted
    and nothing is delivered, so guests poll their devices; synchronous exceptions reach the
    guest's vectors (see :mod:`vmmkit_emu.arm64`). :meth:`EmuHypervisor.delivers_interrupts_to`
    says so per architecture (the x86 guests' interrupt tests run on emu, the AArch64 ones skip).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from vmmkit.errors import CapabilityError, HypervisorError
from vmmkit.hypervisor import (
    Availability,
    ExitReason,
    Hypervisor,
    Vcpu,
    VcpuOps,
    Vm,
    VmExit,
)

__all__ = ["EmuHypervisor", "EmuVm", "EmuVcpu", "RunToken", "SLICE", "PHYS_LIMIT"]


#: Longest turn of a vCPU while another one waits to run.
SLICE = 0.005
#: How long a halted vCPU (x86 HLT, AArch64 WFI) sleeps before it resumes after the
#: instruction when nothing wakes it sooner (no interrupt can: see the module docstring).
HALT_WAIT = 0.002
#: Guest-physical addresses below this that are not RAM are MMIO (unicorn ``mmio_map``).
PHYS_LIMIT = 1 << 40
_PAGE = 0x1000
_OPS_METHODS = ("pio_read", "pio_write", "mmio_read", "mmio_write")
_MIN_UNICORN = (2, 1)


def _unicorn_version() -> tuple[int, int] | None:
    try:
        import unicorn
    except ImportError:
        return None
    major, minor, _ = getattr(unicorn, "uc_version")()  # noqa: B009  (untyped binding)
    return int(major), int(minor)


def new_engine(arch: int, mode: int) -> Any:
    """A unicorn engine (typed ``Any``: unicorn's Python binding has no type hints)."""
    import unicorn

    return getattr(unicorn, "Uc")(arch, mode)  # noqa: B009  (untyped binding)


class EmuHypervisor(Hypervisor):
    """Software emulation with unicorn: no /dev/kvm needed, slow, no interrupt delivery."""

    name: ClassVar[str] = "emu"
    description: ClassVar[str] = (
        "software emulation (unicorn): x86-64 and AArch64 guests; x86 interrupts, none on AArch64"
    )
    #: ``auto`` tries hardware backends (10-49) first.
    priority: ClassVar[int] = 90
    architectures: ClassVar[tuple[str, ...]] = ("x86_64", "aarch64")
    delivers_interrupts: ClassVar[bool] = True

    @classmethod
    def delivers_interrupts_to(cls, arch: str) -> bool:
        return arch == "x86_64"  # AArch64: no GIC model yet

    @classmethod
    def is_available(cls) -> Availability:
        version = _unicorn_version()
        if version is None:
            return Availability(False, "the unicorn package is not installed (pip install 'unicorn>=2.1,<3')")
        if version < _MIN_UNICORN:
            return Availability(False, f"unicorn {version[0]}.{version[1]} is too old (2.1 or later needed)")
        return Availability(True)

    def create_vm(self, arch: str = "x86_64") -> EmuVm:
        if arch not in self.architectures:
            raise CapabilityError("emu.create_vm", None, f"cannot run {arch} guests "
                                  f"(it runs: {', '.join(self.architectures)})")
        availability = self.is_available()
        if not availability:
            raise CapabilityError("emu.create_vm", None, availability.reason)
        if arch == "aarch64":
            from vmmkit_emu.arm64 import Arm64Vm

            return Arm64Vm(arch)
        from vmmkit_emu.x86 import X86Vm

        return X86Vm(arch)

    # X86Hypervisor (vmmkit.x86): the x86 architecture asks every backend for these.

    def supported_cpuid(self) -> list[Any]:
        from vmmkit_emu.x86 import supported_cpuid

        return supported_cpuid()

    def tsc_khz(self) -> int | None:
        return None


class RunToken:
    """Lets one vCPU of a VM run guest code at a time, in FIFO turns (see the module docstring)."""

    def __init__(self, slice_seconds: float = SLICE) -> None:
        self._cv = threading.Condition()
        self._owner: EmuVcpu | None = None
        self._since = 0.0
        self._queue: collections.deque[EmuVcpu] = collections.deque()
        self._slice = slice_seconds

    def acquire(self, vcpu: EmuVcpu) -> bool:
        """Wait for ``vcpu``'s turn; ``False`` if it was kicked while waiting."""
        with self._cv:
            if self._owner is None and not self._queue:
                self._grant(vcpu)
                return True
            self._queue.append(vcpu)
            try:
                while self._owner is not None or self._queue[0] is not vcpu:
                    if vcpu.kicked:
                        return False
                    if not self._cv.wait(self._slice):
                        owner = self._owner
                        if owner is not None and time.monotonic() - self._since >= self._slice:
                            owner.preempt()
                self._queue.popleft()
                self._grant(vcpu)
                return True
            finally:
                if vcpu in self._queue and self._owner is not vcpu:
                    self._queue.remove(vcpu)
                    self._cv.notify_all()

    def _grant(self, vcpu: EmuVcpu) -> None:
        self._owner = vcpu
        self._since = time.monotonic()

    def contended(self) -> bool:
        return bool(self._queue)

    def release(self, vcpu: EmuVcpu) -> None:
        with self._cv:
            if self._owner is vcpu:
                self._owner = None
                self._cv.notify_all()

    def wake_waiters(self) -> None:
        """Let waiting vCPUs re-check their kick flag."""
        with self._cv:
            self._cv.notify_all()

    def end_turn(self) -> None:
        """Preempt the turn in progress, without waiting for it to end (it ends at the end of
        the engine's current translation block)."""
        with self._cv:
            if self._owner is not None:
                self._owner.preempt()

    def barrier(self) -> None:
        """Return once the turn in progress (if any) has ended, preempting it after its slice:
        every vCPU that runs guest code afterwards starts a new turn."""
        with self._cv:
            while self._owner is not None:
                if time.monotonic() - self._since >= self._slice:
                    self._owner.preempt()
                self._cv.wait(self._slice)


class EmuVm(Vm):
    """One emulated VM: the RAM regions every vCPU maps, interrupt bookkeeping, the run token."""

    supports_ioeventfd = False
    supports_irqfd = False

    def __init__(self, arch: str) -> None:
        self.arch = arch
        self.regions: dict[int, tuple[int, int, int]] = {}
        self.vcpus: list[EmuVcpu] = []
        self.token = RunToken()
        self.irq_levels: dict[int, bool] = {}
        self.irq_count = 0
        self.msi_count = 0
        self.irqchip = False
        self._lock = threading.Lock()
        #: Pages written by the guest while dirty logging is on (None: off).
        self._dirty: set[int] | None = None
        self._dirty_lock = threading.Lock()

    # memory

    supports_dirty_log = True

    @property
    def dirty_logging(self) -> bool:
        return self._dirty is not None

    def start_dirty_log(self) -> None:
        with self._dirty_lock:
            if self._dirty is None:
                self._dirty = set()
        self.token.barrier()  # a turn in progress ends; the next ones hook writes first

    def stop_dirty_log(self) -> None:
        with self._dirty_lock:
            self._dirty = None

    def mark_dirty(self, address: int, size: int) -> None:
        """From a vCPU's write hook: the guest stored ``size`` bytes at ``address``."""
        with self._dirty_lock:
            if self._dirty is not None:
                self._dirty.update(range(address // _PAGE, (address + max(size, 1) - 1) // _PAGE + 1))

    def get_dirty_log(self, slot: int) -> bytes:
        """The slot's pages the guest wrote since the last call, one bit per page, in KVM's
        layout (padded to 64-bit words); cleared."""
        if slot not in self.regions:
            raise ValueError(f"memory slot {slot} is not in use")
        start, size, _host = self.regions[slot]
        first, pages = start // _PAGE, size // _PAGE
        bitmap = bytearray((pages + 63) // 64 * 8)
        with self._dirty_lock:
            if self._dirty is None:
                raise HypervisorError("emu.get_dirty_log", None, "dirty logging is off (start_dirty_log)")
            hits = [page for page in self._dirty if first <= page < first + pages]
            self._dirty.difference_update(hits)
        for page in hits:
            bitmap[(page - first) // 8] |= 1 << ((page - first) % 8)
        return bytes(bitmap)

    def add_memory_region(
        self,
        slot: int,
        guest_addr: int,
        size: int,
        host_addr: int,
        *,
        readonly: bool = False,
        log_dirty: bool = False,
    ) -> None:
        if size <= 0 or size % _PAGE or guest_addr % _PAGE or host_addr % _PAGE:
            raise ValueError("emu memory regions must be positive and 4 KiB aligned")
        if readonly:
            raise CapabilityError("emu.add_memory_region", None,
                                  "read-only regions are not supported (unicorn cannot turn a store into MMIO)")
        end = guest_addr + size
        if end > PHYS_LIMIT:
            raise CapabilityError("emu.add_memory_region", None, f"RAM must end below {PHYS_LIMIT:#x}")
        for other_slot, (start, other_size, _) in self.regions.items():
            if other_slot != slot and start < end and guest_addr < start + other_size:
                raise HypervisorError("emu.add_memory_region", None, f"slot {slot} overlaps slot {other_slot}")
        if self.vcpus:
            raise HypervisorError("emu.add_memory_region", None, "memory must be added before the first vCPU")
        self.regions[slot] = (guest_addr, size, host_addr)
        if log_dirty:  # logging is VM-wide here: every slot's writes are recorded
            self.start_dirty_log()

    def remove_memory_region(self, slot: int) -> None:
        if slot not in self.regions:
            raise ValueError(f"memory slot {slot} is not in use")
        if self.vcpus:
            raise HypervisorError("emu.remove_memory_region", None, "not supported once vCPUs exist")
        del self.regions[slot]

    def ram_ranges(self) -> list[tuple[int, int, int]]:
        """``(guest_addr, size, host_addr)`` of every region, by address."""
        return sorted(self.regions.values())

    def mmio_ranges(self) -> list[tuple[int, int]]:
        """``(start, size)`` of every hole between RAM regions below :data:`PHYS_LIMIT`."""
        holes = []
        cursor = 0
        for start, size, _ in self.ram_ranges():
            if start > cursor:
                holes.append((cursor, start - cursor))
            cursor = max(cursor, start + size)
        if cursor < PHYS_LIMIT:
            holes.append((cursor, PHYS_LIMIT - cursor))
        return holes

    # vCPUs

    def create_vcpu(self, index: int, ops: VcpuOps) -> EmuVcpu:
        missing = [name for name in _OPS_METHODS if not callable(getattr(ops, name, None))]
        if missing:
            raise TypeError(f"ops lacks {', '.join(missing)} (a VcpuOps is needed)")
        if any(v.index == index for v in self.vcpus):
            raise HypervisorError("emu.create_vcpu", None, f"vCPU {index} exists")
        vcpu = self._new_vcpu(index, ops)
        self.vcpus.append(vcpu)
        return vcpu

    def _new_vcpu(self, index: int, ops: VcpuOps) -> EmuVcpu:
        raise NotImplementedError

    def vcpu(self, index: int) -> EmuVcpu | None:
        for vcpu in self.vcpus:
            if vcpu.index == index:
                return vcpu
        return None

    # interrupts: recorded, never delivered

    def setup_interrupt_controller(self) -> None:
        self.irqchip = True

    def set_irq_line(self, gsi: int, level: bool) -> None:
        with self._lock:
            if level and not self.irq_levels.get(gsi, False):
                self.irq_count += 1
            self.irq_levels[gsi] = level

    def signal_msi(self, address: int, data: int, *, devid: int | None = None) -> None:
        with self._lock:
            self.msi_count += 1

    def set_msi_route(self, gsi: int, address: int, data: int, *, devid: int | None = None) -> None:
        """Accepted and ignored: nothing is delivered on this backend."""

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()


class EmuVcpu(Vcpu):
    """One emulated vCPU. Subclasses create the engine and translate registers and exceptions."""

    def __init__(self, vm: EmuVm, index: int, ops: VcpuOps) -> None:
        self.index = index
        self.vm = vm
        self.ops = ops
        self._kicked = False
        self._preempt = False
        self._in_emu = False
        self._on = True
        self._halted = False
        self._wake = threading.Event()
        self._pending: VmExit | None = None
        self._start: Callable[[], None] | None = None
        self._deferred: Callable[[], None] | None = None
        self._counts: collections.Counter[str] = collections.Counter()
        self._closed = False
        self._write_hooks: list[Any] = []
        self.uc: Any = self._make_engine()
        self._map_memory()

    # -- engine set-up (subclasses) ----------------------------------------------------------

    def _make_engine(self) -> Any:
        raise NotImplementedError

    def _pc(self) -> int:
        raise NotImplementedError

    def _enter(self, pc: int) -> None:
        """One ``emu_start`` from ``pc`` until a stop."""
        self.uc.emu_start(pc, 0xFFFF_FFFF_FFFF_FFFF)

    def _map_memory(self) -> None:
        from unicorn import UC_PROT_ALL

        for start, size, host in self.vm.ram_ranges():
            self.uc.mem_map_ptr(start, size, UC_PROT_ALL, host)
        for start, size in self.vm.mmio_ranges():
            self.uc.mmio_map(start, size, self._mmio_read_cb, start, self._mmio_write_cb, start)

    def _sync_write_hooks(self) -> None:
        """On this vCPU's thread, holding the run token: hook guest stores to RAM while the
        VM logs dirty pages, and not otherwise (a hook makes every store a Python call)."""
        if self.vm.dirty_logging and not self._write_hooks:
            from unicorn import UC_HOOK_MEM_WRITE

            self._write_hooks = [self.uc.hook_add(UC_HOOK_MEM_WRITE, self._ram_write_cb, None, start, start + size - 1)
                                 for start, size in self._ram()]
        elif not self.vm.dirty_logging and self._write_hooks:
            for hook in self._write_hooks:
                self.uc.hook_del(hook)
            self._write_hooks = []

    def _ram(self) -> list[tuple[int, int]]:
        """``(start, size)`` of the guest RAM this engine maps."""
        return [(start, size) for start, size, _host in self.vm.ram_ranges()]

    def _ram_write_cb(self, uc: Any, access: int, address: int, size: int, value: int, _data: Any) -> None:
        self.vm.mark_dirty(address, size)

    def _mmio_read_cb(self, uc: Any, offset: int, size: int, base: int) -> int:
        self._counts["mmio"] += 1
        return int.from_bytes(self.mmio_read(base + offset, size), "little")

    def _mmio_write_cb(self, uc: Any, offset: int, size: int, value: int, base: int) -> None:
        self._counts["mmio"] += 1
        self.mmio_write(base + offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def mmio_read(self, addr: int, size: int) -> bytes:
        """A guest MMIO read (subclasses intercept per-vCPU registers such as the LAPIC)."""
        return self.ops.mmio_read(addr, size)

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.ops.mmio_write(addr, data)

    # -- stops requested from hooks ----------------------------------------------------------

    def stop_with(self, reason: ExitReason, detail: str = "") -> None:
        """From a hook: end the current ``emu_start`` and make :meth:`run` return this exit."""
        if self._pending is None:
            self._pending = VmExit(reason, detail)
        self._stop_engine()

    def _stop_engine(self) -> None:
        uc = self.uc
        if uc is not None:
            uc.emu_stop()

    def defer(self, work: Callable[[], None]) -> None:
        """From a hook: stop the engine and run ``work`` on this vCPU's thread once it has
        stopped (before it runs guest code again). For hooks that must change registers or
        the PC: doing it inside the hook races with a concurrent ``emu_stop``."""
        self._deferred = work
        self._stop_engine()

    def halt(self) -> None:
        """From a hook or after a stop: the vCPU waits (HLT, WFI) until woken or a short while."""
        self._halted = True

    def wake(self) -> None:
        """End a halt or a power-off wait early (an IPI, CPU_ON, SEV)."""
        self._wake.set()

    # -- running ----------------------------------------------------------------------------

    @property
    def kicked(self) -> bool:
        return self._kicked

    @property
    def powered_on(self) -> bool:
        return self._on

    def set_powered(self, on: bool) -> None:
        self._on = on
        if on:
            self._halted = False
            self._wake.set()

    def start_at(self, setup: Callable[[], None]) -> None:
        """Power on, with ``setup`` (register writes) run first by this vCPU's own thread.

        Another vCPU's hook (PSCI CPU_ON, an x86 STARTUP IPI) must not touch this engine
        while its own engine is executing: unicorn's TCG state is not meant to be used from
        two engines at once (register values leak between them). So the writes are deferred
        to the target's thread, which applies them before it next enters the emulator."""
        self._start = setup
        self.set_powered(True)

    def run(self) -> VmExit:
        while True:
            if self._kicked:
                self._counts["interrupted"] += 1
                return VmExit(ExitReason.INTERRUPTED, "kicked")
            if self._pending is not None:
                exit_, self._pending = self._pending, None
                self._counts[exit_.reason.value] += 1
                return exit_
            if not self._on:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            if self._halted:
                self._wake.wait(HALT_WAIT)
                self._wake.clear()
                self._halted = False
                continue
            if not self.vm.token.acquire(self):
                continue
            try:
                if self._kicked or not self._on or self._pending is not None:
                    continue
                start, self._start = self._start, None
                if start is not None:
                    start()
                self._preempt = False
                self._sync_write_hooks()
                self._before_entry()
                self._in_emu = True
                try:
                    self._counts["entries"] += 1
                    self._enter(self._pc())
                    deferred, self._deferred = self._deferred, None
                    if deferred is not None:
                        deferred()
                    elif not (self._kicked or self._preempt or self._pending is not None):
                        self._stopped_by_engine()
                except Exception as exc:  # unicorn errors: unmapped fetch, invalid instruction...
                    if self._pending is None:
                        self._pending = self._engine_error(exc)
                finally:
                    self._in_emu = False
            finally:
                self.vm.token.release(self)

    def _before_entry(self) -> None:
        """On this vCPU's thread, the engine stopped, just before it runs guest code: where a
        subclass injects a pending interrupt."""

    def _stopped_by_engine(self) -> None:
        """``emu_start`` returned without a kick, preemption or pending exit: a halt
        instruction (x86 HLT, AArch64 WFI) in unicorn. Subclasses may refine."""
        self._counts["halt"] += 1
        self.halt()

    def _engine_error(self, exc: Exception) -> VmExit | None:
        """The exit for an engine error, or None when a subclass handled it (delivered an
        exception to the guest) and the vCPU goes on."""
        try:
            pc = self._pc()
        except Exception:
            pc = -1
        return VmExit(ExitReason.INTERNAL_ERROR, f"vcpu{self.index}: {exc} at pc {pc:#x}{self._error_context(pc)}")

    def _error_context(self, pc: int) -> str:
        """More about an engine error at ``pc`` (subclasses: the instruction bytes)."""
        return ""

    def preempt(self) -> None:
        """End this vCPU's turn (called by a vCPU waiting for the run token)."""
        self._preempt = True
        if self._in_emu:
            self._stop_engine()

    def kick(self) -> None:
        self._kicked = True
        self._wake.set()
        self.vm.token.wake_waiters()
        if self._in_emu and not self._closed:
            self._stop_engine()
            _retry(self._restop, 0.005, tries=200)

    def _restop(self) -> bool:
        """Repeat a stop that ``emu_start`` may have swallowed; ``False`` once it is not needed."""
        if self._kicked and self._in_emu and not self._closed:
            self._stop_engine()
            return True
        return False

    def clear_kick(self) -> None:
        self._kicked = False

    def exit_counts(self) -> dict[str, int]:
        return dict(self._counts)

    def count(self, what: str) -> None:
        self._counts[what] += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._kicked = True
        self._wake.set()
        self.uc = None  # the engine is freed with its last reference


def _retry(func: Callable[[], bool], interval: float, tries: int) -> None:
    """Call ``func`` every ``interval`` seconds from a daemon timer while it returns True."""

    def tick(left: int) -> None:
        if left > 0 and func():
            timer = threading.Timer(interval, tick, (left - 1,))
            timer.daemon = True
            timer.start()

    timer = threading.Timer(interval, tick, (tries,))
    timer.daemon = True
    timer.start()
