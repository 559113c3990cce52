"""The backend conformance kit: one suite every hypervisor backend must pass.

Run it against a backend with one line::

    VMMKIT_CONFORMANCE_BACKEND=kvm python -m pytest --pyargs vmmkit.testing.conformance

``VMMKIT_CONFORMANCE_BACKEND`` names a registered backend (``kvm``, ``mshv``, ``emu``, a
third party's) or a class as ``package.module:Class``; unset, the session's backend
(``VMMKIT_TEST_HYPERVISOR``, else ``auto``). The guests are a few x86-64 instructions each
(assembled bytes, listed with their source), run in long mode with flat segments and an identity
map of the low 4 GiB; they report through ports and through memory, so results do not depend on
the backend's register interface. A failed check names the contract it broke.

Contracts (an x86-64 backend):

* **memory**: a region maps; an overlapping one is refused; removed, a region can be added again;
* **registers**: general, instruction-pointer and flags registers round-trip at 64 bits, and so
  do the control registers and EFER; a run continues where the registers say (*reset*);
* **port I/O** of 1, 2 and 4 bytes and **MMIO** of 1, 2, 4 and 8 bytes reach the ``VcpuOps``
  with the right address, size and bytes, and reads complete the guest's instruction;
* **HLT**: a halting vCPU either returns ``HLT`` or stays parked, and a kick always ends the run;
* **kick**: a kick stops a running vCPU promptly (``INTERRUPTED``), one before :meth:`run`
  stops the next run, and the vCPU runs again after ``clear_kick``;
* **interrupts** (where ``delivers_interrupts``): an MSI reaches the guest's handler;
* **ioeventfd / irqfd** (where offered; otherwise the calls raise ``NotImplementedError``, the
  documented fallback): a matching write signals the eventfd and is not an MMIO exit, a
  different value is; an irqfd on an MSI route interrupts the guest;
* **dirty logging** (where advertised; else ``CapabilityError`` at ``add_memory_region``):
  written pages are reported once.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

from vmmkit.errors import CapabilityError
from vmmkit.hypervisor import ExitReason, Hypervisor
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.x86 import DescriptorTable, Segment, StandardRegisters

BACKEND_ENV = "VMMKIT_CONFORMANCE_BACKEND"
RAM = 4 << 20
CODE = 0x1000
STACK = 0x8000
RESULTS = 0x7000
MMIO = 0xD000_0000
DONE_PORT = 0xF4
GDT, IDT, PML4, PDPT, PD = 0x500, 0x2000, 0x9000, 0xA000, 0xB000
CODE64 = Segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=0xB, present=1, dpl=0, db=0, s=1, l=1, g=1)
DATA = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=0x3, present=1, dpl=0, db=1, s=1, l=0, g=1)
KICK_WITHIN = 2.0

# -- the guests (x86-64, assembled with GNU as; the source is beside each) ---------------------

#: mov $0x12,%al; outb %al,$0x80; mov $0x3456,%ax; outw %ax,$0x82; mov $0x789abcde,%eax;
#: outl %eax,$0x84; mov $-1,%rax; inb $0x90,%al; mov %rax,0x7000; mov $-1,%rax;
#: inw $0x92,%ax; mov %rax,0x7008; mov $-1,%rax; inl $0x94,%eax; mov %rax,0x7010;
#: outb %al,$0xf4; 1: jmp 1b
PIO = bytes.fromhex(
    "b012e68066b8563466e782b8debc9a78e78448c7c0ffffffffe490488904250070000048c7c0ffffffff66e5924889"
    "04250870000048c7c0ffffffffe5944889042510700000e6f4ebfe")
#: mov $0xd0000000,%esi; movb $0x11,(%rsi); movw $0x2233,8(%rsi); movl $0x44556677,16(%rsi);
#: mov $0x8899aabbccddeeff,%rax; mov %rax,24(%rsi); mov $-1,%rax; movb 32(%rsi),%al;
#: mov %rax,0x7000; mov $-1,%rax; movw 40(%rsi),%ax; mov %rax,0x7008; mov $-1,%rax;
#: movl 48(%rsi),%eax; mov %rax,0x7010; mov 56(%rsi),%rax; mov %rax,0x7018; outb %al,$0xf4;
#: 1: jmp 1b
MMIO_GUEST = bytes.fromhex(
    "be000000d0c6061166c746083322c746107766554448b8ffeeddccbbaa99884889461848c7c0ffffffff8a462048"
    "8904250070000048c7c0ffffffff668b4628488904250870000048c7c0ffffffff8b46304889042510700000488b"
    "46384889042518700000e6f4ebfe")
SPIN = bytes.fromhex("ebfe")  # 1: jmp 1b
HALT = bytes.fromhex("f4ebfd")  # 1: hlt; jmp 1b
#: mov $0xd0000000,%esi; movl $7,0x100(%rsi); movl $8,0x100(%rsi); outb %al,$0xf4; 1: jmp 1b
DOORBELL = bytes.fromhex("be000000d0c7860001000007000000c7860001000008000000e6f4ebfe")
#: mov $0xfee00000,%edi; movl $0x1ff,0xf0(%rdi) (APIC on); sti; 1: hlt; cmpl $0,0x7100;
#: je 1b; outb %al,$0xf4; 2: jmp 2b
WAIT_IRQ = bytes.fromhex("bf0000e0fec787f0000000ff010000fbf4833c25007100000074f5e6f4ebfe")
#: incl 0x7100; push %rdi; mov $0xfee00000,%edi; movl $0,0xb0(%rdi) (EOI); pop %rdi; iretq
HANDLER = bytes.fromhex("ff04250071000057bf0000e0fec787b0000000000000005f48cf")
HANDLER_AT = 0x1800
#: movl $1,0x40000; movl $1,0x42000; outb %al,$0xf4; 1: jmp 1b
DIRTY = bytes.fromhex("c704250000040001000000c704250020040001000000e6f4ebfe")
#: mov $0x5a,%al; outb %al,$0x80; outb %al,$0xf4; 1: jmp 1b
MARK = bytes.fromhex("b05ae680e6f4ebfe")


class Contract(AssertionError):
    """A backend broke a contract of the kit (the message names it)."""


def check(condition: object, contract: str, detail: str) -> None:
    if not condition:
        raise Contract(f"contract '{contract}' broken: {detail}")


class Ops:
    """Records every access; reads answer from :data:`READS`; the done port kicks the vCPU."""

    READS = {1: b"\xa1", 2: b"\xa1\xb2", 4: b"\xa1\xb2\xc3\xd4", 8: b"\xa1\xb2\xc3\xd4\xe5\xf6\x07\x18"}

    def __init__(self) -> None:
        self.log: list[tuple[str, int, Any]] = []
        self.vcpu: Any = None

    def pio_read(self, port: int, size: int) -> bytes:
        self.log.append(("pio_read", port, size))
        return self.READS[size]

    def pio_write(self, port: int, data: bytes) -> None:
        self.log.append(("pio_write", port, bytes(data)))
        if port == DONE_PORT:
            self.vcpu.kick()

    def mmio_read(self, addr: int, size: int) -> bytes:
        self.log.append(("mmio_read", addr, size))
        return self.READS[size]

    def mmio_write(self, addr: int, data: bytes) -> None:
        self.log.append(("mmio_write", addr, bytes(data)))


# -- the backend under test ---------------------------------------------------------------


def _backend_class() -> type[Hypervisor]:
    spec = os.environ.get(BACKEND_ENV) or os.environ.get("VMMKIT_TEST_HYPERVISOR", "auto")
    if ":" in spec:
        module, _, name = spec.partition(":")
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Hypervisor)):
            raise pytest.UsageError(f"{BACKEND_ENV}={spec}: not a vmmkit.hypervisor.Hypervisor subclass")
        return cls
    from vmmkit.plugin import collect_registries, make_plugin_manager

    registries = collect_registries(make_plugin_manager())
    return registries.select_hypervisor(spec, "x86_64")


@pytest.fixture(scope="module")
def backend() -> Hypervisor:
    cls = _backend_class()
    if "x86_64" not in cls.architectures:
        pytest.skip(f"the kit's guests are x86-64; {cls.name} runs {', '.join(cls.architectures) or 'nothing'}")
    availability = cls.is_available()
    if not availability:
        pytest.skip(f"{cls.name} is not usable here: {availability.reason}")
    return cls()


@attrs.define
class Guest:
    vm: Any
    vcpu: Any
    ops: Ops
    memory: GuestMemory

    def results(self, count: int) -> list[int]:
        raw = self.memory.read(RESULTS, 8 * count)
        return [int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(count)]

    def run(self, timeout: float = 20.0, contract: str = "run") -> Any:
        """One :meth:`Vcpu.run` on a thread of its own (kicked if it overstays)."""
        out: list[Any] = []
        thread = threading.Thread(target=lambda: out.append(self.vcpu.run()), daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            self.vcpu.kick()
            thread.join(5)
            raise Contract(f"contract '{contract}' broken: the vCPU ran {timeout:.0f} s without the exit expected")
        return out[0]

    def run_to_done(self, timeout: float = 20.0) -> None:
        """Run (past HLT exits) until the guest writes the done port."""
        deadline = time.monotonic() + timeout
        while True:
            exit_ = self.run(max(deadline - time.monotonic(), 0.1))
            if exit_.reason is ExitReason.INTERRUPTED:
                self.vcpu.clear_kick()
                return
            check(exit_.reason is ExitReason.HLT, "run",
                  f"run() returned {exit_.reason.value} ({exit_.detail}) before the guest finished")


def _long_mode(vcpu: Any, memory: GuestMemory, entry: int) -> None:
    for i, descriptor in enumerate((0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)):
        memory.write(GDT + 8 * i, descriptor.to_bytes(8, "little"))
    memory.write(PML4, (PDPT | 3).to_bytes(8, "little"))
    for i in range(4):
        memory.write(PDPT + 8 * i, ((PD + 0x1000 * i) | 3).to_bytes(8, "little"))
    memory.write(PD, b"".join(((page << 21) | 0x83).to_bytes(8, "little") for page in range(4 * 512)))
    sregs = attrs.evolve(
        vcpu.get_sregs(), cs=CODE64, ds=DATA, es=DATA, fs=DATA, gs=DATA, ss=DATA,
        gdt=DescriptorTable(GDT, 8 * 3 - 1), idt=DescriptorTable(IDT, 16 * 256 - 1),
        cr0=0x80050033, cr3=PML4, cr4=0x20, efer=0x500,
    )
    vcpu.set_sregs(sregs)
    vcpu.set_regs(StandardRegisters(rip=entry, rsp=STACK, rflags=0x2))


@pytest.fixture
def guest(backend: Hypervisor) -> Iterator[Callable[..., Guest]]:
    made: list[Guest] = []

    def make(code: bytes, *, log_dirty: bool = False, before_vcpu: Callable[[Any], None] | None = None) -> Guest:
        memory = GuestMemory.allocate([MemoryRange(0, RAM)])
        vm = backend.create_vm("x86_64")
        try:
            vm.add_memory_region(0, 0, RAM, memory.host_address(0, RAM), log_dirty=log_dirty)
        except BaseException:
            vm.close()
            memory.close()
            raise
        vm.setup_interrupt_controller()
        if before_vcpu is not None:
            before_vcpu(vm)
        memory.write(CODE, code)
        memory.write(HANDLER_AT, HANDLER)
        gate = HANDLER_AT
        low = (gate & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | (((gate >> 16) & 0xFFFF) << 48)
        for vector in (0x40, 0x41):
            memory.write(IDT + 16 * vector, low.to_bytes(8, "little") + (gate >> 32).to_bytes(8, "little"))
        ops = Ops()
        vcpu = vm.create_vcpu(0, ops)
        ops.vcpu = vcpu
        _long_mode(vcpu, memory, CODE)
        made.append(Guest(vm, vcpu, ops, memory))
        return made[-1]

    yield make
    for made_guest in made:
        made_guest.vcpu.kick()
        made_guest.vm.close()
        made_guest.memory.close()


# -- the contracts ------------------------------------------------------------------------


def test_memory_regions_map_refuse_overlaps_and_remap(backend: Hypervisor) -> None:
    memory = GuestMemory.allocate([MemoryRange(0, RAM), MemoryRange(0x1000_0000, 0x10000)])
    vm = backend.create_vm("x86_64")
    try:
        vm.add_memory_region(0, 0, RAM, memory.host_address(0, RAM))
        other = memory.host_address(0x1000_0000, 0x10000)
        try:
            vm.add_memory_region(1, RAM // 2, 0x10000, other)
        except Exception:  # any refusal will do: HypervisorError, ValueError, ...
            refused = True
        else:
            refused = False
        check(refused, "memory", "a region overlapping slot 0 was accepted")
        vm.add_memory_region(1, 0x1000_0000, 0x10000, other)
        vm.remove_memory_region(1)
        vm.add_memory_region(1, 0x1000_0000, 0x10000, other)
    finally:
        vm.close()
        memory.close()


def test_registers_round_trip_at_64_bits(guest: Callable[..., Guest]) -> None:
    vcpu = guest(SPIN).vcpu
    regs = StandardRegisters(rax=0x1111_2222_3333_4444, rbx=0x5555_6666_7777_8888, rcx=3, rdx=4, rsi=5,
                             rdi=0xFFFF_FFFF_0000_0001, rsp=0x7FF0, rbp=0x8000_0000_0000_0000, r8=8,
                             r15=0x0F0F_0F0F_0F0F_0F0F, rip=CODE, rflags=0x202)
    vcpu.set_regs(regs)
    got = vcpu.get_regs()
    check(got == regs, "registers", f"set {regs}, got {got}")
    sregs = vcpu.get_sregs()
    check((sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer & 0x500) == (0x80050033, PML4, 0x20, 0x500), "registers",
          f"control registers came back as cr0 {sregs.cr0:#x} cr3 {sregs.cr3:#x} cr4 {sregs.cr4:#x} "
          f"efer {sregs.efer:#x}")
    check(sregs.cs.selector == 0x08 and sregs.gdt.base == GDT, "registers", f"segments came back as {sregs.cs}")


def test_port_io_of_every_size(guest: Callable[..., Guest]) -> None:
    g = guest(PIO)
    g.run_to_done()
    want = [("pio_write", 0x80, b"\x12"), ("pio_write", 0x82, b"\x56\x34"), ("pio_write", 0x84, b"\xde\xbc\x9a\x78"),
            ("pio_read", 0x90, 1), ("pio_read", 0x92, 2), ("pio_read", 0x94, 4)]
    check(g.ops.log[:6] == want, "port I/O", f"the ops saw {g.ops.log[:6]}, expected {want}")
    got = g.results(3)
    # IN AL/AX merge into RAX; IN EAX zero-extends (SDM: 32-bit operands clear the upper half)
    want_regs = [0xFFFF_FFFF_FFFF_FFA1, 0xFFFF_FFFF_FFFF_B2A1, 0xD4C3_B2A1]
    check(got == want_regs, "port I/O", f"IN left RAX as {[hex(v) for v in got]}, expected "
          f"{[hex(v) for v in want_regs]}")


def test_mmio_of_every_size(guest: Callable[..., Guest]) -> None:
    g = guest(MMIO_GUEST)
    g.run_to_done()
    want = [("mmio_write", MMIO, b"\x11"), ("mmio_write", MMIO + 8, b"\x33\x22"),
            ("mmio_write", MMIO + 16, b"\x77\x66\x55\x44"),
            ("mmio_write", MMIO + 24, bytes.fromhex("ffeeddccbbaa9988")),
            ("mmio_read", MMIO + 32, 1), ("mmio_read", MMIO + 40, 2), ("mmio_read", MMIO + 48, 4),
            ("mmio_read", MMIO + 56, 8)]
    check(g.ops.log[:8] == want, "MMIO", f"the ops saw {g.ops.log[:8]}, expected {want}")
    got = g.results(4)
    want_regs = [0xFFFF_FFFF_FFFF_FFA1, 0xFFFF_FFFF_FFFF_B2A1, 0xD4C3_B2A1, 0x1807_F6E5_D4C3_B2A1]
    check(got == want_regs, "MMIO", f"reads left RAX as {[hex(v) for v in got]}, expected "
          f"{[hex(v) for v in want_regs]}")


def test_a_run_continues_where_the_registers_say(guest: Callable[..., Guest]) -> None:
    g = guest(PIO)
    g.memory.write(0x1400, MARK)
    g.vcpu.set_regs(attrs.evolve(g.vcpu.get_regs(), rip=0x1400))
    g.run_to_done()
    check(g.ops.log[0] == ("pio_write", 0x80, b"\x5a"), "reset",
          f"after setting RIP the guest did {g.ops.log[:1]} instead of the code at the new RIP")


def test_hlt_returns_or_parks_and_a_kick_ends_it(guest: Callable[..., Guest]) -> None:
    g = guest(HALT)
    threading.Timer(0.3, g.vcpu.kick).start()
    started = time.monotonic()
    while True:
        exit_ = g.run(KICK_WITHIN + 5, "HLT")
        if exit_.reason is ExitReason.INTERRUPTED:
            break
        check(exit_.reason is ExitReason.HLT, "HLT", f"a halted vCPU's run returned {exit_.reason.value}")
        check(time.monotonic() - started < KICK_WITHIN + 5, "HLT", "HLT exits went on after the kick")


def test_a_kick_stops_a_running_vcpu_and_it_runs_again(guest: Callable[..., Guest]) -> None:
    g = guest(SPIN)
    for attempt in range(2):
        timer = threading.Timer(0.3, g.vcpu.kick)
        timer.start()
        started = time.monotonic()
        exit_ = g.run(KICK_WITHIN + 5, "kick")
        check(exit_.reason is ExitReason.INTERRUPTED, "kick", f"run {attempt}: {exit_.reason.value} ({exit_.detail})")
        check(time.monotonic() - started < 0.3 + KICK_WITHIN, "kick", f"run {attempt} took over {KICK_WITHIN} s")
        g.vcpu.clear_kick()
    g.vcpu.kick()
    check(g.run(KICK_WITHIN, "kick").reason is ExitReason.INTERRUPTED, "kick", "a kick before run() did not stop it")


def test_an_msi_reaches_the_guests_handler(backend: Hypervisor, guest: Callable[..., Guest]) -> None:
    if not backend.delivers_interrupts_to("x86_64"):
        pytest.skip(f"{backend.name} says it delivers no interrupts to x86-64 guests")
    g = guest(WAIT_IRQ)
    threading.Timer(0.3, lambda: g.vm.signal_msi(0xFEE0_0000, 0x40)).start()
    g.run_to_done()
    count = int.from_bytes(g.memory.read(0x7100, 4), "little")
    check(count == 1, "interrupts", f"the handler ran {count} times for one MSI")


def test_ioeventfd_takes_matching_writes_or_is_refused(guest: Callable[..., Guest]) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        box: dict[str, bool] = {}

        def register(vm: Any) -> None:
            box["offered"] = bool(vm.supports_ioeventfd)
            if not vm.supports_ioeventfd:
                with pytest.raises(NotImplementedError):
                    vm.register_ioeventfd(efd, MMIO + 0x100, pio=False, length=4, datamatch=7)
                return
            vm.register_ioeventfd(efd, MMIO + 0x100, pio=False, length=4, datamatch=7)

        g = guest(DOORBELL, before_vcpu=register)
        g.run_to_done()
        if not box["offered"]:
            writes = [entry for entry in g.ops.log if entry[0] == "mmio_write"]
            check(len(writes) == 2, "ioeventfd", f"without ioeventfds both writes are MMIO exits, saw {writes}")
            return
        try:
            count = os.eventfd_read(efd)
        except BlockingIOError:
            count = 0
        check(count == 1, "ioeventfd", f"the matching write signalled the eventfd {count} times")
        writes = [entry for entry in g.ops.log if entry[0] == "mmio_write"]
        check(writes == [("mmio_write", MMIO + 0x100, b"\x08\0\0\0")], "ioeventfd",
              f"only the non-matching write may be an MMIO exit, saw {writes}")
    finally:
        os.close(efd)


def test_an_irqfd_on_an_msi_route_interrupts_the_guest(backend: Hypervisor, guest: Callable[..., Guest]) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        box: dict[str, Any] = {}

        def route(vm: Any) -> None:
            box["vm"] = vm

        g = guest(WAIT_IRQ, before_vcpu=route)
        if not (g.vm.supports_irqfd and backend.delivers_interrupts_to("x86_64")):
            if not g.vm.supports_irqfd:
                with pytest.raises(NotImplementedError):
                    g.vm.register_irqfd(efd, 40)
            pytest.skip(f"{backend.name} offers no irqfd interrupts (the documented fallback)")
        g.vm.set_msi_route(40, 0xFEE0_0000, 0x41)
        g.vm.register_irqfd(efd, 40)
        threading.Timer(0.3, lambda: os.eventfd_write(efd, 1)).start()
        g.run_to_done()
        count = int.from_bytes(g.memory.read(0x7100, 4), "little")
        check(count == 1, "irqfd", f"the handler ran {count} times for one irqfd signal")
        g.vm.unregister_irqfd(efd, 40)
    finally:
        os.close(efd)


def test_dirty_pages_are_reported_where_advertised(guest: Callable[..., Guest]) -> None:
    try:
        g = guest(DIRTY, log_dirty=True)
    except CapabilityError as exc:
        pytest.skip(f"dirty logging is not advertised: {exc}")
    g.vm.get_dirty_log(0)  # what set-up wrote
    g.run_to_done()
    bitmap = g.vm.get_dirty_log(0)
    dirty = {i for i in range(RAM // 0x1000) if bitmap[i // 8] >> (i % 8) & 1}
    check({0x40, 0x42} <= dirty, "dirty logging", f"pages 0x40 and 0x42 were written, the log says {sorted(dirty)}")
    again = g.vm.get_dirty_log(0)
    check(not again[0x40 // 8] >> (0x40 % 8) & 1, "dirty logging", "a page was reported twice for one write")
