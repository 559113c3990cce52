"""The MMIO instruction decoder against a real x86 implementation: unicorn (QEMU's TCG) runs
each instruction on RAM, and the decoder must agree on its length, its access size and
direction, and the destination register's value afterwards."""

from __future__ import annotations

import pytest

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const as X  # noqa: E402

from vmmkit import x86_decode  # noqa: E402

CODE = 0x1000
DATA = 0x8000
REGS64 = [X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX, X.UC_X86_REG_RSP,
          X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI] + [getattr(X, f"UC_X86_REG_R{i}") for i in range(8, 16)]
MEMORY = bytes(range(0x81, 0x91))  # high bits set: sign extension shows

# (encoding, access size, write); every memory operand addresses DATA through RBX or disp32.
CASES = [
    ("8a 03", 1, False),  # mov al, [rbx]
    ("8a 23", 1, False),  # mov ah, [rbx]
    ("40 8a 33", 1, False),  # mov sil, [rbx]
    ("66 8b 0b", 2, False),  # mov cx, [rbx]
    ("8b 13", 4, False),  # mov edx, [rbx]
    ("48 8b 33", 8, False),  # mov rsi, [rbx]
    ("4c 8b 43 08", 8, False),  # mov r8, [rbx+8]
    ("44 8b 8c 23 00 00 00 00", 4, False),  # mov r9d, [rbx+0] (SIB without index, disp32)
    ("8b 04 25 00 80 00 00", 4, False),  # mov eax, [0x8000] (SIB, no base)
    ("0f b6 0b", 1, False),  # movzx ecx, byte [rbx]
    ("48 0f b7 0b", 2, False),  # movzx rcx, word [rbx]
    ("0f be 0b", 1, False),  # movsx ecx, byte [rbx]
    ("48 0f bf 0b", 2, False),  # movsx rcx, word [rbx]
    ("88 03", 1, True),  # mov [rbx], al
    ("88 3b", 1, True),  # mov [rbx], bh
    ("66 89 0b", 2, True),  # mov [rbx], cx
    ("89 53 04", 4, True),  # mov [rbx+4], edx
    ("48 89 33", 8, True),  # mov [rbx], rsi
    ("c6 03 5a", 1, True),  # mov byte [rbx], 0x5a
    ("66 c7 03 34 12", 2, True),  # mov word [rbx], 0x1234
    ("c7 43 04 78 56 34 12", 4, True),  # mov dword [rbx+4], 0x12345678
    ("48 c7 03 f0 ff ff ff", 8, True),  # mov qword [rbx], -16
]


def _run(code: bytes) -> tuple[int, list[int], bytes]:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(CODE, code + b"\xf4")
    uc.mem_write(DATA, MEMORY)
    for i, reg in enumerate(REGS64):
        uc.reg_write(reg, 0x1111_2222_3333_4400 + i * 0x11)
    uc.reg_write(X.UC_X86_REG_RBX, DATA)
    uc.reg_write(X.UC_X86_REG_RSP, 0x9000)
    before = [int(uc.reg_read(r)) for r in REGS64]
    uc.emu_start(CODE, CODE + len(code), count=1)
    return int(uc.reg_read(X.UC_X86_REG_RIP)) - CODE, before, bytes(uc.mem_read(DATA, 16))


@pytest.mark.parametrize("hexcode,size,write", CASES, ids=[c[0] for c in CASES])
def test_decoder_agrees_with_a_real_cpu(hexcode: str, size: int, write: bool) -> None:
    code = bytes.fromhex(hexcode)
    length, before, memory_after = _run(code)
    access = x86_decode.decode(code + b"\x90" * 8, 64)
    assert (access.length, access.size, access.write) == (length, size, write)
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(CODE, code)
    uc.mem_write(DATA, MEMORY)
    for i, reg in enumerate(REGS64):
        uc.reg_write(reg, before[i])
    uc.emu_start(CODE, CODE + len(code), count=1)
    offset = 4 if "43 04" in hexcode or "53 04" in hexcode else (8 if "43 08" in hexcode else 0)
    if write:
        written = memory_after[offset : offset + size]
        if access.immediate is not None:
            assert access.immediate.to_bytes(size, "little") == written
        else:
            assert x86_decode.register_bytes(before[access.register], access) == written
    else:
        data = MEMORY[offset : offset + size]
        expected = int(uc.reg_read(REGS64[access.register]))
        assert x86_decode.merge_read(before[access.register], access, data) == expected


def test_32_bit_code_has_no_rex_and_the_16_bit_operand_prefix() -> None:
    assert x86_decode.decode(bytes.fromhex("8b 0d 00 00 e0 fe"), 32) == x86_decode.MemoryAccess(
        6, 4, write=False, register=1, dest_size=4)
    assert x86_decode.decode(bytes.fromhex("a1 00 00 c0 fe"), 32).length == 5  # mov eax, moffs32


@pytest.mark.parametrize("hexcode", ["0f 01 d0", "f3 a4", "ff 03", "83 3b 00", "8b c3"])
def test_anything_else_is_refused_by_name(hexcode: str) -> None:
    with pytest.raises(x86_decode.UnsupportedInstruction) as info:
        x86_decode.decode(bytes.fromhex(hexcode) + bytes(8), 64)
    assert hexcode.split()[0] in str(info.value) or "register operand" in str(info.value)


def test_truncated_instructions_are_refused() -> None:
    with pytest.raises(x86_decode.UnsupportedInstruction):
        x86_decode.decode(bytes.fromhex("c7 43 04 78"), 64)
