"""vmmkit's x86-64 architecture plugin (distribution ``vmmkit-x86-64``).

- :mod:`~vmmkit_x86_64.arch`: :class:`X86_64`, the :class:`vmmkit.arch.Architecture`
- :mod:`~vmmkit_x86_64.plugin`: the hook implementations (registration, kernel loaders)
- loaders: :mod:`~vmmkit_x86_64.elf` (vmlinux, PVH), :mod:`~vmmkit_x86_64.bzimage`,
  :mod:`~vmmkit_x86_64.loaders` (try them in order)
- guest memory: :mod:`~vmmkit_x86_64.layout`, :mod:`~vmmkit_x86_64.e820`,
  :mod:`~vmmkit_x86_64.boot` (zero page, PVH start info, GDT, page tables), :mod:`~vmmkit_x86_64.acpi`
  (tables and an AML builder), :mod:`~vmmkit_x86_64.mptable`
- vCPUs: :mod:`~vmmkit_x86_64.cpuid`, :mod:`~vmmkit_x86_64.vcpu`, :mod:`~vmmkit_x86_64.topology`
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["X86_64", "__version__"]


def __getattr__(name: str) -> object:
    if name == "X86_64":
        from vmmkit_x86_64.arch import X86_64

        return X86_64
    raise AttributeError(name)
