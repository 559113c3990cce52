"""Boot preparation: everything written to guest memory between loading and running.

Every boot gets the command line, ACPI tables (RSDP in the BIOS area) and an MP table. Then,
per protocol:

- ``linux64``: the zero page (setup header, e820 map, command line, initramfs, RSDP), a GDT with
  a 64-bit code segment, an empty IDT and identity page tables for the first 4 GiB.
- ``pvh``: ``hvm_start_info`` with the memory map, the module list (the initramfs) and the
  RSDP, and a GDT with a flat 32-bit code segment.

Addresses are in :mod:`vmmkit_x86_64.layout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from vmmkit.arch import BootInfo, MemoryLayout
from vmmkit.device import PlacedDevice
from vmmkit.errors import BootError
from vmmkit_x86_64 import e820, gdt, interrupts, mptable
from vmmkit_x86_64 import layout as L
from vmmkit_x86_64 import platform as P
from vmmkit_x86_64.acpi import build_acpi
from vmmkit_x86_64.topology import apic_ids

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.memory import GuestMemory

from vmmkit.log import get_logger

log = get_logger()

PROTOCOLS = ("linux64", "pvh")


def prepare_boot(
    memory: GuestMemory,
    config: VmConfig,
    layout: MemoryLayout,
    boot: BootInfo,
    devices: Sequence[PlacedDevice],
) -> BootInfo:
    kernel = config.payload.kernel or "<kernel>"
    if boot.protocol not in PROTOCOLS:
        raise BootError(
            kernel,
            f"an x86-64 guest cannot be entered through the {boot.protocol!r} protocol "
            f"(supported: {', '.join(PROTOCOLS)})",
        )
    cmdline = _final_cmdline(kernel, boot, devices)
    memory.fill(L.CMDLINE_START, L.CMDLINE_MAX_SIZE)
    memory.write(L.CMDLINE_START, cmdline + b"\0")

    ids = apic_ids(config.cpus)
    boot_vcpus = config.cpus.boot_vcpus
    memory_map = e820.e820_map(layout)
    try:
        acpi = build_acpi(layout, devices, apic_ids=ids, boot_vcpus=boot_vcpus)
    except ValueError as exc:
        raise BootError(kernel, str(exc)) from None
    acpi.write(memory)
    table = mptable.mptable(
        L.MPTABLE_START,
        apic_ids=ids,
        enabled=boot_vcpus,
        ioapic_id=interrupts.ioapic_id(ids),
        ioapic_address=L.IOAPIC_START,
        lapic_address=L.APIC_START,
    )
    if L.MPTABLE_START + len(table) > L.BIOS_START:
        raise BootError(kernel, "the MP table does not fit below the BIOS area")
    memory.fill(L.MPTABLE_START, L.BIOS_START - L.MPTABLE_START)
    memory.write(L.MPTABLE_START, table)

    long_mode = boot.protocol == "linux64"
    memory.write(L.BOOT_GDT_START, gdt.gdt_bytes(long_mode).ljust(8 * L.BOOT_GDT_MAX_ENTRIES, b"\0"))
    memory.write(L.BOOT_IDT_START, bytes(8))
    extra: dict[str, Any] = {
        **boot.extra,
        "rsdp": acpi.rsdp_address,
        "mptable": L.MPTABLE_START,
        "gdt": L.BOOT_GDT_START,
    }
    if long_mode:
        from vmmkit_x86_64 import bootparams, paging

        initramfs = (boot.initramfs.start, boot.initramfs.size) if boot.initramfs else None
        page = bootparams.zero_page(
            setup_header=boot.extra.get("setup_header"),
            load_address=boot.extra.get("load_address"),
            cmdline_address=L.CMDLINE_START,
            cmdline_size=len(cmdline),
            initramfs=initramfs,
            e820=memory_map,
            rsdp_address=acpi.rsdp_address,
        )
        memory.write(L.ZERO_PAGE_START, page)
        for address, table_page in paging.page_tables().items():
            memory.write(address, table_page)
        extra.update(zero_page=L.ZERO_PAGE_START, page_tables=L.PML4_START)
    else:
        from vmmkit_x86_64 import pvh

        modules = 0
        modlist = b""
        if boot.initramfs is not None:
            modules = 1
            modlist = pvh.modlist_entry(boot.initramfs.start, boot.initramfs.size)
        if len(memory_map) > L.PVH_MEMMAP_MAX_ENTRIES:
            raise BootError(kernel, "too many memory map entries for PVH")
        memory.write(L.PVH_MODLIST_START, modlist.ljust(L.PVH_MEMMAP_START - L.PVH_MODLIST_START, b"\0"))
        memory.write(L.PVH_MEMMAP_START, pvh.memmap(memory_map))
        info = pvh.start_info(
            nr_modules=modules,
            modlist_paddr=L.PVH_MODLIST_START if modules else 0,
            cmdline_paddr=L.CMDLINE_START,
            rsdp_paddr=acpi.rsdp_address,
            memmap_paddr=L.PVH_MEMMAP_START,
            memmap_entries=len(memory_map),
        )
        memory.write(L.PVH_INFO_START, info.ljust(0x1000, b"\0"))
        extra.update(start_info=L.PVH_INFO_START)
    log.debug(
        "boot.prepared",
        protocol=boot.protocol,
        entry=hex(boot.entry),
        rsdp=hex(acpi.rsdp_address),
        cmdline_bytes=len(cmdline),
    )
    return attrs.evolve(boot, cmdline=cmdline, extra=extra)


def _final_cmdline(kernel: str, boot: BootInfo, devices: Sequence[PlacedDevice]) -> bytes:
    """``boot.cmdline`` with the virtio-mmio arguments it lacks (for a Linux kernel, which
    finds those devices in the DSDT: without them), checked against the kernel's limit."""
    text = boot.cmdline.decode("utf-8", "surrogateescape")
    if boot.extra.get("linux"):
        text = P.kernel_cmdline_for_acpi_linux(text, devices)
    else:
        text = P.kernel_cmdline(text, devices)
    data = text.encode("utf-8", "surrogateescape")
    limit = min(int(boot.extra.get("cmdline_max", L.CMDLINE_MAX_SIZE - 1)), L.CMDLINE_MAX_SIZE - 1)
    if len(data) > limit:
        raise BootError(
            kernel, f"the kernel command line is {len(data)} bytes; this kernel accepts at most {limit}"
        )
    return data
