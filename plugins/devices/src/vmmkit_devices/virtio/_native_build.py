"""cffi build script for ``vmmkit_devices.virtio._native`` (out-of-line API mode): the
virtio-blk data path and queue in C (``native/blk_io.c``, ``native/blk_queue.c``) and the
virtio-net queues (``native/net_queue.c``).

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

#define BLKQ_STOPPED ...
#define BLKQ_SIGNAL ...
#define BLKQ_BROKEN ...
#define BLKQ_IDLE ...
#define BLKQ_ERR_AVAIL_INDEX ...
#define BLKQ_ERR_DEVICE ...
#define BLKQ_F_EVENT_IDX ...
#define BLKQ_F_INDIRECT ...
#define BLKQ_F_FLUSH ...
#define BLKQ_F_DISCARD ...
#define BLKQ_F_WRITE_ZEROES ...
#define BLKQ_F_SPARSE ...
#define BLKQ_COUNTERS ...
#define BLKQ_ID_BYTES ...
#define BLKQ_MAX_SLOTS ...

struct blkq_vq_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
    uint32_t readonly;
    ...;
};
struct blkq_vq_memory {
    const struct blkq_vq_region *regions;
    uint32_t count;
    ...;
};
struct blkq_vq_chain {
    uint32_t count;
    uint32_t readable;
    uint32_t descriptors;
    uint64_t readable_bytes;
    uint64_t writable_bytes;
    ...;
};
typedef int (*blkq_walk_fn)(const struct blkq_vq_memory *mem, uint64_t desc_gpa,
                            uint32_t queue_size, uint32_t head, uint32_t flags,
                            struct iovec *iov, uint64_t *gpa, uint32_t capacity,
                            struct blkq_vq_chain *out);
struct blkq {
    blkq_walk_fn walk;
    const struct blkq_vq_memory *vq_mem;
    const struct blk_memory *blk_mem;
    struct blk_disk disk;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint32_t size;
    uint32_t flags;
    uint32_t max_segments;
    uint32_t slots;
    int kick_fd;
    int wake_fd;
    int irq_fd;
    uint8_t serial[20];
    uint16_t last_avail;
    uint16_t next_used;
    uint16_t signalled_used;
    uint8_t signalled_valid;
    uint8_t pending_signal;
    volatile uint32_t stop;
    uint64_t counters[15];
    int32_t error_kind;
    char message[160];
    int epoll_fd;
    struct iovec *iov;
    uint64_t *gpa;
    void *pool;
    ...;
};

int blkq_run(struct blkq *q);
int blkq_process(struct blkq *q);
int blkq_needs_signal(struct blkq *q);
void blkq_release(struct blkq *q);

#define NETQ_STOPPED ...
#define NETQ_SIGNAL ...
#define NETQ_BROKEN ...
#define NETQ_IDLE ...
#define NETQ_ERR_AVAIL_INDEX ...
#define NETQ_ERR_DEVICE ...
#define NETQ_F_EVENT_IDX ...
#define NETQ_F_INDIRECT ...
#define NETQ_F_MRG_RXBUF ...
#define NETQ_F_GUEST_CSUM ...
#define NETQ_F_CSUM ...
#define NETQ_F_HOST_TSO4 ...
#define NETQ_F_HOST_TSO6 ...
#define NETQ_F_HOST_ECN ...
#define NETQ_F_HOST_UFO ...
#define NETQ_HDR_SIZE ...
#define NETQ_MAX_FRAME ...
#define NETQ_MAX_RX ...
#define NETQ_BURST ...
#define NETQ_COUNTERS ...

struct netq_vq_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
    uint32_t readonly;
    ...;
};
struct netq_vq_memory {
    const struct netq_vq_region *regions;
    uint32_t count;
    ...;
};
struct netq_vq_chain {
    uint32_t count;
    uint32_t readable;
    uint32_t descriptors;
    uint64_t readable_bytes;
    uint64_t writable_bytes;
    ...;
};
typedef int (*netq_walk_fn)(const struct netq_vq_memory *mem, uint64_t desc_gpa,
                            uint32_t queue_size, uint32_t head, uint32_t flags,
                            struct iovec *iov, uint64_t *gpa, uint32_t capacity,
                            struct netq_vq_chain *out);
struct netq_ring {
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint32_t size;
    int kick_fd;
    int irq_fd;
    uint16_t last_avail;
    uint16_t next_used;
    uint16_t signalled_used;
    uint8_t signalled_valid;
    uint8_t pending_signal;
    ...;
};
struct netq {
    netq_walk_fn walk;
    const struct netq_vq_memory *vq_mem;
    struct netq_ring rx, tx;
    uint32_t flags;
    uint32_t max_segments;
    int tap_fd;
    int wake_fd;
    volatile uint32_t stop;
    uint32_t signal;
    uint64_t counters[8];
    int32_t error_kind;
    int32_t error_queue;
    char message[160];
    int32_t last_errno;
    uint16_t *held;
    uint64_t *held_bytes;
    uint32_t held_count;
    uint32_t pending_len;
    int epoll_fd;
    uint32_t tap_armed;
    struct iovec *iov;
    uint64_t *gpa;
    uint8_t *frame;
    ...;
};

int netq_run(struct netq *q);
int netq_process(struct netq *q);
void netq_release(struct netq *q);
"""

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fno-strict-aliasing"]


def make_ffibuilder(
    module: str = "vmmkit_devices.virtio._native", *, extra_compile_args: Sequence[str] = (),
    extra_link_args: Sequence[str] = (), relative: bool = True,
) -> FFI:
    builder = FFI()
    builder.cdef(CDEF)
    sources = [NATIVE / "blk_io.c", NATIVE / "blk_queue.c", NATIVE / "net_queue.c"]
    builder.set_source(
        module,
        '#include <sys/uio.h>\n#include "blk_io.h"\n#include "blk_queue.h"\n#include "net_queue.h"',
        # cffi wants the path relative to the directory setup.py runs in.
        sources=[os.path.relpath(source) if relative else str(source) for source in sources],
        include_dirs=[str(NATIVE)],
        extra_compile_args=[*CFLAGS, *extra_compile_args],
        extra_link_args=list(extra_link_args),
    )
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
