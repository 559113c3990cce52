"""The CPUID table of a vCPU: what the hypervisor supports, filtered, with the VM's topology.

Starting from ``hypervisor.supported_cpuid()``:

1. **Filter** (:data:`FILTER`): features a vmmkit VM does not virtualize are removed, so a guest
   never probes for them:

   ========================  ======================================================================
   removed                   why
   ========================  ======================================================================
   leaf 1 DTES64, DS-CPL,    the debug store (BTS/PEBS buffers) needs a virtual PMU; vmmkit has none
   DS, PDCM
   leaf 1 MONITOR            guests idle with HLT; MONITOR/MWAIT would spin on a host CPU
   leaf 1 SMX                Intel TXT (GETSEC) is not virtualized
   leaf 1 EST, TM, TM2,      power and thermal control of the host CPU is not the guest's
   ACPI (thermal), PBE,
   xTPR
   leaf 6 (all but ARAT)     thermal sensors, HWP, energy-performance MSRs: not emulated; ARAT (the
                             APIC timer keeps running in deep C-states) stays true in a VM
   leaf 0xA                  architectural performance monitoring: vmmkit offers no virtual PMU
   leaf 7 SGX, SGX_LC and    SGX needs EPC memory, which vmmkit does not provide
   leaf 0x12
   leaf 7 Intel PT and       processor trace is not virtualized
   leaf 0x14
   VMX (leaf 1), SVM         only with ``--cpus nested=off``: nested virtualization
   (0x80000001)
   AMX (leaf 7 AMX-BF16,     unless ``--cpus features=amx`` (Cloud Hypervisor's option): the tile
   AMX-TILE, AMX-INT8,       state is 8 KiB per vCPU that the VMM must first obtain permission for;
   AMX-FP16, AMX-COMPLEX;    with the option the backend requests it and the leaves stay as
   XCR0 bits 17-18, leaves   supported (an error if the hypervisor has none)
   0xD.17, 0xD.18, 0x1D,
   0x1E)
   ========================  ======================================================================

2. **Masking**: each name in :attr:`FeatureSelection.disabled` clears one more bit. Names are
   Linux's ``/proc/cpuinfo`` flags from :data:`FEATURES` (``cx16``, ``pclmulqdq``, ``sse4_2``,
   ``fsgsbase``, ``erms``, ``smap``, ``sha_ni``, ``fsrm``...), or raw bits written
   ``LEAF.SUBLEAF.REG.BIT`` (``0x7.0.ebx.9``). Syntax accepted by :func:`parse_features`::

       amx                enable AMX (Cloud Hypervisor's features=amx)
       -NAME              clear a feature (vmmkit extension), e.g. -cx16 or -0x1.0.ecx.13

   so ``--cpus features=[amx,-cx16,-pclmulqdq]`` where the CLI accepts a list. Only bits the
   hypervisor supports can be present, so nothing can be added except AMX.

3. **XSAVE** (leaf 0xD, :func:`_xsave_leaf`): derived from the features left after 1 and 2, as
   QEMU does: a state component is in XCR0 (0xD.0 EAX/EDX) or IA32_XSS (0xD.1 ECX/EDX, only
   with XSAVES) only while the hypervisor supports it *and* a feature that uses it is offered
   (:data:`XSAVE_COMPONENTS`: ``-avx`` takes YMM away, ``-pku`` PKRU, ``-avx512f`` the three
   AVX-512 components...); other component sub-leaves are dropped; 0xD.0 EBX/ECX are the XSAVE
   area size for exactly that XCR0 and 0xD.1 EBX the compacted size (:func:`xsave_area_size`).
   Without XSAVE the whole leaf is zero (the kvm_pvm host reports XCR0 0xe7 with no XSAVE).

4. **Topology**: leaf 1 (initial APIC ID, addressable logical processors, HTT), leaf 4 (cores
   per package, threads sharing each cache), leaves 0xB and 0x1F (x2APIC topology: SMT, core,
   die), on AMD 0x80000008 ECX, 0x8000001D and 0x8000001E; leaf 1 gets the hypervisor bit and
   0x80000008 EAX the guest's physical address width (``max_phys_bits``). The hypervisor's own
   leaves (0x40000000 and up, the KVM signature) are left as supported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

from vmmkit.errors import CapabilityError
from vmmkit.value import Value
from vmmkit.x86 import CPUID_FLAG_SIGNIFICANT_INDEX, CpuIdEntry
from vmmkit_x86_64.topology import Topology

REGISTERS: Final = ("eax", "ebx", "ecx", "edx")


class Bit(Value):
    """One CPUID bit: ``leaf.subleaf.register.bit`` (a value: compare, hash, never change)."""

    __slots__ = ("leaf", "subleaf", "reg", "bit")

    def __init__(self, leaf: int, subleaf: int, reg: str, bit: int) -> None:
        self.leaf = leaf
        self.subleaf = subleaf
        self.reg = reg
        self.bit = bit

    def __str__(self) -> str:
        return f"{self.leaf:#x}.{self.subleaf}.{self.reg}.{self.bit}"


def _bits(leaf: int, subleaf: int, reg: str, names: dict[str, int]) -> dict[str, Bit]:
    return {name: Bit(leaf, subleaf, reg, bit) for name, bit in names.items()}


#: Feature names (as in Linux's /proc/cpuinfo) that ``-NAME`` may clear.
FEATURES: Final[dict[str, Bit]] = {
    **_bits(
        1,
        0,
        "ecx",
        {
            "pni": 0,
            "sse3": 0,
            "pclmulqdq": 1,
            "dtes64": 2,
            "monitor": 3,
            "ds_cpl": 4,
            "vmx": 5,
            "smx": 6,
            "est": 7,
            "tm2": 8,
            "ssse3": 9,
            "fma": 12,
            "cx16": 13,
            "xtpr": 14,
            "pdcm": 15,
            "pcid": 17,
            "sse4_1": 19,
            "sse4_2": 20,
            "x2apic": 21,
            "movbe": 22,
            "popcnt": 23,
            "tsc_deadline_timer": 24,
            "aes": 25,
            "xsave": 26,
            "avx": 28,
            "f16c": 29,
            "rdrand": 30,
        },
    ),
    **_bits(1, 0, "edx", {"ds": 21, "acpi": 22, "tm": 29, "pbe": 31}),
    **_bits(
        7,
        0,
        "ebx",
        {
            "fsgsbase": 0,
            "sgx": 2,
            "bmi1": 3,
            "hle": 4,
            "avx2": 5,
            "smep": 7,
            "bmi2": 8,
            "erms": 9,
            "invpcid": 10,
            "rtm": 11,
            "mpx": 14,
            "avx512f": 16,
            "avx512dq": 17,
            "rdseed": 18,
            "adx": 19,
            "smap": 20,
            "avx512ifma": 21,
            "clflushopt": 23,
            "clwb": 24,
            "intel_pt": 25,
            "avx512pf": 26,
            "avx512er": 27,
            "avx512cd": 28,
            "sha_ni": 29,
            "avx512bw": 30,
            "avx512vl": 31,
        },
    ),
    **_bits(
        7,
        0,
        "ecx",
        {
            "avx512vbmi": 1,
            "umip": 2,
            "pku": 3,
            "waitpkg": 5,
            "avx512_vbmi2": 6,
            "gfni": 8,
            "vaes": 9,
            "vpclmulqdq": 10,
            "avx512_vnni": 11,
            "avx512_bitalg": 12,
            "avx512_vpopcntdq": 14,
            "la57": 16,
            "rdpid": 22,
            "cldemote": 25,
            "movdiri": 27,
            "movdir64b": 28,
            "sgx_lc": 30,
        },
    ),
    **_bits(
        7,
        0,
        "edx",
        {
            "fsrm": 4,
            "avx512_vp2intersect": 8,
            "md_clear": 10,
            "serialize": 14,
            "tsxldtrk": 16,
            "amx_bf16": 22,
            "avx512_fp16": 23,
            "amx_tile": 24,
            "amx_int8": 25,
            "arch_capabilities": 29,
        },
    ),
    **_bits(
        7, 1, "eax", {"avx_vnni": 4, "avx512_bf16": 5, "fzrm": 10, "fsrs": 11, "fsrc": 12, "amx_fp16": 21}
    ),
    **_bits(7, 1, "edx", {"amx_complex": 8}),
    **_bits(0xD, 1, "eax", {"xsaveopt": 0, "xsavec": 1, "xgetbv1": 2, "xsaves": 3}),
    **_bits(
        0x80000001,
        0,
        "ecx",
        {
            "lahf_lm": 0,
            "svm": 2,
            "abm": 5,
            "sse4a": 6,
            "3dnowprefetch": 8,
            "xop": 11,
            "fma4": 16,
            "tbm": 21,
            "topoext": 22,
        },
    ),
    **_bits(0x80000001, 0, "edx", {"nx": 20, "pdpe1gb": 26, "rdtscp": 27}),
}

AMX_FEATURES: Final = ("amx_bf16", "amx_tile", "amx_int8", "amx_fp16", "amx_complex")
XFEATURE_XTILECFG: Final = 17
XFEATURE_XTILEDATA: Final = 18
AMX_LEAVES: Final = ((0xD, 17), (0xD, 18), (0x1D, None), (0x1E, None))

#: XSAVE state components (the XCR0 / IA32_XSS bit = the leaf 0xD sub-leaf) and the CPUID
#: features that offer them: a component is in leaf 0xD only while one of its features is. As
#: Linux's ``xsave_cpuid_features`` (arch/x86/kernel/fpu/xstate.c) and QEMU's
#: ``x86_ext_save_areas`` (target/i386/cpu.c). x87 (0) and SSE (1) go with XSAVE itself; a
#: component not named here (newer than this table) stays as the hypervisor reports it.
XSAVE_COMPONENTS: Final[dict[int, tuple[Bit, ...]]] = {
    2: (FEATURES["avx"],),  # YMM_Hi128
    3: (FEATURES["mpx"],),  # BNDREGS
    4: (FEATURES["mpx"],),  # BNDCSR
    5: (FEATURES["avx512f"],),  # opmask
    6: (FEATURES["avx512f"],),  # ZMM_Hi256
    7: (FEATURES["avx512f"],),  # Hi16_ZMM
    8: (FEATURES["intel_pt"],),  # PT (supervisor)
    9: (FEATURES["pku"],),  # PKRU
    10: (Bit(7, 0, "ecx", 29),),  # PASID (supervisor): ENQCMD
    11: (Bit(7, 0, "ecx", 7), Bit(7, 0, "edx", 20)),  # CET_U: shadow stack or IBT
    12: (Bit(7, 0, "ecx", 7), Bit(7, 0, "edx", 20)),  # CET_S (supervisor)
    13: (Bit(6, 0, "eax", 13),),  # HDC (supervisor)
    14: (Bit(7, 0, "edx", 5),),  # UINTR (supervisor)
    15: (Bit(7, 0, "edx", 19),),  # architectural LBR (supervisor)
    16: (Bit(6, 0, "eax", 7),),  # HWP (supervisor)
    XFEATURE_XTILECFG: (FEATURES["amx_tile"],),
    XFEATURE_XTILEDATA: (FEATURES["amx_tile"],),
    19: (Bit(7, 1, "edx", 21),),  # APX
}
#: The legacy region (x87 and SSE state) and the XSAVE header: where component 2 may begin.
XSAVE_LEGACY_AND_HEADER: Final = 512 + 64
#: Leaf 0xD sub-leaf ECX bit 1: the component is 64-byte aligned in the compacted format.
XSAVE_ALIGN64: Final = 1 << 1

#: The documented filter: ``(feature, reason)``; see the module docstring.
FILTER: Final[tuple[tuple[str, str], ...]] = (
    ("dtes64", "64-bit debug store: needs a virtual PMU"),
    ("ds_cpl", "CPL-qualified debug store: needs a virtual PMU"),
    ("ds", "debug store: needs a virtual PMU"),
    ("pdcm", "perfmon and debug capability MSR: no virtual PMU"),
    ("monitor", "MONITOR/MWAIT: guests idle with HLT"),
    ("smx", "Intel TXT is not virtualized"),
    ("est", "host P-states are not the guest's"),
    ("tm", "thermal monitor: no thermal sensors"),
    ("tm2", "thermal monitor 2: no thermal sensors"),
    ("acpi", "thermal monitor and clock control MSRs are not emulated"),
    ("pbe", "pending break enable: a chipset signal"),
    ("xtpr", "xTPR update control: a chipset feature"),
    ("sgx", "SGX needs EPC memory, which vmmkit does not provide"),
    ("sgx_lc", "SGX launch control"),
    ("intel_pt", "processor trace is not virtualized"),
)
#: Leaves removed outright, and why.
REMOVED_LEAVES: Final[dict[int, str]] = {
    0xA: "architectural performance monitoring: vmmkit offers no virtual PMU",
    0x12: "SGX",
    0x14: "Intel processor trace",
}
ARAT: Final = 1 << 2  #: leaf 6 EAX: the APIC timer always runs
HYPERVISOR: Final = 1 << 31  #: leaf 1 ECX
HTT: Final = 1 << 28  #: leaf 1 EDX
INDEXED_LEAVES: Final = frozenset(
    {4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x8000001D, 0x80000020}
)

#: ``LEAF.SUBLEAF.REG.BIT`` (compiled by ``re`` on first use: most boots name no feature).
_RAW = r"(0x[0-9a-fA-F]+|\d+)\.(0x[0-9a-fA-F]+|\d+)\.(eax|ebx|ecx|edx)\.(\d+)"


class FeatureSelection(Value):
    """CPU features chosen in the configuration: AMX on, and bits to clear."""

    __slots__ = ("amx", "disabled")

    def __init__(self, amx: bool = False, disabled: Iterable[Bit] = ()) -> None:
        self.amx = amx
        self.disabled: tuple[Bit, ...] = tuple(disabled)



DEFAULT_FEATURES: Final = FeatureSelection()


def feature_bit(name: str) -> Bit:
    """The bit a feature name or ``LEAF.SUBLEAF.REG.BIT`` stands for.

    :raises ValueError: unknown name or bad syntax.
    """
    raw = re.fullmatch(_RAW, name)
    if raw:
        bit = int(raw.group(4))
        if bit > 31:
            raise ValueError(f"CPUID bit {bit} out of range in {name!r}")
        return Bit(int(raw.group(1), 0), int(raw.group(2), 0), raw.group(3), bit)
    try:
        return FEATURES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown CPU feature {name!r} (known: {', '.join(sorted(FEATURES))}, or LEAF.SUBLEAF.REG.BIT)"
        ) from None


def parse_features(items: Iterable[str]) -> FeatureSelection:
    """``["amx", "-cx16", "-0x7.0.ebx.9"]`` -> a :class:`FeatureSelection`.

    :raises ValueError: an item that is neither ``amx`` nor ``-FEATURE``.
    """
    amx = False
    disabled = []
    for item in items:
        item = item.strip()
        if item == "amx":
            amx = True
        elif item.startswith("-"):
            disabled.append(feature_bit(item[1:]))
        else:
            raise ValueError(f"unknown CPU feature request {item!r} (accepted: amx, -FEATURE)")
    return FeatureSelection(amx=amx, disabled=tuple(disabled))


def features_from_config(features: Any) -> FeatureSelection:
    """The selection a ``CpusConfig.features`` carries: ``amx`` (Cloud Hypervisor's field) and,
    when the configuration has it, a ``disable`` list of feature names (vmmkit extension).
    Also accepts a list of :func:`parse_features` items."""
    if features is None:
        return FeatureSelection()
    if isinstance(features, str):
        return parse_features(p for p in re.split(r"[,:\s]+", features) if p)
    if isinstance(features, (list, tuple)):
        return parse_features(features)
    disabled = [feature_bit(name.lstrip("-")) for name in getattr(features, "disable", ()) or ()]
    return FeatureSelection(amx=bool(getattr(features, "amx", False)), disabled=tuple(disabled))


class _Table:
    """A mutable working copy of a CPUID table."""

    def __init__(self, entries: Iterable[CpuIdEntry]) -> None:
        self.entries: list[CpuIdEntry] = list(entries)

    def find(self, function: int, index: int = 0) -> CpuIdEntry | None:
        for entry in self.entries:
            if entry.function == function and (
                entry.index == index or not entry.flags & CPUID_FLAG_SIGNIFICANT_INDEX
            ):
                return entry
        return None

    def all(self, function: int) -> list[CpuIdEntry]:
        return [e for e in self.entries if e.function == function]

    def update(self, old: CpuIdEntry, **regs: int) -> CpuIdEntry:
        values = {"eax": old.eax, "ebx": old.ebx, "ecx": old.ecx, "edx": old.edx, **regs}
        new = CpuIdEntry(old.function, old.index, old.flags, **values)
        self.entries[self.entries.index(old)] = new
        return new

    def remove(self, function: int, index: int | None = None) -> None:
        self.entries = [
            e for e in self.entries if not (e.function == function and (index is None or e.index == index))
        ]

    def replace_leaf(self, function: int, rows: Sequence[CpuIdEntry]) -> None:
        """Put ``rows`` where leaf ``function`` was (or at the end)."""
        positions = [i for i, e in enumerate(self.entries) if e.function == function]
        at = positions[0] if positions else len(self.entries)
        self.remove(function)
        self.entries[at:at] = rows

    def clear(self, bit: Bit) -> None:
        entry = self.find(bit.leaf, bit.subleaf)
        if entry is not None:
            self.update(entry, **{bit.reg: getattr(entry, bit.reg) & ~(1 << bit.bit)})

    def has(self, bit: Bit) -> bool:
        entry = self.find(bit.leaf, bit.subleaf)
        return entry is not None and bool(getattr(entry, bit.reg) >> bit.bit & 1)

    def max_basic(self) -> int:
        leaf0 = self.find(0)
        return leaf0.eax if leaf0 else 0

    def vendor(self) -> bytes:
        leaf0 = self.find(0)
        if leaf0 is None:
            return b""
        return b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))


#: CPUID vendor strings of AMD's architecture.
AMD_VENDORS: Final = (b"AuthenticAMD", b"HygonGenuine")


def cpu_vendor(entries: Iterable[CpuIdEntry]) -> bytes:
    """The vendor string of a CPUID table (leaf 0: EBX, EDX, ECX)."""
    return _Table(entries).vendor()


def build_cpuid(
    supported: Iterable[CpuIdEntry],
    *,
    index: int,
    topology: Topology,
    nested: bool = True,
    features: FeatureSelection = DEFAULT_FEATURES,
    max_phys_bits: int | None = None,
) -> list[CpuIdEntry]:
    """The CPUID table for vCPU ``index``.

    :raises CapabilityError: AMX was asked for and the hypervisor has none.
    """
    table = _Table(supported)
    _filter(table, nested=nested, amx=features.amx)
    for bit in features.disabled:
        table.clear(bit)
    _xsave_leaf(table)
    apic_id = topology.apic_id(index)
    _leaf1(table, topology, apic_id)
    _cache_leaf(table, 4, topology, cores_field=True)
    _extended_topology(table, topology, apic_id)
    if table.vendor() in AMD_VENDORS:
        _amd_topology(table, topology, index, apic_id)
    if max_phys_bits is not None:
        entry = table.find(0x80000008)
        if entry is not None and entry.eax & 0xFF > max_phys_bits:
            table.update(entry, eax=(entry.eax & ~0xFF) | max_phys_bits)
    return table.entries


def _filter(table: _Table, *, nested: bool, amx: bool) -> None:
    for name, _reason in FILTER:
        table.clear(FEATURES[name])
    if not nested:
        table.clear(FEATURES["vmx"])
        table.clear(FEATURES["svm"])
    for leaf in REMOVED_LEAVES:
        table.remove(leaf)
    leaf6 = table.find(6)
    if leaf6 is not None:
        table.update(leaf6, eax=leaf6.eax & ARAT, ebx=0, ecx=0, edx=0)
    if amx:
        if not table.has(FEATURES["amx_tile"]):
            raise CapabilityError(
                "CPUID",
                detail="features=amx, but the hypervisor offers no AMX (an AMX CPU, "
                "and the backend must request XTILEDATA permission before reading CPUID)",
            )
        return
    for name in AMX_FEATURES:
        table.clear(FEATURES[name])
    for leaf, sub in AMX_LEAVES:
        table.remove(leaf, sub)  # leaf 0xD's XCR0 mask and sizes follow in _xsave_leaf


def xsave_area_size(entries: Iterable[CpuIdEntry], components: int, *, compacted: bool = False) -> int:
    """Bytes of an XSAVE area holding ``components`` (an XCR0 | IA32_XSS mask), from the
    component sub-leaves of leaf 0xD in ``entries``: the standard format places component ``i``
    at sub-leaf ``i``'s EBX; the compacted one (XSAVEC/XSAVES) packs them in bit order, aligned
    to 64 bytes where sub-leaf ECX bit 1 says so (Intel SDM vol. 1, 13.4.3). The formula of
    KVM's ``xstate_required_size`` and QEMU's ``xsave_area_size``."""
    areas = {e.index: e for e in entries if e.function == 0xD and e.index >= 2}
    size = XSAVE_LEGACY_AND_HEADER
    for index in sorted(i for i in areas if components >> i & 1):
        area = areas[index]
        if compacted:
            offset = (size + 63) & ~63 if area.ecx & XSAVE_ALIGN64 else size
            size = offset + area.eax
        else:
            size = max(size, area.ebx + area.eax)
    return size


def _xsave_leaf(table: _Table) -> None:
    """Leaf 0xD from the features this table offers (as QEMU's ``cpu_x86_cpuid`` does): only the
    components whose features are offered, and of those only what the hypervisor supports, are
    in XCR0 (0xD.0 EAX/EDX) and IA32_XSS (0xD.1 ECX/EDX, only with XSAVES); the other component
    sub-leaves are dropped (they read as zero); 0xD.0 EBX and ECX are the standard-format size
    of every offered user component, 0xD.1 EBX the compacted size with the supervisor ones
    (what each reads once the guest enabled them all: KVM recomputes EBX from the guest's XCR0
    and XSS at run time, a static CPUID as ``emu``'s does not). Without XSAVE, leaf 0xD is zero.
    """
    if not table.all(0xD):
        return
    flags = CPUID_FLAG_SIGNIFICANT_INDEX
    if not table.has(FEATURES["xsave"]):
        table.replace_leaf(0xD, [CpuIdEntry(0xD, 0, flags), CpuIdEntry(0xD, 1, flags)])
        return
    main = table.find(0xD, 0) or CpuIdEntry(0xD, 0, flags)
    extended = table.find(0xD, 1) or CpuIdEntry(0xD, 1, flags)
    areas = {e.index: e for e in table.all(0xD) if e.index >= 2}

    def offered(index: int) -> bool:
        if index < 2:
            return True
        gates = XSAVE_COMPONENTS.get(index)
        return index in areas and areas[index].eax != 0 and (gates is None or any(map(table.has, gates)))

    def mask(supported: int) -> int:
        return sum(1 << i for i in range(64) if supported >> i & 1 and offered(i))

    xcr0 = mask(main.eax | main.edx << 32)
    xss = mask(extended.ecx | extended.edx << 32) if table.has(FEATURES["xsaves"]) else 0
    size = xsave_area_size(areas.values(), xcr0)
    compacts = table.has(FEATURES["xsavec"]) or table.has(FEATURES["xsaves"])
    compacted = xsave_area_size(areas.values(), xcr0 | xss, compacted=True) if compacts else 0
    rows = [
        CpuIdEntry(0xD, 0, main.flags | flags, eax=xcr0 & 0xFFFFFFFF, ebx=size, ecx=size, edx=xcr0 >> 32),
        CpuIdEntry(
            0xD, 1, extended.flags | flags, eax=extended.eax, ebx=compacted, ecx=xss & 0xFFFFFFFF, edx=xss >> 32
        ),
        *(areas[i] for i in sorted(areas) if (xcr0 | xss) >> i & 1),
    ]
    table.replace_leaf(0xD, rows)


def _leaf1(table: _Table, topology: Topology, apic_id: int) -> None:
    entry = table.find(1)
    if entry is None:
        return
    addressable = min(1 << topology.package_shift, 0xFF)
    ebx = (entry.ebx & 0xFFFF) | (addressable << 16) | ((apic_id & 0xFF) << 24)
    edx = entry.edx | HTT if topology.logical_per_package > 1 else entry.edx & ~HTT
    table.update(entry, ebx=ebx, ecx=entry.ecx | HYPERVISOR, edx=edx)


def _cache_leaf(table: _Table, leaf: int, topology: Topology, *, cores_field: bool) -> None:
    """Leaf 4 (Intel) / 0x8000001D (AMD): threads sharing each cache (and cores per package)."""
    for entry in table.all(leaf):
        if entry.eax & 0x1F == 0:
            continue
        level = (entry.eax >> 5) & 7
        width = topology.thread_width if level <= 2 else topology.package_shift
        eax = (entry.eax & ~(0xFFF << 14)) | ((((1 << width) - 1) & 0xFFF) << 14)
        if cores_field:
            cores = min((1 << (topology.core_width + topology.die_width)) - 1, 63)
            eax = (eax & 0x03FFFFFF) | (cores << 26)
        table.update(entry, eax=eax)


def _extended_topology(table: _Table, topology: Topology, apic_id: int) -> None:
    """Leaves 0xB and 0x1F: one subleaf per topology level, then an invalid one."""
    t = topology
    significant = CPUID_FLAG_SIGNIFICANT_INDEX
    if table.all(0xB) or table.max_basic() >= 0xB:
        levels = [(t.thread_width, t.threads_per_core, 1), (t.package_shift, t.logical_per_package, 2)]
        table.replace_leaf(0xB, _levels(0xB, levels, apic_id, significant))
    wants_die_level = t.dies_per_package > 1 and table.vendor() == b"GenuineIntel"
    if table.all(0x1F) or wants_die_level:
        levels = [
            (t.thread_width, t.threads_per_core, 1),
            (t.thread_width + t.core_width, t.threads_per_core * t.cores_per_die, 2),
            (t.package_shift, t.logical_per_package, 5),
        ]
        table.replace_leaf(0x1F, _levels(0x1F, levels, apic_id, significant))
        leaf0 = table.find(0)
        if leaf0 is not None and leaf0.eax < 0x1F:
            table.update(leaf0, eax=0x1F)


def _levels(leaf: int, levels: Sequence[tuple[int, int, int]], apic_id: int, flags: int) -> list[CpuIdEntry]:
    rows = [
        CpuIdEntry(leaf, i, flags, eax=shift, ebx=min(count, 0xFFFF), ecx=i | (level_type << 8), edx=apic_id)
        for i, (shift, count, level_type) in enumerate(levels)
    ]
    rows.append(CpuIdEntry(leaf, len(levels), flags, ecx=len(levels), edx=apic_id))
    return rows


def _amd_topology(table: _Table, topology: Topology, index: int, apic_id: int) -> None:
    t = topology
    entry = table.find(0x80000008)
    if entry is not None:
        ecx = (entry.ecx & ~0xF0FF) | ((t.logical_per_package - 1) & 0xFF) | ((t.package_shift & 0xF) << 12)
        table.update(entry, ecx=ecx)
    _cache_leaf(table, 0x8000001D, topology, cores_field=False)
    entry = table.find(0x8000001E)
    if entry is not None:
        package, die, _core, _thread = t.location(index)
        core_id = (apic_id >> t.thread_width) & 0xFF
        node = package * t.dies_per_package + die
        table.update(
            entry,
            eax=apic_id,
            ebx=(entry.ebx & ~0xFFFF) | ((t.threads_per_core - 1) << 8) | core_id,
            ecx=(entry.ecx & ~0x7FF) | ((t.dies_per_package - 1) << 8) | (node & 0xFF),
        )
