/*
 * virtq_ring: the split-virtqueue ring helpers blk_queue.c and net_queue.c share (virtio 1.2,
 * 2.7: the available and used rings, and 2.7.7.2's event index). Private to those two files;
 * everything here reads or writes guest memory already translated and bounds-checked.
 */
#ifndef VMMKIT_VIRTQ_RING_H
#define VMMKIT_VIRTQ_RING_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

#define VQ_ERR_RING 8 /* the walker's code for rings outside guest RAM (ErrorKind.RING) */
#define AVAIL_F_NO_INTERRUPT 1

/* One queue's rings, translated once per process() call. */
struct rings {
    uint16_t *avail; /* flags, idx, ring[size], used_event */
    uint8_t *used;   /* flags, idx, ring[size] of {id, len}, avail_event */
};

/* The walker's errors, worded as vmmkit/virtio/chain.py's _NATIVE_MESSAGES. */
static inline const char *walk_message(int rc)
{
    static const char *const messages[] = {
        "?",
        "a head or next index is beyond its table",
        "the chain is longer than its table (a loop)",
        "a buffer is not in guest RAM",
        "a readable buffer follows a writable one",
        "invalid indirect descriptor",
        "the chain is longer than 4 GiB",
        "the chain has too many segments",
        "bad queue size or descriptor table placement",
    };
    return rc > 0 && rc < 9 ? messages[rc] : "unknown walker error";
}

static inline uint16_t load16(const void *p)
{
    return le16toh(__atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED));
}

static inline void store16(void *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, htole16(v), __ATOMIC_RELAXED);
}

static inline void fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Add {head, len} to the used ring of a queue of `size` entries and publish it (the element
 * before the index); *next_used is the device's used index. */
static inline void push_used(uint8_t *used, uint32_t size, uint16_t *next_used, uint16_t head,
                             uint32_t len)
{
    uint8_t *elem = used + 4 + 8 * (uint64_t)(*next_used % size);
    uint32_t le_id = htole32(head), le_len = htole32(len);
    memcpy(elem, &le_id, 4);
    memcpy(elem + 4, &le_len, 4);
    fence(); /* the element before the index that publishes it */
    (*next_used)++;
    store16(used + 2, *next_used);
}

/* Whether the used index moving from `old` to `now` passed the driver's used_event
 * (vring_need_event() of virtio 1.2, 2.7.7.2). */
static inline int need_event(uint16_t used_event, uint16_t now, uint16_t old)
{
    return (uint16_t)(now - used_event - 1) < (uint16_t)(now - old);
}

#endif
