"""CPUID: topology leaves, the documented filter and feature masking, on fake supported tables."""

from __future__ import annotations

import pytest
from vmmkit_x86_64.cpuid import (
    FEATURES,
    FILTER,
    FeatureSelection,
    build_cpuid,
    feature_bit,
    features_from_config,
    parse_features,
)
from vmmkit_x86_64.topology import Topology, apic_ids
from x86_helpers import make_config

from vmmkit.config import CpuFeatures, CpuTopology
from vmmkit.errors import CapabilityError
from vmmkit.x86 import CPUID_FLAG_SIGNIFICANT_INDEX as SIG
from vmmkit.x86 import CpuIdEntry, CpuIdTable


def vendor(name: bytes) -> dict[str, int]:
    return {
        "ebx": int.from_bytes(name[0:4], "little"),
        "edx": int.from_bytes(name[4:8], "little"),
        "ecx": int.from_bytes(name[8:12], "little"),
    }


def bit(*names: str) -> int:
    return sum(1 << FEATURES[n].bit for n in names)


def intel_supported() -> list[CpuIdEntry]:
    leaf1_ecx = bit(
        "sse3",
        "pclmulqdq",
        "monitor",
        "vmx",
        "ssse3",
        "cx16",
        "pdcm",
        "sse4_1",
        "sse4_2",
        "x2apic",
        "popcnt",
        "tsc_deadline_timer",
        "aes",
        "xsave",
        "avx",
        "dtes64",
        "est",
        "tm2",
        "xtpr",
    )
    leaf1_edx = (1 << 0) | (1 << 9) | bit("ds", "acpi", "tm", "pbe")
    return [
        CpuIdEntry(0, eax=0x1F, **vendor(b"GenuineIntel")),
        CpuIdEntry(1, eax=0x806EC, ebx=0x00FF0800 | 0x07 << 24, ecx=leaf1_ecx, edx=leaf1_edx),
        CpuIdEntry(4, 0, SIG, eax=0x1C004121, ebx=0x01C0003F, ecx=0x3F),  # L1d
        CpuIdEntry(4, 1, SIG, eax=0x1C004122, ebx=0x01C0003F, ecx=0x3F),  # L1i
        CpuIdEntry(4, 2, SIG, eax=0x1C004143, ebx=0x00C0003F, ecx=0x3FF),  # L2
        CpuIdEntry(4, 3, SIG, eax=0x1C03C163, ebx=0x03C0003F, ecx=0x1FFF),  # L3
        CpuIdEntry(4, 4, SIG),
        CpuIdEntry(6, eax=0x77, ecx=0x9),
        CpuIdEntry(
            7,
            0,
            SIG,
            eax=1,
            ebx=bit("fsgsbase", "sgx", "erms", "intel_pt", "smap"),
            ecx=bit("sgx_lc", "umip"),
            edx=bit("fsrm", "amx_bf16", "amx_tile", "amx_int8"),
        ),
        CpuIdEntry(7, 1, SIG, eax=bit("avx_vnni", "amx_fp16")),
        CpuIdEntry(0xA, eax=0x07300404, edx=0x603),
        CpuIdEntry(0xB, 0, SIG, eax=1, ebx=2, ecx=0x100, edx=7),
        CpuIdEntry(0xB, 1, SIG, eax=4, ebx=8, ecx=0x201, edx=7),
        CpuIdEntry(0xD, 0, SIG, eax=0x602E7, ebx=0x2B00, ecx=0x2B00),
        CpuIdEntry(0xD, 1, SIG, eax=0xF),
        CpuIdEntry(0xD, 2, SIG, eax=256, ebx=576),
        CpuIdEntry(0xD, 17, SIG, eax=64, ebx=2752),
        CpuIdEntry(0xD, 18, SIG, eax=8192, ebx=2816),
        CpuIdEntry(0x12, 0, SIG, eax=3),
        CpuIdEntry(0x14, 0, SIG, eax=1),
        CpuIdEntry(0x1D, 0, SIG, eax=1),
        CpuIdEntry(0x1E, 0, SIG, ebx=0x4010),
        CpuIdEntry(0x1F, 0, SIG, eax=1, ebx=2, ecx=0x100),
        CpuIdEntry(0x1F, 1, SIG, eax=4, ebx=8, ecx=0x201),
        CpuIdEntry(0x1F, 2, SIG, ecx=2),
        CpuIdEntry(0x40000000, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
        CpuIdEntry(0x80000000, eax=0x80000008),
        CpuIdEntry(0x80000001, ecx=bit("lahf_lm"), edx=bit("nx") | 1 << 29),
        CpuIdEntry(0x80000008, eax=0x3027),
    ]


def amd_supported() -> list[CpuIdEntry]:
    return [
        CpuIdEntry(0, eax=0x10, **vendor(b"AuthenticAMD")),
        CpuIdEntry(1, eax=0xA20F10, ebx=0x800, ecx=bit("sse3", "x2apic"), edx=1),
        CpuIdEntry(0x80000000, eax=0x8000001F),
        CpuIdEntry(0x80000001, ecx=bit("svm", "topoext")),
        CpuIdEntry(0x80000008, eax=0x3030, ecx=0x7007),
        CpuIdEntry(0x8000001D, 0, SIG, eax=0x121),
        CpuIdEntry(0x8000001D, 1, SIG, eax=0x163),
        CpuIdEntry(0x8000001E, eax=5, ebx=0x102, ecx=0x3),
    ]


def table(entries: list[CpuIdEntry]) -> CpuIdTable:
    return CpuIdTable(entries)


def reg(entries: list[CpuIdEntry], leaf: int, sub: int = 0, name: str = "eax") -> int:
    entry = table(entries).get(leaf, sub)
    assert entry is not None, (leaf, sub)
    return getattr(entry, name)


# -- APIC IDs -------------------------------------------------------------------------------------


def test_apic_ids_without_topology_are_indices() -> None:
    assert apic_ids(make_config(boot_vcpus=2, max_vcpus=5).cpus) == [0, 1, 2, 3, 4]


def test_apic_ids_pack_topology_fields() -> None:
    topo = Topology(threads_per_core=2, cores_per_die=3, dies_per_package=1, packages=2)
    assert (topo.thread_width, topo.core_width, topo.die_width, topo.package_shift) == (1, 2, 0, 3)
    assert [topo.apic_id(i) for i in range(12)] == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    assert topo.location(7) == (1, 0, 0, 1)
    cpus = make_config(
        boot_vcpus=1,
        max_vcpus=12,
        topology=CpuTopology(threads_per_core=2, cores_per_die=3, dies_per_package=1, packages=2),
    ).cpus
    assert apic_ids(cpus) == [topo.apic_id(i) for i in range(12)]


# -- topology leaves ------------------------------------------------------------------------------


def test_intel_topology_leaves() -> None:
    topo = Topology(threads_per_core=2, cores_per_die=4, dies_per_package=2, packages=1)
    entries = build_cpuid(intel_supported(), index=5, topology=topo)
    apic_id = topo.apic_id(5)
    assert apic_id == 5
    ebx = reg(entries, 1, name="ebx")
    assert ebx >> 24 == apic_id
    assert (ebx >> 16) & 0xFF == 16  # 1 << (1 + 2 + 1)
    assert ebx & 0xFFFF == 0x0800  # CLFLUSH size kept
    assert reg(entries, 1, name="edx") & (1 << 28)  # HTT
    assert reg(entries, 1, name="ecx") & (1 << 31)  # hypervisor
    # Leaf 4: L1/L2 shared by a core's threads, L3 by the package; 8 cores per package.
    for sub, sharing in ((0, 1), (1, 1), (2, 1), (3, 15)):
        eax = reg(entries, 4, sub)
        assert (eax >> 14) & 0xFFF == sharing, sub
        assert eax >> 26 == 7
        assert eax & 0x3FFF == intel_supported()[2 + sub].eax & 0x3FFF
    # Leaf 0xB: SMT then core level (shift covers core and die).
    assert [
        (reg(entries, 0xB, i, "eax"), reg(entries, 0xB, i, "ebx"), reg(entries, 0xB, i, "ecx"))
        for i in range(3)
    ] == [(1, 2, 0x100), (4, 16, 0x201), (0, 0, 2)]
    assert {reg(entries, 0xB, i, "edx") for i in range(3)} == {apic_id}
    # Leaf 0x1F: SMT, core, die.
    assert [
        (reg(entries, 0x1F, i, "eax"), reg(entries, 0x1F, i, "ebx"), reg(entries, 0x1F, i, "ecx"))
        for i in range(4)
    ] == [(1, 2, 0x100), (3, 8, 0x201), (4, 16, 0x502), (0, 0, 3)]
    assert all(e.flags & SIG for e in entries if e.function in (0xB, 0x1F, 4))


def test_single_vcpu_has_no_htt() -> None:
    entries = build_cpuid(intel_supported(), index=0, topology=Topology(1, 1, 1, 1))
    assert not reg(entries, 1, name="edx") & (1 << 28)
    assert (reg(entries, 1, name="ebx") >> 16) & 0xFF == 1
    assert reg(entries, 4, 3) >> 14 == 0


def test_each_vcpu_sees_its_own_apic_id() -> None:
    topo = Topology(1, 3, 1, 2)
    for index in range(6):
        entries = build_cpuid(intel_supported(), index=index, topology=topo)
        expected = topo.apic_id(index)
        assert reg(entries, 1, name="ebx") >> 24 == expected
        assert reg(entries, 0xB, 0, "edx") == expected
        assert reg(entries, 0x1F, 2, "edx") == expected


def test_die_level_is_added_on_intel_without_leaf_0x1f() -> None:
    supported = [e for e in intel_supported() if e.function != 0x1F]
    supported[0] = CpuIdEntry(0, eax=0x16, **vendor(b"GenuineIntel"))
    entries = build_cpuid(supported, index=0, topology=Topology(1, 2, 2, 1))
    assert reg(entries, 0) == 0x1F
    assert reg(entries, 0x1F, 2, "ecx") == 0x502
    no_dies = build_cpuid(supported, index=0, topology=Topology(1, 2, 1, 1))
    assert not [e for e in no_dies if e.function == 0x1F]
    assert reg(no_dies, 0) == 0x16


def test_amd_topology_leaves() -> None:
    topo = Topology(threads_per_core=2, cores_per_die=4, dies_per_package=1, packages=2)
    entries = build_cpuid(amd_supported(), index=11, topology=topo)
    apic_id = topo.apic_id(11)
    assert apic_id == 11
    ecx = reg(entries, 0x80000008, name="ecx")
    assert ecx & 0xFF == 7 and (ecx >> 12) & 0xF == 3
    assert ecx & 0x30000 == 0x7007 & 0x30000
    assert reg(entries, 0x8000001E) == 11
    assert reg(entries, 0x8000001E, name="ebx") & 0xFFFF == (1 << 8) | (11 >> 1)
    assert reg(entries, 0x8000001E, name="ecx") & 0x7FF == 1  # node 1 (package 1), 1 node per package
    assert (reg(entries, 0x8000001D, 0) >> 14) & 0xFFF == 1  # L1 shared by the 2 threads
    assert (reg(entries, 0x8000001D, 1) >> 14) & 0xFFF == 7  # L3 by the package
    assert not [e for e in entries if e.function == 4]


def test_max_phys_bits_clamps_the_address_width() -> None:
    entries = build_cpuid(intel_supported(), index=0, topology=Topology(), max_phys_bits=36)
    assert reg(entries, 0x80000008) == 0x3024
    entries = build_cpuid(intel_supported(), index=0, topology=Topology(), max_phys_bits=46)
    assert reg(entries, 0x80000008) == 0x3027  # never widened


# -- filter and features --------------------------------------------------------------------------


def test_filter_removes_what_a_vm_does_not_virtualize() -> None:
    entries = build_cpuid(intel_supported(), index=0, topology=Topology())
    t = table(entries)
    for name, reason in FILTER:
        b = FEATURES[name]
        entry = t.get(b.leaf, b.subleaf)
        assert entry is None or not getattr(entry, b.reg) >> b.bit & 1, (name, reason)
    assert reg(entries, 6) == 0x4  # only ARAT
    assert reg(entries, 6, name="ecx") == 0
    functions = {e.function for e in entries}
    assert not functions & {0xA, 0x12, 0x14}
    # Kept: what guests need, and the hypervisor's own leaves.
    kept = reg(entries, 1, name="ecx")
    assert kept & bit("sse4_2", "x2apic", "cx16", "vmx", "tsc_deadline_timer")
    assert reg(entries, 7, 0, "ebx") & bit("fsgsbase", "erms", "smap") == bit("fsgsbase", "erms", "smap")
    assert t.get(0x40000000) == CpuIdEntry(
        0x40000000, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D
    )


def test_amx_is_removed_unless_asked_for() -> None:
    entries = build_cpuid(intel_supported(), index=0, topology=Topology())
    assert reg(entries, 7, 0, "edx") & bit("amx_bf16", "amx_tile", "amx_int8") == 0
    assert reg(entries, 7, 1, "eax") & bit("amx_fp16") == 0
    assert reg(entries, 7, 1, "eax") & bit("avx_vnni")
    # XCR0: x87, SSE, AVX. The table's 0x602E7 also names AVX-512 and PKRU, but it offers neither
    # feature (nor their sub-leaves), so leaf 0xD does not either.
    assert reg(entries, 0xD, 0) == 0x7
    assert reg(entries, 0xD, 0, "ecx") == 832  # 576 + 256: AVX is the last component left
    assert not [
        e for e in entries if (e.function, e.index) in ((0xD, 17), (0xD, 18)) or e.function in (0x1D, 0x1E)
    ]

    with_amx = build_cpuid(
        intel_supported(), index=0, topology=Topology(), features=FeatureSelection(amx=True)
    )
    assert reg(with_amx, 7, 0, "edx") & bit("amx_tile")
    assert reg(with_amx, 0xD, 0) == 0x60007
    assert reg(with_amx, 0xD, 0, "ecx") == 2816 + 8192  # XTILEDATA ends the area
    assert table(with_amx).get(0xD, 18) is not None


def test_amx_without_hypervisor_support_is_an_error() -> None:
    with pytest.raises(CapabilityError, match="features=amx"):
        build_cpuid(amd_supported(), index=0, topology=Topology(), features=FeatureSelection(amx=True))


def test_nested_off_removes_vmx_and_svm() -> None:
    assert (
        reg(build_cpuid(intel_supported(), index=0, topology=Topology(), nested=False), 1, name="ecx")
        & bit("vmx")
        == 0
    )
    assert (
        reg(build_cpuid(amd_supported(), index=0, topology=Topology(), nested=False), 0x80000001, name="ecx")
        & bit("svm")
        == 0
    )
    assert reg(build_cpuid(amd_supported(), index=0, topology=Topology()), 0x80000001, name="ecx") & bit(
        "svm"
    )


def test_disabled_features_are_masked() -> None:
    selection = parse_features(["-cx16", "-pclmulqdq", "-0x7.0.ebx.9", "-FSRM"])
    entries = build_cpuid(intel_supported(), index=0, topology=Topology(), features=selection)
    assert reg(entries, 1, name="ecx") & bit("cx16", "pclmulqdq") == 0
    assert reg(entries, 1, name="ecx") & bit("sse4_2")
    assert reg(entries, 7, 0, "ebx") & bit("erms") == 0
    assert reg(entries, 7, 0, "edx") & bit("fsrm") == 0


def test_feature_syntax() -> None:
    assert parse_features(["amx"]) == FeatureSelection(amx=True)
    assert feature_bit("0x1.0.ecx.13") == FEATURES["cx16"]
    with pytest.raises(ValueError, match="unknown CPU feature 'warp'"):
        parse_features(["-warp"])
    with pytest.raises(ValueError, match="accepted: amx, -FEATURE"):
        parse_features(["avx"])
    with pytest.raises(ValueError, match="out of range"):
        feature_bit("1.0.ecx.40")


def test_features_from_config() -> None:
    assert features_from_config(CpuFeatures()) == FeatureSelection()
    assert features_from_config(CpuFeatures(amx=True)) == FeatureSelection(amx=True)
    assert features_from_config(None) == FeatureSelection()
    assert features_from_config("amx,-cx16") == FeatureSelection(amx=True, disabled=(FEATURES["cx16"],))

    class WithDisable:
        amx = False
        disable = ("cx16", "-sse4_2")

    assert features_from_config(WithDisable()).disabled == (FEATURES["cx16"], FEATURES["sse4_2"])
