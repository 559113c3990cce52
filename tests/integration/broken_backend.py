"""A deliberately broken backend for the conformance kit's own test: KVM with one flaw,
chosen by ``BROKEN_FLAW``: ``lose_kicks`` (kick() does nothing), ``truncate_registers``
(get_regs keeps only the low 32 bits), ``accept_overlaps`` (overlapping regions are silently
dropped instead of refused)."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import attrs
from vmmkit_kvm.hypervisor import KvmHypervisor

FLAW = os.environ.get("BROKEN_FLAW", "")


class _BrokenVcpu:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def kick(self) -> None:
        if FLAW != "lose_kicks":
            self._inner.kick()

    def get_regs(self) -> Any:
        regs = self._inner.get_regs()
        if FLAW == "truncate_registers":
            return attrs.evolve(regs, **{f.name: getattr(regs, f.name) & 0xFFFF_FFFF for f in attrs.fields(type(regs))})
        return regs


class _BrokenVm:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._ranges: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def add_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int, **kw: Any) -> None:
        overlaps = any(start < guest_addr + size and guest_addr < start + length for start, length in self._ranges)
        if FLAW == "accept_overlaps" and overlaps:
            return
        self._inner.add_memory_region(slot, guest_addr, size, host_addr, **kw)
        self._ranges.append((guest_addr, size))

    def create_vcpu(self, index: int, ops: Any) -> Any:
        return _BrokenVcpu(self._inner.create_vcpu(index, ops))


class BrokenKvm(KvmHypervisor):
    name: ClassVar[str] = "broken-kvm"

    def create_vm(self, arch: str = "x86_64") -> Any:
        return _BrokenVm(super().create_vm(arch))
