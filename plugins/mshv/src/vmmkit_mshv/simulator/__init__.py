"""A simulated ``/dev/mshv``: a CONTRACT TEST of the MSHV backend, not a hypervisor.

No vmmkit host has the Microsoft Hypervisor. This package implements the kernel's side of the
``/dev/mshv`` ABI (the ioctl numbers, the struct layouts, the argument checks and errnos of
drivers/hv/mshv_root_main.c and mshv_eventfd.c, the intercept messages of the hypervisor)
backed by the emu backend's unicorn engine, so that every line of the production backend runs
in tests: the backend reaches it only through its one seam, :class:`vmmkit_mshv.kernel.Kernel`.
A guest that runs here has run on a simulation written from the documentation, never on MSHV.

Selected only by name: ``VMMKIT_MSHV_KERNEL=simulated`` (never by ``--hypervisor auto``).
"""

from __future__ import annotations

from vmmkit_mshv.simulator.kernel import SimulatedKernel, simulated_kernel

__all__ = ["SimulatedKernel", "simulated_kernel"]
