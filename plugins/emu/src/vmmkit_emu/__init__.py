"""vmmkit-emu: a software-emulation backend for vmmkit, built on the unicorn CPU emulator.

Registered through the ``vmmkit`` entry-point group (:mod:`vmmkit_emu.plugin`); the classes
live in :mod:`vmmkit_emu.hypervisor` (x86-64 vCPUs in :mod:`vmmkit_emu.x86`, AArch64 vCPUs in
:mod:`vmmkit_emu.arm64`). Importing this package does not import unicorn.
"""

from __future__ import annotations

__version__ = "0.1.0"
