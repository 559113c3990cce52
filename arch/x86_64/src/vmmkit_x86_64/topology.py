"""CPU topology and APIC IDs: the one place that decides which APIC ID vCPU ``index`` has.

As in Cloud Hypervisor (``get_x2apic_id``), an APIC ID is packed from the vCPU's thread, core,
die and package numbers, each field as wide as needed for its count (3 cores take 2 bits), so
CPUID leaves 0xB/0x1F describe the same IDs the MADT and MP table list.  Without a configured
topology every vCPU is a core of one die of one package, and APIC ID == vCPU index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmmkit.value import Value

if TYPE_CHECKING:
    from vmmkit.config import CpusConfig


def field_width(count: int) -> int:
    """Bits needed to number ``count`` items (0 for one item)."""
    return (count - 1).bit_length()


class Topology(Value):
    """Threads per core, cores per die, dies per package, packages (a value: never changed)."""

    __slots__ = ("threads_per_core", "cores_per_die", "dies_per_package", "packages")

    def __init__(
        self, threads_per_core: int = 1, cores_per_die: int = 1, dies_per_package: int = 1, packages: int = 1
    ) -> None:
        self.threads_per_core = threads_per_core
        self.cores_per_die = cores_per_die
        self.dies_per_package = dies_per_package
        self.packages = packages

    @classmethod
    def from_config(cls, cpus: CpusConfig) -> Topology:
        t = cpus.topology
        if t is None:
            return cls(1, cpus.max_vcpus, 1, 1)
        return cls(t.threads_per_core, t.cores_per_die, t.dies_per_package, t.packages)

    @property
    def thread_width(self) -> int:
        return field_width(self.threads_per_core)

    @property
    def core_width(self) -> int:
        return field_width(self.cores_per_die)

    @property
    def die_width(self) -> int:
        return field_width(self.dies_per_package)

    @property
    def package_shift(self) -> int:
        """Where the package number starts in an APIC ID."""
        return self.thread_width + self.core_width + self.die_width

    @property
    def logical_per_package(self) -> int:
        return self.threads_per_core * self.cores_per_die * self.dies_per_package

    @property
    def cores_per_package(self) -> int:
        return self.cores_per_die * self.dies_per_package

    def location(self, index: int) -> tuple[int, int, int, int]:
        """``(package, die, core, thread)`` of vCPU ``index``."""
        thread = index % self.threads_per_core
        core = index // self.threads_per_core % self.cores_per_die
        die = index // (self.threads_per_core * self.cores_per_die) % self.dies_per_package
        package = index // self.logical_per_package
        return package, die, core, thread

    def apic_id(self, index: int) -> int:
        package, die, core, thread = self.location(index)
        return (
            thread
            | core << self.thread_width
            | die << (self.thread_width + self.core_width)
            | package << self.package_shift
        )


def apic_ids(cpus: CpusConfig) -> list[int]:
    """The APIC ID of every possible vCPU (``max_vcpus`` of them), by index."""
    topology = Topology.from_config(cpus)
    return [topology.apic_id(i) for i in range(cpus.max_vcpus)]
