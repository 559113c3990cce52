"""A simulated virtual processor: an engine thread running one :class:`.engine.Engine`, and the
MSHV_RUN_VP / register / VP-state side the VMM sees.

Two threads, strictly taking turns (a condition variable hands control over):

* the VMM's vCPU thread, inside MSHV_RUN_VP, waits for the next intercept message;
* the engine thread runs guest code; at an intercept it either *returns* from the engine
  (memory faults, halts, exceptions: the instruction pointer is exact and nothing is half done)
  or *parks* inside the hook (IN/OUT, CPUID: unicorn cannot stop before them). A parked
  intercept is completed by the VMM's register writes (hypercall or register page), which are
  collected and applied when the next MSHV_RUN_VP resumes the engine: RAX for IN, RAX-RDX for
  CPUID. A VMM that does not step RIP exactly past the intercepted instruction asks for
  something the simulator cannot model (re-executing or redirecting a half-executed
  instruction): that MSHV_RUN_VP fails with EIO and the reason is kept in
  :attr:`Vp.violations`.
"""

from __future__ import annotations

import ctypes
import errno
import struct
import threading
from typing import TYPE_CHECKING, Any

from unicorn import x86_const as X
from vmmkit_emu import fullregs

from vmmkit.hypervisor import ExitReason
from vmmkit.log import get_logger
from vmmkit.x86 import DescriptorTable, FpuState, MpState, MsrEntry, Segment
from vmmkit_mshv.simulator import abi
from vmmkit_mshv.simulator.engine import Engine

if TYPE_CHECKING:
    from vmmkit_mshv.simulator.partition import Partition

log = get_logger()
_GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
REG_RAX = 0x00020000
REG_RIP = 0x00020010
REG_RFLAGS = 0x00020011
REG_INTERNAL_ACTIVITY = 0x00000004
REG_FP_CONTROL = 0x00030018
REG_XMM_CONTROL = 0x00030019
_CONTROL = {0x00040000: "cr0", 0x00040001: "cr2", 0x00040002: "cr3", 0x00040003: "cr4", 0x00040004: "cr8"}
_SEGMENTS = {0x00060000: "es", 0x00060001: "cs", 0x00060002: "ss", 0x00060003: "ds", 0x00060004: "fs",
             0x00060005: "gs", 0x00060006: "ldt", 0x00060007: "tr"}
_TABLES = {0x00070000: "idt", 0x00070001: "gdt"}
_MSRS = {0x00080000: 0x10, 0x00080001: 0xC000_0080, 0x00080002: 0xC000_0102, 0x00080003: 0x1B,
         0x00080004: 0x277, 0x00080005: 0x174, 0x00080006: 0x176, 0x00080007: 0x175,
         0x00080008: 0xC000_0081, 0x00080009: 0xC000_0082, 0x0008000A: 0xC000_0083,
         0x0008000B: 0xC000_0084, 0x0008000E: 0x2FF, 0x0008007B: 0xC000_0103}
_EFER_LMA = 1 << 10


def _put(buffer: ctypes.Array[ctypes.c_char], offset: int, data: bytes) -> None:
    ctypes.memmove(ctypes.addressof(buffer) + offset, data, len(data))


class UnknownRegister(KeyError):
    """A register name the simulated hypervisor does not implement (HV_STATUS_INVALID_PARAMETER)."""


