"""vmmkit's Microsoft Hypervisor backend (``/dev/mshv``, Linux as root partition)."""
