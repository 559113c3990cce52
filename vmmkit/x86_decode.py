"""Decoding the instruction behind an MSHV memory intercept.

An ``HVMSG_UNMAPPED_GPA`` message gives the guest-physical address and the instruction bytes,
not the access: the VMM must decode the instruction, do the access and complete it (write the
destination register, advance RIP), as Cloud Hypervisor's ``hypervisor::arch::x86::emulator``
does for MSHV. vmmkit's decoder covers the moves compilers emit for device registers:

    88/89/8A/8B  mov r/m, r  and  mov r, r/m
    C6/C7 /0     mov r/m, imm
    0F B6/B7     movzx r, r/m8/16      0F BE/BF  movsx r, r/m8/16
    A0-A3        mov al/ax/eax/rax <-> moffs

with the operand-size, address-size, segment and REX prefixes. Anything else is refused with
:class:`UnsupportedInstruction` naming the bytes (the VM stops with an internal error rather
than guess). The address in the ModRM bytes is not evaluated: the hypervisor reports it.
"""

from __future__ import annotations

from attrs import frozen

_SEGMENT_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65})


class UnsupportedInstruction(ValueError):
    """The intercepted instruction is not one this decoder emulates."""


@frozen
class MemoryAccess:
    """What one intercepted instruction does to memory.

    ``size`` bytes are read (``write`` False) into register ``register`` (0-15 in the
    hypervisor's order: rax rcx rdx rbx rsp rbp rsi rdi r8-r15; ``high_byte`` for AH/CH/DH/BH)
    of ``dest_size`` bytes, zero- or ``sign``-extended; or written from that register or from
    ``immediate``. ``length`` is the instruction's length."""

    length: int
    size: int
    write: bool
    register: int = 0
    high_byte: bool = False
    dest_size: int = 0
    sign: bool = False
    immediate: int | None = None


def _modrm_length(code: bytes, at: int, address_bits: int) -> int:
    """Bytes taken by ModRM and what follows it (SIB, displacement) from ``at``."""
    if at >= len(code):
        raise UnsupportedInstruction("truncated instruction")
    modrm = code[at]
    mod, rm = modrm >> 6, modrm & 7
    if address_bits == 16:
        raise UnsupportedInstruction("16-bit addressing")
    if mod == 3:
        raise UnsupportedInstruction("register operand where memory was accessed")
    length = 1
    if rm == 4:
        if at + 1 >= len(code):
            raise UnsupportedInstruction("truncated instruction")
        sib = code[at + 1]
        length += 1
        if mod == 0 and sib & 7 == 5:
            length += 4
    if mod == 0 and rm == 5:
        length += 4
    elif mod == 1:
        length += 1
    elif mod == 2:
        length += 4
    return length


def decode(code: bytes, code_bits: int = 64) -> MemoryAccess:
    """Decode the memory access of the instruction at the start of ``code`` executed with
    ``code_bits``-bit code (64 in long mode, 32 or 16 otherwise)."""
    if code_bits not in (16, 32, 64):
        raise ValueError(f"code_bits must be 16, 32 or 64, not {code_bits}")
    i = 0
    opsize_prefix = addrsize_prefix = False
    rex = 0
    while i < len(code) and i < 15:
        byte = code[i]
        if byte == 0x66:
            opsize_prefix = True
        elif byte == 0x67:
            addrsize_prefix = True
        elif byte in _SEGMENT_PREFIXES:
            pass
        elif code_bits == 64 and 0x40 <= byte <= 0x4F:
            rex = byte
            i += 1
            break
        else:
            break
        i += 1
    if i >= len(code):
        raise UnsupportedInstruction(f"truncated instruction {code.hex(' ')}")
    default_size = 2 if code_bits == 16 else 4
    if rex & 8:
        opsize = 8
    elif opsize_prefix:
        opsize = 4 if default_size == 2 else 2
    else:
        opsize = default_size
    address_bits = code_bits
    if addrsize_prefix:
        address_bits = 32 if code_bits == 64 else (16 if code_bits == 32 else 32)
    rex_r = 8 if rex & 4 else 0
    opcode = code[i]
    i += 1

    def reg_field() -> tuple[int, bool]:
        reg = (code[i] >> 3) & 7
        return reg | rex_r, False

    def byte_reg() -> tuple[int, bool]:
        reg = (code[i] >> 3) & 7
        if not rex and 4 <= reg <= 7:
            return reg - 4, True  # AH CH DH BH
        return reg | rex_r, False

    if opcode in (0x88, 0x89, 0x8A, 0x8B):
        size = 1 if opcode in (0x88, 0x8A) else opsize
        register, high = byte_reg() if size == 1 else reg_field()
        length = i + _modrm_length(code, i, address_bits)
        return MemoryAccess(length, size, write=opcode in (0x88, 0x89), register=register, high_byte=high,
                            dest_size=size)
    if opcode in (0xC6, 0xC7):
        if i >= len(code) or (code[i] >> 3) & 7:
            raise UnsupportedInstruction(f"{code.hex(' ')}: not mov r/m, imm")
        size = 1 if opcode == 0xC6 else opsize
        imm_size = min(size, 4)
        at = i + _modrm_length(code, i, address_bits)
        if at + imm_size > len(code):
            raise UnsupportedInstruction(f"truncated instruction {code.hex(' ')}")
        imm = int.from_bytes(code[at : at + imm_size], "little", signed=True) & ((1 << (8 * size)) - 1)
        return MemoryAccess(at + imm_size, size, write=True, immediate=imm)
    if 0xA0 <= opcode <= 0xA3:
        size = 1 if opcode in (0xA0, 0xA2) else opsize
        offset_size = address_bits // 8
        return MemoryAccess(i + offset_size, size, write=opcode >= 0xA2, register=0, dest_size=size)
    if opcode == 0x0F and i < len(code) and code[i] in (0xB6, 0xB7, 0xBE, 0xBF):
        second = code[i]
        i += 1
        register, _ = reg_field()
        length = i + _modrm_length(code, i, address_bits)
        size = 1 if second in (0xB6, 0xBE) else 2
        return MemoryAccess(length, size, write=False, register=register, dest_size=opsize,
                            sign=second in (0xBE, 0xBF))
    raise UnsupportedInstruction(f"MMIO by an instruction vmmkit does not emulate: {code.hex(' ')}")


def merge_read(old: int, access: MemoryAccess, data: bytes) -> int:
    """The destination register's new 64-bit value after ``access`` read ``data``."""
    value = int.from_bytes(data[: access.size], "little")
    if access.sign and value >> (8 * access.size - 1):
        value -= 1 << (8 * access.size)
    dest = access.dest_size
    value &= (1 << (8 * dest)) - 1
    if access.high_byte:
        return (old & ~0xFF00) | (value & 0xFF) << 8
    if dest == 4:
        return value  # 32-bit writes zero the upper half
    if dest == 8:
        return value
    mask = (1 << (8 * dest)) - 1
    return (old & ~mask & 0xFFFF_FFFF_FFFF_FFFF) | value


def register_bytes(value: int, access: MemoryAccess) -> bytes:
    """The bytes a write of ``access`` stores, from the source register's value."""
    if access.high_byte:
        value >>= 8
    return (value & ((1 << (8 * access.size)) - 1)).to_bytes(access.size, "little")
