"""vmmkit's Microsoft Hypervisor backend (``/dev/mshv``, Linux as root partition)."""

__version__ = "0.1.0"
