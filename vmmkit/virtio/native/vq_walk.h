/*
 * vq_walk: walk one split-virtqueue descriptor chain in guest memory (virtio 1.2, 2.7.5).
 *
 * Everything read from guest memory is hostile: every index, address and length is checked
 * here before use, with overflow-safe arithmetic, and nothing outside the region table is
 * ever read or handed out. The Python walker in vmmkit/virtio/chain.py is the reference this
 * code is fuzzed against; change both together.
 *
 * The result is a scatter-gather list a data path can give straight to preadv/pwritev:
 * iov[0 .. readable) are device-readable buffers, iov[readable .. count) device-writable ones
 * (a chain lists its readable buffers first; a readable one after a writable one is an error).
 * A buffer that spans adjacent guest memory regions is split into one iovec per region.
 */
#ifndef VMMKIT_VQ_WALK_H
#define VMMKIT_VQ_WALK_H

#include <stdint.h>
#include <sys/uio.h>

/* Results (vmmkit.virtio.chain.ErrorKind has the same values). */
#define VQ_OK 0
#define VQ_ERR_INDEX 1     /* a head or next index beyond the queue (or indirect table) */
#define VQ_ERR_LOOP 2      /* more descriptors than the table holds: a loop */
#define VQ_ERR_ADDRESS 3   /* a buffer outside guest RAM (or writable in read-only memory) */
#define VQ_ERR_ORDER 4     /* a device-readable buffer after a device-writable one */
#define VQ_ERR_INDIRECT 5  /* indirect table misuse (not negotiated, nested, bad size/place) */
#define VQ_ERR_TOO_LARGE 6 /* more than VQ_MAX_CHAIN_BYTES in total */
#define VQ_ERR_TOO_MANY 7  /* more buffers than the caller's iovec array holds */
#define VQ_ERR_RING 8      /* bad queue size, or the descriptor table is not inside one region */

#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2
#define VQ_DESC_F_INDIRECT 4

#define VQ_MAX_QUEUE_SIZE 32768
#define VQ_MAX_INDIRECT 65535            /* entries in one indirect table */
#define VQ_MAX_CHAIN_BYTES 0x100000000ULL /* 2^32: "no chain longer than 2^32 bytes" */

/* vq_walk_chain() flags */
#define VQ_WALK_INDIRECT 1 /* VIRTIO_F_INDIRECT_DESC was negotiated */

/* One guest RAM region: [gpa, gpa + size) is mapped at host. Sorted by gpa, disjoint. */
struct vq_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
    uint32_t readonly;
};

struct vq_memory {
    const struct vq_region *regions;
    uint32_t count;
};

/* What a walk found. Valid (and only partly filled on error) after every call. */
struct vq_chain {
    uint32_t count;          /* iovecs filled */
    uint32_t readable;       /* iov[0 .. readable) are device-readable */
    uint32_t descriptors;    /* descriptors read, indirect ones included */
    uint64_t readable_bytes;
    uint64_t writable_bytes;
};

/* The host address of [gpa, gpa + len) if it lies inside one region, else NULL. */
uint8_t *vq_translate(const struct vq_memory *mem, uint64_t gpa, uint64_t len);

/*
 * Walk the chain starting at descriptor `head` of the table at `desc_gpa` (queue_size
 * entries). Fills iov[] and gpa[] (each `capacity` entries) and *out. Returns VQ_OK or a
 * VQ_ERR_* code; on error the arrays hold nothing the caller may use.
 */
int vq_walk_chain(const struct vq_memory *mem, uint64_t desc_gpa, uint32_t queue_size,
                  uint32_t head, uint32_t flags, struct iovec *iov, uint64_t *gpa,
                  uint32_t capacity, struct vq_chain *out);

/* A full memory barrier, for the ring protocol's ordering points. */
void vq_fence(void);

#endif
