/*
 * net_queue: a virtio-net device's receive and transmit queues served in C against its tap
 * (virtio 1.2, 2.7 and 5.1).
 *
 * One device thread calls netq_run() with the GIL released (cffi drops it around the call). It
 * waits in epoll on the two queues' kick eventfds, the tap (only while the driver has receive
 * buffers) and a wake eventfd, and moves frames both ways:
 *
 * - TX: each available chain is one frame: its first 12 bytes are the virtio_net_hdr, copied out
 *   once and checked (zeroed when VIRTIO_NET_F_CSUM was not negotiated; otherwise only the flags
 *   and GSO types the driver negotiated pass), then writev() to the tap (the tap's vnet header),
 *   followed by the chain's remaining readable buffers in place;
 * - RX: readv() of one frame from the tap into a buffer of NETQ_MAX_RX bytes, then into the
 *   driver's chains: one chain without VIRTIO_NET_F_MRG_RXBUF (a frame too big for it is dropped
 *   and the chain kept), as many as it needs with it (num_buffers says how many); the tap's
 *   header passes through when VIRTIO_NET_F_GUEST_CSUM was negotiated (the tap's offloads were
 *   set from the negotiated GUEST_* features), else it is zeroed;
 * - used ring with event-idx suppression, and the interrupt through the queue's irqfd (or
 *   NETQ_SIGNAL for Python to trigger it).
 *
 * Everything in guest memory is hostile: ring indices are checked against the queue size, the
 * rings are re-translated against the region table, chains are walked by the SDK's walker
 * (vmmkit/virtio/native/vq_walk.c, passed in as a function pointer), and every byte moved goes
 * through the walker's iovecs. A malformed chain returns NETQ_BROKEN (the device fails, the VMM
 * goes on). The semantics are NetDevice's Python path (plugins/devices/src/vmmkit_devices/
 * virtio/net.py), the reference; tests/unit/devices/virtio/test_net_queue_differential.py
 * compares the two. Change both together.
 */
#ifndef VMMKIT_NET_QUEUE_H
#define VMMKIT_NET_QUEUE_H

#include <stdint.h>
#include <sys/uio.h>

/* Same layout as vq_walk.h's struct vq_region / vq_memory / vq_chain (checked at load time). */
struct netq_vq_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
    uint32_t readonly;
};

struct netq_vq_memory {
    const struct netq_vq_region *regions;
    uint32_t count;
};

struct netq_vq_chain {
    uint32_t count;
    uint32_t readable;
    uint32_t descriptors;
    uint64_t readable_bytes;
    uint64_t writable_bytes;
};

typedef int (*netq_walk_fn)(const struct netq_vq_memory *mem, uint64_t desc_gpa,
                            uint32_t queue_size, uint32_t head, uint32_t flags,
                            struct iovec *iov, uint64_t *gpa, uint32_t capacity,
                            struct netq_vq_chain *out);

/* netq_run() / netq_process() results */
#define NETQ_STOPPED 0 /* q->stop was set (pause, reset, close) */
#define NETQ_SIGNAL 1  /* q->signal has queues (bit 0 RX, bit 1 TX) to interrupt: do it, call again */
#define NETQ_BROKEN 2  /* the driver broke the protocol: error_kind/error_queue/message say how */
#define NETQ_IDLE 3    /* netq_process(): nothing more to do now */

/* error_kind when BROKEN: the walker's codes 1-8 (vmmkit.virtio.chain.ErrorKind), plus: */
#define NETQ_ERR_AVAIL_INDEX 16 /* the available index ran more than a queue size ahead */
#define NETQ_ERR_DEVICE 17      /* a chain the device cannot use, or a ring outside RAM */

/* flags */
#define NETQ_F_EVENT_IDX 1
#define NETQ_F_INDIRECT 2
#define NETQ_F_MRG_RXBUF 4
#define NETQ_F_GUEST_CSUM 8 /* RX: the tap's header passes through */
#define NETQ_F_CSUM 16      /* TX: the driver's header passes through (checked) */
#define NETQ_F_HOST_TSO4 32
#define NETQ_F_HOST_TSO6 64
#define NETQ_F_HOST_ECN 128
#define NETQ_F_HOST_UFO 256

#define NETQ_HDR_SIZE 12                     /* struct virtio_net_hdr_mrg_rxbuf */
#define NETQ_MAX_FRAME (65535 + 18)          /* a 64 KiB IP packet + Ethernet and VLAN headers */
#define NETQ_MAX_RX (NETQ_HDR_SIZE + NETQ_MAX_FRAME)
#define NETQ_BURST 256                       /* frames per direction before the other gets a turn */

/* Counters, NetDevice's names in this order (net_io.py: NET_COUNTERS). */
enum {
    NETQ_C_RX_BYTES, NETQ_C_RX_FRAMES, NETQ_C_TX_BYTES, NETQ_C_TX_FRAMES, NETQ_C_RX_DROPPED,
    NETQ_C_TX_DROPPED, NETQ_C_TX_ERRORS, NETQ_C_RX_ERRORS, NETQ_C_COUNT
};
#define NETQ_COUNTERS 8

struct netq_ring {
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint32_t size;  /* a power of two <= 32768, or 0 when the queue is not ready */
    int kick_fd;    /* the queue's ioeventfd */
    int irq_fd;     /* an eventfd raising the queue's interrupt, or -1 */
    uint16_t last_avail;
    uint16_t next_used;
    uint16_t signalled_used;
    uint8_t signalled_valid;
    uint8_t pending_signal;
};

struct netq {
    /* configuration (Python, before run) */
    netq_walk_fn walk;
    const struct netq_vq_memory *vq_mem;
    struct netq_ring rx, tx;
    uint32_t flags;        /* NETQ_F_* */
    uint32_t max_segments; /* iovec entries at iov / gpa */
    int tap_fd;
    int wake_fd;           /* an eventfd Python writes after setting stop */
    /* control */
    volatile uint32_t stop;
    /* results */
    uint32_t signal;       /* NETQ_SIGNAL: bit 0 RX, bit 1 TX */
    uint64_t counters[NETQ_COUNTERS];
    int32_t error_kind;
    int32_t error_queue;   /* 0 RX, 1 TX */
    char message[160];
    int32_t last_errno;    /* the last tap error (rx_errors / tx_errors), for Python's log */
    /* RX state kept across runs (Python reads it back only to know nothing is half done) */
    uint16_t *held;        /* heads of popped, unused RX chains: rx.size entries */
    uint64_t *held_bytes;  /* their writable bytes */
    uint32_t held_count;
    uint32_t pending_len;  /* a frame waiting in `frame` for more RX buffers (MRG_RXBUF) */
    /* scratch, owned by the run */
    int epoll_fd;
    uint32_t tap_armed;
    struct iovec *iov;     /* max_segments + 1 entries */
    uint64_t *gpa;         /* max_segments entries */
    uint8_t *frame;        /* 2 * NETQ_MAX_RX bytes: RX, then TX's copy when writev takes too few pieces */
};

/* Serve until stopped, a signal Python must send, or an error (see NETQ_*). */
int netq_run(struct netq *q);

/* Serve what can be served now, without waiting (tests): NETQ_IDLE when done. */
int netq_process(struct netq *q);

/* Close the run's epoll descriptor (after the last run). */
void netq_release(struct netq *q);

#endif
