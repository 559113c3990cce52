"""Fixtures for tests that run tiny guests: assembling guest code at test time and putting an
x86 vCPU into real, protected or long mode. Backend-neutral: the vCPU set-up goes through
:class:`vmmkit.x86.X86Vcpu` and memory through :class:`vmmkit.memory.GuestMemory`.

Guest code is source text in the test itself, assembled with GNU ``as`` and linked flat with
``ld`` (no prebuilt blobs)::

    def test_x(assemble):
        code = assemble("mov $1, %al\\n out %al, $0x80\\n hlt", bits=64, base=0x1000)
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from attrs import frozen

from vmmkit.memory import GuestMemory
from vmmkit.x86 import DescriptorTable, Segment, SpecialRegisters, StandardRegisters, X86Vcpu

# -- assembling ---------------------------------------------------------------------------------


@frozen
class GuestImage:
    """Assembled guest code: the flat bytes to load at ``base`` and the address of every label."""

    code: bytes
    base: int
    symbols: dict[str, int]

    def __getitem__(self, label: str) -> int:
        return self.symbols[label]


class AssemblyError(Exception):
    pass


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} (GNU binutils) is needed to assemble test guests")
    return path


@functools.lru_cache(maxsize=256)
def assemble_image(source: str, *, bits: int = 64, base: int = 0) -> GuestImage:
    """Assemble AT&T-syntax ``source`` for ``bits``-bit mode, linked to run at ``base``."""
    directive = {16: ".code16", 32: ".code32", 64: ".code64"}.get(bits)
    if directive is None:
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    as_, ld, objcopy, nm = _tool("as"), _tool("ld"), _tool("objcopy"), _tool("nm")
    with tempfile.TemporaryDirectory(prefix="vmmkit-guest-") as tmp:
        work = Path(tmp)
        (work / "guest.S").write_text(f"{directive}\n.text\n.globl _start\n_start:\n{source}\n")
        steps = [
            [as_, "--64", "-o", "guest.o", "guest.S"],
            [ld, "-m", "elf_x86_64", "-N", "-nostdlib", f"-Ttext={base:#x}", "-o", "guest.elf", "guest.o"],
            [objcopy, "-O", "binary", "-j", ".text", "-j", ".data", "guest.elf", "guest.bin"],
            [nm, "guest.elf"],
        ]
        out = ""
        for step in steps:
            result = subprocess.run(step, cwd=work, capture_output=True, text=True)
            if result.returncode != 0:
                tool = Path(step[0]).name
                raise AssemblyError(f"{tool} failed:\n{result.stderr}\n--- source ---\n{source}")
            out = result.stdout
        symbols = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3:
                symbols[parts[2]] = int(parts[0], 16)
        return GuestImage((work / "guest.bin").read_bytes(), base, symbols)


def assemble_guest(source: str, *, bits: int = 64, base: int = 0) -> bytes:
    """The flat bytes of ``source`` assembled for ``bits``-bit mode at ``base``."""
    return assemble_image(source, bits=bits, base=base).code


@pytest.fixture(scope="session")
def assemble() -> Callable[..., bytes]:
    """``assemble(source, *, bits=16|32|64, base=0) -> bytes``."""
    return assemble_guest


@pytest.fixture(scope="session")
def assemble_with_symbols() -> Callable[..., GuestImage]:
    """``assemble_with_symbols(source, *, bits, base) -> GuestImage`` (bytes + label addresses)."""
    return assemble_image


# -- x86 vCPU modes ---------------------------------------------------------------------------

#: Guest-physical layout used by :class:`X86Setup` (all below 1 MiB except the page tables).
GDT_ADDR = 0x500
IDT_ADDR = 0x600  # 256 x 16-byte gates = 0x1000 bytes, up to 0x1600
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four page directories (4 GiB of 2 MiB pages), up to 0xF000

_GDT = (
    0x0000000000000000,  # null
    0x00AF9B000000FFFF,  # 0x08: 64-bit code, DPL0
    0x00CF93000000FFFF,  # 0x10: data, 4 GiB, DPL0
    0x00CF9B000000FFFF,  # 0x18: 32-bit code, 4 GiB, DPL0
)

CODE64 = Segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=0xB, present=1, dpl=0, db=0, s=1, l=1, g=1)
CODE32 = Segment(base=0, limit=0xFFFFFFFF, selector=0x18, type=0xB, present=1, dpl=0, db=1, s=1, l=0, g=1)
DATA = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=0x3, present=1, dpl=0, db=1, s=1, l=0, g=1)


class X86Setup:
    """Puts a vCPU into a CPU mode with flat segments, for tiny test guests."""

    @staticmethod
    def write_gdt(memory: GuestMemory) -> None:
        for i, descriptor in enumerate(_GDT):
            memory.write_u64(GDT_ADDR + 8 * i, descriptor)

    @staticmethod
    def write_page_tables(memory: GuestMemory) -> None:
        """Identity-map the low 4 GiB with 2 MiB pages (covers the LAPIC and IOAPIC)."""
        memory.write_u64(PML4_ADDR, PDPT_ADDR | 0x3)
        for i in range(4):
            memory.write_u64(PDPT_ADDR + 8 * i, (PD_ADDR + 0x1000 * i) | 0x3)
        table = bytearray()
        for page in range(4 * 512):
            table += ((page << 21) | 0x83).to_bytes(8, "little")  # present, writable, 2 MiB
        memory.write(PD_ADDR, bytes(table))

    @staticmethod
    def write_idt_gate(memory: GuestMemory, vector: int, handler: int, *, bits: int = 64) -> None:
        """An interrupt gate for ``vector`` (64-bit 16-byte gates, or 32-bit 8-byte ones)."""
        if bits == 64:
            low = (handler & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | (((handler >> 16) & 0xFFFF) << 48)
            memory.write_u64(IDT_ADDR + 16 * vector, low)
            memory.write_u64(IDT_ADDR + 16 * vector + 8, handler >> 32)
        else:
            low = (handler & 0xFFFF) | (0x18 << 16) | (0x8E << 40) | (((handler >> 16) & 0xFFFF) << 48)
            memory.write_u64(IDT_ADDR + 8 * vector, low)

    def long_mode(
        self, vcpu: X86Vcpu, memory: GuestMemory, *, entry: int, stack: int, idt: bool = True, **regs: int
    ) -> None:
        """64-bit mode, paging on (4 GiB identity map), interrupts off, at ``entry``."""
        self.write_gdt(memory)
        self.write_page_tables(memory)
        sregs = attrs.evolve(
            vcpu.get_sregs(),
            cs=CODE64, ds=DATA, es=DATA, fs=DATA, gs=DATA, ss=DATA,
            gdt=DescriptorTable(GDT_ADDR, 8 * len(_GDT) - 1),
            idt=DescriptorTable(IDT_ADDR, 16 * 256 - 1 if idt else 0),
            cr0=0x80050033,  # PG WP NE ET MP PE
            cr3=PML4_ADDR,
            cr4=0x20,  # PAE
            efer=0x500,  # LMA LME
        )
        vcpu.set_sregs(sregs)
        vcpu.set_regs(StandardRegisters(rip=entry, rsp=stack, rflags=0x2, **regs))

    def protected_mode(
        self, vcpu: X86Vcpu, memory: GuestMemory, *, entry: int, stack: int, idt: bool = True, **regs: int
    ) -> None:
        """32-bit flat protected mode without paging, interrupts off, at ``entry``."""
        self.write_gdt(memory)
        sregs = attrs.evolve(
            vcpu.get_sregs(),
            cs=CODE32, ds=DATA, es=DATA, fs=DATA, gs=DATA, ss=DATA,
            gdt=DescriptorTable(GDT_ADDR, 8 * len(_GDT) - 1),
            idt=DescriptorTable(IDT_ADDR, 8 * 256 - 1 if idt else 0),
            cr0=0x11, cr3=0, cr4=0, efer=0,
        )
        vcpu.set_sregs(sregs)
        vcpu.set_regs(StandardRegisters(rip=entry, rsp=stack, rflags=0x2, **regs))

    @staticmethod
    def real_mode(vcpu: X86Vcpu, *, entry: int, **regs: int) -> None:
        """16-bit real mode with all segments at 0, at ``entry`` (< 64 KiB)."""
        flat = Segment(base=0, limit=0xFFFF, selector=0, type=0x3, present=1, s=1)
        sregs: SpecialRegisters = attrs.evolve(
            vcpu.get_sregs(), cs=attrs.evolve(flat, type=0xB), ds=flat, es=flat, fs=flat, gs=flat, ss=flat
        )
        vcpu.set_sregs(sregs)
        vcpu.set_regs(StandardRegisters(rip=entry, rflags=0x2, **regs))


@pytest.fixture(scope="session")
def x86_setup() -> X86Setup:
    return X86Setup()


GUESTS = Path(__file__).resolve().parents[1] / "guests"


@pytest.fixture(scope="module")
def guest_elf() -> Path:
    """The test guest from this source tree, brought up to date with make (incremental)."""
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("make and gcc are needed to build tests/guests")
    result = subprocess.run(["make", "-s", "-C", str(GUESTS)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"make -C tests/guests failed:\n{result.stdout}{result.stderr}")
    return GUESTS / "build" / "x86_64" / "selftest.elf"
