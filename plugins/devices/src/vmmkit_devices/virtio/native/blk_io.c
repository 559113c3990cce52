/*
 * blk_io: see blk_io.h. Small and boring on purpose: check everything, then preadv/pwritev.
 */
#define _GNU_SOURCE
#include "blk_io.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>
#include <unistd.h>

#define ZERO_CHUNK (64 * 1024)

static const uint8_t zeros[ZERO_CHUNK];

static void clear(struct blk_result *out)
{
    memset(out, 0, sizeof(*out));
}

/* Whether guest [gpa, gpa + len) lies inside one region (a writable one if into_guest) and is
 * mapped at host address base. */
static int in_guest(const struct blk_memory *mem, uint64_t gpa, uintptr_t base, uint64_t len,
                    int into_guest)
{
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct blk_region *r = &mem->regions[i];
        if (gpa < r->gpa)
            continue;
        uint64_t offset = gpa - r->gpa;
        if (offset >= r->size)
            continue;
        if (len > r->size - offset)
            return 0; /* runs past the region: regions are never merged */
        if (base != (uintptr_t)r->host + (uintptr_t)offset)
            return 0; /* the host address is not this gpa's */
        return !(into_guest && r->readonly);
    }
    return 0;
}

/* offset and length: sector multiples, inside the disk. */
static int range_ok(const struct blk_disk *disk, uint64_t offset, uint64_t length)
{
    if (offset % BLK_SECTOR_SIZE || length % BLK_SECTOR_SIZE)
        return 0;
    return offset <= disk->size && length <= disk->size - offset;
}

/*
 * Copy the iovecs after `skip` bytes, `length` bytes of them, into local[], dropping empty
 * pieces; check each against guest memory. Returns BLK_OK and the count in *n.
 */
static int slice(const struct blk_memory *mem, const struct iovec *iov, const uint64_t *gpa,
                 uint32_t count, uint64_t skip, uint64_t length, int into_guest, struct iovec *local,
                 uint32_t *n)
{
    uint64_t total = 0;
    if (count > BLK_MAX_IOV)
        return BLK_ERR_TOO_MANY;
    if (count && (!iov || !gpa))
        return BLK_ERR_ARGS;
    for (uint32_t i = 0; i < count; i++) {
        if ((uint64_t)iov[i].iov_len > UINT64_MAX - total)
            return BLK_ERR_ARGS;
        total += iov[i].iov_len;
    }
    if (length > total || skip > total - length)
        return BLK_ERR_ARGS;
    *n = 0;
    for (uint32_t i = 0; i < count && length; i++) {
        uint64_t len = iov[i].iov_len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        uintptr_t base = (uintptr_t)iov[i].iov_base + (uintptr_t)skip;
        uint64_t where = gpa[i] + skip;
        if (where < gpa[i])
            return BLK_ERR_IOVEC; /* wraps around the address space */
        len -= skip;
        skip = 0;
        if (len > length)
            len = length;
        if (!in_guest(mem, where, base, len, into_guest))
            return BLK_ERR_IOVEC;
        local[*n].iov_base = (void *)base;
        local[*n].iov_len = (size_t)len;
        (*n)++;
        length -= len;
    }
    return length ? BLK_ERR_ARGS : BLK_OK;
}

static int direct_aligned(const struct blk_disk *disk, uint64_t offset, uint64_t length,
                          const struct iovec *v, uint32_t n)
{
    uint64_t mem = disk->mem_align ? disk->mem_align : 1;
    uint64_t off = disk->offset_align ? disk->offset_align : 1;
    if (disk->direct_fd < 0 || offset % off || length % off)
        return 0;
    for (uint32_t i = 0; i < n; i++) {
        if ((uintptr_t)v[i].iov_base % mem || v[i].iov_len % mem || v[i].iov_len % off)
            return 0;
    }
    return 1;
}

/* Drop `done` bytes from the front of v[0 .. *n). */
static struct iovec *advance(struct iovec *v, uint32_t *n, uint64_t done)
{
    while (*n && done >= v->iov_len) {
        done -= v->iov_len;
        v++;
        (*n)--;
    }
    if (*n && done) {
        v->iov_base = (uint8_t *)v->iov_base + done;
        v->iov_len -= (size_t)done;
    }
    return v;
}