def _u64(value: int) -> bytes:
    return (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little") + bytes(8)


def _segment_bytes(seg: Segment) -> bytes:
    attributes = (seg.type & 0xF) | (seg.s & 1) << 4 | (seg.dpl & 3) << 5 | (seg.present & 1) << 7 \
        | (seg.avl & 1) << 12 | (seg.l & 1) << 13 | (seg.db & 1) << 14 | (seg.g & 1) << 15
    return abi.SEGMENT.pack(seg.base, seg.limit, seg.selector, attributes)


def _segment_from(raw: bytes) -> Segment:
    base, limit, selector, attributes = abi.SEGMENT.unpack_from(raw)
    return Segment(base=base, limit=limit, selector=selector, type=attributes & 0xF, s=(attributes >> 4) & 1,
                   dpl=(attributes >> 5) & 3, present=(attributes >> 7) & 1, avl=(attributes >> 12) & 1,
                   l=(attributes >> 13) & 1, db=(attributes >> 14) & 1, g=(attributes >> 15) & 1)


class Vp:
    """One VP of a simulated partition."""

    def __init__(self, partition: Partition, index: int) -> None:
        self.partition = partition
        self.index = index
        self.ops = InterceptOps(self)
        self.engine: Engine = partition.engine_vm.create_vcpu(index, self.ops)  # type: ignore[assignment]
        self.register_page = ctypes.create_string_buffer(abi.MESSAGE_SIZE * 16)  # one 4 KiB page
        self.message_page = ctypes.create_string_buffer(abi.MESSAGE_SIZE * 16)
        self.violations: list[str] = []
        self.last_error = ""
        self._cv = threading.Condition()
        self._state = "idle"  # idle | running | parked | closed
        self._go = False
        self._outbox: tuple[str, bytes] | None = None
        self._overlay: dict[int, int] = {}
        self._parked_rip = 0
        self._parked_next = 0
        self._notification = False
        self._abandon = False
        self.runner: int | None = None
        self._thread = threading.Thread(target=self._engine_loop, name=f"mshv-sim-vp{index}", daemon=True)
        self._thread.start()

    # -- MSHV_RUN_VP (the VMM's thread) ----------------------------------------------------------

    def run(self, caller: int) -> bytes:
        """Resume the guest and wait for the next intercept message; OSError(EINTR) on a kick."""
        with self._cv:
            if self._state == "closed":
                raise OSError(errno.EBADF, "the partition is gone")
            self.runner = caller
            if self._state == "parked":
                self._collect_page_into_overlay()
                self._check_completion()
                self._state = "running"
            else:
                self._apply_page_to_engine()
                self._state = "running"
                self._go = True
            self._cv.notify_all()
            while self._outbox is None and self._state != "closed":
                self._cv.wait()
            self.runner = None
            out, self._outbox = self._outbox, None
        if out is None:
            raise OSError(errno.EBADF, "the partition is gone")
        kind, payload = out
        if kind == "eintr":
            raise OSError(errno.EINTR, "interrupted")
        if kind == "error":
            raise OSError(errno.EIO, payload.decode())
        _put(self.message_page, 0, payload)
        return payload

    def _unpark_locked(self) -> None:
        """The VMM sets state a pending IN/OUT/CPUID intercept cannot carry (a reset, a new RIP):
        let the hooked instruction finish and the engine stop, then the writes apply to a
        stopped engine. unicorn stops at the end of a translation block, so a few more guest
        instructions may run first (a limit of the simulation, documented in the README)."""
        self._abandon = True
        self._state = "running"
        self._cv.notify_all()
        self.engine.kick()
        while self._state not in ("idle", "closed"):
            self._cv.wait()
        self._outbox = None
        self._abandon = False
        self.engine.clear_kick()

    def _check_completion(self) -> None:
        """A parked intercept resumes only past the instruction (see the module docstring)."""
        rip = self._overlay.get(REG_RIP)
        if self._notification:
            if rip is None:
                return
            self.violations.append(f"vp {self.index}: the VMM wrote RIP while handling a notification")
            self.runner = None
            raise OSError(errno.EIO, self.violations[-1])
        if rip == self._parked_next:
            return
        if rip is None:
            problem = "did not step RIP past it (re-executing it is not simulated)"
        else:
            problem = f"set RIP to {rip:#x} (the simulator resumes only at {self._parked_next:#x})"
        self.violations.append(f"vp {self.index}: after the intercepted instruction at {self._parked_rip:#x} "
                               f"the VMM {problem}")
        self.runner = None
        raise OSError(errno.EIO, self.violations[-1])

    def kick(self) -> None:
        """A signal for the thread in MSHV_RUN_VP: the engine stops and the call fails with EINTR."""
        with self._cv:
            running = self._state == "running"
        if running:
            self.engine.kick()

    def close(self) -> None:
        """Stop the engine thread (it must be out of the engine before the engine is freed)."""
        with self._cv:
            self._state = "closed"
            self._cv.notify_all()
        if self.engine.uc is not None:
            self.engine.kick()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)

    # -- the engine thread ---------------------------------------------------------------------

    def _engine_loop(self) -> None:
        while True:
            with self._cv:
                while not self._go and self._state != "closed":
                    self._cv.wait()
                if self._state == "closed":
                    return
                self._go = False
            out = self._run_engine()
            with self._cv:
                if self._state == "closed":
                    return
                self._fill_register_page(None)
                self._state = "idle"
                self._outbox = out
                self._cv.notify_all()

    def _run_engine(self) -> tuple[str, bytes]:
        engine = self.engine
        while True:
            exit_ = engine.run()
            if exit_.reason is ExitReason.INTERRUPTED:
                # a fault or exception recorded before the kick stays for the next run (its
                # pending exit is returned first)
                engine.clear_kick()
                return ("eintr", b"")
            fault, engine.fault = engine.fault, None
            exception, engine.exception = engine.exception, None
            if exit_.reason is ExitReason.HLT:
                return ("message", self._message(abi.HVMSG_X64_HALT, abi.HV_INTERCEPT_ACCESS_EXECUTE, 0, b""))
            if fault is not None:
                if fault.write and self.partition.ioeventfd_hit(fault.address, fault.size, fault.value):
                    self._step_over_doorbell(fault.address)
                    continue
                return ("message", self._memory_message(fault))
            if exception is not None:
                return ("message", self._exception_message(exception))
            self.last_error = exit_.detail  # why the engine gave up (for logs and tests)
            log.warning("mshv.simulator.unrecoverable", vp=self.index, detail=exit_.detail)
            return ("message", self._message(abi.HVMSG_UNRECOVERABLE_EXCEPTION, 0, 0, b""))

    def _step_over_doorbell(self, address: int) -> None:
        """An ioeventfd write (the hypervisor's doorbell): complete the store into a scratch page
        so the engine steps past the instruction itself, then take the page away again."""
        uc = self.engine.uc
        page = address & ~0xFFF
        pc = int(uc.reg_read(X.UC_X86_REG_EIP))
        uc.mem_map(page, 0x1000)
        try:
            uc.emu_start(pc, 0xFFFF_FFFF, 0, 1)
        finally:
            uc.mem_unmap(page, 0x1000)

    # -- parking (the engine thread, inside a hook) -------------------------------------------

    def park(self, message: bytes, rip: int, next_rip: int, *, notification: bool = False) -> dict[int, int]:
        """Hand ``message`` to the VMM and wait until MSHV_RUN_VP resumes us; the registers the
        VMM wrote meanwhile (hv register name -> value). A ``notification`` (an EOI message)
        completes nothing: the VMM resumes without touching RIP."""
        with self._cv:
            if self._abandon:
                self.engine.kick()
                return {}
            self._overlay = {}
            self._notification = notification
            self._parked_rip = rip
            self._parked_next = next_rip
            self._fill_register_page(None if notification else rip)
            self._state = "parked"
            self._outbox = ("message", message)
            self._cv.notify_all()
            while self._state == "parked":
                self._cv.wait()
            overlay = self._overlay
            self._overlay = {}
            if self._state == "closed":
                self.engine.kick()  # leave the engine at the end of this block; nothing is checked
                return overlay
        return overlay

    # -- registers -------------------------------------------------------------------------------

    def get_registers(self, names: list[int]) -> list[bytes]:
        with self._cv:
            if self._state == "running":
                raise OSError(errno.EBUSY, "the VP is running")
            parked = self._state == "parked"
            if parked:
                self._collect_page_into_overlay()
            else:
                self._apply_page_to_engine()
            values = []
            for name in names:
                if parked and name in self._overlay:
                    values.append(_u64(self._overlay[name]))
                elif parked and name == REG_RIP:
                    values.append(_u64(self._parked_rip))
                else:
                    values.append(self._read(name))
            return values

    def set_registers(self, pairs: list[tuple[int, bytes]]) -> None:
        with self._cv:
            if self._state == "running":
                raise OSError(errno.EBUSY, "the VP is running")
            if self._state == "parked":
                next_rip = self._parked_next
                completes = all(REG_RAX <= name <= REG_RFLAGS for name, _ in pairs) and all(
                    int.from_bytes(value[:8], "little") == next_rip for name, value in pairs if name == REG_RIP)
                if completes:
                    for name, value in pairs:
                        self._overlay[name] = int.from_bytes(value[:8], "little")
                    return
                self._unpark_locked()
            self._apply_page_to_engine()
            self._write(pairs)
            _put(self.register_page, 2, b"\0")  # isvalid: the page no longer reflects the registers

    def _read(self, name: int) -> bytes:
        engine = self.engine
        uc = engine.uc
        if REG_RAX <= name <= REG_RFLAGS:
            gprs, rip, rflags = fullregs.read(uc)
            return _u64(gprs[name - REG_RAX] if name < REG_RIP else rip if name == REG_RIP else rflags)
        if name in _CONTROL or name in _SEGMENTS or name in _TABLES:
            sregs = engine.get_sregs()
            if name in _CONTROL:
                return _u64(getattr(sregs, _CONTROL[name]))
            if name in _SEGMENTS:
                return _segment_bytes(getattr(sregs, _SEGMENTS[name]))
            table = getattr(sregs, _TABLES[name])
            return abi.TABLE.pack(table.limit, table.base)
        if name in _MSRS:
            return _u64(engine.get_msrs([_MSRS[name]])[0].data)
        if name == REG_FP_CONTROL:
            return struct.pack("<H14x", int(uc.reg_read(X.UC_X86_REG_FPCW)))
        if name == REG_XMM_CONTROL:
            return struct.pack("<QII", 0, int(uc.reg_read(X.UC_X86_REG_MXCSR)), 0xFFFF)
        if name == REG_INTERNAL_ACTIVITY:
            return _u64(1 if engine.get_mp_state() != MpState.RUNNABLE else 0)
        raise UnknownRegister(f"{name:#x}")

    def _write(self, pairs: list[tuple[int, bytes]]) -> None:
        engine = self.engine
        values = dict(pairs)
        unknown = [n for n in values if not (REG_RAX <= n <= REG_RFLAGS or n in _CONTROL or n in _SEGMENTS
                                             or n in _TABLES or n in _MSRS or n in (REG_FP_CONTROL, REG_XMM_CONTROL,
                                                                                    REG_INTERNAL_ACTIVITY))]
        if unknown:
            raise UnknownRegister(f"{unknown[0]:#x}")
        special = {n: v for n, v in values.items() if n in _CONTROL or n in _SEGMENTS or n in _TABLES}
        if special:
            import attrs

            changes: dict[str, Any] = {}
            for name, raw in special.items():
                if name in _CONTROL:
                    changes[_CONTROL[name]] = int.from_bytes(raw[:8], "little")
                elif name in _SEGMENTS:
                    changes[_SEGMENTS[name]] = _segment_from(raw)
                else:
                    limit, base = abi.TABLE.unpack_from(raw)
                    changes[_TABLES[name]] = DescriptorTable(base=base, limit=limit)
            msrs = {_MSRS[n]: int.from_bytes(v[:8], "little") for n, v in values.items() if n in _MSRS}
            sregs = attrs.evolve(engine.get_sregs(), **changes)
            if 0xC000_0080 in msrs:
                sregs = attrs.evolve(sregs, efer=msrs[0xC000_0080])
            if 0x1B in msrs:
                sregs = attrs.evolve(sregs, apic_base=msrs[0x1B])
            engine.set_sregs(sregs)
        msrs_only = [MsrEntry(_MSRS[n], int.from_bytes(v[:8], "little")) for n, v in values.items() if n in _MSRS]
        if msrs_only:
            engine.set_msrs(msrs_only)
        general = {n - REG_RAX: int.from_bytes(v[:8], "little") for n, v in values.items() if REG_RAX <= n < REG_RIP}
        rip = int.from_bytes(values[REG_RIP][:8], "little") if REG_RIP in values else None
        rflags = int.from_bytes(values[REG_RFLAGS][:8], "little") if REG_RFLAGS in values else None
        fullregs.write(engine.uc, general, rip, rflags)
        if REG_FP_CONTROL in values or REG_XMM_CONTROL in values:
            fcw = struct.unpack_from("<H", values.get(REG_FP_CONTROL, struct.pack("<H14x", 0x37F)))[0]
            mxcsr = struct.unpack_from("<I", values.get(REG_XMM_CONTROL, struct.pack("<QII", 0, 0x1F80, 0)), 8)[0]
            engine.set_fpu(FpuState(fcw=fcw, mxcsr=mxcsr))
        if REG_INTERNAL_ACTIVITY in values:
            suspended = int.from_bytes(values[REG_INTERNAL_ACTIVITY][:8], "little") & 1
            engine.set_mp_state(MpState.UNINITIALIZED if suspended else MpState.RUNNABLE)

    # -- VP state (MSHV_GET/SET_VP_STATE) -----------------------------------------------------

    #: (hv_local_interrupt_controller_state word, xAPIC page offset): the scalar registers,
    #: then the ISR, TMR and IRR bitmaps (8 words each, 16 bytes apart in the page).
    _LAPIC_WORDS = ((0, 0x20), (1, 0x30), (2, 0xD0), (3, 0xE0), (4, 0xF0), (29, 0x280), (30, 0x310), (31, 0x300),
                    (32, 0x320), (33, 0x330), (34, 0x340), (35, 0x350), (36, 0x360), (37, 0x370), (38, 0x2F0),
                    (40, 0x380), (41, 0x390), (42, 0x3E0), (43, 0xC0)) \
        + tuple((5 + i, 0x100 + 0x10 * i) for i in range(8)) + tuple((13 + i, 0x180 + 0x10 * i) for i in range(8)) \
        + tuple((21 + i, 0x200 + 0x10 * i) for i in range(8))

    def lapic_state(self) -> bytes:
        page = self.engine.get_lapic()
        words = [0] * 44
        for word, offset in self._LAPIC_WORDS:
            words[word] = struct.unpack_from("<I", page, offset)[0]
        return abi.LAPIC_STATE.pack(*words)

    def set_lapic_state(self, state: bytes) -> None:
        words = abi.LAPIC_STATE.unpack_from(state)
        page = bytearray(self.engine.get_lapic())
        for word, offset in self._LAPIC_WORDS:
            struct.pack_into("<I", page, offset, words[word])
        self.engine.set_lapic(bytes(page))

    def xsave(self) -> bytes:
        """The legacy XSAVE region (x87 control word at 0, MXCSR at 24) and a header that says
        only x87 and SSE state are present (XSTATE_BV at 512)."""
        uc = self.engine.uc
        area = bytearray(0x1000)
        struct.pack_into("<H", area, 0, int(uc.reg_read(X.UC_X86_REG_FPCW)))
        struct.pack_into("<I", area, 24, int(uc.reg_read(X.UC_X86_REG_MXCSR)))
        struct.pack_into("<Q", area, 512, 0b11)
        return bytes(area)

    def set_xsave(self, data: bytes) -> None:
        fcw = struct.unpack_from("<H", data, 0)[0]
        mxcsr = struct.unpack_from("<I", data, 24)[0]
        self.engine.set_fpu(FpuState(fcw=fcw, mxcsr=mxcsr))

    # -- the register page (hv_vp_register_page) -------------------------------------------------

    def _fill_register_page(self, rip: int | None) -> None:
        uc = self.engine.uc
        if uc is None:
            return
        gprs, engine_rip, rflags = fullregs.read(uc)
        header = struct.pack("<HBBI", 1, 1, 0, 0)  # version 1, isvalid, dirty 0
        body = struct.pack("<16QQQ", *gprs, engine_rip if rip is None else rip, rflags)
        _put(self.register_page, 0, header + body)

    def _page_dirty(self) -> tuple[int, list[int], int, int]:
        raw = ctypes.string_at(ctypes.addressof(self.register_page), abi.REGISTER_PAGE.size)
        _, _, _, dirty, *rest = abi.REGISTER_PAGE.unpack_from(raw)
        return dirty, list(rest[:16]), rest[16], rest[17]

    def _clear_dirty(self) -> None:
        _put(self.register_page, 4, bytes(4))

    def _collect_page_into_overlay(self) -> None:
        dirty, gprs, rip, rflags = self._page_dirty()
        if dirty & 1:  # HV_X64_REGISTER_CLASS_GENERAL
            for i, value in enumerate(gprs):
                self._overlay[REG_RAX + i] = value
        if dirty & 2:  # HV_X64_REGISTER_CLASS_IP
            self._overlay[REG_RIP] = rip
        if dirty & 16:  # HV_X64_REGISTER_CLASS_FLAGS
            self._overlay[REG_RFLAGS] = rflags
        self._clear_dirty()

    def _apply_page_to_engine(self) -> None:
        dirty, gprs, rip, rflags = self._page_dirty()
        if not dirty:
            return
        pairs = []
        if dirty & 1:
            pairs += [(REG_RAX + i, _u64(v)) for i, v in enumerate(gprs)]
        if dirty & 2:
            pairs.append((REG_RIP, _u64(rip)))
        if dirty & 16:
            pairs.append((REG_RFLAGS, _u64(rflags)))
        self._write(pairs)
        self._clear_dirty()

    # -- messages ----------------------------------------------------------------------------

    def code_bits(self) -> int:
        """The execution mode of the code running: 64 with EFER.LMA and CS.L, else from CS.D."""
        engine = self.engine
        uc = engine.uc
        efer = int(engine.get_msrs([0xC000_0080])[0].data)
        cs = int(uc.reg_read(X.UC_X86_REG_CS))
        cr0 = int(uc.reg_read(X.UC_X86_REG_CR0))
        if not cr0 & 1:
            return 16
        gdtr = uc.reg_read(X.UC_X86_REG_GDTR)
        try:
            descriptor = int.from_bytes(bytes(uc.mem_read(gdtr[1] + (cs & ~7), 8)), "little")
        except Exception:
            return 64 if efer & _EFER_LMA else 32
        if efer & _EFER_LMA and descriptor >> 53 & 1:
            return 64
        return 32 if descriptor >> 54 & 1 else 16

    def _header(self, access: int, length: int, rip: int | None = None) -> bytes:
        uc = self.engine.uc
        bits = self.code_bits()
        attributes = 0x9B | (1 << 13 if bits == 64 else 0) | (1 << 14 if bits == 32 else 0)
        cs = abi.SEGMENT.pack(0, 0xFFFF_FFFF, int(uc.reg_read(X.UC_X86_REG_CS)), attributes)
        eip = int(uc.reg_read(X.UC_X86_REG_EIP)) if rip is None else rip
        return abi.INTERCEPT_HEADER.pack(self.index, length & 0xF, access, 0, cs, eip,
                                         int(uc.reg_read(X.UC_X86_REG_EFLAGS)))

    def _message(self, mtype: int, access: int, length: int, body: bytes, rip: int | None = None) -> bytes:
        payload = self._header(access, length, rip) + body
        header = abi.MESSAGE_HEADER.pack(mtype, len(payload), 0, b"\0\0", 0)
        return (header + payload).ljust(abi.MESSAGE_SIZE, b"\0")

    def instruction_bytes(self, rip: int) -> bytes:
        try:
            return bytes(self.engine.uc.mem_read(rip, 16))
        except Exception:
            return b""

    def _memory_message(self, fault: object) -> bytes:
        from vmmkit_mshv.simulator.engine import Fault

        assert isinstance(fault, Fault)
        rip = int(self.engine.uc.reg_read(X.UC_X86_REG_EIP))
        code = self.instruction_bytes(rip)
        body = abi.MEMORY_BODY.pack(0, len(code), 0, 0, 0, 0, fault.address, code.ljust(16, b"\0"))
        mtype = abi.HVMSG_GPA_INTERCEPT if fault.protected else abi.HVMSG_UNMAPPED_GPA
        access = abi.HV_INTERCEPT_ACCESS_WRITE if fault.write else abi.HV_INTERCEPT_ACCESS_READ
        return self._message(mtype, access, 0, body)

    def _exception_message(self, vector: int) -> bytes:
        rip = int(self.engine.uc.reg_read(X.UC_X86_REG_EIP))
        code = self.instruction_bytes(rip)
        body = abi.EXCEPTION_BODY.pack(vector, 0, len(code), 0, 0, 0, code.ljust(16, b"\0"), bytes(16), bytes(16),
                                       *([0] * 16))
        return self._message(abi.HVMSG_X64_EXCEPTION_INTERCEPT, abi.HV_INTERCEPT_ACCESS_EXECUTE, 0, body)


