/* The split-virtqueue chain walker; see vq_walk.h. Keep it small and boring. */
#include "vq_walk.h"

#include <endian.h>
#include <string.h>

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* The region holding gpa, or NULL. */
static const struct vq_region *find_region(const struct vq_memory *mem, uint64_t gpa)
{
    uint32_t lo = 0, hi = mem->count;

    /* lo = the number of regions that start at or below gpa */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (mem->regions[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    const struct vq_region *r = &mem->regions[lo - 1];
    return gpa - r->gpa < r->size ? r : NULL;
}

uint8_t *vq_translate(const struct vq_memory *mem, uint64_t gpa, uint64_t len)
{
    const struct vq_region *r = find_region(mem, gpa);
    if (r == NULL || len > r->size - (gpa - r->gpa))
        return NULL;
    return r->host + (gpa - r->gpa);
}

/* Copy descriptor `index` out of guest memory once; only the copy is used afterwards. */
static void read_desc(const uint8_t *table, uint32_t index, struct desc *d)
{
    uint8_t raw[16];

    memcpy(raw, table + (uint64_t)index * 16, sizeof raw);
    __asm__ __volatile__("" ::: "memory"); /* the guest may rewrite it: never read it twice */
    memcpy(&d->addr, raw, 8);
    memcpy(&d->len, raw + 8, 4);
    memcpy(&d->flags, raw + 12, 2);
    memcpy(&d->next, raw + 14, 2);
    d->addr = le64toh(d->addr);
    d->len = le32toh(d->len);
    d->flags = le16toh(d->flags);
    d->next = le16toh(d->next);
}

/* Append [gpa, gpa + len) as one iovec per guest memory region it covers. */
static int add_buffer(const struct vq_memory *mem, uint64_t gpa, uint64_t len, int writable,
                      struct iovec *iov, uint64_t *gpas, uint32_t capacity,
                      struct vq_chain *out)
{
    while (len > 0) {
        const struct vq_region *r = find_region(mem, gpa);
        if (r == NULL || (writable && r->readonly))
            return VQ_ERR_ADDRESS;
        uint64_t offset = gpa - r->gpa;
        uint64_t piece = r->size - offset; /* > 0: gpa is inside r */
        if (piece > len)
            piece = len;
        if (out->count >= capacity)
            return VQ_ERR_TOO_MANY;
        iov[out->count].iov_base = r->host + offset;
        iov[out->count].iov_len = piece;
        gpas[out->count] = gpa;
        out->count++;
        if (writable) {
            out->writable_bytes += piece;
        } else {
            out->readable++;
            out->readable_bytes += piece;
        }
        gpa += piece; /* <= r->gpa + r->size: no wrap for a valid region table */
        len -= piece;
    }
    return VQ_OK;
}

int vq_walk_chain(const struct vq_memory *mem, uint64_t desc_gpa, uint32_t queue_size,
                  uint32_t head, uint32_t flags, struct iovec *iov, uint64_t *gpas,
                  uint32_t capacity, struct vq_chain *out)
{
    memset(out, 0, sizeof *out);
    if (queue_size == 0 || queue_size > VQ_MAX_QUEUE_SIZE || (queue_size & (queue_size - 1)))
        return VQ_ERR_RING;
    const uint8_t *table = vq_translate(mem, desc_gpa, (uint64_t)queue_size * 16);
    if (table == NULL)
        return VQ_ERR_RING;
    if (head >= queue_size)
        return VQ_ERR_INDEX;

    uint32_t table_len = queue_size, index = head, visited = 0;
    int indirect = 0, writable_seen = 0;
    uint64_t total = 0; /* at most (32768 + 65535) * (2^32 - 1): cannot wrap */

    for (;;) {
        struct desc d;

        if (++visited > table_len)
            return VQ_ERR_LOOP;
        read_desc(table, index, &d);
        out->descriptors++;

        if (d.flags & VQ_DESC_F_INDIRECT) {
            /* Zero or more direct descriptors, then at most one table, which ends the
             * chain; its own WRITE flag is ignored (virtio 1.2, 2.7.5.3.2). */
            if (indirect || !(flags & VQ_WALK_INDIRECT) || (d.flags & VQ_DESC_F_NEXT) ||
                d.len == 0 || d.len % 16 != 0 || d.len / 16 > VQ_MAX_INDIRECT)
                return VQ_ERR_INDIRECT;
            table = vq_translate(mem, d.addr, d.len);
            if (table == NULL)
                return VQ_ERR_INDIRECT;
            table_len = d.len / 16;
            index = 0;
            visited = 0;
            indirect = 1;
            continue;
        }

        int writable = (d.flags & VQ_DESC_F_WRITE) != 0;
        if (!writable && writable_seen)
            return VQ_ERR_ORDER;
        writable_seen |= writable;
        total += d.len;
        if (total > VQ_MAX_CHAIN_BYTES)
            return VQ_ERR_TOO_LARGE;
        int rc = add_buffer(mem, d.addr, d.len, writable, iov, gpas, capacity, out);
        if (rc != VQ_OK)
            return rc;

        if (!(d.flags & VQ_DESC_F_NEXT))
            return VQ_OK;
        index = d.next;
        if (index >= table_len)
            return VQ_ERR_INDEX;
    }
}

void vq_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
