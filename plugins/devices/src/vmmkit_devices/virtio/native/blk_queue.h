/*
 * blk_queue: one virtio-blk request queue served entirely in C (virtio 1.2, 2.7 and 5.2).
 *
 * A worker thread calls blkq_run() with the GIL released (cffi drops it around the call); it
 * waits on the queue's kick eventfd, pops available chains of the split ring, walks each with
 * the SDK's descriptor walker (vmmkit/virtio/native/vq_walk.c, passed in as a function pointer
 * so the fuzzed walker is the one used), serves IN / OUT / FLUSH / GET_ID / DISCARD /
 * WRITE_ZEROES through blk_io.c, writes the status byte, publishes the used ring and signals
 * the driver (an irqfd write when the transport gives one, else it returns BLKQ_SIGNAL for
 * Python to trigger the interrupt). It returns to Python only for that, to stop, or with an
 * error. Everything in guest memory is hostile: ring indices are checked against the queue
 * size, the rings were placed inside guest RAM by Python (Virtqueue.validate) and are
 * re-translated here against the region table, chains are bounded by the walker, and every
 * data buffer is checked again by blk_transfer.
 *
 * The semantics are BlockDevice.handle()'s (plugins/devices/src/vmmkit_devices/virtio/block.py),
 * the Python reference; tests/unit/devices/virtio/test_blk_queue_differential.py compares the
 * two on random and hostile request streams. Change both together.
 */
#ifndef VMMKIT_BLK_QUEUE_H
#define VMMKIT_BLK_QUEUE_H

#include <stdint.h>
#include <sys/uio.h>

#include "blk_io.h"

/* Same layout as vq_walk.h's struct vq_region / vq_memory (checked at load time by blk_io.py). */
struct blkq_vq_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
    uint32_t readonly;
};

struct blkq_vq_memory {
    const struct blkq_vq_region *regions;
    uint32_t count;
};

struct blkq_vq_chain {
    uint32_t count;
    uint32_t readable;
    uint32_t descriptors;
    uint64_t readable_bytes;
    uint64_t writable_bytes;
};

typedef int (*blkq_walk_fn)(const struct blkq_vq_memory *mem, uint64_t desc_gpa,
                            uint32_t queue_size, uint32_t head, uint32_t flags,
                            struct iovec *iov, uint64_t *gpa, uint32_t capacity,
                            struct blkq_vq_chain *out);

/* blkq_run() / blkq_process() results */
#define BLKQ_STOPPED 0 /* q->stop was set (pause, reset, snapshot, close) */
#define BLKQ_SIGNAL 1  /* used buffers want an interrupt and irq_fd < 0: trigger it, call again */
#define BLKQ_BROKEN 2  /* the driver broke the protocol: error/error_kind/message say how */
#define BLKQ_IDLE 3    /* blkq_process(): nothing left to pop */

/* error_kind when BROKEN: vmmkit.virtio.chain.ErrorKind values (walker codes 1-8), plus (same values): */
#define BLKQ_ERR_AVAIL_INDEX 16 /* the available index ran more than a queue size ahead */
#define BLKQ_ERR_DEVICE 17     /* a request with no status byte, or a ring outside RAM */

/* flags */
#define BLKQ_F_EVENT_IDX 1
#define BLKQ_F_INDIRECT 2
#define BLKQ_F_FLUSH 4        /* VIRTIO_BLK_F_FLUSH negotiated (else writes are write-through) */
#define BLKQ_F_DISCARD 8      /* VIRTIO_BLK_F_DISCARD negotiated */
#define BLKQ_F_WRITE_ZEROES 16 /* VIRTIO_BLK_F_WRITE_ZEROES negotiated */
#define BLKQ_F_SPARSE 32      /* honour the unmap flag of WRITE_ZEROES */

#define BLKQ_MAX_DISCARD_SECTORS 0x3FFFFF
#define BLKQ_MAX_DISCARD_SEGMENTS 32
#define BLKQ_SIGNAL_BATCH 32
#define BLKQ_ID_BYTES 20
#define BLKQ_MAX_SLOTS 8 /* requests served at once (a pool of BLKQ_MAX_SLOTS - 1 threads) */

/* Counters, BlockDevice's names in this order (blk_io.py: QUEUE_COUNTERS). */
enum {
    BLKQ_C_READ_BYTES, BLKQ_C_WRITE_BYTES, BLKQ_C_READ_OPS, BLKQ_C_WRITE_OPS, BLKQ_C_FLUSH_OPS,
    BLKQ_C_DISCARD_OPS, BLKQ_C_WRITE_ZEROES_OPS, BLKQ_C_GET_ID_OPS, BLKQ_C_IO_ERRORS,
    BLKQ_C_INVALID_REQUESTS, BLKQ_C_UNSUPPORTED_REQUESTS, BLKQ_C_DIRECT_OPS,
    BLKQ_C_DIRECT_FALLBACKS, BLKQ_C_EINVAL, BLKQ_C_IN_FLIGHT, BLKQ_C_COUNT
};
#define BLKQ_COUNTERS 15

struct blkq {
    /* configuration (Python, before run) */
    blkq_walk_fn walk;
    const struct blkq_vq_memory *vq_mem; /* for the walker and the rings */
    const struct blk_memory *blk_mem;    /* for blk_transfer's own checks */
    struct blk_disk disk;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint32_t size;  /* queue size: a power of two <= 32768 */
    uint32_t flags; /* BLKQ_F_* */
    uint32_t max_segments;
    uint32_t slots; /* requests in flight at most (1: one at a time, no pool) */
    int kick_fd;    /* the queue's ioeventfd */
    int wake_fd;    /* an eventfd Python writes after setting stop */
    int irq_fd;     /* an eventfd that raises the queue's interrupt, or -1 */
    uint8_t serial[BLKQ_ID_BYTES];
    /* ring position (Python loads and reads it back around each run) */
    uint16_t last_avail;
    uint16_t next_used;
    uint16_t signalled_used;
    uint8_t signalled_valid;
    uint8_t pending_signal; /* used buffers were added and not yet looked at for a signal */
    /* control */
    volatile uint32_t stop;
    /* results */
    uint64_t counters[BLKQ_COUNTERS];
    int32_t error_kind;
    char message[160];
    /* scratch, owned by the run */
    int epoll_fd;
    struct iovec *iov;   /* slots * max_segments entries */
    uint64_t *gpa;       /* slots * max_segments entries */
    void *pool;          /* the thread pool, started on first use (C's) */
};

/* Serve until stopped, a signal Python must send, or an error (see BLKQ_*). */
int blkq_run(struct blkq *q);

/* Serve what is available now, without waiting (tests); BLKQ_IDLE when the ring is empty. */
int blkq_process(struct blkq *q);

/* Whether the driver wants an interrupt for the used buffers added since the last call. */
int blkq_needs_signal(struct blkq *q);

/* Stop the pool's threads and close the run's epoll descriptor (after the last run). */
void blkq_release(struct blkq *q);

#endif
