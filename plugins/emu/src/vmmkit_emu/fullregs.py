"""All 64 bits of an x86 engine's general registers and RIP.

emu's engines run in ``UC_MODE_32`` (so that guests can switch modes themselves), where
unicorn's register API reaches only EAX-EDI and EIP; a hypervisor's register interface must
give the VMM R8-R15 and the upper halves too. unicorn's saved context is the CPU state
(``CPUX86State``), which begins with ``regs[16]`` (RAX RCX RDX RBX RSP RBP RSI RDI R8-R15),
then ``eip``, each a 64-bit ``target_ulong``; ``uc_context`` puts a header of
its own before it. The header's size is found at run time (the context's total size minus the
state's size in its first field) and the layout is checked once against the 32-bit API: if an
other unicorn build lays it out differently, :class:`LayoutMismatch` says so instead of
returning wrong registers. RFLAGS is not taken from there: QEMU keeps the arithmetic flags
lazily (``cc_src``/``cc_op``) and DF apart, which unicorn's EFLAGS accessors compute and load;
its upper half is reserved (zero).
"""

from __future__ import annotations

import ctypes
import struct
import threading
from typing import Any

from unicorn import x86_const as X

_CHECKED: dict[int, int] = {}
_LOCK = threading.Lock()
_PROBE = (0x1357_9BDF, 0x2468_ACE0, 0x0F1E_2D3C)


class LayoutMismatch(RuntimeError):
    """This unicorn's saved context is not laid out as expected."""


def _data_offset(ctx: Any) -> int:
    base = int(ctx.context.value)
    state_size = struct.unpack_from("<Q", ctypes.string_at(base, 8))[0]
    return int(ctx.size) - int(state_size)


def _check(uc: Any) -> int:
    """The offset of the CPU state in a saved context, verified with probe values."""
    key = id(type(uc))
    with _LOCK:
        if key in _CHECKED:
            return _CHECKED[key]
        saved = [int(uc.reg_read(r)) for r in (X.UC_X86_REG_EAX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDI)]
        for reg, value in zip((X.UC_X86_REG_EAX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDI), _PROBE, strict=True):
            uc.reg_write(reg, value)
        ctx = uc.context_save()
        offset = _data_offset(ctx)
        raw = ctypes.string_at(int(ctx.context.value) + offset, 8 * 8)
        for reg, value in zip((X.UC_X86_REG_EAX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDI), saved, strict=True):
            uc.reg_write(reg, value)
        got = struct.unpack_from("<8Q", raw)
        if (got[0] & 0xFFFF_FFFF, got[1] & 0xFFFF_FFFF, got[7] & 0xFFFF_FFFF) != _PROBE:
            raise LayoutMismatch("unicorn's saved x86 context does not start with the 16 general registers")
        _CHECKED[key] = offset
        return offset


def read(uc: Any) -> tuple[list[int], int, int]:
    """``(gprs in the order rax rcx rdx rbx rsp rbp rsi rdi r8-r15, rip, rflags)``."""
    offset = _check(uc)
    ctx = uc.context_save()
    values = struct.unpack("<17Q", ctypes.string_at(int(ctx.context.value) + offset, 17 * 8))
    return list(values[:16]), values[16], int(uc.reg_read(X.UC_X86_REG_EFLAGS))


def write(uc: Any, gprs: dict[int, int], rip: int | None = None, rflags: int | None = None) -> None:
    """Set general registers (by index 0-15) and RIP to 64-bit values, and RFLAGS."""
    if gprs or rip is not None:
        offset = _check(uc)
        ctx = uc.context_save()
        base = int(ctx.context.value) + offset
        for index, value in gprs.items():
            ctypes.memmove(base + 8 * index, struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF), 8)
        if rip is not None:
            ctypes.memmove(base + 128, struct.pack("<Q", rip & 0xFFFF_FFFF_FFFF_FFFF), 8)
        uc.context_restore(ctx)
    if rflags is not None:
        uc.reg_write(X.UC_X86_REG_EFLAGS, rflags & 0xFFFF_FFFF)
