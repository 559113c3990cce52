/* blk_queue: a virtio-blk queue served in C; see blk_queue.h. */
#define _GNU_SOURCE
#include "blk_queue.h"
#include "virtq_ring.h"

#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13

#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2

#define HEADER_SIZE 16
#define SEGMENT_SIZE 16
#define WZ_FLAG_UNMAP 1

static uint8_t *translate(const struct blkq_vq_memory *mem, uint64_t gpa, uint64_t len,
                          int writable)
{
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct blkq_vq_region *r = &mem->regions[i];
        if (gpa < r->gpa || gpa - r->gpa >= r->size)
            continue;
        if (len > r->size - (gpa - r->gpa) || (writable && r->readonly))
            return NULL;
        return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static int broken(struct blkq *q, int kind, const char *fmt, unsigned long long a,
                  unsigned long long b)
{
    q->error_kind = kind;
    snprintf(q->message, sizeof q->message, fmt, a, b);
    return BLKQ_BROKEN;
}

static int walk_broken(struct blkq *q, int rc, uint16_t head)
{
    const char *what = walk_message(rc);
    q->error_kind = rc;
    snprintf(q->message, sizeof q->message, "chain at head %u: %s", (unsigned)head, what);
    return BLKQ_BROKEN;
}

/* Counters and the O_DIRECT alignment may be updated by several pool threads at once. */
static void bump(struct blkq *q, int which, uint64_t n)
{
    __atomic_fetch_add(&q->counters[which], n, __ATOMIC_RELAXED);
}

/* -- one request ------------------------------------------------------------------------ */

struct request {
    const struct iovec *iov;
    const uint64_t *gpa;
    uint32_t count, readable;
    uint64_t readable_bytes, writable_bytes;
};

/* Copy `len` bytes of the readable part, after `skip`, into buf; 0 if they are not there. */
static int gather(const struct request *r, uint64_t skip, uint8_t *buf, uint64_t len)
{
    if (len > r->readable_bytes || skip > r->readable_bytes - len)
        return 0;
    for (uint32_t i = 0; i < r->readable && len; i++) {
        uint64_t l = r->iov[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t n = l - skip < len ? l - skip : len;
        memcpy(buf, (uint8_t *)r->iov[i].iov_base + skip, n);
        __asm__ __volatile__("" ::: "memory"); /* the copy is all we use */
        buf += n;
        len -= n;
        skip = 0;
    }
    return len == 0;
}

/* Write `len` bytes at the start of the writable part; the bytes written. */
static uint64_t scatter(const struct request *r, const uint8_t *data, uint64_t len)
{
    uint64_t done = 0;
    for (uint32_t i = r->readable; i < r->count && done < len; i++) {
        uint64_t n = r->iov[i].iov_len < len - done ? r->iov[i].iov_len : len - done;
        memcpy(r->iov[i].iov_base, data + done, n);
        done += n;
    }
    return done;
}

static int io_status(struct blkq *q, int rc, const struct blk_result *out)
{
    if (out->einval) {
        bump(q, BLKQ_C_EINVAL, 1);
        if (__atomic_load_n(&q->disk.mem_align, __ATOMIC_RELAXED) < 4096)
            __atomic_store_n(&q->disk.mem_align, 4096, __ATOMIC_RELAXED);
        if (__atomic_load_n(&q->disk.offset_align, __ATOMIC_RELAXED) < 4096)
            __atomic_store_n(&q->disk.offset_align, 4096, __ATOMIC_RELAXED);
    }
    if (rc == BLK_OK)
        return S_OK;
    bump(q, rc == BLK_ERR_IO ? BLKQ_C_IO_ERRORS : BLKQ_C_INVALID_REQUESTS, 1);
    return S_IOERR;
}

static int in_disk(const struct blkq *q, uint64_t sector, uint64_t sectors)
{
    uint64_t capacity = q->disk.size / BLK_SECTOR_SIZE;
    return sector <= capacity && sectors <= capacity - sector;
}

static int transfer(struct blkq *q, const struct request *r, int write, uint64_t sector,
                    uint64_t skip, int64_t length)
{
    struct blk_result out;
    if ((write && q->disk.readonly) || length < 0 || length % BLK_SECTOR_SIZE ||
        !in_disk(q, sector, (uint64_t)length / BLK_SECTOR_SIZE)) {
        bump(q, BLKQ_C_INVALID_REQUESTS, 1);
        return S_IOERR;
    }
    uint32_t first = write ? 0 : r->readable;
    uint32_t count = write ? r->readable : r->count - r->readable;
    int rc = blk_transfer(&q->disk, q->blk_mem, write, sector * BLK_SECTOR_SIZE, r->iov + first,
                          r->gpa + first, count, skip, (uint64_t)length, &out);
    if (out.direct)
        bump(q, BLKQ_C_DIRECT_OPS, 1);
    if (out.fallback)
        bump(q, BLKQ_C_DIRECT_FALLBACKS, 1);
    int status = io_status(q, rc, &out);
    if (status == S_OK) {
        bump(q, write ? BLKQ_C_WRITE_OPS : BLKQ_C_READ_OPS, 1);
        bump(q, write ? BLKQ_C_WRITE_BYTES : BLKQ_C_READ_BYTES, (uint64_t)length);
    }
    return status;
}

static int discard_or_zero(struct blkq *q, const struct request *r, int discard, int64_t data)
{
    uint8_t raw[BLKQ_MAX_DISCARD_SEGMENTS * SEGMENT_SIZE];
    uint64_t sector[BLKQ_MAX_DISCARD_SEGMENTS];
    uint32_t sectors[BLKQ_MAX_DISCARD_SEGMENTS], flags[BLKQ_MAX_DISCARD_SEGMENTS];

    uint32_t feature = discard ? BLKQ_F_DISCARD : BLKQ_F_WRITE_ZEROES;
    if (!(q->flags & feature) || q->disk.readonly)
        return S_UNSUPP;
    if (data <= 0 || data % SEGMENT_SIZE) {
        bump(q, BLKQ_C_INVALID_REQUESTS, 1);
        return S_IOERR;
    }
    if (data / SEGMENT_SIZE > BLKQ_MAX_DISCARD_SEGMENTS)
        return S_UNSUPP;
    uint32_t n = (uint32_t)(data / SEGMENT_SIZE);
    if (!gather(r, HEADER_SIZE, raw, (uint64_t)data)) {
        bump(q, BLKQ_C_INVALID_REQUESTS, 1); /* cannot happen: data <= readable - 16 */
        return S_IOERR;
    }
    for (uint32_t i = 0; i < n; i++) {
        memcpy(&sector[i], raw + i * SEGMENT_SIZE, 8);
        memcpy(&sectors[i], raw + i * SEGMENT_SIZE + 8, 4);
        memcpy(&flags[i], raw + i * SEGMENT_SIZE + 12, 4);
        sector[i] = le64toh(sector[i]);
        sectors[i] = le32toh(sectors[i]);
        flags[i] = le32toh(flags[i]);
        if ((flags[i] & ~(uint32_t)WZ_FLAG_UNMAP) || (discard && flags[i]))
            return S_UNSUPP;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (sectors[i] > BLKQ_MAX_DISCARD_SECTORS || !in_disk(q, sector[i], sectors[i])) {
            bump(q, BLKQ_C_INVALID_REQUESTS, 1);
            return S_IOERR;
        }
    }
    for (uint32_t i = 0; i < n; i++) {
        struct blk_result out;
        uint64_t offset = sector[i] * BLK_SECTOR_SIZE, length = (uint64_t)sectors[i] * BLK_SECTOR_SIZE;
        int rc;
        if (discard) {
            rc = blk_discard(&q->disk, offset, length, &out);
        } else {
            int unmap = (flags[i] & WZ_FLAG_UNMAP) && (q->flags & BLKQ_F_SPARSE);
            rc = blk_write_zeroes(&q->disk, offset, length, unmap, &out);
        }
        int status = io_status(q, rc, &out);
        if (status != S_OK)
            return status;
    }
    bump(q, discard ? BLKQ_C_DISCARD_OPS : BLKQ_C_WRITE_ZEROES_OPS, 1);
    return S_OK;
}

static int flush(struct blkq *q)
{
    struct blk_result out;
    int rc = blk_flush(&q->disk, &out);
    bump(q, BLKQ_C_FLUSH_OPS, 1);
    return io_status(q, rc, &out);
}

/* Serve one walked chain: the used length, or -1 if it has no status byte to answer with. */
static int64_t serve(struct blkq *q, const struct request *r)
{
    uint8_t *status_byte = NULL;
    for (uint32_t i = r->count; i > r->readable; i--) {
        if (r->iov[i - 1].iov_len) {
            status_byte = (uint8_t *)r->iov[i - 1].iov_base + r->iov[i - 1].iov_len - 1;
            break;
        }
    }
    if (status_byte == NULL)
        return -1;
    if (r->readable_bytes < HEADER_SIZE) {
        bump(q, BLKQ_C_INVALID_REQUESTS, 1);
        *status_byte = S_IOERR;
        return 1;
    }
    uint8_t header[HEADER_SIZE];
    gather(r, 0, header, HEADER_SIZE);
    uint32_t kind;
    uint64_t sector;
    memcpy(&kind, header, 4);
    memcpy(&sector, header + 8, 8);
    kind = le32toh(kind);
    sector = le64toh(sector);
    /* both < 2^32 + 1 (the walker caps a chain at 4 GiB): no overflow in int64_t */
    int64_t data_in = (int64_t)r->writable_bytes - 1;
    int64_t data_out = (int64_t)r->readable_bytes - HEADER_SIZE;
    uint64_t written = 0;
    int status;

    switch (kind) {
    case T_IN:
        status = transfer(q, r, 0, sector, 0, data_in);
        written = status == S_OK ? (uint64_t)data_in : 0;
        break;
    case T_OUT:
        status = transfer(q, r, 1, sector, HEADER_SIZE, data_out);
        break;
    case T_FLUSH:
        status = flush(q);
        break;
    case T_GET_ID:
        written = scatter(r, q->serial, data_in < BLKQ_ID_BYTES ? (uint64_t)data_in : BLKQ_ID_BYTES);
        status = S_OK;
        bump(q, BLKQ_C_GET_ID_OPS, 1);
        break;
    case T_DISCARD:
    case T_WRITE_ZEROES:
        status = discard_or_zero(q, r, kind == T_DISCARD, data_out);
        break;
    default:
        status = S_UNSUPP;
    }
    if (status == S_UNSUPP) {
        bump(q, BLKQ_C_UNSUPPORTED_REQUESTS, 1);
    } else if (status == S_OK && (kind == T_OUT || kind == T_DISCARD || kind == T_WRITE_ZEROES) &&
               !(q->flags & BLKQ_F_FLUSH)) {
        status = flush(q); /* a driver without FLUSH expects write-through (5.2.6.2) */
    }
    *status_byte = (uint8_t)status;
    return (int64_t)written + 1;
}

/* -- the ring --------------------------------------------------------------------------- */

int blkq_needs_signal(struct blkq *q)
{
    uint16_t *avail = (uint16_t *)translate(q->vq_mem, q->avail_gpa, 6 + 2 * (uint64_t)q->size, 0);
    if (avail == NULL)
        return 1;
    fence(); /* the used idx store before the flags / used_event load */
    if (!(q->flags & BLKQ_F_EVENT_IDX))
        return !(load16(&avail[0]) & AVAIL_F_NO_INTERRUPT);
    uint16_t used_event = load16(&avail[2 + q->size]);
    uint16_t now = q->next_used, old = q->signalled_used;
    int valid = q->signalled_valid;
    q->signalled_used = now;
    q->signalled_valid = 1;
    if (!valid)
        return 1;
    return need_event(used_event, now, old);
}

/* 0: nothing to do or irqfd written; BLKQ_SIGNAL: Python must trigger the interrupt. */
static int signal_driver(struct blkq *q)
{
    q->pending_signal = 0;
    if (!blkq_needs_signal(q))
        return 0;
    if (q->irq_fd < 0)
        return BLKQ_SIGNAL;
    uint64_t one = 1;
    while (write(q->irq_fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
    return 0;
}

/* -- several requests in flight: a batch served by a small thread pool ---------------------- */

struct slot {
    struct request r;
    uint16_t head;
    uint8_t parallel; /* an IN or OUT with a whole header: may overlap with its neighbours */
    int64_t used;
    uint64_t lo, len; /* the disk bytes it moves */
};

struct pool {
    pthread_mutex_t lock;
    pthread_cond_t work, done;
    struct blkq *q;
    struct slot *slots;
    uint32_t next, count, remaining, threads;
    int quit;
    pthread_t tid[BLKQ_MAX_SLOTS];
};

static void *pool_main(void *arg)
{
    struct pool *p = arg;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->quit && p->next >= p->count)
            pthread_cond_wait(&p->work, &p->lock);
        if (p->quit)
            break;
        struct slot *sl = &p->slots[p->next++];
        pthread_mutex_unlock(&p->lock);
        sl->used = serve(p->q, &sl->r);
        pthread_mutex_lock(&p->lock);
        if (--p->remaining == 0)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* The pool, started on first use; NULL if no thread could be started (serve one at a time). */
static struct pool *pool_of(struct blkq *q)
{
    if (q->pool != NULL || q->slots < 2)
        return q->pool;
    struct pool *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    p->q = q;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with the interpreter's threads */
    for (uint32_t i = 0; i + 1 < q->slots && i < BLKQ_MAX_SLOTS; i++) {
        if (pthread_create(&p->tid[i], NULL, pool_main, p) != 0)
            break;
        p->threads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    q->pool = p;
    return p;
}

static void pool_stop(struct pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->quit = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    for (uint32_t i = 0; i < p->threads; i++)
        pthread_join(p->tid[i], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->done);
    free(p);
}

/* Serve slots[0 .. n) at once (the calling thread takes its share), then return. */
static void serve_parallel(struct blkq *q, struct pool *p, struct slot *slots, uint32_t n)
{
    pthread_mutex_lock(&p->lock);
    p->slots = slots;
    p->next = 0;
    p->count = n;
    p->remaining = n;
    pthread_cond_broadcast(&p->work);
    while (p->next < p->count) {
        struct slot *sl = &slots[p->next++];
        pthread_mutex_unlock(&p->lock);
        sl->used = serve(q, &sl->r);
        pthread_mutex_lock(&p->lock);
        p->remaining--;
    }
    while (p->remaining)
        pthread_cond_wait(&p->done, &p->lock);
    p->count = p->next = 0;
    pthread_mutex_unlock(&p->lock);
}

static int ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen; /* no wrap: both lie in RAM or the disk */
}

/* Whether the requests touch disjoint guest buffers and disjoint disk bytes: then serving them
 * at once gives the same bytes as one after the other (and the differential test can tell). */
static int independent(const struct slot *slots, uint32_t n)
{
    uint32_t buffers = 0;
    for (uint32_t i = 0; i < n; i++) {
        buffers += slots[i].r.count;
        if (buffers > 64)
            return 0;
    }
    for (uint32_t i = 0; i < n; i++) {
        for (uint32_t j = i + 1; j < n; j++) {
            const struct request *a = &slots[i].r, *b = &slots[j].r;
            if (ranges_overlap(slots[i].lo, slots[i].len, slots[j].lo, slots[j].len))
                return 0;
            for (uint32_t x = 0; x < a->count; x++)
                for (uint32_t y = 0; y < b->count; y++)
                    if (ranges_overlap(a->gpa[x], a->iov[x].iov_len, b->gpa[y], b->iov[y].iov_len))
                        return 0;
        }
    }
    return 1;
}

static int has_status_byte(const struct request *r)
{
    for (uint32_t i = r->count; i > r->readable; i--)
        if (r->iov[i - 1].iov_len)
            return 1;
    return 0;
}

static void classify(const struct blkq *q, struct slot *sl)
{
    uint8_t header[HEADER_SIZE];
    uint32_t kind;
    uint64_t sector;
    sl->parallel = 0;
    sl->lo = sl->len = 0;
    if (!gather(&sl->r, 0, header, HEADER_SIZE))
        return;
    memcpy(&kind, header, 4);
    memcpy(&sector, header + 8, 8);
    kind = le32toh(kind);
    sector = le64toh(sector);
    uint64_t capacity = q->disk.size / BLK_SECTOR_SIZE;
    if ((kind != T_IN && kind != T_OUT) || sector > capacity)
        return;
    sl->parallel = 1;
    sl->lo = sector * BLK_SECTOR_SIZE;
    sl->len = kind == T_IN ? sl->r.writable_bytes - 1 : sl->r.readable_bytes - HEADER_SIZE;
}

static void publish(struct blkq *q, const struct rings *ring, uint16_t head, int64_t used)
{
    if (used > 0xFFFFFFFFLL)
        used = 0xFFFFFFFFLL;
    push_used(ring->used, q->size, &q->next_used, head, (uint32_t)used);
    q->pending_signal = 1;
}

int blkq_process(struct blkq *q)
{
    uint32_t size = q->size;
    if (size == 0 || size > 32768 || (size & (size - 1)))
        return broken(q, BLKQ_ERR_DEVICE, "queue size %llu is not a power of two%.0llu", size, 0);
    struct rings ring;
    ring.avail = (uint16_t *)translate(q->vq_mem, q->avail_gpa, 6 + 2 * (uint64_t)size, 0);
    ring.used = translate(q->vq_mem, q->used_gpa, 6 + 8 * (uint64_t)size, 1);
    if (ring.avail == NULL || ring.used == NULL || (q->avail_gpa & 1) || (q->used_gpa & 3))
        return broken(q, VQ_ERR_RING, "rings at %#llx / %#llx are not in guest RAM",
                      q->avail_gpa, q->used_gpa);
    uint16_t *avail_event = (uint16_t *)(ring.used + 4 + 8 * (uint64_t)size);
    int event_idx = (q->flags & BLKQ_F_EVENT_IDX) != 0;
    uint32_t nslots = q->slots < 1 ? 1 : q->slots > BLKQ_MAX_SLOTS ? BLKQ_MAX_SLOTS : q->slots;
    struct slot slots[BLKQ_MAX_SLOTS];
    uint32_t done = 0;

    if (q->pending_signal) { /* a BLKQ_SIGNAL return interrupted the last pass: finish it */
        int rc = signal_driver(q);
        if (rc)
            return rc;
    }
    for (;;) {
        uint32_t n = 0;
        int error = 0;
        /* Pop a batch: up to nslots chains, ending after any request that is not an IN/OUT. */
        while (n < nslots && !q->stop) {
            if (event_idx) {
                store16(avail_event, q->last_avail);
                fence(); /* our avail_event store before the avail idx load */
            }
            uint16_t avail_idx = load16(&ring.avail[1]);
            uint16_t pending = (uint16_t)(avail_idx - q->last_avail);
            if (pending > size) {
                q->error_kind = BLKQ_ERR_AVAIL_INDEX;
                snprintf(q->message, sizeof q->message, "available index moved from %u to %u (size %u)",
                         (unsigned)q->last_avail, (unsigned)avail_idx, (unsigned)size);
                error = 1;
                break;
            }
            if (pending == 0)
                break;
            fence(); /* the avail idx load before the ring entry and descriptor loads */
            uint16_t head = load16(&ring.avail[2 + q->last_avail % size]);
            struct iovec *iov = q->iov + (uint64_t)n * q->max_segments;
            uint64_t *gpa = q->gpa + (uint64_t)n * q->max_segments;
            struct blkq_vq_chain chain;
            int rc = q->walk(q->vq_mem, q->desc_gpa, size, head, (q->flags & BLKQ_F_INDIRECT) ? 1 : 0,
                             iov, gpa, q->max_segments, &chain);
            if (rc != 0) {
                walk_broken(q, rc, head);
                error = 1;
                break;
            }
            q->last_avail++;
            if (event_idx)
                store16(avail_event, q->last_avail);
            struct slot *sl = &slots[n];
            sl->r = (struct request){iov, gpa, chain.count, chain.readable, chain.readable_bytes,
                                     chain.writable_bytes};
            sl->head = head;
            if (!has_status_byte(&sl->r)) {
                broken(q, BLKQ_ERR_DEVICE, "request %llu has no device-writable status byte%.0llu",
                       head, 0);
                error = 1;
                break;
            }
            classify(q, sl);
            n++;
            if (!sl->parallel)
                break;
        }
        /* Serve it: the IN/OUT requests at once when they are independent, then the last one. */
        uint32_t group = n && !slots[n - 1].parallel ? n - 1 : n;
        struct pool *p = group >= 2 ? pool_of(q) : NULL;
        if (p != NULL && p->threads && independent(slots, group)) {
            serve_parallel(q, p, slots, group);
            bump(q, BLKQ_C_IN_FLIGHT, group);
        } else {
            for (uint32_t i = 0; i < group; i++)
                slots[i].used = serve(q, &slots[i].r);
        }
        for (uint32_t i = group; i < n; i++)
            slots[i].used = serve(q, &slots[i].r);
        int python_signal = 0;
        for (uint32_t i = 0; i < n; i++) {
            publish(q, &ring, slots[i].head, slots[i].used);
            if (++done % BLKQ_SIGNAL_BATCH == 0 && signal_driver(q) == BLKQ_SIGNAL)
                python_signal = 1; /* Python triggers it once the batch is published */
        }
        if (error)
            return BLKQ_BROKEN; /* as the Python path: no signal after a fault */
        if (python_signal)
            return BLKQ_SIGNAL;
        if (n == 0)
            break;
    }
    if (q->pending_signal) {
        int rc = signal_driver(q);
        if (rc)
            return rc;
    }
    return q->stop ? BLKQ_STOPPED : BLKQ_IDLE;
}

int blkq_run(struct blkq *q)
{
    if (q->epoll_fd < 0) {
        q->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (q->epoll_fd < 0)
            return broken(q, BLKQ_ERR_DEVICE, "epoll_create1: errno %llu%.0llu",
                          (unsigned)errno, 0);
        struct epoll_event kick = {.events = EPOLLIN, .data.fd = q->kick_fd};
        struct epoll_event wake = {.events = EPOLLIN, .data.fd = q->wake_fd};
        if (epoll_ctl(q->epoll_fd, EPOLL_CTL_ADD, q->kick_fd, &kick) < 0 ||
            epoll_ctl(q->epoll_fd, EPOLL_CTL_ADD, q->wake_fd, &wake) < 0)
            return broken(q, BLKQ_ERR_DEVICE, "epoll_ctl: errno %llu%.0llu", (unsigned)errno, 0);
    }
    for (;;) {
        int rc = blkq_process(q);
        if (rc != BLKQ_IDLE)
            return rc;
        struct epoll_event events[2];
        int n = epoll_wait(q->epoll_fd, events, 2, -1);
        if (n < 0 && errno != EINTR)
            return broken(q, BLKQ_ERR_DEVICE, "epoll_wait: errno %llu%.0llu", (unsigned)errno, 0);
        for (int i = 0; i < n; i++) {
            if (events[i].data.fd == q->kick_fd) {
                uint64_t count;
                if (read(q->kick_fd, &count, sizeof count) < 0) {
                    /* EAGAIN: someone else drained it; nothing to do */
                }
            }
        }
    }
}

void blkq_release(struct blkq *q)
{
    if (q->pool != NULL) {
        pool_stop(q->pool);
        q->pool = NULL;
    }
    if (q->epoll_fd >= 0) {
        close(q->epoll_fd);
        q->epoll_fd = -1;
    }
}
