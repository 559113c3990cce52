"""An x86-64 vCPU's state in a snapshot, through the backend-neutral types of :mod:`vmmkit.x86`.

The state (version :data:`VCPU_STATE_VERSION`) is a JSON object::

    regs      StandardRegisters as an object (rax ... rip, rflags)
    sregs     SpecialRegisters: segments and descriptor tables as objects, control registers
    xsave     the XSAVE area, base64 (Intel SDM vol. 1, 13.4; its layout is architectural)
    xcrs      {"<index>": value}
    msrs      [[index, value], ...]: the MSRs of :data:`SAVED_MSRS` the backend has
    lapic     the local APIC register page, base64 (1 KiB, the xAPIC MMIO layout)
    mp_state  vmmkit.x86.MpState
    events    pending/injected exception, interrupt and NMI (KVM's kvm_vcpu_events fields),
              or null when the backend has no such interface

Restored in Cloud Hypervisor's order (``hypervisor/src/kvm/mod.rs``, ``set_state``): MP state,
registers, special registers, XSAVE, XCRs, LAPIC, MSRs (after the LAPIC, for the TSC
deadline), events. CPUID is not saved: the restoring architecture sets it from the
configuration, as at boot.

Across backends: a backend without the XSAVE interface takes the FPU control words only, and
refuses a state whose x87/SSE registers hold anything (it would lose them); a backend without
an events interface refuses a state with an event pending.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from vmmkit.hypervisor import Hypervisor, Vcpu
from vmmkit.log import get_logger
from vmmkit.state import NotSnapshottable, StateError, field, int_field, pack_bytes, unpack_bytes
from vmmkit.x86 import (
    DescriptorTable,
    MsrEntry,
    Segment,
    SpecialRegisters,
    StandardRegisters,
    X86Vcpu,
    X86VcpuXsave,
    fpu_from_xsave,
    xsave_registers_are_clear,
)
from vmmkit_x86_64 import vcpu as vcpu_state

log = get_logger()

VCPU_STATE_VERSION: Final = 1

MSR_IA32_TSC_DEADLINE: Final = 0x6E0
MSR_IA32_CR_PAT: Final = 0x277
MSR_TSC_AUX: Final = 0xC000_0103
#: kvmclock's MSRs (Documentation/virt/kvm/x86/msr.rst), old and new numbers.
MSR_KVM_WALL_CLOCK: Final = 0x11
MSR_KVM_SYSTEM_TIME: Final = 0x12
MSR_KVM_WALL_CLOCK_NEW: Final = 0x4B56_4D00
MSR_KVM_SYSTEM_TIME_NEW: Final = 0x4B56_4D01
#: CPUID 0x40000001 EAX: KVM_FEATURE_CLOCKSOURCE (bit 0), KVM_FEATURE_CLOCKSOURCE2 (bit 3).
KVM_CPUID_FEATURES: Final = 0x4000_0001
KVM_FEATURE_CLOCKSOURCES: Final = 1 << 0 | 1 << 3

#: The MSRs a snapshot saves (those of them the backend has): the boot set, the TSC, PAT,
#: TSC_AUX and the TSC deadline. FS/GS base and EFER travel in the special registers.
SAVED_MSRS: Final = tuple(dict.fromkeys(
    [entry.index for entry in vcpu_state.boot_msrs()]
    + [MSR_IA32_CR_PAT, MSR_TSC_AUX, vcpu_state.MSR_K7_HWCR, MSR_IA32_TSC_DEADLINE, MSR_KVM_WALL_CLOCK,
       MSR_KVM_SYSTEM_TIME, MSR_KVM_WALL_CLOCK_NEW, MSR_KVM_SYSTEM_TIME_NEW]))

_SEGMENTS: Final = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_TABLES: Final = ("gdt", "idt")
_EVENT_PENDING_FIELDS: Final = ("exception_injected", "exception_pending", "interrupt_injected",
                                "nmi_injected", "nmi_pending", "smi_pending", "triple_fault_pending")


def save_vcpu(vcpu: Vcpu, hypervisor: Hypervisor) -> dict[str, Any]:
    """The state of a paused vCPU. :raises NotSnapshottable: the backend lacks an interface."""
    if not isinstance(vcpu, X86Vcpu):
        raise NotSnapshottable(f"vCPU {vcpu.index}: {type(vcpu).__name__} lacks the x86-64 register interface")
    if not isinstance(vcpu, X86VcpuXsave):
        raise NotSnapshottable(f"vCPU {vcpu.index}: backend {type(vcpu).__name__} cannot save the FPU/SSE "
                               "state (no XSAVE interface)")
    events = None
    get_events = getattr(vcpu, "get_vcpu_events", None)
    if callable(get_events):
        events = attrs.asdict(get_events())
    return {
        "regs": attrs.asdict(vcpu.get_regs()),
        "sregs": attrs.asdict(vcpu.get_sregs()),
        "xsave": pack_bytes(vcpu.get_xsave()),
        "xcrs": {str(index): value for index, value in vcpu.get_xcrs().items()},
        "msrs": [[entry.index, entry.data] for entry in _read_msrs(vcpu, hypervisor)],
        "lapic": pack_bytes(vcpu.get_lapic()),
        "mp_state": vcpu.get_mp_state(),
        "events": events,
    }


def _read_msrs(vcpu: X86Vcpu, hypervisor: Hypervisor) -> list[MsrEntry]:
    indices = list(SAVED_MSRS)
    index_list = getattr(hypervisor, "msr_index_list", None)
    if callable(index_list):
        offered = set(index_list())
        indices = [index for index in indices if index in offered]
    try:
        return vcpu.get_msrs(indices)
    except Exception:  # one the backend lists but cannot read: take the others one by one
        out = []
        for index in indices:
            try:
                out.extend(vcpu.get_msrs([index]))
            except Exception as exc:
                log.debug("snapshot.msr_unreadable", index=hex(index), error=str(exc))
        return out


def restore_vcpu(vcpu: X86Vcpu, state: Mapping[str, Any], *, paravirt_clock: bool = True) -> None:
    """Put ``state`` (from :func:`save_vcpu`, checked here) into ``vcpu``. ``paravirt_clock``:
    whether the restoring backend offers kvmclock (a guest that enabled it cannot go without).

    :raises StateError: malformed, or a piece this backend cannot take."""
    what = f"vcpu{getattr(vcpu, 'index', '?')}"
    regs = _regs(field(state, "regs", dict, what), what)
    sregs = _sregs(field(state, "sregs", dict, what), what)
    xsave = unpack_bytes(field(state, "xsave", str, what), f"{what}.xsave")
    xcrs_raw = field(state, "xcrs", dict, what)
    xcrs = {}
    for key, value in xcrs_raw.items():
        if not key.isdigit() or not isinstance(value, int) or isinstance(value, bool):
            raise StateError(f"{what}.xcrs: bad entry {key!r}")
        xcrs[int(key)] = value
    msrs = []
    for entry in field(state, "msrs", list, what):
        if (not isinstance(entry, list) or len(entry) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in entry)):
            raise StateError(f"{what}.msrs: bad entry {entry!r}")
        msrs.append(MsrEntry(entry[0], entry[1]))
    lapic = unpack_bytes(field(state, "lapic", str, what), f"{what}.lapic")
    if len(lapic) < vcpu_state.LAPIC_PAGE_SIZE:
        raise StateError(f"{what}.lapic: {len(lapic)} bytes, a local APIC page is {vcpu_state.LAPIC_PAGE_SIZE}")
    mp_state = int_field(state, "mp_state", what, 0, 16)
    events = state.get("events")
    if events is not None and not isinstance(events, dict):
        raise StateError(f"{what}.events: expected an object or null")
    set_events = getattr(vcpu, "set_vcpu_events", None)
    get_events = getattr(vcpu, "get_vcpu_events", None)
    if events and not callable(set_events) and any(events.get(name) for name in _EVENT_PENDING_FIELDS):
        raise StateError(f"{what}: an exception, interrupt or NMI is pending and backend "
                         f"{type(vcpu).__name__} cannot take pending events")
    clock_msrs = (MSR_KVM_SYSTEM_TIME, MSR_KVM_SYSTEM_TIME_NEW)
    if not paravirt_clock and any(msr.index in clock_msrs and msr.data & 1 for msr in msrs):
        raise StateError(f"{what}: the guest uses kvmclock and backend {type(vcpu).__name__} has no paravirtual "
                         "clock")
    xsave_ok = isinstance(vcpu, X86VcpuXsave)
    if not xsave_ok and not xsave_registers_are_clear(xsave):
        raise StateError(f"{what}: the x87/SSE/AVX registers hold values and backend {type(vcpu).__name__} "
                         "has no XSAVE interface to take them")

    vcpu.set_mp_state(mp_state)
    vcpu.set_regs(regs)
    vcpu.set_sregs(sregs)
    if isinstance(vcpu, X86VcpuXsave):
        vcpu.set_xsave(xsave)
        if xcrs:
            vcpu.set_xcrs(xcrs)
    else:
        vcpu.set_fpu(fpu_from_xsave(xsave))
    vcpu.set_lapic(lapic[: len(vcpu.get_lapic())])
    if msrs:
        vcpu.set_msrs(msrs)
    if events is not None and callable(set_events) and callable(get_events):
        kind = type(get_events())
        try:
            set_events(kind(**events))
        except TypeError as exc:
            raise StateError(f"{what}.events: {exc}") from None


def _ints(source: Mapping[str, Any], names: tuple[str, ...], what: str) -> dict[str, int]:
    return {name: int_field(source, name, what) for name in names}


def _regs(source: Mapping[str, Any], what: str) -> StandardRegisters:
    return StandardRegisters(**_ints(source, tuple(f.name for f in attrs.fields(StandardRegisters)), f"{what}.regs"))


def _sregs(source: Mapping[str, Any], what: str) -> SpecialRegisters:
    kwargs: dict[str, Any] = {}
    segment_names = tuple(f.name for f in attrs.fields(Segment))
    table_names = tuple(f.name for f in attrs.fields(DescriptorTable))
    for name in _SEGMENTS:
        saved = field(source, name, dict, f"{what}.sregs")
        kwargs[name] = Segment(**_ints(saved, segment_names, f"{what}.sregs.{name}"))
    for name in _TABLES:
        kwargs[name] = DescriptorTable(**_ints(field(source, name, dict, f"{what}.sregs"), table_names,
                                               f"{what}.sregs.{name}"))
    for f in attrs.fields(SpecialRegisters):
        if f.name not in kwargs:
            kwargs[f.name] = int_field(source, f.name, f"{what}.sregs")
    return SpecialRegisters(**kwargs)
