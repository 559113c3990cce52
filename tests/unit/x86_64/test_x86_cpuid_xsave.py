"""CPUID leaf 0xD (XSAVE) follows the features offered, on KVM_GET_SUPPORTED_CPUID tables
recorded from real KVMs (``data/supported-cpuid-*.json``: this project's kvm_pvm CI host and the
x86-64 lab's kvm_amd) and on small hand-made tables for what neither host has (XSAVEC, XSAVES
and supervisor components)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmmkit_x86_64.cpuid import FEATURES, build_cpuid, parse_features, xsave_area_size
from vmmkit_x86_64.topology import Topology

from vmmkit.x86 import CPUID_FLAG_SIGNIFICANT_INDEX as SIG
from vmmkit.x86 import CpuIdEntry, CpuIdTable

DATA = Path(__file__).parent / "data"
RECORDED = ("supported-cpuid-kvm-pvm.json", "supported-cpuid-kvm-amd-lab.json")


def recorded(name: str) -> list[CpuIdEntry]:
    document = json.loads((DATA / name).read_text())
    return [CpuIdEntry(*(int(value, 16) for value in row)) for row in document["entries"]]


def build(supported: list[CpuIdEntry], *features: str) -> list[CpuIdEntry]:
    return build_cpuid(supported, index=0, topology=Topology(), features=parse_features(features))


def leaf(entries: list[CpuIdEntry], sub: int) -> CpuIdEntry:
    entry = CpuIdTable(entries).get(0xD, sub)
    assert entry is not None, sub
    return entry


def xcr0(entries: list[CpuIdEntry]) -> int:
    main = leaf(entries, 0)
    return main.eax | main.edx << 32


def components(entries: list[CpuIdEntry]) -> set[int]:
    return {e.index for e in entries if e.function == 0xD and e.index >= 2}


def assert_consistent(entries: list[CpuIdEntry], supported: list[CpuIdEntry]) -> None:
    """What Linux's ``paranoid_xstate_size_valid`` and KVM's ``kvm_check_cpuid`` rely on."""
    main, extended = leaf(entries, 0), leaf(entries, 1)
    has_xsave = CpuIdTable(entries).get(1).ecx >> 26 & 1  # type: ignore[union-attr]
    if not has_xsave:
        assert [e for e in entries if e.function == 0xD and (e.eax, e.ebx, e.ecx, e.edx) != (0, 0, 0, 0)] == []
        return
    user, supervisor = xcr0(entries), extended.ecx | extended.edx << 32
    assert user & 0x3 == 0x3  # x87 and SSE always
    supported_main = CpuIdTable(supported).get(0xD, 0)
    assert supported_main is not None
    assert user & ~(supported_main.eax | supported_main.edx << 32) == 0  # nothing KVM lacks
    assert components(entries) == {i for i in range(2, 64) if (user | supervisor) >> i & 1}
    size = xsave_area_size(entries, user)
    assert main.ebx == main.ecx == size
    for entry in entries:
        if entry.function == 0xD and entry.index >= 2:
            assert CpuIdTable(supported).get(0xD, entry.index) == entry  # sub-leaves as supported


@pytest.mark.parametrize("name", RECORDED)
def test_sizes_match_what_kvm_computed(name: str) -> None:
    """KVM fills 0xD.0 ECX with ``xstate_required_size`` of what it supports: the same formula."""
    supported = recorded(name)
    main = CpuIdTable(supported).get(0xD, 0)
    assert main is not None
    assert xsave_area_size(supported, main.eax | main.edx << 32) == main.ecx


def test_the_pvm_host_offers_no_xsave_so_leaf_0xd_is_zero() -> None:
    """kvm_pvm reports XCR0 0xe7 in 0xD.0 yet no XSAVE in leaf 1: vmmkit's table is zero there."""
    supported = recorded("supported-cpuid-kvm-pvm.json")
    assert CpuIdTable(supported).get(0xD, 0).eax == 0xE7  # type: ignore[union-attr]
    entries = build(supported)
    assert (leaf(entries, 0).eax, leaf(entries, 0).ecx, leaf(entries, 1).eax) == (0, 0, 0)
    assert components(entries) == set()
    assert_consistent(entries, supported)


def test_the_lab_kvm_offers_avx_and_pkru() -> None:
    supported = recorded("supported-cpuid-kvm-amd-lab.json")
    entries = build(supported)
    assert xcr0(entries) == 0x207
    assert leaf(entries, 0).ecx == 2696  # PKRU ends at 2688 + 8, as Linux computed in the lab
    assert components(entries) == {2, 9}
    assert leaf(entries, 1).eax == 0x5  # XSAVEOPT, XGETBV1: as supported
    assert leaf(entries, 1).ebx == 0  # no XSAVEC/XSAVES: no compacted size
    assert_consistent(entries, supported)


@pytest.mark.parametrize(
    ("disabled", "expected_xcr0", "size"),
    [
        (("-pku",), 0x7, 832),
        (("-avx",), 0x203, 2696),  # PKRU keeps its fixed offset: the standard format has gaps
        (("-avx", "-pku"), 0x3, 576),
    ],
)
def test_a_disabled_feature_takes_its_state_component_away(
    disabled: tuple[str, ...], expected_xcr0: int, size: int
) -> None:
    supported = recorded("supported-cpuid-kvm-amd-lab.json")
    entries = build(supported, *disabled)
    assert xcr0(entries) == expected_xcr0
    assert leaf(entries, 0).ebx == leaf(entries, 0).ecx == size
    assert_consistent(entries, supported)