class InterceptOps:
    """What the engine's IN/OUT (and CPUID) hooks call: build the intercept message, park."""

    def __init__(self, vp: Vp) -> None:
        self.vp = vp

    def _port(self, port: int, size: int, write: bool, value: int) -> int:
        vp = self.vp
        uc = vp.engine.uc
        rip = int(uc.reg_read(X.UC_X86_REG_EIP))
        code = vp.instruction_bytes(rip)
        length, string, rep = _port_instruction(code)
        gprs, _, _ = fullregs.read(uc)
        rax = gprs[0]
        if write:
            rax = (rax & ~((1 << (8 * size)) - 1)) | value
        info = size | (8 if string else 0) | (16 if rep else 0)
        body = abi.IO_PORT_BODY.pack(port, info, len(code), 0, rax, code.ljust(16, b"\0"), bytes(16), bytes(16),
                                     gprs[1], gprs[6], gprs[7])
        access = abi.HV_INTERCEPT_ACCESS_WRITE if write else abi.HV_INTERCEPT_ACCESS_READ
        overlay = vp.park(vp._message(abi.HVMSG_X64_IO_PORT_INTERCEPT, access, length, body, rip), rip, rip + length)
        return overlay.get(REG_RAX, rax) & ((1 << (8 * size)) - 1)

    def pio_read(self, port: int, size: int) -> bytes:
        return self._port(port, size, False, 0).to_bytes(size, "little")

    def pio_write(self, port: int, data: bytes) -> None:
        self._port(port, len(data), True, int.from_bytes(data, "little"))

    def mmio_read(self, addr: int, size: int) -> bytes:
        raise AssertionError(f"the simulator maps no MMIO but the APIC page ({addr:#x})")

    def mmio_write(self, addr: int, data: bytes) -> None:
        raise AssertionError(f"the simulator maps no MMIO but the APIC page ({addr:#x})")

    def apic_eoi(self, vector: int) -> None:
        """An HVMSG_X64_APIC_EOI message (hv_x64_apic_eoi_message: vp_index, vector); the VMM
        resumes without completing anything."""
        vp = self.vp
        payload = struct.pack("<II", vp.index, vector)
        header = abi.MESSAGE_HEADER.pack(abi.HVMSG_X64_APIC_EOI, len(payload), 0, b"\0\0", 0)
        vp.park((header + payload).ljust(abi.MESSAGE_SIZE, b"\0"), 0, 0, notification=True)

    def cpuid(self) -> None:
        """A CPUID intercept: the VMM answers in RAX, RBX, RCX, RDX."""
        vp = self.vp
        uc = vp.engine.uc
        rip = int(uc.reg_read(X.UC_X86_REG_EIP))
        leaf = int(uc.reg_read(X.UC_X86_REG_EAX))
        subleaf = int(uc.reg_read(X.UC_X86_REG_ECX))
        default = vp.partition.default_cpuid(leaf, subleaf)
        body = abi.CPUID_BODY.pack(leaf, subleaf, int(uc.reg_read(X.UC_X86_REG_EDX)),
                                   int(uc.reg_read(X.UC_X86_REG_EBX)), default[0], default[2], default[3], default[1])
        overlay = vp.park(vp._message(abi.HVMSG_X64_CPUID_INTERCEPT, abi.HV_INTERCEPT_ACCESS_EXECUTE, 2, body, rip),
                          rip, rip + 2)
        for name, reg in ((REG_RAX, X.UC_X86_REG_EAX), (REG_RAX + 1, X.UC_X86_REG_ECX),
                          (REG_RAX + 2, X.UC_X86_REG_EDX), (REG_RAX + 3, X.UC_X86_REG_EBX)):
            if name in overlay:
                uc.reg_write(reg, overlay[name] & 0xFFFF_FFFF)


def _port_instruction(code: bytes) -> tuple[int, bool, bool]:
    """(length, string, rep) of the IN/OUT/INS/OUTS at the start of ``code``."""
    i = 0
    rep = False
    while i < len(code) and code[i] in (0x66, 0xF3, 0xF2, 0x67, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65):
        rep = rep or code[i] in (0xF3, 0xF2)
        i += 1
    if i >= len(code):
        raise AssertionError(f"no port instruction in {code.hex(' ')}")
    opcode = code[i]
    if opcode in (0xE4, 0xE5, 0xE6, 0xE7):
        return i + 2, False, False
    if opcode in (0xEC, 0xED, 0xEE, 0xEF):
        return i + 1, False, False
    if opcode in (0x6C, 0x6D, 0x6E, 0x6F):
        return i + 1, True, rep
    raise AssertionError(f"no port instruction in {code.hex(' ')}")
