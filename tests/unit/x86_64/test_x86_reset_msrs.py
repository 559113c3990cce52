"""Every (re)boot disarms the MSRs a previous guest may have pointed at its memory."""

from __future__ import annotations

from vmmkit_x86_64.vcpu import KVM_SIGNATURE, reset_msrs

from vmmkit.x86 import CpuIdEntry


def kvm_leaves(features: int) -> list[CpuIdEntry]:
    ebx, ecx, edx = KVM_SIGNATURE
    return [CpuIdEntry(0x4000_0000, 0, 0, 0x4000_0001, ebx, ecx, edx),
            CpuIdEntry(0x4000_0001, 0, 0, features, 0, 0, 0)]


def test_the_pv_msrs_of_offered_features_are_cleared() -> None:
    # This kvm_pvm host's leaf: clocksource(2), async PF (+INT), steal time, PV EOI, poll control.
    msrs = {m.index: m.data for m in reset_msrs(kvm_leaves(0x1007EFB))}
    assert msrs == {0x11: 0, 0x12: 0, 0x4B564D00: 0, 0x4B564D01: 0, 0x4B564D02: 0, 0x4B564D03: 0,
                    0x4B564D04: 0, 0x4B564D05: 1, 0x4B564D06: 0}


def test_only_offered_features_and_only_under_kvms_signature() -> None:
    steal_time_only = {m.index for m in reset_msrs(kvm_leaves(1 << 5))}
    assert steal_time_only == {0x4B564D03}
    other = [CpuIdEntry(0x4000_0000, 0, 0, 0x4000_0001, 1, 2, 3), CpuIdEntry(0x4000_0001, 0, 0, 0xFFFF, 0, 0, 0)]
    assert reset_msrs(other) == []


def test_the_tsc_deadline_is_disarmed_when_offered() -> None:
    leaf1 = CpuIdEntry(1, 0, 0, 0, 0, 1 << 24, 0)
    assert [(m.index, m.data) for m in reset_msrs([leaf1])] == [(0x6E0, 0)]
    assert reset_msrs([CpuIdEntry(1, 0, 0, 0, 0, 0, 0)]) == []