def test_without_xsave_leaf_0xd_is_zero() -> None:
    supported = recorded("supported-cpuid-kvm-amd-lab.json")
    entries = build(supported, "-xsave")
    assert components(entries) == set()
    assert xcr0(entries) == 0 and leaf(entries, 0).ecx == 0
    assert_consistent(entries, supported)


TOGGLES = ("avx", "pku", "mpx", "avx512f", "xsave", "xsavec", "xsaves", "xsaveopt")


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(RECORDED + ("synthetic",)), st.sets(st.sampled_from(TOGGLES)))
def test_leaf_0xd_is_consistent_whatever_is_disabled(name: str, off: set[str]) -> None:
    supported = intel_with_xsaves() if name == "synthetic" else recorded(name)
    assert_consistent(build(supported, *(f"-{n}" for n in sorted(off))), supported)


def intel_with_xsaves() -> list[CpuIdEntry]:
    """A Skylake-SP-like table (sizes and offsets as such CPUs report them) with XSAVEC, XSAVES
    and two supervisor components: PT (filtered by vmmkit) and CET (offered with shadow stacks)."""
    leaf1_ecx = sum(1 << FEATURES[n].bit for n in ("xsave", "avx"))
    leaf7_ebx = sum(1 << FEATURES[n].bit for n in ("avx512f", "intel_pt", "mpx"))
    leaf7_ecx = 1 << FEATURES["pku"].bit | 1 << 7  # PKU, CET shadow stacks
    vendor = {"ebx": 0x756E6547, "edx": 0x49656E69, "ecx": 0x6C65746E}
    return [
        CpuIdEntry(0, eax=0xD, **vendor),
        CpuIdEntry(1, eax=0x50654, ecx=leaf1_ecx, edx=1 | 1 << 25),
        CpuIdEntry(7, 0, SIG, ebx=leaf7_ebx, ecx=leaf7_ecx),
        CpuIdEntry(0xD, 0, SIG, eax=0x2FF, ebx=2696, ecx=2696),
        CpuIdEntry(0xD, 1, SIG, eax=0xF, ebx=0, ecx=0x1900),  # XSS: PT (8), CET_U (11), CET_S (12)
        CpuIdEntry(0xD, 2, SIG, eax=256, ebx=576),
        CpuIdEntry(0xD, 3, SIG, eax=64, ebx=960),
        CpuIdEntry(0xD, 4, SIG, eax=64, ebx=1024),
        CpuIdEntry(0xD, 5, SIG, eax=64, ebx=1088),
        CpuIdEntry(0xD, 6, SIG, eax=512, ebx=1152),
        CpuIdEntry(0xD, 7, SIG, eax=1024, ebx=1664),
        CpuIdEntry(0xD, 8, SIG, eax=128, ecx=1),
        CpuIdEntry(0xD, 9, SIG, eax=8, ebx=2688),
        CpuIdEntry(0xD, 11, SIG, eax=16, ecx=1),
        CpuIdEntry(0xD, 12, SIG, eax=24, ecx=1),
    ]


def test_compacted_size_and_supervisor_components() -> None:
    supported = intel_with_xsaves()
    entries = build(supported)
    assert xcr0(entries) == 0x2FF
    extended = leaf(entries, 1)
    assert extended.ecx == 0x1800  # CET_U and CET_S; PT is filtered (processor trace is not virtualized)
    assert components(entries) == {2, 3, 4, 5, 6, 7, 9, 11, 12}
    # Compacted, in bit order: 576 + AVX 256 + MPX 64 + 64 + AVX-512 64 + 512 + 1024 + PKRU 8
    # + CET 16 + 24 (no component asks for 64-byte alignment here)
    assert extended.ebx == 576 + 256 + 128 + 64 + 512 + 1024 + 8 + 16 + 24
    assert leaf(entries, 0).ecx == 2696
    assert_consistent(entries, supported)

    no_xsaves = build(supported, "-xsaves")
    assert leaf(no_xsaves, 1).ecx == 0  # supervisor state needs XSAVES
    assert components(no_xsaves) == {2, 3, 4, 5, 6, 7, 9}
    assert leaf(no_xsaves, 1).ebx == 576 + 256 + 128 + 64 + 512 + 1024 + 8  # XSAVEC still compacts

    plain = build(supported, "-xsaves", "-xsavec")
    assert leaf(plain, 1).ebx == 0


def test_compacted_alignment() -> None:
    areas = [CpuIdEntry(0xD, 2, SIG, eax=256, ebx=576), CpuIdEntry(0xD, 5, SIG, eax=64, ebx=1088, ecx=2)]
    assert xsave_area_size(areas, 0x27, compacted=True) == 576 + 256 + 64  # 832 is already aligned
    areas = [CpuIdEntry(0xD, 9, SIG, eax=8, ebx=2688), CpuIdEntry(0xD, 17, SIG, eax=64, ebx=2752, ecx=2)]
    assert xsave_area_size(areas, 0x20203, compacted=True) == 640 + 64  # 584 rounds up to 640
    assert xsave_area_size(areas, 0x20203) == 2816
