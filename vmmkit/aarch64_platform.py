"""The AArch64 platform's interrupt controller in a snapshot, backend-neutral: a GICv3 (and its
ITS) as the guest sees it, register by register, in the GIC architecture's terms (Arm IHI 0069,
"GIC architecture specification", 12: the register offsets; 12.2: the CPU interface's system
registers). A backend's :class:`vmmkit.hypervisor.Vm` that has a GICv3 saves it in this layout
(version :data:`STATE_VERSION`); KVM reads and writes these very offsets through
``KVM_DEV_ARM_VGIC_GRP_DIST_REGS`` / ``REDIST_REGS`` / ``CPU_SYSREGS`` (Linux
Documentation/virt/kvm/devices/arm-vgic-v3.rst), as Cloud Hypervisor and Firecracker do
(``hypervisor/src/arch/aarch64/gic``, ``src/vmm/src/arch/aarch64/gic/gicv3/regs``)::

    gic  null (no GIC) or
         {"nr_irqs": INTIDs below it exist (32 private + SPIs),
          "distributor": {"0x0000": u32, ...}      GICD registers by offset (32-bit accesses),
          "line_levels": [u32, ...]                the input level of the SPIs (32 per word),
          "redistributors": [{"mpidr": the vCPU's MPIDR_EL1,
                              "registers": {"0x0000": u32, ...}   GICR_* (the SGI frame at 0x10000),
                              "cpu_interface": {"ICC_PMR_EL1": u64, ...}}, ...]}
    its  null (no ITS) or {"registers": {"0x0000": u64, ...}} (GITS_* by offset); its tables
         (device, collection, interrupt translation) are in guest RAM, written there when the
         snapshot is taken (``KVM_DEV_ARM_ITS_SAVE_TABLES``), as the LPI pending tables are.

Which registers: :func:`distributor_offsets`, :data:`REDISTRIBUTOR_OFFSETS` and
:data:`CPU_INTERFACE_REGISTERS` list them in the order a restore writes them (the enables last).
A backend without a GICv3 (emu) takes a state whose GIC the guest never enabled
(:meth:`GicState.in_use`) and refuses one it did, saying so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from attrs import frozen

from vmmkit.state import StateError, field, int_field

STATE_VERSION: Final = 1

GICD_CTLR: Final = 0x0000
GICD_IGROUPR: Final = 0x0080
GICD_ISENABLER: Final = 0x0100
GICD_ISPENDR: Final = 0x0200
GICD_ISACTIVER: Final = 0x0300
GICD_IPRIORITYR: Final = 0x0400
GICD_ICFGR: Final = 0x0C00
GICD_IGRPMODR: Final = 0x0D00
GICD_IROUTER: Final = 0x6000
#: GICD_CTLR: EnableGrp0, EnableGrp1NS (EnableGrp1A with ARE).
GICD_CTLR_ENABLES: Final = 0x3

GICR_CTLR: Final = 0x0000
GICR_PROPBASER: Final = 0x0070
GICR_PENDBASER: Final = 0x0078
SGI_FRAME: Final = 0x1_0000
GICR_IGROUPR0: Final = SGI_FRAME + 0x0080
GICR_ISENABLER0: Final = SGI_FRAME + 0x0100
GICR_ISPENDR0: Final = SGI_FRAME + 0x0200
GICR_ISACTIVER0: Final = SGI_FRAME + 0x0300
GICR_IPRIORITYR0: Final = SGI_FRAME + 0x0400
GICR_ICFGR0: Final = SGI_FRAME + 0x0C00
GICR_IGRPMODR0: Final = SGI_FRAME + 0x0D00
#: GICR_CTLR.EnableLPIs.
GICR_CTLR_ENABLE_LPIS: Final = 1 << 0

#: The redistributor's registers, 32-bit words, in restore order: the LPI tables' bases before
#: GICR_CTLR (KVM ignores PROPBASER/PENDBASER writes once LPIs are enabled), which comes last.
REDISTRIBUTOR_OFFSETS: Final = (
    GICR_PROPBASER, GICR_PROPBASER + 4, GICR_PENDBASER, GICR_PENDBASER + 4,
    GICR_IGROUPR0, GICR_ICFGR0, GICR_ICFGR0 + 4, GICR_IGRPMODR0,
    *(GICR_IPRIORITYR0 + 4 * i for i in range(8)),
    GICR_ISENABLER0, GICR_ISPENDR0, GICR_ISACTIVER0,
    GICR_CTLR,
)

#: The CPU interface's system registers ``(name, (op0, op1, CRn, CRm, op2))`` in restore order
#: (ICC_SRE_EL1 and ICC_CTLR_EL1 first, the group enables last). ICC_AP0R<n>/AP1R<n> exist
#: up to the number the priority bits imply (:func:`active_priority_registers`).
ICC_SRE_EL1: Final = (3, 0, 12, 12, 5)
ICC_CTLR_EL1: Final = (3, 0, 12, 12, 4)
ICC_IGRPEN0_EL1: Final = (3, 0, 12, 12, 6)
ICC_IGRPEN1_EL1: Final = (3, 0, 12, 12, 7)
CPU_INTERFACE_REGISTERS: Final = (
    ("ICC_SRE_EL1", ICC_SRE_EL1),
    ("ICC_CTLR_EL1", ICC_CTLR_EL1),
    ("ICC_PMR_EL1", (3, 0, 4, 6, 0)),
    ("ICC_BPR0_EL1", (3, 0, 12, 8, 3)),
    ("ICC_BPR1_EL1", (3, 0, 12, 12, 3)),
    *((f"ICC_AP0R{n}_EL1", (3, 0, 12, 8, 4 + n)) for n in range(4)),
    *((f"ICC_AP1R{n}_EL1", (3, 0, 12, 9, n)) for n in range(4)),
    ("ICC_IGRPEN0_EL1", ICC_IGRPEN0_EL1),
    ("ICC_IGRPEN1_EL1", ICC_IGRPEN1_EL1),
)


def active_priority_registers(icc_ctlr: int) -> int:
    """How many ICC_AP<g>R<n>_EL1 exist per group (GIC 12.2.6: ICC_CTLR_EL1.PRIbits, bits
    [10:8], is the number of priority bits minus one; 5 bits: 1, 6: 2, 7: 4)."""
    bits = ((icc_ctlr >> 8) & 7) + 1
    return {5: 1, 6: 2, 7: 4}.get(bits, 1)


def cpu_interface_registers(icc_ctlr: int) -> tuple[tuple[str, tuple[int, int, int, int, int]], ...]:
    """:data:`CPU_INTERFACE_REGISTERS` that exist with this ICC_CTLR_EL1."""
    count = active_priority_registers(icc_ctlr)
    return tuple((name, enc) for name, enc in CPU_INTERFACE_REGISTERS
                 if not name.startswith("ICC_AP") or int(name[8]) < count)


def distributor_offsets(nr_irqs: int) -> tuple[int, ...]:
    """The distributor's 32-bit words for ``nr_irqs`` INTIDs, in restore order: the SPIs'
    configuration (the private INTIDs' words are the redistributors'), their routes (GICD_IROUTER,
    64-bit: two words), the enable, pending and active bits, GICD_CTLR last."""
    spis = range(32, nr_irqs)
    words = range(1, nr_irqs // 32)
    out = [GICD_IGROUPR + 4 * w for w in words]
    out += [GICD_ICFGR + 4 * w for w in range(2, nr_irqs // 16)]
    out += [GICD_IGRPMODR + 4 * w for w in words]
    out += [GICD_IPRIORITYR + 4 * w for w in range(8, nr_irqs // 4)]
    for irq in spis:
        out += [GICD_IROUTER + 8 * irq, GICD_IROUTER + 8 * irq + 4]
    for base in (GICD_ISENABLER, GICD_ISPENDR, GICD_ISACTIVER):
        out += [base + 4 * w for w in words]
    out.append(GICD_CTLR)
    return tuple(out)


#: The ITS's registers (64-bit), in restore order (devices/arm-vgic-its.rst, "ITS Restore
#: Sequence"): GITS_IIDR first, GITS_CBASER before GITS_CREADR/CWRITER, the GITS_BASER<n>, then
#: the tables are loaded (``KVM_DEV_ARM_ITS_RESTORE_TABLES``) and GITS_CTLR comes last.
GITS_CTLR: Final = 0x0000
GITS_IIDR: Final = 0x0004
GITS_CBASER: Final = 0x0080
GITS_CWRITER: Final = 0x0088
GITS_CREADR: Final = 0x0090
GITS_BASER: Final = 0x0100
ITS_OFFSETS: Final = (GITS_IIDR, GITS_CBASER, GITS_CREADR, GITS_CWRITER,
                      *(GITS_BASER + 8 * n for n in range(8)), GITS_CTLR)
GITS_CTLR_ENABLED: Final = 1 << 0


@frozen
class Redistributor:
    mpidr: int
    registers: Mapping[int, int]
    cpu_interface: Mapping[str, int]


@frozen
class GicState:
    nr_irqs: int
    distributor: Mapping[int, int]
    line_levels: tuple[int, ...]
    redistributors: tuple[Redistributor, ...]

    def in_use(self) -> str | None:
        """What the guest enabled (a reason a backend without a GIC cannot take), or None."""
        if self.distributor.get(GICD_CTLR, 0) & GICD_CTLR_ENABLES:
            return "the guest enabled the GICv3 distributor (GICD_CTLR)"
        for redist in self.redistributors:
            for name in ("ICC_IGRPEN0_EL1", "ICC_IGRPEN1_EL1"):
                if redist.cpu_interface.get(name, 0) & 1:
                    return f"the guest enabled interrupts at the CPU interface of MPIDR {redist.mpidr:#x} ({name})"
            if redist.registers.get(GICR_CTLR, 0) & GICR_CTLR_ENABLE_LPIS:
                return f"the guest enabled LPIs at the redistributor of MPIDR {redist.mpidr:#x}"
        return None


@frozen
class ItsState:
    registers: Mapping[int, int]

    def in_use(self) -> str | None:
        if self.registers.get(GITS_CTLR, 0) & GITS_CTLR_ENABLED:
            return "the guest enabled the GICv3 ITS (GITS_CTLR)"
        return None


@frozen
class PlatformState:
    gic: GicState | None
    its: ItsState | None


def _registers(values: Mapping[int, int]) -> dict[str, int]:
    return {f"{offset:#06x}": value for offset, value in values.items()}


def platform_state(gic: GicState | None = None, its: ItsState | None = None) -> dict[str, Any]:
    """The JSON-able layout of the module docstring."""
    return {
        "gic": None if gic is None else {
            "nr_irqs": gic.nr_irqs,
            "distributor": _registers(gic.distributor),
            "line_levels": list(gic.line_levels),
            "redistributors": [{"mpidr": r.mpidr, "registers": _registers(r.registers),
                                "cpu_interface": dict(r.cpu_interface)} for r in gic.redistributors],
        },
        "its": None if its is None else {"registers": _registers(its.registers)},
    }


def _parse_registers(raw: Any, what: str, allowed: set[int], bits: int) -> dict[int, int]:
    if not isinstance(raw, Mapping):
        raise StateError(f"{what}: expected an object")
    out = {}
    for key, value in raw.items():
        try:
            offset = int(key, 16) if isinstance(key, str) else -1
        except ValueError:
            offset = -1
        if offset not in allowed:
            raise StateError(f"{what}: {key!r} is not a register this layout has")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
            raise StateError(f"{what}.{key}: {value!r} is not a {bits}-bit value")
        out[offset] = value
    return out


def parse_platform_state(state: Mapping[str, Any]) -> PlatformState:
    """:raises StateError: malformed (unknown registers, values out of range)."""
    if not isinstance(state, Mapping):
        raise StateError("vm: expected an object")
    gic = None
    raw = state.get("gic")
    if raw is not None:
        nr_irqs = int_field(raw, "nr_irqs", "vm.gic", 64, 1020)
        if nr_irqs % 32:
            raise StateError(f"vm.gic.nr_irqs: {nr_irqs} is not a multiple of 32")
        distributor = _parse_registers(field(raw, "distributor", dict, "vm.gic"), "vm.gic.distributor",
                                       set(distributor_offsets(nr_irqs)), 32)
        levels = field(raw, "line_levels", list, "vm.gic")
        if len(levels) > nr_irqs // 32 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                  and 0 <= v < 1 << 32 for v in levels):
            raise StateError("vm.gic.line_levels: expected at most one 32-bit word per 32 SPIs")
        redistributors = []
        names = {name for name, _ in CPU_INTERFACE_REGISTERS}
        for index, entry in enumerate(field(raw, "redistributors", list, "vm.gic")):
            what = f"vm.gic.redistributors[{index}]"
            cpu = field(entry, "cpu_interface", dict, what)
            for name, value in cpu.items():
                if name not in names or not isinstance(value, int) or isinstance(value, bool) \
                        or not 0 <= value < 1 << 64:
                    raise StateError(f"{what}.cpu_interface: bad entry {name!r}")
            redistributors.append(Redistributor(
                int_field(entry, "mpidr", what),
                _parse_registers(field(entry, "registers", dict, what), f"{what}.registers",
                                 set(REDISTRIBUTOR_OFFSETS), 32),
                dict(cpu)))
        gic = GicState(nr_irqs, distributor, tuple(levels), tuple(redistributors))
    its = None
    raw_its = state.get("its")
    if raw_its is not None:
        its = ItsState(_parse_registers(field(raw_its, "registers", dict, "vm.its"), "vm.its.registers",
                                        set(ITS_OFFSETS), 64))
    return PlatformState(gic, its)
