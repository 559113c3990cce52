"""The KVM host quirks without /dev/kvm: selection, CPUID trimming, kernel arguments, guest
page walks, and the pvm exit handling against a fake vCPU in fake guest memory."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path
from typing import Any

import attrs
import pytest
from vmmkit_kvm import quirks
from vmmkit_kvm.quirks import HostQuirks, merge_args
from vmmkit_kvm.quirks.guestmem import GuestPhysical, GuestVirtual, idt_gate_target
from vmmkit_kvm.quirks.pvm import (
    HIDDEN_FEATURES,
    MSR_LSTAR,
    MSR_STAR,
    RFLAGS_DF,
    PvmQuirks,
    PvmVm,
    trivial_instruction,
)

from vmmkit.hypervisor import ExitReason, VmExit
from vmmkit.machine import append_kernel_args
from vmmkit.x86 import CpuIdEntry, DescriptorTable, MsrEntry, Segment, SpecialRegisters, StandardRegisters


@pytest.fixture(autouse=True)
def _no_configured_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(quirks.ENV_MODE, raising=False)
    monkeypatch.delenv(quirks.ENV_DILATION, raising=False)
    monkeypatch.setattr(quirks, "_settings", quirks.QuirkSettings())


# -- selection -------------------------------------------------------------------------------


def test_auto_detects_pvm_from_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert quirks.detect(tmp_path / "absent") == "none"
    (tmp_path / "kvm_pvm").mkdir()
    assert quirks.detect(tmp_path / "kvm_pvm") == "pvm"
    monkeypatch.setattr(quirks, "PVM_SYSFS", tmp_path / "kvm_pvm")
    monkeypatch.setattr(quirks.detect, "__defaults__", (tmp_path / "kvm_pvm",))
    selected = quirks.select()
    assert isinstance(selected, PvmQuirks) and selected.detected and selected.dilation == 10
    assert "detected" in quirks.describe()


def test_forced_modes_and_their_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quirks.detect, "__defaults__", (Path("/nonexistent/kvm_pvm"),))
    assert not quirks.select().active
    assert quirks.describe() == ""
    monkeypatch.setenv(quirks.ENV_MODE, "pvm")
    monkeypatch.setenv(quirks.ENV_DILATION, "4")
    forced = quirks.select()
    assert isinstance(forced, PvmQuirks) and not forced.detected and forced.dilation == 4
    quirks.configure("none")  # the command line beats the environment
    assert not quirks.select().active
    assert quirks.select("pvm", dilation=2).dilation == 2  # an explicit argument beats both


def test_bad_modes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown KVM quirks mode"):
        quirks.configure("vmx")
    with pytest.raises(ValueError, match="at least 1"):
        quirks.configure("pvm", 0)
    monkeypatch.setenv(quirks.ENV_MODE, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        quirks.select()
    assert "bogus" in quirks.describe()


def test_a_normal_host_changes_nothing() -> None:
    normal = HostQuirks()
    entries = [CpuIdEntry(1, 0, 0, 0, 0, 0xFFFF_FFFF, 0)]
    assert normal.supported_cpuid(entries) == entries
    assert normal.in_kernel_pit and not normal.active
    assert normal.kernel_args(2_000_000) == [] and normal.platform_devices() == []
    assert normal.attach(object()) is None  # type: ignore[arg-type]


# -- what the pvm set asks of the platform ---------------------------------------------------


def test_pvm_hides_the_features_the_emulator_lacks() -> None:
    leaf1 = CpuIdEntry(1, 0, 0, eax=0x806F2, ebx=0, ecx=0xFFFF_FFFF, edx=0xFFFF_FFFF)
    leaf7 = CpuIdEntry(7, 0, 1, eax=0, ebx=0xFFFF_FFFF, ecx=0xFFFF_FFFF, edx=0xFFFF_FFFF)
    other = CpuIdEntry(0x80000001, 0, 0, ecx=0xFFFF_FFFF)
    out = {e.function: e for e in PvmQuirks().supported_cpuid([leaf1, leaf7, other])}
    assert not out[1].ecx & (1 << 13)  # CX16: lock cmpxchg16b cannot be emulated
    for _name, leaf, _sub, reg, bit, _number in HIDDEN_FEATURES:
        assert not getattr(out[leaf], reg) & (1 << bit), _name
    assert out[1].ecx & (1 << 31) and out[1].edx == 0xFFFF_FFFF  # the rest stays
    assert out[0x80000001] == other


def test_pvm_hides_kvm_features_that_need_a_hypercall() -> None:
    kvm_features = CpuIdEntry(0x4000_0001, 0, 0, eax=0x01FF_FFFF, ebx=0, ecx=0, edx=0)
    (out,) = PvmQuirks().supported_cpuid([kvm_features])
    for bit in (7, 11, 13):  # PV_UNHALT (KICK_CPU), PV_SEND_IPI, PV_SCHED_YIELD: a VMCALL never completes
        assert not out.eax & (1 << bit), bit
    assert out.eax == 0x01FF_FFFF & ~(1 << 7 | 1 << 11 | 1 << 13)  # the clock, steal time, PV EOI... stay


def test_pvm_kernel_arguments_slow_the_clock_and_hide_features() -> None:
    args = PvmQuirks(dilation=10).kernel_args(2_300_000)
    assert "tsc_early_khz=23000000" in args
    assert {"no-kvmclock", "tsc=reliable", "mitigations=off"} <= set(args)
    clear = next(a for a in args if a.startswith("clearcpuid="))
    numbers = {int(n) for n in clear.split("=")[1].split(",")}
    assert {129, 137, 147, 148, 151, 153, 154, 288, 297, 308, 312, 317, 580} == numbers  # 312: clwb (pmem)
    assert not any(a.startswith("tsc_early_khz") for a in PvmQuirks().kernel_args(None))


def test_pvm_replaces_the_in_kernel_pit_with_a_slowed_userspace_one() -> None:
    (pit,) = PvmQuirks(dilation=7).platform_devices()
    assert (pit.type, pit.pio, pit.irq, pit.config) == ("i8254", (0x40, 4), 0, {"dilation": 7})
    assert not PvmQuirks.in_kernel_pit


def test_the_users_own_arguments_win() -> None:
    assert merge_args("console=ttyS0 tsc_early_khz=5", ["tsc_early_khz=9", "no-kvmclock"]) == ["no-kvmclock"]


@pytest.mark.parametrize(
    "cmdline,args,expected",
    [
        ("console=ttyS0", ["a=1", "b"], "console=ttyS0 a=1 b"),
        ("console=ttyS0 -- net=1", ["a=1"], "console=ttyS0 a=1 -- net=1"),
        (None, ["a"], "a"),
        ("a b", ["b"], "a b"),
        ("x --", ["a"], "x a --"),
    ],
)
def test_arguments_go_before_the_init_arguments(cmdline: str | None, args: list[str], expected: str) -> None:
    assert append_kernel_args(cmdline, args) == expected


# -- decoding and page walks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "code,expected",
    [
        ("90", (1, False)),
        ("6690", (2, False)),
        ("0f1f00", (3, False)),
        ("0f1f4000", (4, False)),
        ("0f1f440000", (5, False)),
        ("660f1f440000", (6, False)),
        ("0f1f8000000000", (7, False)),
        ("0f1f840000000000", (8, False)),
        ("fc", (1, True)),
        ("f30f1efa", (4, False)),
        ("0f1f08", None),  # reg != 0: not a NOP
        ("0f01ca", None),  # clac itself
        ("e8", None),
        ("", None),
        ("0f1f84", None),  # truncated
    ],
)
def test_trivial_instructions(code: str, expected: tuple[int, bool] | None) -> None:
    assert trivial_instruction(bytes.fromhex(code)) == expected


class FakeRam:
    """Guest-physical RAM at 0 in a ctypes buffer, with helpers to build page tables."""

    def __init__(self, size: int = 4 << 20) -> None:
        self.buffer = ctypes.create_string_buffer(size)
        self.size = size
        self.physical = GuestPhysical(lambda: [(0, size, ctypes.addressof(self.buffer))])
        self.next_table = 0x1000

    def write(self, addr: int, data: bytes) -> None:
        ctypes.memmove(ctypes.addressof(self.buffer) + addr, data, len(data))

    def u64(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<Q", value))

    def table(self) -> int:
        addr, self.next_table = self.next_table, self.next_table + 0x1000
        return addr

    def map(self, root: int, vaddr: int, paddr: int, *, large: int = 0) -> None:
        """Map one 4 KiB page (or a 2 MiB page with ``large=2``) with 4-level tables."""
        table = root
        for level in (4, 3, 2, 1):
            index = (vaddr >> (12 + 9 * (level - 1))) & 0x1FF
            entry_addr = table + index * 8
            if level == large:
                self.u64(entry_addr, paddr | 0x83)
                return
            if level == 1:
                self.u64(entry_addr, paddr | 0x3)
                return
            existing = struct.unpack_from("<Q", self.buffer, entry_addr)[0]
            if existing & 1:
                table = existing & ~0xFFF
            else:
                new = self.table()
                self.u64(entry_addr, new | 0x3)
                table = new


def test_page_walk_across_pages_and_large_pages() -> None:
    ram = FakeRam()
    root = ram.table()
    kernel = 0xFFFF_FFFF_8100_0000
    ram.map(root, kernel, 0x20_0000)
    ram.map(root, kernel + 0x1000, 0x30_0000)
    ram.map(root, 0xFFFF_8880_0000_0000, 0x0, large=2)
    ram.write(0x20_0FFC, b"abcd")
    ram.write(0x30_0000, b"efgh")
    view = GuestVirtual(ram.physical, root, 0)
    assert view.read(kernel + 0xFFC, 8) == b"abcdefgh"
    assert view.translate(0xFFFF_8880_0012_3456) == 0x12_3456
    assert view.read(0x4000_0000, 1) is None  # not mapped
    assert ram.physical.read(ram.size - 4, 8) is None  # beyond RAM
    assert GuestVirtual(ram.physical, 0xFFF_0000_0000, 0).translate(kernel) is None  # root outside RAM


def test_idt_gate_target() -> None:
    handler = 0xFFFF_FFFF_8140_0B00
    gate = struct.pack("<HHBBHII", handler & 0xFFFF, 0x10, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0)
    idt = bytes(16 * 14) + gate
    assert idt_gate_target(idt, 14) == handler
    assert idt_gate_target(idt, 13) is None  # not present
    assert idt_gate_target(idt, 15) is None  # beyond the table


# -- the pvm exit handling, against a fake vCPU ------------------------------------------------

PF_HANDLER = 0xFFFF_FFFF_8140_0B00
LSTAR = 0xFFFF_FFFF_8140_0040
STAR = 0x0023_0010_0000_0000
KERNEL_STACK = 0xFFFF_C900_0000_8000


@attrs.define
class FakeInfo:
    reason: ExitReason
    words: tuple[int, ...] = ()
    instruction: bytes = b""


class FakeVcpu:
    """What :class:`PvmVm` uses of a :class:`KvmVcpu`, over a :class:`FakeRam`."""

    def __init__(self, ram: FakeRam, root: int) -> None:
        self.index = 0
        self.regs = StandardRegisters(rsp=KERNEL_STACK - 48, rip=PF_HANDLER, rflags=0x2)
        self.sregs = SpecialRegisters(
            cs=Segment(selector=0x10, type=11, l=1, g=1, limit=0xFFFF_FFFF),
            idt=DescriptorTable(base=0xFFFF_FFFF_8200_0000, limit=0xFFF),
            cr0=0x8000_0011, cr3=root, cr4=0x20, efer=0x500,
        )
        self.msrs = {MSR_STAR: STAR, MSR_LSTAR: LSTAR}
        self.debug: list[dict[str, Any]] = []
        self.events: Any = None
        self.kicks = 0
        self.sync_sregs = False  #: what set_sync_sregs last asked (the repair turns it on when armed)

    def set_sync_sregs(self, enabled: bool) -> None:
        self.sync_sregs = enabled

    def get_regs(self) -> StandardRegisters:
        return self.regs

    def set_regs(self, regs: StandardRegisters) -> None:
        self.regs = regs

    def get_sregs(self) -> SpecialRegisters:
        return self.sregs

    def set_sregs(self, sregs: SpecialRegisters) -> None:
        self.sregs = sregs

    def get_msrs(self, indices: list[int]) -> list[MsrEntry]:
        return [MsrEntry(i, self.msrs.get(i, 0)) for i in indices]

    def set_guest_debug(self, **kwargs: Any) -> None:
        self.debug.append(kwargs)

    def get_vcpu_events(self) -> Any:
        from vmmkit_kvm.bindings import VcpuEventsState

        return VcpuEventsState(flags=4)

    def set_vcpu_events(self, events: Any) -> None:
        self.events = events

    def kick(self) -> None:
        self.kicks += 1


@pytest.fixture
def guest() -> tuple[PvmVm, FakeVcpu, FakeRam]:
    ram = FakeRam()
    root = ram.table()
    ram.map(root, 0xFFFF_FFFF_8200_0000, 0x10_0000)  # the IDT
    ram.map(root, PF_HANDLER & ~0xFFF, 0x11_0000)  # the handler's page
    ram.map(root, KERNEL_STACK - 0x1000, 0x12_0000)  # the kernel stack
    gate = struct.pack("<HHBBHII", PF_HANDLER & 0xFFFF, 0x10, 0, 0x8E, (PF_HANDLER >> 16) & 0xFFFF, PF_HANDLER >> 32, 0)
    ram.write(0x10_0000 + 16 * 14, gate)
    ram.write(0x11_0000 + (PF_HANDLER & 0xFFF), bytes.fromhex("0f1f00fc"))  # patched CLAC, then CLD

    class Vm:
        memory_slots = staticmethod(lambda: [(0, ram.size, ctypes.addressof(ram.buffer))])

    quirk_vm = PvmVm(Vm())  # type: ignore[arg-type]
    vcpu = FakeVcpu(ram, root)
    quirk_vm.vcpu_created(vcpu)  # type: ignore[arg-type]
    return quirk_vm, vcpu, ram


def exit_(vm: PvmVm, vcpu: FakeVcpu, reason: ExitReason, *words: int, instruction: bytes = b"") -> bool:
    info = FakeInfo(reason, words, instruction)
    return vm.handle_exit(vcpu, VmExit(reason), info)  # type: ignore[arg-type]


def frame(ram: FakeRam, *, rip: int, cs: int, rsp: int = 0x7FFF_F000, rflags: int = 0x10202) -> None:
    ram.write(0x12_0000 + 0x1000 - 48, struct.pack("<6Q", 4, rip, cs, rflags, rsp, cs + 8))


def test_int3_is_stepped_over_and_becomes_a_breakpoint_exception(guest: tuple[PvmVm, FakeVcpu, FakeRam]) -> None:
    vm, vcpu, _ = guest
    vcpu.regs = attrs.evolve(vcpu.regs, rip=0x1000)
    assert exit_(vm, vcpu, ExitReason.INTERNAL_ERROR, 1, instruction=b"\xcc\x90")
    assert vcpu.regs.rip == 0x1001
    assert (vcpu.events.exception_injected, vcpu.events.exception_nr) == (1, 3)
    assert vcpu.events.flags == 4  # what KVM reported is kept
    assert exit_(vm, vcpu, ExitReason.INTERNAL_ERROR, 1, instruction=b"\x9b\xdd")  # fwait
    assert vcpu.regs.rip == 0x1002
    assert not exit_(vm, vcpu, ExitReason.INTERNAL_ERROR, 1, instruction=b"\x0f\x01\xca")  # clac: fatal
    assert not exit_(vm, vcpu, ExitReason.INTERNAL_ERROR, 3)  # not an emulation failure
    counts = vm.counts(vcpu)  # type: ignore[arg-type]
    assert counts["quirk-int3"] == 1 and counts["quirk-fwait"] == 1


def test_the_repair_is_armed_on_the_page_fault_handler(guest: tuple[PvmVm, FakeVcpu, FakeRam]) -> None:
    vm, vcpu, _ = guest
    vcpu.msrs[MSR_LSTAR] = 0
    assert not exit_(vm, vcpu, ExitReason.INTERRUPTED)  # no LSTAR yet: not armed
    assert vcpu.debug == [] and not vcpu.sync_sregs
    vcpu.msrs[MSR_LSTAR] = LSTAR
    assert not exit_(vm, vcpu, ExitReason.INTERRUPTED)  # the kick still reaches the VMM
    assert vcpu.debug == [{"hw_breakpoints": [PF_HANDLER]}]
    assert vcpu.sync_sregs  # every page fault is an exit that reads them from now on


def test_a_user_syscall_that_faulted_is_repaired(guest: tuple[PvmVm, FakeVcpu, FakeRam]) -> None:
    vm, vcpu, ram = guest
    exit_(vm, vcpu, ExitReason.INTERRUPTED)
    frame(ram, rip=LSTAR, cs=0x33, rsp=0x7FFF_1234, rflags=0x10202)
    assert exit_(vm, vcpu, ExitReason.DEBUG, 1, PF_HANDLER)
    assert (vcpu.regs.rip, vcpu.regs.rsp, vcpu.regs.rflags) == (LSTAR, 0x7FFF_1234, 0x202)
    assert (vcpu.sregs.cs.selector, vcpu.sregs.cs.dpl, vcpu.sregs.cs.l) == (0x10, 0, 1)
    assert (vcpu.sregs.ss.selector, vcpu.sregs.ss.dpl, vcpu.sregs.ss.db) == (0x18, 0, 1)
    assert vm.counts(vcpu)["quirk-syscall"] == 1  # type: ignore[arg-type]


def test_other_page_faults_run_the_handler(guest: tuple[PvmVm, FakeVcpu, FakeRam]) -> None:
    vm, vcpu, ram = guest
    exit_(vm, vcpu, ExitReason.INTERRUPTED)
    for rip, cs in ((0x401000, 0x33), (0xFFFF_FFFF_8139_C45E, 0x10)):  # a user fault, a kernel one
        vcpu.regs = attrs.evolve(vcpu.regs, rip=PF_HANDLER, rflags=0x2 | RFLAGS_DF)
        frame(ram, rip=rip, cs=cs)
        assert exit_(vm, vcpu, ExitReason.DEBUG, 1, PF_HANDLER)
        assert vcpu.regs.rip == PF_HANDLER + 3  # the 3-byte NOP done here: the breakpoint is behind
        assert vcpu.sregs.cs.selector == 0x10
    assert vm.counts(vcpu)["quirk-pf-pass"] == 2  # type: ignore[arg-type]


def test_a_handler_that_starts_with_real_work_is_single_stepped(guest: tuple[PvmVm, FakeVcpu, FakeRam]) -> None:
    vm, vcpu, ram = guest
    exit_(vm, vcpu, ExitReason.INTERRUPTED)
    ram.write(0x11_0000 + (PF_HANDLER & 0xFFF), bytes.fromhex("e837040000"))  # call error_entry
    frame(ram, rip=0x401000, cs=0x33)
    assert exit_(vm, vcpu, ExitReason.DEBUG, 1, PF_HANDLER)
    assert vcpu.debug[-1] == {"single_step": True} and vcpu.regs.rip == PF_HANDLER
    assert exit_(vm, vcpu, ExitReason.DEBUG, 1, PF_HANDLER + 5)  # the step is done: re-armed
    assert vcpu.debug[-1] == {"hw_breakpoints": [PF_HANDLER]}


def test_foreign_debug_exits_reach_the_vmm(guest: tuple[PvmVm, FakeVcpu, FakeRam]) -> None:
    vm, vcpu, _ = guest
    assert not exit_(vm, vcpu, ExitReason.DEBUG, 1, 0x1234)  # not armed
    exit_(vm, vcpu, ExitReason.INTERRUPTED)
    assert not exit_(vm, vcpu, ExitReason.DEBUG, 1, 0x1234)  # someone else's breakpoint
    assert not exit_(vm, vcpu, ExitReason.SHUTDOWN)


def test_the_poller_kicks_unarmed_vcpus_until_armed(guest: tuple[PvmVm, FakeVcpu, FakeRam],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from vmmkit_kvm.quirks import pvm

    vm, vcpu, _ = guest
    monkeypatch.setattr(pvm, "ARM_POLL_INTERVAL", 0.01)
    vm.start()
    try:
        import time

        deadline = time.monotonic() + 5
        while vcpu.kicks < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vcpu.kicks >= 2
        exit_(vm, vcpu, ExitReason.INTERRUPTED)  # armed: the poller stops by itself
        assert vm._poller is not None
        vm._poller.join(timeout=5)
        assert not vm._poller.is_alive()
    finally:
        vm.close()
