"""cffi build script for ``vmmkit_devices.virtio._native`` (out-of-line API mode): the
virtio-blk data path in C (``vmmkit_devices/virtio/native/blk_io.c``).

Built by ``plugins/devices/setup.py`` (``cffi_modules``). :func:`make_ffibuilder` also serves
the tests, which may build a sanitizer variant of the same C under another module name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "native"

CDEF = r"""
#define BLK_OK ...
#define BLK_ERR_RANGE ...
#define BLK_ERR_IOVEC ...
#define BLK_ERR_TOO_MANY ...
#define BLK_ERR_READONLY ...
#define BLK_ERR_ARGS ...
#define BLK_ERR_IO ...
#define BLK_SECTOR_SIZE ...
#define BLK_MAX_IOV ...

struct iovec {
    void *iov_base;
    size_t iov_len;
    ...;
};
struct blk_region {
    uint64_t gpa;
    uint8_t *host;
    uint64_t size;
    uint32_t readonly;
    ...;
};
struct blk_memory {
    const struct blk_region *regions;
    uint32_t count;
    ...;
};
struct blk_disk {
    int fd;
    int direct_fd;
    uint32_t mem_align;
    uint32_t offset_align;
    uint64_t size;
    uint32_t readonly;
    ...;
};
struct blk_result {
    uint64_t bytes;
    int32_t error;
    uint32_t direct;
    uint32_t fallback;
    uint32_t einval;
    uint32_t emulated;
    ...;
};

int blk_transfer(const struct blk_disk *disk, const struct blk_memory *mem, int write,
                 uint64_t offset, const struct iovec *iov, const uint64_t *gpa, uint32_t count,
                 uint64_t skip, uint64_t length, struct blk_result *out);
int blk_discard(const struct blk_disk *disk, uint64_t offset, uint64_t length,
                struct blk_result *out);
int blk_write_zeroes(const struct blk_disk *disk, uint64_t offset, uint64_t length, int unmap,
                     struct blk_result *out);
int blk_flush(const struct blk_disk *disk, struct blk_result *out);
"""

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fno-strict-aliasing"]


def make_ffibuilder(
    module: str = "vmmkit_devices.virtio._native", *, extra_compile_args: Sequence[str] = (),
    extra_link_args: Sequence[str] = (), relative: bool = True,
) -> FFI:
    builder = FFI()
    builder.cdef(CDEF)
    source = NATIVE / "blk_io.c"
    builder.set_source(
        module,
        '#include <sys/uio.h>\n#include "blk_io.h"',
        # cffi wants the path relative to the directory setup.py runs in.
        sources=[os.path.relpath(source) if relative else str(source)],
        include_dirs=[str(NATIVE)],
        extra_compile_args=[*CFLAGS, *extra_compile_args],
        extra_link_args=list(extra_link_args),
    )
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
