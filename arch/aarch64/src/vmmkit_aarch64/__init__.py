"""vmmkit's AArch64 architecture plugin: arm64 Image loader, device tree, PSCI, vCPU set-up."""

__version__ = "0.1.0"
