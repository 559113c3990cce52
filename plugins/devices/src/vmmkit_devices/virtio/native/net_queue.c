/* net_queue: a virtio-net device's queues served in C against its tap; see net_queue.h. */
#define _GNU_SOURCE
#include "net_queue.h"
#include "virtq_ring.h"

#include <endian.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define RX 0
#define TX 1

/* struct virtio_net_hdr (virtio 1.2, 5.1.6) */
#define HDR_F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_UDP 3
#define GSO_TCPV6 4
#define GSO_ECN 0x80

static uint8_t *translate(const struct netq_vq_memory *mem, uint64_t gpa, uint64_t len,
                          int writable)
{
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct netq_vq_region *r = &mem->regions[i];
        if (gpa < r->gpa || gpa - r->gpa >= r->size)
            continue;
        if (len > r->size - (gpa - r->gpa) || (writable && r->readonly))
            return NULL;
        return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static int broken(struct netq *q, int queue, int kind, const char *fmt, unsigned long long a,
                  unsigned long long b)
{
    q->error_kind = kind;
    q->error_queue = queue;
    snprintf(q->message, sizeof q->message, fmt, a, b);
    return -1;
}

static int map_rings(struct netq *q, const struct netq_ring *ring, int queue, struct rings *out)
{
    uint32_t size = ring->size;
    out->avail = NULL;
    out->used = NULL;
    if (size == 0)
        return 0; /* not ready: not served */
    if (size > 32768 || (size & (size - 1)))
        return broken(q, queue, NETQ_ERR_DEVICE, "queue size %llu is not a power of two%.0llu", size, 0);
    out->avail = (uint16_t *)translate(q->vq_mem, ring->avail_gpa, 6 + 2 * (uint64_t)size, 0);
    out->used = translate(q->vq_mem, ring->used_gpa, 6 + 8 * (uint64_t)size, 1);
    if (out->avail == NULL || out->used == NULL || (ring->avail_gpa & 1) || (ring->used_gpa & 3))
        return broken(q, queue, VQ_ERR_RING, "rings at %#llx / %#llx are not in guest RAM",
                      ring->avail_gpa, ring->used_gpa);
    return 0;
}

/* Pop the next available head: 1 and *head, 0 when the ring is empty, -1 on a bad index. */
static int pop(struct netq *q, struct netq_ring *ring, const struct rings *r, int queue,
               uint16_t *head)
{
    uint16_t *avail_event = (uint16_t *)(r->used + 4 + 8 * (uint64_t)ring->size);
    int event_idx = (q->flags & NETQ_F_EVENT_IDX) != 0;
    if (event_idx) {
        store16(avail_event, ring->last_avail);
        fence(); /* our avail_event store before the avail idx load */
    }
    uint16_t avail_idx = load16(&r->avail[1]);
    uint16_t pending = (uint16_t)(avail_idx - ring->last_avail);
    if (pending > ring->size) {
        q->error_kind = NETQ_ERR_AVAIL_INDEX;
        q->error_queue = queue;
        snprintf(q->message, sizeof q->message, "available index moved from %u to %u (size %u)",
                 (unsigned)ring->last_avail, (unsigned)avail_idx, (unsigned)ring->size);
        return -1;
    }
    if (pending == 0)
        return 0;
    fence(); /* the avail idx load before the ring entry and descriptor loads */
    *head = load16(&r->avail[2 + ring->last_avail % ring->size]);
    return 1;
}

/* The position moves past a popped head once its chain walked cleanly (as the Python queue). */
static void consumed(struct netq *q, struct netq_ring *ring, const struct rings *r)
{
    ring->last_avail++;
    if (q->flags & NETQ_F_EVENT_IDX)
        store16(r->used + 4 + 8 * (uint64_t)ring->size, ring->last_avail);
}

/* Walk `head` into q->iov + 1 (q->iov[0] stays free for a header); -1 on a walker error. */
static int walk(struct netq *q, const struct netq_ring *ring, int queue, uint16_t head,
                struct netq_vq_chain *chain)
{
    int rc = q->walk(q->vq_mem, ring->desc_gpa, ring->size, head,
                     (q->flags & NETQ_F_INDIRECT) ? 1 : 0, q->iov + 1, q->gpa, q->max_segments,
                     chain);
    if (rc == 0)
        return 0;
    const char *what = walk_message(rc);
    q->error_kind = rc;
    q->error_queue = queue;
    snprintf(q->message, sizeof q->message, "chain at head %u: %s", (unsigned)head, what);
    return -1;
}

static void publish(struct netq_ring *ring, const struct rings *r, uint16_t head, uint32_t len)
{
    push_used(r->used, ring->size, &ring->next_used, head, len);
    ring->pending_signal = 1;
}

/* Whether the driver wants an interrupt for the used buffers added since the last look. */
static int needs_signal(struct netq *q, struct netq_ring *ring, const struct rings *r)
{
    fence(); /* the used idx store before the flags / used_event load */
    if (!(q->flags & NETQ_F_EVENT_IDX))
        return !(load16(&r->avail[0]) & AVAIL_F_NO_INTERRUPT);
    uint16_t used_event = load16(&r->avail[2 + ring->size]);
    uint16_t now = ring->next_used, old = ring->signalled_used;
    int valid = ring->signalled_valid;
    ring->signalled_used = now;
    ring->signalled_valid = 1;
    if (!valid)
        return 1;
    return need_event(used_event, now, old);
}

static void signal_ring(struct netq *q, struct netq_ring *ring, const struct rings *r, int queue)
{
    if (!ring->pending_signal || r->avail == NULL)
        return;
    ring->pending_signal = 0;
    if (!needs_signal(q, ring, r))
        return;
    if (ring->irq_fd < 0) {
        q->signal |= 1u << queue;
        return;
    }
    uint64_t one = 1;
    while (write(ring->irq_fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

/* -- TX ----------------------------------------------------------------------------------- */

/* Whether the driver's header asks only for what it negotiated (virtio 1.2, 5.1.6.2). */
static int tx_header_ok(const struct netq *q, const uint8_t *hdr)
{
    uint8_t flags = hdr[0], gso = hdr[1];
    if (flags & ~HDR_F_NEEDS_CSUM)
        return 0;
    if ((gso & GSO_ECN) && !(q->flags & NETQ_F_HOST_ECN))
        return 0;
    switch (gso & ~GSO_ECN) {
    case GSO_NONE:
        return !(gso & GSO_ECN);
    case GSO_TCPV4:
        return (q->flags & NETQ_F_HOST_TSO4) != 0;
    case GSO_TCPV6:
        return (q->flags & NETQ_F_HOST_TSO6) != 0;
    case GSO_UDP:
        return (q->flags & NETQ_F_HOST_UFO) != 0;
    default:
        return 0;
    }
}

/* Write one frame: the chain's readable iovecs at w[0 .. readable), `total` bytes >= 12. */
static void tx_send(struct netq *q, struct iovec *w, uint32_t readable, uint64_t total)
{
    uint8_t hdr[NETQ_HDR_SIZE];
    uint32_t j = 0;
    uint64_t got = 0;

    /* Copy the header out once (the guest may rewrite it) and step past it. */
    while (j < readable && got < NETQ_HDR_SIZE) {
        uint64_t n = w[j].iov_len < NETQ_HDR_SIZE - got ? w[j].iov_len : NETQ_HDR_SIZE - got;
        memcpy(hdr + got, w[j].iov_base, n);
        got += n;
        if (n < w[j].iov_len) {
            w[j].iov_base = (uint8_t *)w[j].iov_base + n;
            w[j].iov_len -= n;
            break;
        }
        j++;
    }
    __asm__ __volatile__("" ::: "memory");
    if (!(q->flags & NETQ_F_CSUM)) {
        memset(hdr, 0, sizeof hdr);
    } else if (!tx_header_ok(q, hdr)) {
        q->counters[NETQ_C_TX_ERRORS]++;
        return;
    }
    hdr[10] = hdr[11] = 0; /* num_buffers: RX only */

    /* w[j - 1] is consumed (or j == 0 and q->iov[0] is free): the header goes there. */
    struct iovec *out = w + j - 1;
    uint32_t count = readable - j + 1;
    uint8_t *bounce = NULL;
    if (count > IOV_MAX) { /* more pieces than writev takes: one copy */
        bounce = q->frame + NETQ_MAX_RX; /* the second half: the first may hold a pending frame */
        memcpy(bounce, hdr, NETQ_HDR_SIZE);
        uint64_t at = NETQ_HDR_SIZE;
        for (uint32_t i = j; i < readable; i++) {
            memcpy(bounce + at, w[i].iov_base, w[i].iov_len);
            at += w[i].iov_len;
        }
        out = q->iov;
        out[0].iov_base = bounce;
        out[0].iov_len = at;
        count = 1;
    } else {
        out[0].iov_base = hdr;
        out[0].iov_len = NETQ_HDR_SIZE;
    }
    ssize_t rc;
    do
        rc = writev(q->tap_fd, out, (int)count);
    while (rc < 0 && errno == EINTR);
    if (rc >= 0) {
        q->counters[NETQ_C_TX_FRAMES]++;
        q->counters[NETQ_C_TX_BYTES] += total - NETQ_HDR_SIZE;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
        q->counters[NETQ_C_TX_DROPPED]++;
    } else {
        q->counters[NETQ_C_TX_ERRORS]++; /* EINVAL: not an Ethernet frame; EIO: the tap is down */
        q->last_errno = errno;
    }
}

/* Serve up to NETQ_BURST frames: how many, or -1 (broken). */
static int tx_process(struct netq *q, const struct rings *r)
{
    struct netq_ring *ring = &q->tx;
    int sent = 0;
    while (sent < NETQ_BURST && !q->stop) {
        uint16_t head;
        int rc = pop(q, ring, r, TX, &head);
        if (rc <= 0)
            return rc < 0 ? -1 : sent;
        struct netq_vq_chain chain;
        if (walk(q, ring, TX, head, &chain) < 0)
            return -1;
        consumed(q, ring, r);
        if (chain.readable_bytes < NETQ_HDR_SIZE)
            return broken(q, TX, NETQ_ERR_DEVICE,
                          "transmit buffer %llu is shorter than the %llu-byte header", head,
                          NETQ_HDR_SIZE);
        if (chain.readable_bytes > NETQ_MAX_RX)
            q->counters[NETQ_C_TX_DROPPED]++; /* longer than any frame: not read */
        else
            tx_send(q, q->iov + 1, chain.readable, chain.readable_bytes);
        publish(ring, r, head, 0);
        sent++;
    }
    return sent;
}

/* -- RX ----------------------------------------------------------------------------------- */

/* Pop one receive chain and hold it: 1, 0 (none available) or -1 (broken). */
static int rx_hold(struct netq *q, const struct rings *r)
{
    struct netq_ring *ring = &q->rx;
    uint16_t head;
    if (q->held_count >= ring->size)
        return 0;
    int rc = pop(q, ring, r, RX, &head);
    if (rc <= 0)
        return rc;
    struct netq_vq_chain chain;
    if (walk(q, ring, RX, head, &chain) < 0)
        return -1;
    consumed(q, ring, r);
    if (chain.writable_bytes < NETQ_HDR_SIZE)
        return broken(q, RX, NETQ_ERR_DEVICE,
                      "receive buffer %llu has %llu writable bytes, less than the 12-byte header",
                      head, chain.writable_bytes);
    q->held[q->held_count] = head;
    q->held_bytes[q->held_count] = chain.writable_bytes;
    q->held_count++;
    return 1;
}

/* Copy frame[0 .. len) into held chain k (walked again: only its iovecs are trusted). */
static int rx_fill(struct netq *q, uint32_t k, const uint8_t *data, uint64_t len)
{
    struct netq_vq_chain chain;
    if (walk(q, &q->rx, RX, q->held[k], &chain) < 0)
        return -1;
    if (chain.writable_bytes != q->held_bytes[k])
        return broken(q, RX, NETQ_ERR_DEVICE,
                      "receive buffer %llu changed while the device held it (%llu writable bytes)",
                      q->held[k], chain.writable_bytes);
    const struct iovec *w = q->iov + 1;
    uint64_t done = 0;
    for (uint32_t i = chain.readable; i < chain.count && done < len; i++) {
        uint64_t n = w[i].iov_len < len - done ? w[i].iov_len : len - done;
        memcpy(w[i].iov_base, data + done, n);
        done += n;
    }
    return 0;
}

enum { DELIVERED, DROPPED, WAIT };

/* Put the frame in q->frame[0 .. len) into held chains: DELIVERED, DROPPED, WAIT or -1. */
static int rx_deliver(struct netq *q, const struct rings *r, uint32_t len)
{
    uint32_t needed = 1;
    if (q->flags & NETQ_F_MRG_RXBUF) {
        uint64_t room = 0;
        needed = 0;
        for (;;) {
            while (needed < q->held_count && room < len)
                room += q->held_bytes[needed++];
            if (room >= len)
                break;
            if (q->held_count >= q->rx.size)
                return DROPPED; /* every buffer of the ring would not hold it */
            int rc = rx_hold(q, r);
            if (rc <= 0)
                return rc < 0 ? -1 : WAIT;
        }
    } else if (q->held_count == 0) {
        return WAIT; /* cannot happen: a chain is held before a frame is read */
    } else if (len > q->held_bytes[0]) {
        return DROPPED; /* the chain stays for the next frame */
    }
    uint8_t *hdr = q->frame;
    if (!(q->flags & NETQ_F_GUEST_CSUM))
        memset(hdr, 0, 10);
    uint16_t num_buffers = htole16((uint16_t)needed);
    memcpy(hdr + 10, &num_buffers, 2);
    uint64_t at = 0;
    for (uint32_t k = 0; k < needed; k++) {
        uint64_t n = q->held_bytes[k] < len - at ? q->held_bytes[k] : len - at;
        if (rx_fill(q, k, q->frame + at, n) < 0)
            return -1;
        at += n;
    }
    at = 0;
    for (uint32_t k = 0; k < needed; k++) {
        uint64_t n = q->held_bytes[k] < len - at ? q->held_bytes[k] : len - at;
        publish(&q->rx, r, q->held[k], (uint32_t)n);
        at += n;
    }
    q->held_count -= needed;
    memmove(q->held, q->held + needed, q->held_count * sizeof *q->held);
    memmove(q->held_bytes, q->held_bytes + needed, q->held_count * sizeof *q->held_bytes);
    q->counters[NETQ_C_RX_FRAMES]++;
    q->counters[NETQ_C_RX_BYTES] += len - NETQ_HDR_SIZE;
    return DELIVERED;
}

/* Receive up to NETQ_BURST frames. 1: stopped at the burst (more to do), 0: done, -1: broken.
 * *want_tap says whether the tap should be watched (a buffer is held and the tap drained). */
static int rx_process(struct netq *q, const struct rings *r, int *want_tap)
{
    *want_tap = 0;
    for (int n = 0; n < NETQ_BURST; n++) {
        if (q->stop)
            return 0;
        uint32_t len = q->pending_len;
        if (len == 0) {
            if (q->held_count == 0) {
                int rc = rx_hold(q, r);
                if (rc <= 0)
                    return rc; /* no buffers: the next RX kick brings us back */
            }
            ssize_t got;
            do
                got = read(q->tap_fd, q->frame, NETQ_MAX_RX);
            while (got < 0 && errno == EINTR);
            if (got < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    *want_tap = 1;
                } else {
                    q->counters[NETQ_C_RX_ERRORS]++;
                    q->last_errno = errno;
                }
                return 0;
            }
            if (got < NETQ_HDR_SIZE) {
                q->counters[NETQ_C_RX_DROPPED]++;
                continue;
            }
            len = (uint32_t)got;
        }
        int rc = rx_deliver(q, r, len);
        if (rc < 0)
            return -1;
        if (rc == WAIT) {
            q->pending_len = len;
            return 0;
        }
        q->pending_len = 0;
        if (rc == DROPPED)
            q->counters[NETQ_C_RX_DROPPED]++;
    }
    return 1;
}

/* -- the loop ----------------------------------------------------------------------------- */

static int set_tap(struct netq *q, int want)
{
    if (q->epoll_fd < 0 || (uint32_t)want == q->tap_armed)
        return 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = q->tap_fd};
    if (epoll_ctl(q->epoll_fd, want ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, q->tap_fd, &ev) < 0)
        return broken(q, RX, NETQ_ERR_DEVICE, "epoll_ctl on the tap: errno %llu%.0llu",
                      (unsigned)errno, 0);
    q->tap_armed = (uint32_t)want;
    return 0;
}

int netq_process(struct netq *q)
{
    struct rings rx, tx;
    q->signal = 0;
    if (q->stop)
        return NETQ_STOPPED;
    if (map_rings(q, &q->rx, RX, &rx) < 0 || map_rings(q, &q->tx, TX, &tx) < 0)
        return NETQ_BROKEN;
    for (;;) {
        int more = 0, want_tap = 0;
        if (rx.avail != NULL) { /* RX first, as the Python path after activation (queue order) */
            int rc = rx_process(q, &rx, &want_tap);
            if (rc < 0)
                return NETQ_BROKEN;
            more |= rc;
        }
        if (tx.avail != NULL) {
            int sent = tx_process(q, &tx);
            if (sent < 0)
                return NETQ_BROKEN;
            more |= sent == NETQ_BURST;
        }
        signal_ring(q, &q->rx, &rx, RX);
        signal_ring(q, &q->tx, &tx, TX);
        if (set_tap(q, want_tap) < 0)
            return NETQ_BROKEN;
        if (q->signal)
            return NETQ_SIGNAL;
        if (!more || q->stop)
            break;
    }
    return q->stop ? NETQ_STOPPED : NETQ_IDLE;
}

static int watch(struct netq *q, int fd)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    return fd < 0 ? 0 : epoll_ctl(q->epoll_fd, EPOLL_CTL_ADD, fd, &ev);
}

int netq_run(struct netq *q)
{
    if (q->epoll_fd < 0) {
        q->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        q->tap_armed = 0;
        if (q->epoll_fd < 0) {
            broken(q, RX, NETQ_ERR_DEVICE, "epoll_create1: errno %llu%.0llu", (unsigned)errno, 0);
            return NETQ_BROKEN;
        }
        if (watch(q, q->rx.kick_fd) < 0 || watch(q, q->tx.kick_fd) < 0 || watch(q, q->wake_fd) < 0) {
            broken(q, RX, NETQ_ERR_DEVICE, "epoll_ctl: errno %llu%.0llu", (unsigned)errno, 0);
            return NETQ_BROKEN;
        }
    }
    for (;;) {
        int rc = netq_process(q);
        if (rc != NETQ_IDLE)
            return rc;
        struct epoll_event events[4];
        int n = epoll_wait(q->epoll_fd, events, 4, -1);
        if (n < 0 && errno != EINTR) {
            broken(q, RX, NETQ_ERR_DEVICE, "epoll_wait: errno %llu%.0llu", (unsigned)errno, 0);
            return NETQ_BROKEN;
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == q->rx.kick_fd || fd == q->tx.kick_fd) {
                uint64_t count;
                if (read(fd, &count, sizeof count) < 0) {
                    /* EAGAIN: drained elsewhere; nothing to do */
                }
            }
        }
    }
}

void netq_release(struct netq *q)
{
    if (q->epoll_fd >= 0) {
        close(q->epoll_fd);
        q->epoll_fd = -1;
    }
    q->tap_armed = 0;
}
