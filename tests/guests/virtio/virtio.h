/*
 * A small virtio 1.x driver core: device status handshake, feature
 * negotiation and split virtqueues, polled (no interrupts are used: every
 * queue is set up with VIRTQ_AVAIL_F_NO_INTERRUPT, MSI-X vectors stay
 * VIRTIO_MSI_NO_VECTOR and PCI INTx is disabled in the command register).
 *
 * Transports (virtio-mmio v2, virtio-pci modern) fill in a struct
 * virtio_dev and register it; the architecture discovers them
 * (arch_virtio_discover). Architecture-neutral; needs "arch_io.h".
 */
#ifndef VIRTIO_VIRTIO_H
#define VIRTIO_VIRTIO_H

#include "types.h"

/* Device types (virtio 1.2, 5) */
#define VIRTIO_ID_NET		1
#define VIRTIO_ID_BLOCK		2
#define VIRTIO_ID_CONSOLE	3
#define VIRTIO_ID_RNG		4

/* Device status bits */
#define VIRTIO_S_ACKNOWLEDGE	1
#define VIRTIO_S_DRIVER		2
#define VIRTIO_S_DRIVER_OK	4
#define VIRTIO_S_FEATURES_OK	8
#define VIRTIO_S_NEEDS_RESET	64
#define VIRTIO_S_FAILED		128

/* Transport-independent feature bits we know */
#define VIRTIO_F_VERSION_1	(1ull << 32)
#define VIRTIO_F_ACCESS_PLATFORM (1ull << 33)

/* Split virtqueue (virtio 1.2, 2.7) */
#define VIRTQ_DESC_F_NEXT	1
#define VIRTQ_DESC_F_WRITE	2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_MAX_SIZE		16	/* we use at most this many descriptors */

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags, next;
};

struct virtq_avail {
	u16 flags, idx;
	u16 ring[];
};

struct virtq_used_elem {
	u32 id, len;
};

struct virtq_used {
	u16 flags, idx;
	struct virtq_used_elem ring[];
};

struct virtio_dev;

struct virtq {
	struct virtio_dev *dev;
	u16 index, size;		/* size: 0 = not set up */
	u16 free_head, num_free, last_used, avail_idx;
	struct virtq_desc *desc;
	struct virtq_avail *avail;
	struct virtq_used *used;
	void *page;			/* the ring memory (one page) */
	u64 notify;			/* transport: notification address */
};

/* One buffer of a descriptor chain. */
struct vbuf {
	void *addr;
	u32 len;
	bool device_writes;		/* VIRTQ_DESC_F_WRITE */
};

struct virtio_transport {
	const char *name;		/* "mmio", "pci" */
	void (*set_status)(struct virtio_dev *d, u8 status);
	u8 (*get_status)(struct virtio_dev *d);
	u32 (*get_features)(struct virtio_dev *d, unsigned word);
	void (*set_features)(struct virtio_dev *d, unsigned word, u32 value);
	/* Device-specific configuration (size 1, 2 or 4). */
	u32 (*config_read)(struct virtio_dev *d, unsigned offset, unsigned size);
	u32 (*config_generation)(struct virtio_dev *d);
	/* Largest size of queue `index`; 0 if it does not exist or is in use. */
	unsigned (*queue_max)(struct virtio_dev *d, unsigned index);
	/* Tell the device about q (size, ring addresses) and enable it. */
	const char *(*queue_enable)(struct virtio_dev *d, struct virtq *q);
	void (*notify)(struct virtio_dev *d, struct virtq *q);
};

#define VIRTIO_MAX_QUEUES	2

struct virtio_dev {
	const struct virtio_transport *transport;
	u32 type;			/* VIRTIO_ID_* */
	char where[40];			/* "mmio 0xd0000000 irq 5", "pci 00:03.0" */
	/* virtio-mmio */
	u64 base;
	/* virtio-pci: the structures located through the capabilities */
	u64 common, notify_base, isr, device_cfg;
	u32 notify_mult, device_cfg_len;
	/* the driver's state */
	u64 features;			/* negotiated */
	struct virtq vq[VIRTIO_MAX_QUEUES];
	unsigned nr_vqs;
	char error[96];
};

/* Type name: "net", "blk", "console", "rng", or "type <n>". */
const char *virtio_type_name(u32 type);

/* Transports and the architecture's discovery call this for each device. */
struct virtio_dev *virtio_register(const struct virtio_transport *t, u32 type,
				   const char *where);

/*
 * Discover every device once (prints "info virtio: ..." lines), then return
 * the n-th (0-based) device of this type, or NULL.
 */
struct virtio_dev *virtio_find(u32 type, unsigned n);
unsigned virtio_count(void);
struct virtio_dev *virtio_device(unsigned i);

/*
 * Reset the device, negotiate VIRTIO_F_VERSION_1 (required) plus whatever
 * of `wanted` (device-specific bits this driver implements) the device
 * offers, set up queues 0..nr_vqs-1 and set DRIVER_OK. Returns NULL, or an
 * error message (the device is then left with FAILED set).
 */
const char *virtio_start(struct virtio_dev *d, u64 wanted, unsigned nr_vqs);
void virtio_reset(struct virtio_dev *d);

/* Device configuration, read consistently (config generation). */
u8 virtio_config8(struct virtio_dev *d, unsigned offset);
u16 virtio_config16(struct virtio_dev *d, unsigned offset);
u32 virtio_config32(struct virtio_dev *d, unsigned offset);
u64 virtio_config64(struct virtio_dev *d, unsigned offset);
void virtio_config_bytes(struct virtio_dev *d, unsigned offset, u8 *buf, unsigned n);

/* Queue a chain of n buffers (readable ones first); returns its head or -1. */
int virtq_add(struct virtq *q, const struct vbuf *bufs, unsigned n);
/* Notify the device of new buffers. */
void virtq_kick(struct virtq *q);
/* Take one used chain: its head (descriptors freed) and *len, or -1. */
int virtq_get_used(struct virtq *q, u32 *len);
/*
 * Wait (bounded, polling) until the chain `head` is used; other chains
 * completing meanwhile are dropped. Returns true and *len, or false.
 */
bool virtq_wait(struct virtq *q, int head, u32 *len, unsigned seconds);
/* virtq_add + virtq_kick + virtq_wait; NULL or an error message. */
const char *virtq_transfer(struct virtq *q, const struct vbuf *bufs, unsigned n,
			   u32 *len, unsigned seconds);

/*
 * From the architecture: find the devices (virtio-mmio command line
 * entries, PCI bus scan, ...) and virtio_register() them.
 */
void arch_virtio_discover(void);

/* Memory that devices read and write: page-aligned, not zeroed. */
void *dma_alloc(size_t size, size_t align);

#endif