int blk_transfer(const struct blk_disk *disk, const struct blk_memory *mem, int write,
                 uint64_t offset, const struct iovec *iov, const uint64_t *gpa, uint32_t count,
                 uint64_t skip, uint64_t length, struct blk_result *out)
{
    struct iovec local[BLK_MAX_IOV];
    uint32_t n = 0;
    int rc;

    clear(out);
    if (!disk || !mem || disk->fd < 0)
        return BLK_ERR_ARGS;
    if (write && disk->readonly)
        return BLK_ERR_READONLY;
    if (!range_ok(disk, offset, length))
        return BLK_ERR_RANGE;
    rc = slice(mem, iov, gpa, count, skip, length, !write, local, &n);
    if (rc != BLK_OK)
        return rc;

    int direct = direct_aligned(disk, offset, length, local, n);
    int fd = direct ? disk->direct_fd : disk->fd;
    out->direct = (uint32_t)direct;
    out->fallback = (uint32_t)(disk->direct_fd >= 0 && !direct);
    struct iovec *v = local;
    uint64_t pos = offset;
    while (n) {
        int batch = n > BLK_MAX_IOV ? BLK_MAX_IOV : (int)n;
        ssize_t r = write ? pwritev(fd, v, batch, (off_t)pos) : preadv(fd, v, batch, (off_t)pos);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EINVAL && fd == disk->direct_fd && fd != disk->fd) {
                /* O_DIRECT wants more alignment than we were told: buffered from here on. */
                fd = disk->fd;
                out->einval = 1;
                out->fallback = 1;
                continue;
            }
            out->error = errno;
            return BLK_ERR_IO;
        }
        if (r == 0) {
            if (write) {
                out->error = EIO;
                return BLK_ERR_IO;
            }
            /* The file shrank under us: what is past its end reads as zeros. */
            for (uint32_t i = 0; i < n; i++)
                memset(v[i].iov_base, 0, v[i].iov_len);
            out->bytes += length - (pos - offset);
            return BLK_OK;
        }
        if ((uint64_t)r > length - (pos - offset)) {
            out->error = EIO; /* the kernel moved more than asked: never trust it further */
            return BLK_ERR_IO;
        }
        pos += (uint64_t)r;
        out->bytes += (uint64_t)r;
        v = advance(v, &n, (uint64_t)r);
    }
    return BLK_OK;
}

static int write_zeros(int fd, uint64_t offset, uint64_t length, struct blk_result *out)
{
    while (length) {
        size_t chunk = length > ZERO_CHUNK ? ZERO_CHUNK : (size_t)length;
        ssize_t r = pwrite(fd, zeros, chunk, (off_t)offset);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            out->error = errno;
            return BLK_ERR_IO;
        }
        if (r == 0) {
            out->error = EIO;
            return BLK_ERR_IO;
        }
        offset += (uint64_t)r;
        length -= (uint64_t)r;
        out->bytes += (uint64_t)r;
    }
    return BLK_OK;
}

static int unsupported(int error)
{
    return error == EOPNOTSUPP || error == ENOSYS || error == ENOTTY || error == ENODEV;
}

static int punch(const struct blk_disk *disk, int mode, uint64_t offset, uint64_t length)
{
    int r;
    do {
        r = fallocate(disk->fd, mode, (off_t)offset, (off_t)length);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? errno : 0;
}

int blk_discard(const struct blk_disk *disk, uint64_t offset, uint64_t length,
                struct blk_result *out)
{
    clear(out);
    if (!disk || disk->fd < 0)
        return BLK_ERR_ARGS;
    if (disk->readonly)
        return BLK_ERR_READONLY;
    if (!range_ok(disk, offset, length))
        return BLK_ERR_RANGE;
    if (!length)
        return BLK_OK;
    int error = punch(disk, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    if (error && unsupported(error)) {
        out->emulated = 1;
        return BLK_OK;
    }
    if (error) {
        out->error = error;
        return BLK_ERR_IO;
    }
    out->bytes = length;
    return BLK_OK;
}

int blk_write_zeroes(const struct blk_disk *disk, uint64_t offset, uint64_t length, int unmap,
                     struct blk_result *out)
{
    clear(out);
    if (!disk || disk->fd < 0)
        return BLK_ERR_ARGS;
    if (disk->readonly)
        return BLK_ERR_READONLY;
    if (!range_ok(disk, offset, length))
        return BLK_ERR_RANGE;
    if (!length)
        return BLK_OK;
    int error = EOPNOTSUPP;
    if (unmap)
        error = punch(disk, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    if (error && unsupported(error))
        error = punch(disk, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
    if (error && unsupported(error)) {
        out->emulated = 1;
        return write_zeros(disk->fd, offset, length, out);
    }
    if (error) {
        out->error = error;
        return BLK_ERR_IO;
    }
    out->bytes = length;
    return BLK_OK;
}

int blk_flush(const struct blk_disk *disk, struct blk_result *out)
{
    clear(out);
    if (!disk || disk->fd < 0)
        return BLK_ERR_ARGS;
    int r;
    do {
        r = fdatasync(disk->fd);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        out->error = errno;
        return BLK_ERR_IO;
    }
    return BLK_OK;
}
