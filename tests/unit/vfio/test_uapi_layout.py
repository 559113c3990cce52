"""The plugin's ioctl numbers, flags and struct layouts against the host's own
``<linux/vfio.h>``, compiled with gcc (real headers, no simulation)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from vmmkit_devices.vfio import uapi

HEADER = Path("/usr/include/linux/vfio.h")

CONSTANTS = [
    "VFIO_API_VERSION", "VFIO_TYPE1_IOMMU", "VFIO_TYPE1v2_IOMMU",
    "VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_SET_IOMMU", "VFIO_GROUP_GET_STATUS",
    "VFIO_GROUP_SET_CONTAINER", "VFIO_GROUP_UNSET_CONTAINER", "VFIO_GROUP_GET_DEVICE_FD",
    "VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_GET_REGION_INFO", "VFIO_DEVICE_GET_IRQ_INFO", "VFIO_DEVICE_SET_IRQS",
    "VFIO_DEVICE_RESET", "VFIO_IOMMU_GET_INFO", "VFIO_IOMMU_MAP_DMA", "VFIO_IOMMU_UNMAP_DMA",
    "VFIO_GROUP_FLAGS_VIABLE", "VFIO_GROUP_FLAGS_CONTAINER_SET", "VFIO_DEVICE_FLAGS_RESET",
    "VFIO_DEVICE_FLAGS_PCI", "VFIO_REGION_INFO_FLAG_READ", "VFIO_REGION_INFO_FLAG_WRITE",
    "VFIO_REGION_INFO_FLAG_MMAP", "VFIO_REGION_INFO_FLAG_CAPS", "VFIO_REGION_INFO_CAP_SPARSE_MMAP",
    "VFIO_REGION_INFO_CAP_TYPE", "VFIO_REGION_INFO_CAP_MSIX_MAPPABLE", "VFIO_PCI_BAR0_REGION_INDEX",
    "VFIO_PCI_ROM_REGION_INDEX", "VFIO_PCI_CONFIG_REGION_INDEX", "VFIO_PCI_INTX_IRQ_INDEX",
    "VFIO_PCI_MSI_IRQ_INDEX", "VFIO_PCI_MSIX_IRQ_INDEX", "VFIO_IRQ_INFO_EVENTFD", "VFIO_IRQ_INFO_MASKABLE",
    "VFIO_IRQ_INFO_AUTOMASKED", "VFIO_IRQ_INFO_NORESIZE", "VFIO_IRQ_SET_DATA_NONE", "VFIO_IRQ_SET_DATA_BOOL",
    "VFIO_IRQ_SET_DATA_EVENTFD", "VFIO_IRQ_SET_ACTION_MASK", "VFIO_IRQ_SET_ACTION_UNMASK",
    "VFIO_IRQ_SET_ACTION_TRIGGER", "VFIO_IRQ_SET_DATA_TYPE_MASK", "VFIO_IRQ_SET_ACTION_TYPE_MASK",
    "VFIO_DMA_MAP_FLAG_READ", "VFIO_DMA_MAP_FLAG_WRITE",
]

STRUCTS = {
    "vfio_group_status": uapi.GROUP_STATUS, "vfio_device_info": uapi.DEVICE_INFO,
    "vfio_region_info": uapi.REGION_INFO, "vfio_info_cap_header": uapi.INFO_CAP_HEADER,
    "vfio_region_sparse_mmap_area": uapi.SPARSE_MMAP_AREA, "vfio_irq_info": uapi.IRQ_INFO,
    "vfio_irq_set": uapi.IRQ_SET, "vfio_iommu_type1_dma_map": uapi.DMA_MAP,
    "vfio_iommu_type1_dma_unmap": uapi.DMA_UNMAP,
}

#: (struct, field, offset in our layout)
OFFSETS = [
    ("vfio_device_info", "cap_offset", 16),
    ("vfio_region_info", "size", 16), ("vfio_region_info", "offset", 24), ("vfio_region_info", "cap_offset", 12),
    ("vfio_region_info_cap_sparse_mmap", "nr_areas", 8), ("vfio_region_info_cap_sparse_mmap", "areas", 16),
    ("vfio_irq_set", "data", 20), ("vfio_iommu_type1_dma_map", "vaddr", 8), ("vfio_iommu_type1_dma_map", "iova", 16),
    ("vfio_iommu_type1_dma_unmap", "iova", 8), ("vfio_iommu_type1_dma_unmap", "size", 16),
]


def test_layout_matches_the_hosts_header(tmp_path: Path) -> None:
    if shutil.which("gcc") is None or not HEADER.exists():
        pytest.skip("gcc and linux/vfio.h (linux-libc-dev) are needed")
    lines = [f'printf("{name} %llu\\n", (unsigned long long)({name}));' for name in CONSTANTS]
    lines += [f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));' for name in STRUCTS]
    lines += [f'printf("offsetof {s}.{f} %zu\\n", offsetof(struct {s}, {f}));' for s, f, _ in OFFSETS]
    source = tmp_path / "layout.c"
    source.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <linux/vfio.h>\nint main(void) {\n"
                      + "\n".join(lines) + "\nreturn 0;\n}\n")
    binary = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True, capture_output=True)
    out = dict(line.rsplit(" ", 1) for line in subprocess.run([str(binary)], check=True, capture_output=True,
                                                             text=True).stdout.splitlines())
    for name in CONSTANTS:
        assert int(out[name]) == getattr(uapi, name), name
    for name, layout in STRUCTS.items():
        if name == "vfio_device_info":  # Linux 6.2+ appends a u32 pad (24 bytes); 6.1's ends at cap_offset
            assert int(out[f"sizeof {name}"]) in (20, 24) and layout.size == 24
            continue
        assert int(out[f"sizeof {name}"]) == layout.size, name
    for struct_name, field, offset in OFFSETS:
        assert int(out[f"offsetof {struct_name}.{field}"]) == offset, (struct_name, field)
    assert set(uapi.REQUESTS) <= {getattr(uapi, n) for n in CONSTANTS}
