"""cffi build script for ``vmmkit.virtio._native`` (out-of-line API mode): the split-virtqueue
descriptor-chain walker in C (``vmmkit/virtio/native/vq_walk.c``).

Built by ``setup.py`` (``cffi_modules``). :func:`make_ffibuilder` also serves the tests,
which build a sanitizer variant of the same C under another module name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "native"

CDEF = r"""
#define VQ_OK ...
#define VQ_ERR_INDEX ...
#define VQ_ERR_LOOP ...
#define VQ_ERR_ADDRESS ...
#define VQ_ERR_ORDER ...
#define VQ_ERR_INDIRECT ...
#define VQ_ERR_TOO_LARGE ...
#define VQ_ERR_TOO_MANY ...
#define VQ_ERR_RING ...
#define VQ_DESC_F_NEXT ...
#define VQ_DESC_F_WRITE ...
#define VQ_DESC_F_INDIRECT ...
#define VQ_MAX_QUEUE_SIZE ...
#define VQ_MAX_INDIRECT ...
#define VQ_WALK_INDIRECT ...

struct iovec {
    void *iov_base;
    size_t iov_len;
    ...;
};
struct vq_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
    uint32_t readonly;
    ...;
};
struct vq_memory {
    const struct vq_region *regions;
    uint32_t count;
    ...;
};
struct vq_chain {
    uint32_t count;
    uint32_t readable;
    uint32_t descriptors;
    uint64_t readable_bytes;
    uint64_t writable_bytes;
    ...;
};

uint8_t *vq_translate(const struct vq_memory *mem, uint64_t gpa, uint64_t len);
int vq_walk_chain(const struct vq_memory *mem, uint64_t desc_gpa, uint32_t queue_size,
                  uint32_t head, uint32_t flags, struct iovec *iov, uint64_t *gpa,
                  uint32_t capacity, struct vq_chain *out);
void vq_fence(void);
"""

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fno-strict-aliasing"]


def make_ffibuilder(
    module: str = "vmmkit.virtio._native", *, extra_compile_args: Sequence[str] = (),
    extra_link_args: Sequence[str] = (), relative: bool = True,
) -> FFI:
    builder = FFI()
    builder.cdef(CDEF)
    source = NATIVE / "vq_walk.c"
    builder.set_source(
        module,
        '#include <sys/uio.h>\n#include "vq_walk.h"',
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
