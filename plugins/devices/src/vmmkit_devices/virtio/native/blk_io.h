/*
 * blk_io: the virtio-blk data path, straight between guest memory and the image file.
 *
 * The caller (vmmkit_devices/virtio/blk_io.py) has already walked and validated the
 * descriptor chain and parsed the request header; this code trusts none of it. Every iovec is
 * checked again against the guest memory region table: its guest-physical range must lie in one
 * region (a writable one when the device writes into the guest) and its host address must be
 * that region's translation. skip/length are checked against the iovecs, offset/length against
 * the disk's size and the 512-byte sector size, with overflow-safe arithmetic, all before any
 * system call. The Python functions in blk_io.py are the reference this code is tested
 * against (tests/unit/devices/virtio/test_blk_differential.py); change both together.
 */
#ifndef VMMKIT_BLK_IO_H
#define VMMKIT_BLK_IO_H

#include <stdint.h>
#include <sys/uio.h>

/* Results. BLK_ERR_IO carries the errno in blk_result.error; the others are refusals made
 * before any I/O was attempted. */
#define BLK_OK 0
#define BLK_ERR_RANGE 1    /* offset/length not sector multiples, or beyond the disk */
#define BLK_ERR_IOVEC 2    /* an iovec outside guest RAM (or into read-only RAM) */
#define BLK_ERR_TOO_MANY 3 /* more than BLK_MAX_IOV iovecs */
#define BLK_ERR_READONLY 4 /* a write, discard or write-zeroes on a read-only disk */
#define BLK_ERR_ARGS 5     /* skip + length beyond the iovecs, or a bad descriptor */
#define BLK_ERR_IO 6       /* the host refused: blk_result.error is the errno */

#define BLK_SECTOR_SIZE 512
#define BLK_MAX_IOV 1024 /* Linux's IOV_MAX, the SDK's default max_segments */

/* One guest RAM region: guest-physical [gpa, gpa + size) is mapped at [host, host + size). */
struct blk_region {
    uint64_t gpa;
    uint8_t *host;
    uint64_t size;
    uint32_t readonly;
};

struct blk_memory {
    const struct blk_region *regions;
    uint32_t count;
};

/* An open image. direct_fd (O_DIRECT, or -1) is used when the transfer meets its alignment;
 * fd (buffered) otherwise, and for discard, write-zeroes and flush. size is in bytes, a
 * multiple of 512. */
struct blk_disk {
    int fd;
    int direct_fd;
    uint32_t mem_align;    /* O_DIRECT: iovec base (and length) alignment */
    uint32_t offset_align; /* O_DIRECT: file offset and length alignment */
    uint64_t size;
    uint32_t readonly;
};

struct blk_result {
    uint64_t bytes;         /* bytes moved (transfer), or zeroed/discarded */
    int32_t error;          /* errno for BLK_ERR_IO */
    uint32_t direct;        /* 1: the transfer went through direct_fd */
    uint32_t fallback;      /* 1: an unaligned transfer (or an EINVAL from O_DIRECT) used fd */
    uint32_t einval;        /* 1: O_DIRECT refused the alignment: raise it */
    uint32_t emulated;      /* 1: discard skipped / write-zeroes written as zeros */
};

/*
 * Move `length` bytes between the file at byte `offset` and guest memory described by
 * iov[0 .. count), after skipping `skip` bytes of it. gpa[i] is the guest-physical address of
 * iov[i]: each piece must lie inside one region (a writable one if write == 0) and its host
 * address must be that region's translation of its gpa. write != 0: guest -> file (pwritev);
 * else file -> guest (preadv; a read past the end of a file shorter than `size` reads zeros).
 */
int blk_transfer(const struct blk_disk *disk, const struct blk_memory *mem, int write,
                 uint64_t offset, const struct iovec *iov, const uint64_t *gpa, uint32_t count,
                 uint64_t skip, uint64_t length, struct blk_result *out);

/* Deallocate [offset, offset + length) (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE); where the file
 * system cannot, succeed without doing anything (emulated = 1): discard is advisory. */
int blk_discard(const struct blk_disk *disk, uint64_t offset, uint64_t length,
                struct blk_result *out);

/* Make [offset, offset + length) read as zeros: PUNCH_HOLE when unmap, else ZERO_RANGE (both
 * KEEP_SIZE), falling back to ZERO_RANGE and then to writing zeros (emulated = 1). */
int blk_write_zeroes(const struct blk_disk *disk, uint64_t offset, uint64_t length, int unmap,
                     struct blk_result *out);

/* fdatasync() the image. */
int blk_flush(const struct blk_disk *disk, struct blk_result *out);

#endif
