"""vmmkit's AArch64 architecture plugin."""
