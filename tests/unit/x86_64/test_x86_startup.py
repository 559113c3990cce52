"""Start-up cost: what importing the plugin and building a PVH boot import, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys

    def ours():
        return {name for name in sys.modules if name.startswith("vmmkit_x86_64")}

    import vmmkit_x86_64.plugin
    print("plugin", *sorted(ours()))

    from vmmkit.arch import BootInfo
    from vmmkit.config import CpusConfig, MemoryConfig, PayloadConfig, VmConfig
    from vmmkit.memory import GuestMemory, MemoryRange
    from vmmkit_x86_64.arch import X86_64

    config = VmConfig(
        payload=PayloadConfig(kernel="/k", cmdline="console=ttyS0"),
        memory=MemoryConfig(size="16M"),
        cpus=CpusConfig(boot_vcpus=1, max_vcpus=1),
    )
    arch = X86_64()
    layout = arch.memory_layout(config)
    memory = GuestMemory.allocate(layout.ram)
    boot = BootInfo(protocol="pvh", entry=0x100000, kernel=MemoryRange(0x100000, 0x1000), cmdline=b"")
    arch.prepare_boot(memory, config, layout, boot, [])
    print("pvh", *sorted(ours()))
    attrs_classes = [
        f"{name}.{attr}"
        for name in ours()
        for attr, value in vars(sys.modules[name]).items()
        if isinstance(value, type) and hasattr(value, "__attrs_attrs__") and value.__module__ == name
    ]
    print("attrs", *attrs_classes)
    """
)


def test_imports_and_class_definitions_stay_cheap() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: set(line.split()[1:]) for line in result.stdout.splitlines()}
    # Registering the architecture imports none of what only a boot needs.
    assert not lines["plugin"] & {"vmmkit_x86_64.boot", "vmmkit_x86_64.acpi", "vmmkit_x86_64.cpuid"}
    # A PVH boot needs no zero page, no page tables, and no kernel loader it did not try.
    assert "vmmkit_x86_64.acpi" in lines["pvh"]
    assert not lines["pvh"] & {"vmmkit_x86_64.bootparams", "vmmkit_x86_64.paging", "vmmkit_x86_64.bzimage"}
    # Each attrs class costs ~0.35 ms to define at start-up; the plugin's values are plain classes.
    assert lines["attrs"] == set()
